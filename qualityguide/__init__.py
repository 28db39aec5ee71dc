"""qualityguide: perceptual image quality as a first-class signal for diffusion models."""

__version__ = "0.1.0"

import importlib  # noqa: E402
import importlib.abc  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402

from .errors import ImageError, InputError, QualityGuideError, WeightsNotFoundError  # noqa: E402
from .images import load_image, to_batch  # noqa: E402
from .scorers import QualityScorer, load_scorer, register_scorer_prefix  # noqa: E402
from .scorers.labelling import label_dataset  # noqa: E402

# Where modules users may import by their old path live now (README "How the code is laid out"). The old
# path gives the very same module object, imported on first use, so patches and ``isinstance`` still agree.
MOVED_MODULES = {
    "qualityguide.scoring": "qualityguide.cli.score",
    "qualityguide.scorefile": "qualityguide.cli.scorefile",
    "qualityguide.labels": "qualityguide.cli.label",
    "qualityguide.imagefolder": "qualityguide.cli.imagefolder",
    "qualityguide.demo": "qualityguide.cli.demo",
    "qualityguide.lgdm.commands": "qualityguide.cli.lgdm",
    "qualityguide.data": "qualityguide.evaluation.datasets",
    "qualityguide.protocol": "qualityguide.evaluation.stats",
    "qualityguide.features": "qualityguide.scorers.features",
    "qualityguide.devices": "qualityguide.runtime",
    "qualityguide.distributed": "qualityguide.runtime",
    "qualityguide.timing": "qualityguide.runtime",
    "qualityguide.finetune.denoisers": "qualityguide.diffusion.denoisers",
    "qualityguide.finetune.sampling": "qualityguide.diffusion.k_step",
    "qualityguide.diffusion.training": "qualityguide.diffusion.noising",
}


class _MovedModuleLoader(importlib.abc.Loader):
    """Loads an old module path as the module that now holds its code (imported on first use)."""

    def __init__(self, target: str):
        self.target = target
        self.target_spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.target_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # The import system stamped the alias's spec on the shared module; its own spec (name, file) is the truth.
        module.__spec__ = self.target_spec


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Answers ``import qualityguide.<old path>`` for the names in :data:`MOVED_MODULES`, and nothing else."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(MOVED_MODULES[fullname]))


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())  # ahead of path finders, so a stale old file is never used


def _load_lgdm_scorer(spec, **kwargs):
    """``lgdm:<head folder or hub id>``: LGDM lives above the scorers, so the root (which knows every layer)
    registers it and imports it on first use."""
    from .lgdm.scorer import LGDMScorer

    return LGDMScorer.from_pretrained(spec, **kwargs)


register_scorer_prefix("lgdm", _load_lgdm_scorer, "LGDM: diffusion hyperfeatures and a fitted head",
                       weights_refusal="the head folder holds the weights")


def _load_test_scorer(name, **kwargs):
    """``testing:<name>``: scorers with hand-known values for tests and tiny recipe runs (:mod:`.testing`)."""
    from .testing import load_test_scorer

    return load_test_scorer(name, **kwargs)


register_scorer_prefix("testing", _load_test_scorer, "test scorers with hand-known values (brightness, darkness)",
                       argument="brightness|darkness", weights_refusal="test scorers take no weights")


def load_pipeline(spec, **kwargs):
    """Load a diffusers pipeline from ``tiny:<name>``, a hub id or a local folder (see :mod:`qualityguide.pipelines`)."""
    from .pipelines import load_pipeline as _load

    return _load(spec, **kwargs)


__all__ = ["__version__", "load_scorer", "load_pipeline", "label_dataset", "load_image", "to_batch", "QualityScorer",
           "QualityGuideError", "InputError", "ImageError", "WeightsNotFoundError"]
