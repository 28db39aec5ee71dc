"""LGDM (Saini et al. 2025): diffusion hyperfeatures under Perceptual Manifold Guidance, regressed to quality.

``LGDMConfig`` -> ``LGDM.extract`` -> (``extract_to_cache`` -> ``fit_head``) -> ``LGDMScorer``.
"""

from .cache import FeatureCache, file_hash
from .config import LGDMConfig
from .extract import cache_manifest, dataset_features, extract_to_cache
from .head import HeadConfig, LGDMHead, TrainConfig, fit_head, predict
from .hooks import HyperfeatureRecorder, pool
from .model import LGDM
from .protocol import cross_dataset, repeated_splits
from .scorer import LGDMScorer, head_metadata, write_head_folder

__all__ = ["LGDMConfig", "LGDM", "LGDMHead", "HeadConfig", "TrainConfig", "fit_head", "predict", "LGDMScorer",
           "FeatureCache", "file_hash", "extract_to_cache", "dataset_features", "cache_manifest", "head_metadata",
           "write_head_folder", "repeated_splits", "cross_dataset", "HyperfeatureRecorder", "pool"]
