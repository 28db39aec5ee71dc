"""What every eval does the same way: reports and slugs (:mod:`.report`), figures (:mod:`.figures`), paired gains
(:mod:`.stats`), the CLIP text-image score (:mod:`.clip`), batch scoring (:mod:`.scores`), the command-line style
(:mod:`.flags`), child processes (:mod:`.process`) and the finished pieces of a long run (:mod:`.parts`)."""
