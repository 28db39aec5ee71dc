"""The training recipes' ``--push_to_hub``, ``--hub_model_id`` and ``--hub_token`` (diffusers' flags): checked, and
the repository created, before anything trains; the output folder uploaded in one commit at the end."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

# What a recipe's push leaves out: checkpoints (optimizer state: a resumable run stays local), the caches (self
# samples and latents, rebuilt from the data) and temporary files (hidden names).
PUSH_IGNORE = ("checkpoint-*", "checkpoint-*/**", "cache/**", "latent_cache/**", ".*", "**/.*")


def add_hub_arguments(parser) -> None:
    """``--push_to_hub``, ``--hub_model_id`` and ``--hub_token``: diffusers' training scripts' flags."""
    parser.add_argument("--push_to_hub", action="store_true", help="upload OUTPUT_DIR (weights, model card, "
                        "validation images, logs; no checkpoints or caches) to the hub at the end")
    parser.add_argument("--hub_model_id", default=None, help="hub repository owner/name (default: the --output_dir "
                        "folder's name under your account); checked before training")
    parser.add_argument("--hub_token", default=None, help="hub token (default: the saved login, `hf auth login`)")


@dataclass
class RecipePush:
    """Where a recipe's output goes on the hub (built by :func:`prepare_push`, which checked it).

    Args:
        repo_id: the hub repository.
        token: the hub token (None: the saved login); never logged or written.
        ignore: ``upload_folder`` ignore patterns (:data:`PUSH_IGNORE` and the recipe's cache folder).
    """

    repo_id: str
    token: str | None = field(default=None, repr=False)
    ignore: tuple[str, ...] = PUSH_IGNORE

    def push(self, folder: str | os.PathLike, commit_message: str = "qualityguide training run") -> str | None:
        """Upload ``folder`` in one commit (main process only; other processes return None). Returns its URL."""
        from accelerate import PartialState
        from huggingface_hub import HfApi

        if not PartialState().is_main_process:
            return None
        url = HfApi(token=self.token).upload_folder(repo_id=self.repo_id, repo_type="model", folder_path=folder,
                                                    commit_message=commit_message, ignore_patterns=list(self.ignore))
        print(f"pushed {folder} to https://huggingface.co/{self.repo_id}")
        return url


def prepare_push(args) -> RecipePush | None:
    """Check the hub flags before anything trains: the repository name, and (main process) that the repository can
    be created or reached with the token, so a run does not learn at its end that it cannot push.

    Takes ``args.hub_token`` out of ``args`` (it becomes None there) so that trackers, which log the arguments,
    never see it.

    Args:
        args: the recipe's arguments (``push_to_hub``, ``hub_model_id``, ``hub_token``, ``output_dir``, and
            ``cache_dir`` if the recipe has one).

    Returns:
        The push to do at the end, or None without ``--push_to_hub``.

    Raises:
        InputError: ``--hub_model_id``/``--hub_token`` without ``--push_to_hub``, a name the hub refuses, or a
            repository that cannot be created or reached.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    token, args.hub_token = args.hub_token, None
    if not args.push_to_hub:
        if args.hub_model_id is not None or token is not None:
            raise InputError(f"--hub_model_id {args.hub_model_id} / --hub_token given without --push_to_hub: nothing "
                             "would be pushed; add --push_to_hub, or drop them")
        return None
    repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InputError(f"--hub_model_id {repo_id!r} is not a hub repository name ({str(exc).splitlines()[0]}); "
                         "pass owner/name, e.g. --hub_model_id you/acpo-lora-sd15") from None
    ignore = PUSH_IGNORE
    cache = getattr(args, "cache_dir", None)
    if cache is not None and Path(cache).resolve().is_relative_to(Path(args.output_dir).resolve()):
        inside = Path(cache).resolve().relative_to(Path(args.output_dir).resolve()).as_posix()
        ignore = (*PUSH_IGNORE, inside, f"{inside}/**")
    from accelerate import PartialState
    from huggingface_hub import HfApi

    if PartialState().is_main_process:
        try:
            repo_id = HfApi(token=token).create_repo(repo_id=repo_id, exist_ok=True).repo_id
        except (OSError, ValueError) as exc:  # HfHubHTTPError and offline mode are OSErrors
            raise InputError(f"--hub_model_id {repo_id}: the hub repository could not be created or reached "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); check the "
                             "name, the token (--hub_token or `hf auth login`) and the network, or drop "
                             "--push_to_hub") from None
    return RecipePush(repo_id, token, ignore)
