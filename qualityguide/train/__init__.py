"""Shared pieces of the training recipes: a captioned image folder with deterministic, resumable batches (:mod:`.data`)
from diffusers' data flags (:mod:`.sources`), a latent cache (:mod:`.latents`), crash-safe checkpoints
(:mod:`.checkpoints`), a non-finite loss guard (:mod:`.guard`), the recipes' ``Accelerator`` (:mod:`.setup`) and the
base model's own samples as training data (:mod:`.self_samples`). Imports only ``errors``, ``images``, ``diffusion``
and ``identity`` (and ``finetune``'s setting checks when an accelerator is made).
"""

from .checkpoints import CheckpointManager, read_marker
from .data import (ImageFolderDataset, UnreadableImagesWarning, batch_indices, collate, crop_windows, derive_seed,
                   draw_variants, resize_crop, step_generator, steps_per_epoch)
from .guard import check_finite, check_step_finite, mean_over_processes
from .latents import LatentCache, cache_latents
from .log import StepLog, read_log
from .prompts import PromptEncoder, long_prompts_note
from .self_samples import (SelfSampleSettings, generate_self_samples, load_self_samples, open_self_samples,
                           read_prompts)
from .sources import (add_data_arguments, data_source, dataset_from_table, load_image_folder, load_training_data,
                      resolve_caption_column)
from .setup import check_mixed_precision, check_report_to, make_accelerator, run_training

__all__ = ["CheckpointManager", "read_marker", "ImageFolderDataset", "UnreadableImagesWarning", "batch_indices",
           "collate", "derive_seed", "load_image_folder", "resize_crop", "resolve_caption_column", "step_generator",
           "steps_per_epoch", "crop_windows", "draw_variants", "add_data_arguments", "data_source",
           "load_training_data", "dataset_from_table",
           "check_finite", "check_step_finite", "mean_over_processes", "LatentCache", "cache_latents", "StepLog",
           "read_log", "PromptEncoder", "long_prompts_note", "SelfSampleSettings", "generate_self_samples",
           "load_self_samples", "open_self_samples", "read_prompts", "check_mixed_precision", "check_report_to",
           "make_accelerator", "run_training"]
