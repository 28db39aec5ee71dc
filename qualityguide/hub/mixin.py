"""The hub side of every saved model: ``huggingface_hub.ModelHubMixin`` over qualityguide's own file layouts.

:class:`HubModel` gives a class ``push_to_hub`` (the mixin's: ``create_repo`` then one ``upload_folder`` of what
``save_pretrained`` writes), ``from_pretrained`` with ``revision=``, ``cache_dir=``, ``token=``,
``local_files_only=``, ``force_download=`` and ``subfolder=``, and a model card (:mod:`qualityguide.hub.cards`) in every
saved folder. The class keeps its own files: ``_save_pretrained`` writes them (atomically), ``_from_pretrained``
reads them with its checked readers.

``from_pretrained`` is the one part of the mixin replaced: the mixin reads ``config.json`` and spreads its keys
into the constructor's arguments, but these folders' ``config.json`` files have their own layouts (an adapter's
``{"format", "config"}``, a head's ``{"head", "lgdm", ...}``) and are read by readers that check every field and
every weight shape before a module is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from huggingface_hub import ModelHubMixin

from ..errors import InputError
from .cards import LICENSE, LIBRARY_NAME, build_model_card, write_model_card


class HubModel(ModelHubMixin, library_name=LIBRARY_NAME, license=LICENSE, tags=[LIBRARY_NAME]):
    """Mixin for a qualityguide model class (put it after ``nn.Module`` in the bases).

    A subclass sets :attr:`card_kind` and implements ``_save_pretrained(folder, ...)`` (its files),
    ``_from_pretrained(*, model_id, revision, cache_dir, force_download, local_files_only, token, subfolder,
    **kwargs)`` and, optionally, :meth:`card_defaults`; its ``save_pretrained`` calls :meth:`_finish_save` after
    writing its files.
    """

    card_kind: ClassVar[str] = ""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, force_download: bool = False,
                        token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, revision: str | None = None, subfolder: str | None = None,
                        **model_kwargs):
        """Load from a local folder or a hub id (``owner/name``); an existing local folder always wins.

        Args:
            pretrained_model_name_or_path: a folder written by ``save_pretrained`` or a hub id.
            force_download: fetch the files again even if they are cached.
            token: the hub token (None: the cached login).
            cache_dir: the hub cache folder (default: ``HF_HUB_CACHE``).
            local_files_only: only use the hub cache, never the network.
            revision: a branch, tag or commit of the hub repository.
            subfolder: a folder inside the source that holds the files.
            model_kwargs: the class's own loading options (``device=``, ...).
        """
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), revision=revision,
                                    cache_dir=cache_dir, force_download=force_download,
                                    local_files_only=local_files_only, token=token, subfolder=subfolder,
                                    **model_kwargs)

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: dict | None = None, **push_to_hub_kwargs) -> str:
        """``huggingface_hub``'s ``push_to_hub`` (save to a temporary folder, ``create_repo``, one ``upload_folder``
        commit), with the model card's loading snippets naming ``repo_id``. Returns the commit URL.

        Args:
            repo_id: the hub repository ``owner/name``.
            model_card_kwargs: arguments of :func:`qualityguide.hub.cards.write_model_card`.
            push_to_hub_kwargs: the mixin's options (``token``, ``private``, ``branch``, ``create_pr``,
                ``commit_message``, ...).
        """
        card = {"source": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card, **push_to_hub_kwargs)

    def card_defaults(self) -> dict:
        """What this object knows for its model card (``base_model``, ``settings``): overridden per class."""
        return {}

    def generate_model_card(self, *args, **kwargs):
        """The model card (:func:`~qualityguide.hub.cards.build_model_card`) from :meth:`card_defaults` and
        ``kwargs``."""
        return build_model_card(self.card_kind, **{**self.card_defaults(), **kwargs})

    def _finish_save(self, folder: Path, config, repo_id: str | None, push_to_hub: bool,
                     model_card_kwargs: dict | None, push_to_hub_kwargs: dict) -> str | None:
        """After the files: the model card, then (``push_to_hub=True``) the upload. Returns the commit URL or None.

        Args:
            folder: where the files were written.
            config: the mixin's ``config=`` (refused: the files hold the model's own config).
            repo_id: the hub repository (default: the folder's name, as the mixin does).
            push_to_hub: upload after saving.
            model_card_kwargs: arguments of :func:`qualityguide.hub.cards.write_model_card` (``base_model``,
                ``settings``, ``validation``, ...), over :meth:`card_defaults`.
            push_to_hub_kwargs: the mixin's ``push_to_hub`` options (``token``, ``private``, ``branch``, ...).
        """
        if config is not None:
            raise InputError(f"config={config!r}: a {type(self).__name__} writes its own config.json from its "
                             "settings; drop config=")
        write_model_card(folder, kind=self.card_kind, **{**self.card_defaults(), **(model_card_kwargs or {})})
        if not push_to_hub:
            return None
        return self.push_to_hub(repo_id or folder.name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
