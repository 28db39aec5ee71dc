"""Train an IQA-Adapter: generation conditioned on target quality (docs/design.md section 6).

    qualityguide label photos/ --scorer pyiqa:topiq_nr --scorer pyiqa:laion_aes   # score columns in metadata.csv
    accelerate launch recipes/train_iqa_adapter.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir photos/ --score_columns pyiqa:topiq_nr pyiqa:laion_aes --output_dir iqa-adapter \
        --resolution 512 --train_batch_size 8 --mixed_precision fp16 --max_train_steps 20000
    python recipes/train_iqa_adapter.py --model tiny:sd --train_data_dir DIR --score_columns niqe-embedded \
        --resolution 64 --max_train_steps 20 --output_dir out/            # offline, CPU

The data is ``--train_data_dir`` (``--dataset`` is an alias), an image folder with a ``metadata.csv``, ``.jsonl`` or
``.parquet`` (``file_name``, the score columns and, optionally, a caption column ``text``: without one, as
``qualityguide label`` writes it, every prompt is empty) as ``datasets``' imagefolder reads it, or ``--dataset_name``,
a ``datasets`` table (``--image_column``, ``--caption_column``, the score columns). ``--random_crop`` /
``--random_flip`` augment from encoded variants (:mod:`qualityguide.train.sources`).
Only the adapter trains (AdamW, lr 1e-5, weight decay 1e-2, plain
noise-prediction MSE, condition dropout text 5% / quality 1% / both 1%: IQA-Adapter's settings). Latents are
encoded once into a cache. Checkpoints (``save_state``, adapter weights and optimizer only) every
``--checkpointing_steps``; rerun with ``--resume_from_checkpoint latest`` to continue exactly as an uninterrupted
run would (same batches, noise and losses). The final adapter is written with ``save_pretrained`` to
``--output_dir`` (plus diffusers' IP-Adapter layout where it applies). ``--validation_prompt`` (repeatable) draws a
labelled grid of prompts x target percentiles with each image's measured score at every checkpoint and at the end
(:mod:`qualityguide.adapter.validation`); ``OUTPUT_DIR/training_curves.png`` is redrawn at each checkpoint.
``--reference brisque`` trains a reference-image adapter on the images' own features instead of scores.

Every piece comes from ``qualityguide.adapter`` and ``qualityguide.train``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from qualityguide.adapter import IQAAdapter, ReferenceIQAAdapter, ScoreQuantiles
from qualityguide.adapter.training import AdapterTrainer, DropoutConfig, PromptEncoder, dropout_masks
from qualityguide.adapter.validation import AdapterValidation, AdapterValidationSettings
from qualityguide.diffusion import pipeline_upcasts_vae
from qualityguide.errors import InputError
from qualityguide.cli.label import recorded_columns
from qualityguide.files import read_prompts
from qualityguide.hub import add_hub_arguments, prepare_push, recipe_settings, run_card
from qualityguide.pipelines import load_pipeline
from qualityguide.runtime import quiet_third_party
from qualityguide.train import (add_data_arguments, batch_indices, cache_latents, load_training_data, long_prompts_note,
                                step_generator)
from qualityguide.train.run import TrainingRun
from qualityguide.train.setup import (add_model_arguments, add_schedule_arguments, first_samples, run_training,
                                      schedule_identity)

DTYPES = {"no": None, "fp16": "fp16", "bf16": "bf16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, "hub id, local folder, tiny:sd, tiny:sdxl")
    add_data_arguments(p, alias="--dataset")  # --train_data_dir / --dataset_name, columns, crops and flips
    p.add_argument("--score_columns", nargs="+", default=None, help="score columns to condition on")
    p.add_argument("--reference", default=None, help="train a reference adapter on these features instead "
                   "(brisque, niqe, pyiqa:<metric>)")
    p.add_argument("--reference_weights", default=None, help="local weights of a pyiqa: feature extractor")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--num_tokens", type=int, default=4)
    p.add_argument("--projection", default="linear", choices=["linear", "mlp"])
    p.add_argument("--validation_prompt", action="append", default=[], metavar="TEXT", help="a row of the "
                   "validation grid (repeatable): prompts x target percentiles of each score column, at every "
                   "checkpoint (or every --validation_steps) and at the end")
    p.add_argument("--validation_prompt_file", default=None, help="more validation prompts, one per line")
    p.add_argument("--validation_steps", type=int, default=None, help="validate every N steps (default: at every "
                   "checkpoint); also at the end")
    p.add_argument("--validation_percentiles", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                   help="target percentiles of the grid's columns, in [0, 1] (default 0.1 0.5 0.9)")
    p.add_argument("--num_validation_images", type=int, default=1, help="grid rows per validation prompt, each with "
                   "its own seed")
    p.add_argument("--num_inference_steps", type=int, default=30, help="sampler steps of the validation images")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="CFG scale of the validation images")
    p.add_argument("--p_text", type=float, default=0.05, help="drop only the caption")
    p.add_argument("--p_quality", type=float, default=0.01, help="drop only the quality condition")
    p.add_argument("--p_both", type=float, default=0.01, help="drop both")
    p.add_argument("--snr_gamma", type=float, default=None)
    p.add_argument("--output_dir", default="iqa-adapter")
    p.add_argument("--cache_dir", default=None, help="latent cache folder (default OUTPUT_DIR/latent_cache)")
    p.add_argument("--max_train_steps", type=int, required=True)
    p.add_argument("--train_batch_size", type=int, default=4, help="per process")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-5)
    add_schedule_arguments(p)
    p.add_argument("--adam_weight_decay", type=float, default=1e-2)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--mixed_precision", default="no", choices=list(DTYPES))
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest', a checkpoint name or path")
    p.add_argument("--report_to", default="none", help="accelerate tracker(s), comma-separated: tensorboard, wandb, "
                   "..., all, none (default); logs go to OUTPUT_DIR/logs")
    p.add_argument("--seed", type=int, default=0)
    add_hub_arguments(p)
    args = p.parse_args(argv)
    if (args.score_columns is None) == (args.reference is None):
        p.error("pass --score_columns NAME... (score targets) or --reference FEATURES (reference mode), not both")
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                 "num_inference_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be >= 1")
    if args.validation_steps is not None and args.validation_steps < 1:
        p.error(f"--validation_steps {args.validation_steps}: must be >= 1")
    return args


def build_adapter(args, pipe, dataset, device):
    torch.manual_seed(args.seed)  # the same initial weights on every process and every rerun
    if args.reference is None:
        adapter = IQAAdapter.for_unet(pipe.unet, args.score_columns, num_tokens=args.num_tokens,
                                      projection=args.projection)
        adapter.set_quantiles(ScoreQuantiles.fit({n: dataset.scores[:, i] for i, n in enumerate(args.score_columns)}))
        return adapter, dataset.scores
    adapter = ReferenceIQAAdapter.for_unet(pipe.unet, args.reference, num_tokens=args.num_tokens,
                                           projection=args.projection, weights=args.reference_weights)
    features = []
    for i in tqdm(range(len(dataset)), desc=f"{args.reference} features"):
        try:
            features.append(adapter.features(dataset[i]["pixels"][None]))
        except InputError as exc:  # e.g. a flat image, whose BRISQUE/NIQE statistics are undefined
            raise InputError(f"{args.reference} features of training image {dataset.files[i]}: {exc}; leave such "
                             "images out of the training data, or use another --reference") from None
    features = torch.cat(features)
    adapter.fit_feature_stats(features, resolution=args.resolution)  # references are brought to this scale
    return adapter, features


def validation_settings(args) -> AdapterValidationSettings | None:
    """The validation grid's settings from ``--validation_prompt`` / ``--validation_prompt_file`` (None: no
    validation); refused for a reference adapter, whose targets are images, not percentiles."""
    prompts = list(args.validation_prompt) + (read_prompts(args.validation_prompt_file)
                                              if args.validation_prompt_file else [])
    if not prompts:
        if args.validation_steps is not None:
            raise InputError("--validation_steps needs the grid's rows: pass --validation_prompt TEXT (repeatable) or "
                             "--validation_prompt_file FILE")
        return None
    if args.reference is not None:
        raise InputError(f"--validation_prompt draws a grid of target percentiles of score columns; a --reference "
                         f"{args.reference} adapter is conditioned on reference images instead: drop "
                         "--validation_prompt, or train with --score_columns")
    return AdapterValidationSettings(tuple(prompts), args.resolution, tuple(args.validation_percentiles),
                                     args.num_inference_steps, args.guidance_scale, args.seed,
                                     args.num_validation_images)


def main(argv=None) -> int:
    quiet_third_party()
    args = parse_args(argv)
    push = prepare_push(args)  # before anything loads: a run must not learn at its end that it cannot push
    run = TrainingRun(args, "train_iqa_adapter", "IQA-Adapter")
    validation = validation_settings(args)  # refused flags stop here, before anything loads
    accelerator, device, out = run.accelerator, run.device, run.output_dir
    rank, world = accelerator.process_index, accelerator.num_processes
    pipe = load_pipeline(args.model, dtype=DTYPES[args.mixed_precision], device=device, revision=args.revision,
                         variant=args.variant)
    with accelerator.main_process_first():
        dataset, note = load_training_data(args, args.resolution, args.score_columns or (),
                                           progress=accelerator.is_main_process)
        if note and accelerator.is_main_process:
            print(note, file=sys.stderr)
        dataset = first_samples(dataset, args.max_train_samples)
        batch_indices(len(dataset), args.train_batch_size, 0, args.seed, world, rank)  # too few images: refused now
        cache = cache_latents(dataset, pipe.vae, args.cache_dir or out / "latent_cache",
                              upcast=pipeline_upcasts_vae(pipe), progress=accelerator.is_main_process)
    note = long_prompts_note(pipe, dataset.captions, "captions") if dataset.captions is not None else None
    if note and accelerator.is_main_process:
        print(note, file=sys.stderr)
    adapter, conditions = build_adapter(args, pipe, dataset, device)
    run.check_identity({**schedule_identity(args), "adapter": asdict(adapter.config),  # a sample limit: named
                        "quantiles": getattr(adapter.quantiles, "table", None) if isinstance(adapter, IQAAdapter)
                        else None, "files": len(dataset), **dataset.augment_identity()},
                       fix="resume with the same data and options")
    adapter.attach(pipe, dtype=torch.float32)  # trainable weights in float32; the frozen U-Net in its own dtype
    trainer = AdapterTrainer(adapter, pipe.unet, pipe.scheduler, snr_gamma=args.snr_gamma)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    trainer = run.prepare(trainer, optimizer)
    dropout = DropoutConfig(args.p_text, args.p_quality, args.p_both)
    prompts = PromptEncoder(pipe, args.resolution)
    run.load()

    def micro_step(step: int, micro: int, s: int) -> dict:
        index = batch_indices(len(dataset), args.train_batch_size, s, args.seed, world, rank)
        generator = step_generator(args.seed, s, rank)
        drop_text, drop_quality = dropout_masks(len(index), dropout, generator)
        captions = [dataset.captions[i] if dataset.captions is not None else "" for i in index]
        variants = dataset.draw_variants(len(index), args.seed, s, rank)  # crops and flips: from the cache
        text, added = prompts(captions, device, drop_text, **dataset.micro_conditions(index, variants))
        condition = adapter.condition(conditions[index])
        latents = cache.latents(index, variants=variants).to(device, pipe.unet.dtype)
        return {"loss": trainer(latents, text, condition, added, drop_quality, generator)["loss"]}

    validator = AdapterValidation(pipe, adapter, validation, out, device, accelerator.trackers) \
        if validation is not None and accelerator.is_main_process else None

    def validate(done: int) -> dict:
        if validator is None:
            return {}
        with accelerator.autocast():
            return validator(done)

    run.train(micro_step, trainer.parameters(), len(dataset), validate if validation is not None else None)

    def save():
        labelled = recorded_columns(args.train_data_dir) if args.train_data_dir is not None else {}
        columns = {c: labelled.get(c) for c in args.score_columns} if args.score_columns else None  # how each was scored
        settings = recipe_settings(args, adapter=asdict(adapter.config), score_columns=columns,
                                   reference=args.reference, dropout=asdict(dropout), snr_gamma=args.snr_gamma,
                                   data={"train_data_dir": args.train_data_dir, "dataset_name": args.dataset_name,
                                         "size": len(dataset)})
        accelerator.unwrap_model(trainer).adapter.save_pretrained(
            out, model_card_kwargs=run_card(out, args.model, settings, push and push.repo_id))
        print(f"saved the IQA-Adapter to {out}")
        return out

    run.finish(save)
    if push is not None:
        push.push(out)
    return 0


def cli(argv=None) -> int:
    """``main`` with the training recipes' exit codes (:func:`qualityguide.train.setup.run_training`)."""
    return run_training(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
