"""``OUTPUT/training_curves.png``: a run's curves drawn from its ``train_log.jsonl``, at each checkpoint and at the end.

The panels are the groups of values the log holds: the loss terms, the mean quality score (ACPO's ``quality``), the
learning rate, the gradient norm, the validation scores (``validation/...``) and the guiding-minus-held-out
difference (``validation/guiding_minus_held_out/...``). :func:`curve_series` decides what is drawn, from the records
alone, so a test can check it without reading pixels; :func:`write_training_curves` only draws it.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from ..files import atomic_write
from .log import LOG_NAME, read_log

CURVES_NAME = "training_curves.png"
VALIDATION = "validation/"
GAP = "validation/guiding_minus_held_out/"
# panel title -> which keys it draws; the first panel that claims a key draws it.
PANELS = (
    ("guiding minus held-out (validation)", lambda key: key.startswith(GAP)),
    ("validation scores", lambda key: key.startswith(VALIDATION)),
    ("mean quality score", lambda key: key == "quality"),
    ("learning rate", lambda key: key == "lr"),
    ("gradient norm", lambda key: key == "grad_norm"),
    ("loss terms", lambda key: True),
)

Series = tuple[list[int], list[float]]


def _number(value) -> float | None:
    """A logged value as a float: numbers as they are, the strings StepLog writes for non-finite values ("nan",
    "inf", "-inf") as NaN (a gap in the curve: an infinity would wreck the axis), anything else None (not drawn)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else math.nan
    if isinstance(value, str):
        try:
            return math.nan if not math.isfinite(float(value)) else float(value)
        except ValueError:
            return None
    return None


def curve_series(records: list[dict]) -> dict[str, dict[str, Series]]:
    """What :func:`write_training_curves` draws: ``{panel title: {key: (steps, values)}}``.

    A key is drawn from the steps that logged it (keys may first appear later, e.g. validation values), panels
    without keys are left out, and keys keep the order in which the log first shows them.

    Args:
        records: ``train_log.jsonl``'s records (:func:`~qualityguide.train.log.read_log`), each with ``"step"``.
    """
    series: dict[str, Series] = {}
    for record in records:
        for key, value in record.items():
            number = _number(value)
            if key == "step" or number is None:
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(int(record["step"]))
            values.append(number)
    panels: dict[str, dict[str, Series]] = {}
    for key, curve in series.items():
        title = next(title for title, claims in PANELS if claims(key))
        panels.setdefault(title, {})[key] = curve
    return {title: panels[title] for title, _ in PANELS[::-1] if title in panels}


def _draw(panels: dict[str, dict[str, Series]]) -> bytes:
    """The panels as one PNG, one panel per row; matplotlib's Agg canvas directly (no pyplot: no display, and the
    caller's own matplotlib backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 2.4 * max(1, len(panels))))
    FigureCanvasAgg(figure)
    axes = figure.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    for ax, (title, curves) in zip(axes, panels.items()):
        for key, (steps, values) in curves.items():
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3,
                    label=key.removeprefix(GAP).removeprefix(VALIDATION))
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    if not panels:
        axes[0].set_title("no values logged yet", fontsize=10)
    axes[-1].set_xlabel("optimizer step")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def write_training_curves(output_dir: str | os.PathLike) -> Path:
    """Draw ``output_dir/training_curves.png`` from ``output_dir/train_log.jsonl``, replacing it atomically (a
    viewer never sees half a file). Call it on the main process.

    Args:
        output_dir: the run's output folder.

    Returns:
        the PNG's path.
    """
    output_dir = Path(output_dir)
    records = read_log(output_dir) if (output_dir / LOG_NAME).is_file() else []
    return atomic_write(output_dir / CURVES_NAME, _draw(curve_series(records)))
