"""Figures: matplotlib's file-only backend, chosen in this one place, and the save every plot ends with."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: evals run headless (CI, servers), so no plot may need a display.

    Imported on call, not at module import, so an eval that writes no figure never imports matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int | None = None) -> None:
    """Lay out, write and close ``fig`` (closing frees it: an eval writes many figures in one process).

    Args:
        fig: a matplotlib figure.
        path: the PNG to write.
        dpi: resolution; None keeps the figure's own.
    """
    fig.tight_layout()
    fig.savefig(path, **({} if dpi is None else {"dpi": dpi}))
    pyplot().close(fig)
