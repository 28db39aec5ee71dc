"""The shared small task with known quality: crops of real photos at graded distortion levels, and a tiny
pixel-space diffusion model trained briefly on them (CPU, minutes). Used by ``evals.adapter_control``
(IQA-Adapter control) and ``evals.acpo_toy`` (ACPO fine-tuning); ``python -m evals.toy_task`` measures it.

1. **Crops** (:mod:`.crops`, :func:`build_crops`): ``n_images`` BIQ2021 photos, each downscaled so its short side
   is ``crop / SCENE_FRACTION`` px (128 for 48 px crops, so a crop holds a good part of the scene and the
   downscaling removes most of the photo's own blur and noise), one random textured crop per photo, and one
   of ten conditions per crop (balanced): clean, or Gaussian blur / Gaussian noise / JPEG at levels 1-3
   (:data:`LEVELS`). Every crop is stored at 8 bits, as a photo would be.
2. **Labels** (:mod:`.scoring`): a scorer of this library, :data:`TOY_SCORER` (BRISQUE with the original LIVE SVR
   from ``<data>/params``), which tracks the distortion level on these crops (``evals.toy_task`` measures and
   reports it). :data:`HELD_OUT_SCORER` (official NIQE from ``<data>/params``, after upsizing to 192 px, the least
   NIQE accepts) is a second, independent scorer for reward-hacking checks.
3. **Base model** (:mod:`.base`, :func:`load_or_train_base`): a tiny ``UNet2DConditionModel`` (null text
   condition; the IQA-Adapter needs cross-attention) or ``UNet2DModel`` (ACPO's pixel path), trained with the
   plain epsilon MSE of :mod:`qualityguide.diffusion` on every crop (all distortion levels) and cached.
4. **Samples** (:mod:`.sampling`): DDIM from a base model (with an adapter's condition, or a LoRA), as a grid.
5. **Judge** (:mod:`.judge`, :class:`ToyJudge`): a small classifier trained on the crops' known conditions (held out
   by photo), reporting a sample's P(clean) and predicted distortion level and type: a held-out check that knows
   the truth by construction.
"""

from evals.common.scores import score_images

from .base import (KINDS, PREDICTION_TYPES, TASK_VERSION, BaseConfig, build_scheduler, build_unet, cache_key,
                   load_or_train_base, null_condition, predict, train_base)
from .crops import CONDITIONS, DISTORTIONS, LEVELS, SCENE_FRACTION, Crops, build_crops, distort, resolve_data_dir
from .judge import JudgeConfig, ToyJudge, judge_crops
from .sampling import sample, save_grid
from .scoring import HELD_OUT_SCORER, PARAM_FILES, TOY_SCORER, load_toy_scorer

__all__ = ["BaseConfig", "CONDITIONS", "Crops", "DISTORTIONS", "HELD_OUT_SCORER", "JudgeConfig", "KINDS", "LEVELS",
           "PARAM_FILES", "PREDICTION_TYPES", "SCENE_FRACTION", "TASK_VERSION", "TOY_SCORER", "ToyJudge", "build_crops",
           "build_scheduler", "build_unet", "cache_key", "distort", "judge_crops", "load_or_train_base",
           "load_toy_scorer", "null_condition", "predict", "resolve_data_dir", "sample", "save_grid", "score_images",
           "train_base"]
