"""Validation of an IQA-Adapter during training: a grid of validation prompts (rows) x target percentiles of each
score column (columns), the same noise along a row so only the target changes, each image's measured score under it.

A score column is named by the scorer spec that labelled it (``qualityguide label``), so the same scorer measures
the generated images; a column whose scorer cannot be built here (no weights offline) is shown without measured
scores, and said so once. The mean measured score per target, and the spread between the highest and the lowest
target, are the values the run logs: an adapter that controls quality spreads them apart.
"""

from __future__ import annotations

import numbers
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, QualityGuideError
from ..scorers import load_scorer
from ..train.data import derive_seed
from ..train.validation import PREFIX, caption, labelled_grid, save_validation, score_images, too_small


@dataclass(frozen=True)
class AdapterValidationSettings:
    """What every validation of an adapter run shares.

    Args:
        prompts: the grid's prompts (``--validation_prompt``, repeatable, or a file of prompts).
        resolution: image side in pixels.
        percentiles: the targets, in [0, 1] of the training set's score distribution (one column each per score
            column; the other columns are held at the median).
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale (the adapter's quality condition follows it).
        seed: row ``r`` uses ``derive_seed("qualityguide.adapter_validation", seed, r)`` in every column.
        num_images: rows per prompt, each with its own seed (``--num_validation_images``).
    """

    prompts: tuple[str, ...]
    resolution: int
    percentiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0
    num_images: int = 1

    def __post_init__(self) -> None:
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise InputError(f"--validation_prompt: pass at least one prompt (text), got {self.prompts!r}")
        for name, low in (("resolution", 8), ("num_inference_steps", 1), ("num_images", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                flag = "num_validation_images" if name == "num_images" else name
                raise InputError(f"--{flag} {value!r}: must be a whole number >= {low}")
        if not self.percentiles or any(not 0 <= p <= 1 for p in self.percentiles):
            raise InputError(f"--validation_percentiles {list(self.percentiles)}: pass percentiles in [0, 1] "
                             "(0.9: the training set's 90th percentile)")

    def rows(self) -> list[tuple[str, int]]:
        """The grid's rows: ``(prompt, seed)``, each prompt's ``num_images`` rows together."""
        prompts = [p for p in self.prompts for _ in range(self.num_images)]
        return [(p, derive_seed("qualityguide.adapter_validation", int(self.seed), r)) for r, p in enumerate(prompts)]

    def seeds(self) -> list[int]:
        return [seed for _, seed in self.rows()]


def load_validation_scorer(spec: str, device, resolution: int) -> tuple[nn.Module | None, str | None]:
    """The scorer named ``spec`` for labelling validation images, or (None, why) when it cannot score them here (no
    weights offline, an unknown name, images below its smallest side): validation then labels without that score
    instead of stopping the run.

    Args:
        spec: a scorer spec (:func:`qualityguide.scorers.load_scorer`); score columns are named by theirs.
        device: where to put it.
        resolution: the validation images' side.
    """
    why = f"validation images are labelled without {spec!r} scores: "
    try:
        scorer = load_scorer(spec, device=device)
    except (QualityGuideError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, why + f"it cannot be loaded here ({first})"
    small = too_small(scorer, resolution)
    return (None, why + small) if small else (scorer, None)


def target_columns(score_names: list[str], percentiles: tuple[float, ...]) -> list[tuple[str, dict[str, float]]]:
    """The grid's columns: ``(label, {score name: percentile})``, each score column swept over ``percentiles``
    while the others stay at the median.

    Args:
        score_names: the adapter's score columns.
        percentiles: the targets of each column.
    """
    columns = []
    for name in score_names:
        for p in percentiles:
            label = f"{name} p{round(100 * p):d}" if len(score_names) > 1 else f"p{round(100 * p):d}"
            columns.append((label, {n: (p if n == name else 0.5) for n in score_names}))
    return columns


class AdapterValidation:
    """The adapter recipe's ``validate(step)``; call it on the main process only.

    Args:
        pipe: the pipeline the adapter is attached to (its weights are the ones being trained).
        adapter: the :class:`~qualityguide.adapter.IQAAdapter` (with its score quantiles).
        settings: prompts, targets and sampler settings.
        output_dir: the run's output folder (``validation/step-N`` goes there).
        device: where the column scorers run.
        trackers: accelerate trackers for the grids.
    """

    def __init__(self, pipe, adapter, settings: AdapterValidationSettings, output_dir: str | os.PathLike,
                 device=None, trackers=()):
        self.pipe, self.adapter, self.settings = pipe, adapter, settings
        self.output_dir, self.trackers = Path(output_dir), trackers
        self.scorers = {}
        for name in adapter.score_names:
            self.scorers[name], note = load_validation_scorer(name, device, settings.resolution)
            if note:
                print(note, file=sys.stderr)  # once, here: every later grid lacks the same scores

    def images(self) -> torch.Tensor:
        """The grid's images, row-major (prompts x targets): ``[R*C,3,S,S]`` float32 in [0,1], CPU."""
        columns = target_columns(self.adapter.score_names, self.settings.percentiles)
        names, rows = self.adapter.score_names, []
        targets = {n: [column[1][n] for column in columns] for n in names}  # one target per image of a row
        embeds = self.adapter.embeds(percentiles=targets, do_cfg=self.settings.guidance_scale > 1)
        for prompt, seed in self.settings.rows():
            generators = [torch.Generator().manual_seed(seed) for _ in columns]  # the same noise in every column
            out = self.pipe(prompt=[prompt] * len(columns), height=self.settings.resolution,
                            width=self.settings.resolution, num_inference_steps=self.settings.num_inference_steps,
                            guidance_scale=self.settings.guidance_scale, generator=generators,
                            ip_adapter_image_embeds=embeds, output_type="pt")
            rows.append(out.images.float().cpu())
        return torch.cat(rows)

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float]:
        """Validate after ``step`` optimizer steps: write ``validation/step-<step>`` (``grid.png``, ``scores.json``)
        and send the grid to the trackers.

        Returns:
            per measured score column ``name`` and target ``pNN``: ``validation/<name>/pNN`` (mean measured score over
            the rows) and ``validation/<name>/spread`` (the highest target's mean minus the lowest's).
        """
        columns = target_columns(self.adapter.score_names, self.settings.percentiles)
        images = self.images()
        measured = {n: score_images(s, images) for n, s in self.scorers.items() if s is not None}
        scores = [{n: values[i] for n, values in measured.items()} for i in range(len(images))]
        sheet = labelled_grid(images, len(columns), [caption(s) for s in scores],
                              [_short(p) for p, _ in self.settings.rows()], [label for label, _ in columns])
        values = self._values(columns, measured)
        record = {"step": step, "prompts": [p for p, _ in self.settings.rows()], "seeds": self.settings.seeds(),
                  "targets": [target for _, target in columns], "columns": [label for label, _ in columns],
                  "scores": scores, "unmeasured": [n for n, s in self.scorers.items() if s is None], "values": values}
        save_validation(self.output_dir, step, sheet, record, self.trackers)
        return values

    def _values(self, columns, measured: dict[str, list[float]]) -> dict[str, float]:
        percentiles, names, values = self.settings.percentiles, self.adapter.score_names, {}
        for name, flat in measured.items():
            grid = np.asarray(flat, dtype=np.float64).reshape(-1, len(columns))  # rows x targets
            first = names.index(name) * len(percentiles)  # this column's sweep (target_columns' order)
            means = {p: float(grid[:, first + j].mean()) for j, p in enumerate(percentiles)}
            for p, mean in means.items():
                values[f"{PREFIX}{name}/p{round(100 * p):d}"] = mean
            values[f"{PREFIX}{name}/spread"] = means[max(percentiles)] - means[min(percentiles)]
        return values


def _short(prompt: str, width: int = 24) -> str:
    """A row label: the prompt cut to ``width`` characters, wrapped at most once."""
    text = prompt if len(prompt) <= 2 * width else prompt[:2 * width - 3] + "..."
    return text if len(text) <= width else text[:width] + "\n" + text[width:]
