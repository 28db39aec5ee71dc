"""What every eval writes the same way: reports and slugs (:mod:`.report`), figures (:mod:`.figures`), paired
gains (:mod:`.stats`), the CLIP text-image score (:mod:`.clip`) and the command-line style (:mod:`.flags`)."""
