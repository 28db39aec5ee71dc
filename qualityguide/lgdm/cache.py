"""On-disk hyperfeature cache: content-hash keys, atomic shards, resumable and shardable across processes.

Layout of a cache folder::

    manifest.json                 feature key (hash of config + backbone + autocast), config, layout
    weights_identity.safetensors  the backbone weights the features were extracted with (WeightIdentity)
    shards/<rank>-<id>.safetensors         "features" [n, steps, F]; metadata "keys": JSON list of image hashes
    failed-<rank>.jsonl           images that could not be read (path, hash, error), each recorded once

A shard is written to a temporary name and renamed, so it is either complete or absent. A shard
that cannot be read (disk full, copied half) is moved aside and its images are extracted again.
Loading de-duplicates by key, so overlapping runs never give duplicate rows.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..files import FORMATS, atomic_write, file_sha256, write_json
from ..identity import IDENTITY_FILE, WeightIdentity

MANIFEST = "manifest.json"
FORMAT = FORMATS["lgdm_cache"]


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes: the image's cache key (renaming or moving a file keeps its features)."""
    return file_sha256(path)


def check_cache_folder(root: str | os.PathLike) -> Path:
    """``root`` as a Path if it can be a cache folder (absent, or a folder); a file there is refused unchanged."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise InputError(f"--cache {root} is a file, not a folder; it was left unchanged. Pass a folder name for the "
                         "feature cache (created if absent), e.g. --cache feats/")
    return root


class FeatureCache:
    """A cache folder bound to one feature key.

    Args:
        root: the folder.
        manifest: the expected manifest (``feature_key``, ``config``, ``backbone``, ``layout``, ...). With
            ``create=True`` it is written if the folder is new; an existing folder must match it.
            None opens an existing cache for reading (``lgdm fit`` / ``evaluate``).
        weights: the backbone modules the features come from (:meth:`LGDM.backbone_modules`), with ``manifest``:
            a new cache records their :class:`~qualityguide.identity.WeightIdentity`; an existing one refuses other
            weights (beyond half-precision rounding), naming the parameters that differ.
    """

    def __init__(self, root: str | os.PathLike, manifest: dict | None = None, create: bool = False,
                 weights: Mapping[str, nn.Module] | None = None):
        self.root = check_cache_folder(root)
        self.shards = self.root / "shards"
        self._recorded: set[str] | None = None  # failure records already on disk, read on first need
        path = self.root / MANIFEST
        if path.is_file():
            found = json.loads(path.read_text())
            if manifest is not None and found.get("feature_key") != manifest["feature_key"]:
                raise InputError(manifest_mismatch(self.root, found, manifest))
            if manifest is not None and weights is not None:
                if not (self.root / IDENTITY_FILE).is_file():
                    raise InputError(f"feature cache {self.root} has no {IDENTITY_FILE} (written by an older "
                                     "qualityguide, or without weights=), so the backbone weights its features came "
                                     "from cannot be checked. Fix: extract into a new --cache folder")
                WeightIdentity.load(self.root / IDENTITY_FILE).check(
                    weights, f"feature cache {self.root} was extracted with other backbone weights",
                    "use a new --cache folder for these weights, or load the backbone the cache was built with "
                    f"({found.get('backbone_spec')})")
            self.manifest = found
        elif manifest is None:
            raise InputError(f"{self.root} is not a feature cache (no {MANIFEST}); create one with "
                             "`qualityguide lgdm extract --cache DIR ...`")
        elif create:
            self.shards.mkdir(parents=True, exist_ok=True)
            if weights is not None:  # before the manifest: a cache with a manifest always has its identity
                WeightIdentity.of(weights).save(self.root / IDENTITY_FILE)
            payload = {"format": FORMAT, **manifest}
            write_json(path, payload, default=str)
            self.manifest = payload
        else:
            raise InputError(f"{self.root} has no {MANIFEST} yet (the main process writes it)")

    @property
    def layout(self) -> dict:
        return self.manifest["layout"]

    def weights_identity(self) -> WeightIdentity | None:
        """The backbone weights' identity recorded at creation (None for caches written before it existed)."""
        path = self.root / IDENTITY_FILE
        return WeightIdentity.load(path) if path.is_file() else None

    def _shard_files(self) -> list[Path]:
        return sorted(self.shards.glob("*.safetensors")) if self.shards.is_dir() else []

    def _read_keys(self, path: Path) -> list[str] | None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = json.loads(handle.metadata()["keys"])
                rows = handle.get_slice("features").get_shape()[0]
            if len(keys) != rows:
                raise ValueError(f"{len(keys)} keys for {rows} rows")
            return keys
        except Exception as exc:  # a damaged shard: set it aside, its images get extracted again
            aside = path.with_suffix(".corrupt")
            warnings.warn(f"feature cache: unreadable shard {path.name} ({exc}); moved to {aside.name}, its images "
                          "will be extracted again", RuntimeWarning, stacklevel=3)
            try:
                os.replace(path, aside)
            except OSError:
                pass
            return None

    def done_keys(self) -> set[str]:
        """Keys with features on disk (reading shard headers only)."""
        done: set[str] = set()
        for path in self._shard_files():
            keys = self._read_keys(path)
            if keys:
                done.update(keys)
        return done

    def write(self, keys: list[str], features: torch.Tensor, rank: int = 0) -> Path:
        """Atomically add a shard of ``features [len(keys), steps, F]``."""
        from safetensors.torch import save_file

        if features.shape[0] != len(keys):
            raise ValueError(f"{features.shape[0]} feature rows for {len(keys)} keys")
        expected = (self.layout["num_steps"], sum(self.layout["layer_dims"]))
        if tuple(features.shape[1:]) != expected:
            raise ValueError(f"features {tuple(features.shape)} do not match the cache layout [n, {expected[0]}, "
                             f"{expected[1]}]")
        self.shards.mkdir(parents=True, exist_ok=True)
        name = f"{rank:03d}-{uuid.uuid4().hex}"
        tensors = {"features": features.detach().float().cpu().contiguous()}
        final = atomic_write(self.shards / f"{name}.safetensors",
                             lambda tmp: save_file(tensors, str(tmp), metadata={"keys": json.dumps(keys)}))
        return final

    def failure_log(self, rank: int = 0) -> Path:
        """The file process ``rank`` records failed images in."""
        return self.root / f"failed-{rank:03d}.jsonl"

    def record_failure(self, path: str, key: str | None, error: str, rank: int = 0) -> bool:
        """Append ``(path, key, error)`` to this process's failure log unless any log holds it already (a rerun
        that meets the same bad file adds no line); returns whether a line was written."""
        record = {"path": path, "key": key, "error": error}
        if self._recorded is None:
            self._recorded = {json.dumps(row, sort_keys=True) for row in self.failures()}
        line = json.dumps(record, sort_keys=True)
        if line in self._recorded:
            return False
        with open(self.failure_log(rank), "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self._recorded.add(line)
        return True

    def failures(self) -> list[dict]:
        rows = []
        for path in sorted(self.root.glob("failed-*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash
                    continue
        return rows

    def load(self, keys: list[str] | None = None) -> tuple[list[str], torch.Tensor]:
        """Features for ``keys`` (all cached keys if None), as ``(keys, [n, steps, F])``; raises for missing keys."""
        from safetensors import safe_open

        table: dict[str, torch.Tensor] = {}
        for path in self._shard_files():
            stored = self._read_keys(path)
            if not stored:
                continue
            with safe_open(str(path), framework="pt") as handle:
                block = handle.get_tensor("features")
            for i, key in enumerate(stored):
                table.setdefault(key, block[i])
        wanted = sorted(table) if keys is None else list(keys)
        missing = [k for k in dict.fromkeys(wanted) if k not in table]
        if missing:
            raise InputError(f"feature cache {self.root}: {len(missing)} image(s) have no features (e.g. key "
                             f"{missing[0][:12]}...). Run `qualityguide lgdm extract` on the dataset with this cache "
                             "first; images that failed to load are listed in failed-*.jsonl there")
        if not wanted:
            steps, width = self.layout["num_steps"], sum(self.layout["layer_dims"])
            return [], torch.zeros(0, steps, width)
        return wanted, torch.stack([table[k] for k in wanted])


def manifest_mismatch(root: Path, found: dict, wanted: dict) -> str:
    """The settings in which a stored manifest (``found``) differs from this run's (``wanted``), as one message
    naming the folder ``root`` (shared by the cache and the scorer that checks a head against its cache)."""
    diffs = []
    for section in ("config", "backbone"):
        a, b = found.get(section, {}), wanted.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: cache has {a.get(key)!r}, this run {b.get(key)!r}")
    if found.get("precision") != wanted.get("precision"):
        diffs.append(f"precision: cache has {found.get('precision')!r}, this run {wanted.get('precision')!r}")
    detail = "; ".join(diffs[:6]) or "feature key differs"
    return (f"feature cache {root} was extracted with another configuration ({detail}). Fix: use a new --cache "
            "folder for this configuration, or rerun with the cache's settings")
