"""Extract LGDM hyperfeatures of many images into a :class:`FeatureCache`: batched, resumable, sharded.

Under ``accelerate launch`` every process takes a contiguous share of the missing images (accelerate's
``split_between_processes``) and writes its own shards; the merged cache equals a single-process run because each image's features depend only
on the image (the noise probe is fixed by the config's seed).
"""

from __future__ import annotations

import os
from collections import defaultdict
from contextlib import nullcontext
from typing import Sequence

import torch

from ..errors import InputError, QualityGuideError
from ..identity import IDENTITY_FILE
from ..images import load_image
from ..pipelines import parse_dtype
from ..runtime import process_state, split_for_process
from .cache import FeatureCache, file_hash
from .model import LGDM

AUTOCAST = ("fp16", "bf16")


def cache_manifest(lgdm: LGDM, autocast: str | None = None) -> dict:
    """What a cache built by ``lgdm`` records: the feature key and everything it was hashed from."""
    return {"feature_key": lgdm.feature_key(autocast), "model_key": lgdm.model_key(), "config": lgdm.config.to_dict(),
            "backbone": lgdm.backbone_identity(), "weights_identity": IDENTITY_FILE,
            "backbone_spec": lgdm.backbone_spec, "precision": lgdm.precision(autocast), "layout": lgdm.layout()}


def autocast_context(device: torch.device, autocast: str | None):
    if autocast is None:
        return nullcontext()
    if autocast not in AUTOCAST:
        raise InputError(f"autocast={autocast!r} is not allowed; use one of {', '.join(AUTOCAST)} or None (fp32)")
    return torch.autocast(device.type, dtype=parse_dtype(autocast))


def extract_to_cache(lgdm: LGDM, paths: Sequence[str | os.PathLike], cache_dir: str | os.PathLike,
                     batch_size: int = 8, autocast: str | None = None, progress: bool = True) -> dict:
    """Extract features for every image in ``paths`` that the cache does not hold yet.

    Args:
        lgdm: the extractor (on its device).
        paths: image files; duplicates (same bytes) are extracted once.
        cache_dir: the cache folder (created; an existing one must have the same feature key).
        batch_size: images per U-Net batch (and per shard written).
        autocast: ``"fp16"``/``"bf16"`` mixed precision, or None.
        progress: show a tqdm bar (main process only).

    Returns:
        ``{"images", "cached_before", "extracted", "failed", "failures", "cached_now", "process_index",
        "num_processes"}`` (``extracted``/``failed``/``failures`` are this process's work, ``failures`` a list of
        ``{"path", "error", "log"}`` with the failure log that records it; ``cached_now`` all processes').
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    device = next(lgdm.unet.parameters()).device
    state = process_state(cpu=device.type == "cpu")
    manifest = cache_manifest(lgdm, autocast)
    if state.is_main_process:
        cache = FeatureCache(cache_dir, manifest, create=True, weights=lgdm.backbone_modules())
    state.wait_for_everyone()
    if not state.is_main_process:
        cache = FeatureCache(cache_dir, manifest, weights=lgdm.backbone_modules())
    keys: dict[str, str] = {}
    for path in paths:
        try:
            keys.setdefault(file_hash(path), str(path))
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc}") from None
    done = cache.done_keys()
    state.wait_for_everyone()  # every process has read the same state before anyone writes
    todo = [k for k in keys if k not in done]
    mine = split_for_process(state, todo)
    extracted = 0
    failures: list[dict] = []

    def fail(key: str, error: str) -> None:
        cache.record_failure(keys[key], key, error, state.process_index)
        failures.append({"path": keys[key], "error": error, "log": str(cache.failure_log(state.process_index))})

    bar = tqdm(total=len(mine), desc=f"LGDM features (process {state.process_index})", unit="img",
               disable=not progress or not state.is_main_process)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        groups: dict[tuple, list[tuple[str, torch.Tensor]]] = defaultdict(list)
        for key in chunk:
            try:
                image = lgdm.prepare(load_image(keys[key])[None])
            except QualityGuideError as exc:
                fail(key, str(exc))
                continue
            groups[tuple(image.shape)].append((key, image))
        done_keys, rows = [], []
        for members in groups.values():
            batch = torch.cat([image for _, image in members]).to(device)
            with torch.no_grad(), autocast_context(device, autocast):
                feats = lgdm.extract(batch).float().cpu()
            finite = torch.isfinite(feats.flatten(1)).all(1)
            for (key, _), ok in zip(members, finite.tolist()):
                if not ok:  # never cache NaN/inf: it would poison every head trained on the cache
                    fail(key, "non-finite features (fp16 overflow?); rerun with --dtype bf16/fp32 or without "
                         "--autocast fp16")
            rows.append(feats[finite])
            done_keys += [key for (key, _), ok in zip(members, finite.tolist()) if ok]
        if done_keys:
            cache.write(done_keys, torch.cat(rows), rank=state.process_index)
            extracted += len(done_keys)
        bar.update(len(chunk))
    bar.close()
    state.wait_for_everyone()
    cached = len(cache.done_keys() & set(keys))  # all processes' shards, after the barrier
    return {"images": len(keys), "cached_before": len(done & set(keys)), "extracted": extracted,
            "failed": len(failures), "failures": failures, "cached_now": cached, "process_index": state.process_index,
            "num_processes": state.num_processes}


def dataset_features(cache_dir: str | os.PathLike, dataset) -> tuple[torch.Tensor, FeatureCache]:
    """Features ``[N, steps, F]`` for every row of an IQA dataset (``datasets.Dataset`` with ``image`` paths)."""
    cache = FeatureCache(cache_dir)
    keys = [file_hash(path) for path in dataset["image"]]
    _, features = cache.load(keys)
    return features, cache
