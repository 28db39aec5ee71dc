"""qualityguide: perceptual image quality as a first-class signal for diffusion models."""

__version__ = "0.1.0"

from .errors import ImageError, InputError, QualityGuideError, WeightsNotFoundError  # noqa: E402
from .images import load_image, to_batch  # noqa: E402
from .scorers import QualityScorer, load_scorer  # noqa: E402


def load_pipeline(spec, **kwargs):
    """Load a diffusers pipeline from ``tiny:<name>``, a hub id or a local folder (see :mod:`qualityguide.pipelines`)."""
    from .pipelines import load_pipeline as _load

    return _load(spec, **kwargs)


__all__ = ["__version__", "load_scorer", "load_pipeline", "load_image", "to_batch", "QualityScorer",
           "QualityGuideError", "InputError", "ImageError", "WeightsNotFoundError"]
