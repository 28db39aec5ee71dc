"""The paper's protocol on cached features: repeated content-disjoint splits and cross-dataset tests."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..evaluation.stats import content_disjoint_split, plcc, srcc, summarize
from .head import HeadConfig, TrainConfig, fit_head, predict


def _metrics(pred: np.ndarray, mos: np.ndarray) -> dict[str, float]:
    return {"srcc": srcc(pred, mos), "plcc": plcc(pred, mos, fit="logistic"), "plcc_raw": plcc(pred, mos, fit="none")}


def repeated_splits(features: torch.Tensor, mos: Sequence[float], contents: Sequence[str] | None, layout: dict,
                    repeats: int = 10, ratios: tuple[float, float, float] = (0.7, 0.1, 0.2), mixing: str = "softmax",
                    train: TrainConfig | None = None, progress: bool = False) -> dict:
    """Train a head on each of ``repeats`` content-disjoint splits (seeds 0..repeats-1); test-set SRCC/PLCC.

    Returns:
        ``{"splits": [per-split metrics], "srcc": summary, "plcc": summary}`` (summaries hold the median).
    """
    from tqdm.auto import tqdm

    mos = np.asarray(mos, dtype=np.float64)
    train = train or TrainConfig()
    rows = []
    for seed in tqdm(range(repeats), desc="splits", disable=not progress):
        tr, va, te = content_disjoint_split(contents, n=len(mos), ratios=ratios, seed=seed)
        config = HeadConfig(num_steps=layout["num_steps"], layer_dims=layout["layer_dims"], mixing=mixing)
        head, history = fit_head(features, mos, tr, va, config, TrainConfig(**{**train.__dict__, "seed": seed}))
        pred = predict(head, features[torch.as_tensor(te)])
        rows.append({"seed": seed, "n_train": len(tr), "n_val": len(va), "n_test": len(te),
                     "epochs": history["epochs"], **_metrics(pred, mos[te])})
    return {"splits": rows, "srcc": summarize(r["srcc"] for r in rows), "plcc": summarize(r["plcc"] for r in rows)}


def cross_dataset(train_features: torch.Tensor, train_mos: Sequence[float], train_contents: Sequence[str] | None,
                  test_features: torch.Tensor, test_mos: Sequence[float], layout: dict, repeats: int = 10,
                  mixing: str = "softmax", train: TrainConfig | None = None) -> dict:
    """Train on dataset A (90/10 content-disjoint train/validation, seeds 0..repeats-1), test on all of B."""
    train_mos = np.asarray(train_mos, dtype=np.float64)
    test_mos = np.asarray(test_mos, dtype=np.float64)
    train = train or TrainConfig()
    rows = []
    for seed in range(repeats):
        tr, va, _ = content_disjoint_split(train_contents, n=len(train_mos), ratios=(0.9, 0.1, 0.0), seed=seed)
        config = HeadConfig(num_steps=layout["num_steps"], layer_dims=layout["layer_dims"], mixing=mixing)
        head, history = fit_head(train_features, train_mos, tr, va, config,
                                 TrainConfig(**{**train.__dict__, "seed": seed}))
        rows.append({"seed": seed, "epochs": history["epochs"], **_metrics(predict(head, test_features), test_mos)})
    return {"splits": rows, "srcc": summarize(r["srcc"] for r in rows), "plcc": summarize(r["plcc"] for r in rows)}
