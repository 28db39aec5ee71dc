"""Fine-tune a LoRA with ACPO: raise a no-reference quality score while an anchor keeps the model near its base
(docs/design.md section 7).

    accelerate launch recipes/train_acpo_lora.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 --prompts prompts.txt \
        --num_self_samples 1000 --scorer pyiqa:topiq_nr --mixed_precision fp16 \
        --max_train_steps 2000 --validation_prompt "a photo of a lighthouse" --report_to tensorboard
    python recipes/train_acpo_lora.py --model tiny:sd --prompts prompts.txt --num_self_samples 8 \
        --scorer niqe-embedded@192 --num_inference_steps 4 --max_train_steps 10 --output_dir out/     # offline, CPU

Training data: with ``--prompts`` the base model's own samples (generated once with fixed seeds into
``--cache_dir``, resumable; at ``--self_sample_guidance_scale`` 1 by default, the model's own conditional
distribution), or training images: ``--train_data_dir`` (``--image_dir`` is an alias), a folder with a
``metadata.csv``, ``.jsonl`` or ``.parquet``, or ``--dataset_name``, a ``datasets`` table, captions from
``--caption_column``, ``--random_crop`` / ``--random_flip`` from encoded variants (:mod:`qualityguide.train.sources`);
unconditional models (``tiny:ddpm``) take images or prompt-less self samples. Latents are encoded once;
``--caption_dropout`` (0.1) of the samples train on the empty prompt. Loss: :class:`qualityguide.finetune.ACPOLoss`
(``--w_diff``, ``--w_anchor``, ``--w_quality``, ...); a NaN or infinite term stops the run (exit code 1) before the
optimizer step, so the last checkpoint stays good.
``--validation_prompt`` writes labelled validation grids (base and tuned rows, each image's scores) at every
checkpoint (or every ``--validation_steps``) and at the end; ``--held_out_scorer SPEC`` scores them beside the
guiding scorer and warns when the two part, ``--keep_best held_out`` exports the checkpoint with the best held-out
score (:mod:`qualityguide.train.held_out`). ``OUTPUT_DIR/training_curves.png`` is redrawn at each checkpoint.
Checkpoints (``save_state``: LoRA weights, optimizer) every ``--checkpointing_steps``, written atomically; rerun
with ``--resume_from_checkpoint latest`` to continue exactly as an uninterrupted run would. The result is
``OUTPUT_DIR/pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(OUTPUT_DIR)``); for a pixel-space
``UNet2DModel`` peft's ``adapter_model.safetensors`` (``qualityguide.finetune.load_lora``).

Exit codes: 0 done, 1 training stopped (non-finite loss), 2 bad input. Every piece comes from
``qualityguide.finetune`` and ``qualityguide.train``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qualityguide.diffusion import pipeline_upcasts_vae
from qualityguide.errors import InputError
from qualityguide.finetune import ACPOConfig, ACPOLoss, check_target_modules, lora_parameters, save_lora
from qualityguide.finetune.lora import PEFT_WEIGHT_NAME
from qualityguide.finetune.training import (LoraCheckpointing, TrainingSamples, caption_dropout, check_scorer,
                                            lora_identity, make_optimizer, prepare_lora_unet)
from qualityguide.finetune.validation import ACPOValidation, ValidationSettings
from qualityguide.hub import add_hub_arguments, prepare_push, recipe_settings, run_card, scorer_entry, write_model_card
from qualityguide.identity import WeightIdentity
from qualityguide.pipelines import load_pipeline
from qualityguide.runtime import quiet_third_party
from qualityguide.scorers import DEFAULT_SCORER, load_scorer
from qualityguide.train import (PromptEncoder, add_data_arguments, batch_indices, data_source, draw_variants,
                                load_training_data, long_prompts_note, step_generator)
from qualityguide.train.held_out import (KEEP_BEST, HeldOutGuard, KeepBestCheckpoint, checkpoint_validations,
                                         choose_export, held_out_key)
from qualityguide.train.run import TrainingRun
from qualityguide.train.validation import too_small
from qualityguide.train.setup import (add_model_arguments, add_schedule_arguments, first_samples, run_training,
                                      schedule_identity)
from qualityguide.train.self_samples import (SelfSampleSettings, generate_self_samples, is_conditional,
                                             load_self_samples, native_resolution, open_self_samples, read_prompts)

DEFAULTS = ACPOConfig()
TERMS = ("loss", "diffusion", "anchor", "quality")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    add_model_arguments(p, "hub id, local pipeline folder, tiny:sd, tiny:sdxl, tiny:ddpm")
    a("--scorer", default=DEFAULT_SCORER, help="quality scorer spec, optionally SPEC@SIZE (e.g. niqe-embedded@192)")
    a("--scorer_weights", default=None, help="local weights / parameter file of the scorer")
    a("--prompts", default=None, help="text file, one prompt per line: train on the base model's own samples")
    add_data_arguments(p, alias="--image_dir")  # train on images: --train_data_dir / --dataset_name, crops, flips
    a("--num_self_samples", type=int, default=64, help="self samples to generate (with --prompts or unconditional)")
    a("--resolution", type=int, default=None, help="image side (default: the model's native size)")
    a("--cache_dir", default=None, help="self-sample and latent cache (default OUTPUT_DIR/cache)")
    a("--rank", type=int, default=4, help="LoRA rank")
    a("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    a("--lora_target_modules", default=None, help="comma-separated module names (default to_q,to_k,to_v,to_out.0)")
    a("--w_diff", type=float, default=DEFAULTS.w_diff, help="weight of the diffusion (noise-prediction) loss")
    a("--w_anchor", type=float, default=DEFAULTS.w_anchor, help="weight of the anchor to the base model")
    a("--w_quality", type=float, default=DEFAULTS.w_quality, help="weight of the mean quality score (maximised)")
    a("--t_quality_max", type=int, default=DEFAULTS.t_quality_max, help="quality term on timesteps <= this")
    a("--quality_fraction", type=float, default=DEFAULTS.quality_fraction,
      help="probability that a sample's timestep is drawn in [0, t_quality_max] (per sample; else above it)")
    a("--quality_input", default=DEFAULTS.quality_input, choices=["one_step", "k_step"])
    a("--k_steps", type=int, default=DEFAULTS.k_steps, help="DDIM steps of the k_step quality input")
    a("--k_grad_steps", type=int, default=DEFAULTS.k_grad_steps, help="last k steps with gradients (default all)")
    a("--snr_gamma", type=float, default=DEFAULTS.snr_gamma, help="min-SNR-gamma weighting of the diffusion term")
    a("--output_dir", default="acpo-lora")
    a("--max_train_steps", type=int, required=True)
    a("--train_batch_size", type=int, default=4, help="per process")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", action="store_true")
    a("--learning_rate", type=float, default=1e-4)
    add_schedule_arguments(p)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--max_grad_norm", type=float, default=1.0)
    a("--use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit (CUDA only)")
    a("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    a("--num_inference_steps", type=int, default=30, help="sampler steps of self samples and validation images")
    a("--guidance_scale", type=float, default=7.5, help="CFG scale of the validation images")
    a("--self_sample_guidance_scale", type=float, default=1.0, help="CFG scale of the self samples (default 1: the "
      "model's own conditional distribution, the one --w_diff keeps; higher trains toward guided images)")
    a("--caption_dropout", type=float, default=0.1, help="share of samples trained on the empty prompt, so the "
      "unconditional branch CFG uses is trained and anchored too (0: never)")
    a("--validation_steps", type=int, default=None, help="validation images every N steps (default: at every "
      "checkpoint, when --validation_prompt is given); also at the end")
    a("--validation_prompt", default=None, help="prompt of the validation images, made at every checkpoint (or every "
      "--validation_steps) and at the end")
    a("--num_validation_images", type=int, default=4)
    a("--held_out_scorer", action="append", default=[], metavar="SPEC", help="a scorer the loss never sees, scored "
      "on every validation image beside --scorer (repeatable); the gap is logged and plotted, and a warning says "
      "when the guiding score rises while a held-out one falls")
    a("--keep_best", default=None, choices=KEEP_BEST, help="held_out: keep the checkpoint with the best (first) "
      "held-out validation score, spared by --checkpoints_total_limit, and export it as the run's LoRA (the last "
      "step's goes to OUTPUT_DIR/last)")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help="'latest', a checkpoint name or path")
    a("--report_to", default=None, help="accelerate tracker(s): tensorboard, wandb, ..., all, none (default: "
      "tensorboard when installed)")
    a("--seed", type=int, default=0)
    add_hub_arguments(p)
    args = p.parse_args(argv)
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                 "num_inference_steps", "num_validation_images", "num_self_samples", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be >= 1")
    if not 0 <= args.caption_dropout <= 1:  # NaN too
        raise InputError(f"--caption_dropout {args.caption_dropout}: must be a share in [0, 1], e.g. 0.1 (0: never "
                         "drop)")
    if args.validation_steps is not None and args.validation_steps < 1:
        p.error(f"--validation_steps {args.validation_steps}: must be >= 1")
    if args.prompts is not None and (args.train_data_dir or args.dataset_name) is not None:
        p.error("--prompts (train on the base model's own samples) and --train_data_dir / --dataset_name (train on "
                "images) exclude each other; pass one of them")
    return args


def held_out_scorers(args, validation, device) -> dict:
    """``--held_out_scorer`` specs as ``{spec: scorer}``; refused without validation images to score, twice, or equal
    to ``--scorer``, and ``--keep_best`` without one."""
    if args.keep_best is not None and not args.held_out_scorer:
        raise InputError(f"--keep_best {args.keep_best} ranks checkpoints by a held-out score: pass --held_out_scorer "
                         "SPEC (e.g. --held_out_scorer niqe-embedded)")
    if args.held_out_scorer and validation is None:
        raise InputError("--held_out_scorer scores the validation images: pass --validation_prompt TEXT (or "
                         "--validation_steps N for an unconditional model)")
    held_out = {}
    for spec in (s.strip() for s in args.held_out_scorer):
        if spec in held_out or spec == args.scorer.strip():
            raise InputError(f"--held_out_scorer {spec!r} is given twice or is the guiding --scorer; a held-out "
                             "scorer must be one the loss never sees: pass each other scorer once")
        held_out[spec] = load_scorer(spec, device=device)
        small = too_small(held_out[spec], validation.resolution)
        if small:
            raise InputError(f"--held_out_scorer {spec!r}: {small} (--held_out_scorer {spec}@SIZE)")
    return held_out


def acpo_config(args) -> ACPOConfig:
    return ACPOConfig(w_diff=args.w_diff, w_anchor=args.w_anchor, w_quality=args.w_quality,
                      t_quality_max=args.t_quality_max, quality_fraction=args.quality_fraction,
                      quality_input=args.quality_input, k_steps=args.k_steps, k_grad_steps=args.k_grad_steps,
                      snr_gamma=args.snr_gamma)


def training_samples(args, accelerator, pipe, resolution: int, cache: Path) -> TrainingSamples:
    """The image folder, or the base model's own samples (generated in shares by every process), encoded once."""
    main, progress = accelerator.main_process_first, accelerator.is_main_process
    if data_source(args) is not None:
        with main():
            dataset, note = load_training_data(args, resolution, progress=progress, conditional=is_conditional(pipe))
        source, made_by = "image_dir" if args.train_data_dir is not None else "dataset_name", None
        for line in (note, long_prompts_note(pipe, dataset.captions, "captions") if dataset.captions else None):
            if line and progress:
                print(line, file=sys.stderr)
    else:
        if is_conditional(pipe) and args.prompts is None:
            raise InputError(f"{args.model} is a prompted model: pass --prompts FILE (train on its own samples), "
                             "--train_data_dir DIR or --dataset_name NAME (train on images)")
        if not args.center_crop or args.random_flip:
            raise InputError("--random_crop / --random_flip augment training images (--train_data_dir, "
                             "--dataset_name); self samples are the model's own square images: drop the flag")
        prompts = read_prompts(args.prompts) if args.prompts is not None else None
        note = long_prompts_note(pipe, prompts)
        if note and progress:
            print(note, file=sys.stderr)
        settings = SelfSampleSettings.for_pipeline(pipe, prompts, args.num_self_samples, resolution,
                                                   args.num_inference_steps, args.self_sample_guidance_scale, args.seed,
                                                   args.model)
        with main():
            open_self_samples(pipe, settings, cache / "self_samples")
        generate_self_samples(pipe, settings, cache / "self_samples", process_index=accelerator.process_index,
                              num_processes=accelerator.num_processes, progress=progress)
        accelerator.wait_for_everyone()
        with main():
            dataset = load_self_samples(pipe, settings, cache / "self_samples", progress=progress)
        source, made_by = "self_samples", settings.to_dict()
    dataset = first_samples(dataset, args.max_train_samples)
    with main():
        return TrainingSamples.encode(pipe, dataset, cache / f"latents-{source}", source, made_by, progress=progress)


def main(argv=None) -> int:
    quiet_third_party()
    args = parse_args(argv)
    push = prepare_push(args)  # before anything loads: a run must not learn at its end that it cannot push
    config = acpo_config(args)
    run = TrainingRun(args, "train_acpo_lora", "ACPO")
    accelerator, device, out = run.accelerator, run.device, run.output_dir
    scorer = load_scorer(args.scorer, weights=args.scorer_weights, device=device)
    check_scorer(scorer, config)
    pipe = load_pipeline(args.model, dtype=run.weight_dtype, device=device, revision=args.revision,
                         variant=args.variant)
    targets = check_target_modules(pipe.unet, args.lora_target_modules and args.lora_target_modules.split(","))
    resolution = args.resolution or native_resolution(pipe)
    check_scorer(scorer, config, resolution)
    validation = None
    if args.validation_steps is not None or args.validation_prompt is not None:
        validation = ValidationSettings(args.validation_prompt if is_conditional(pipe) else None,
                                        args.num_validation_images, resolution, args.num_inference_steps,
                                        args.guidance_scale, args.seed)
        if is_conditional(pipe) and validation.prompt is None:
            raise InputError("--validation_steps needs --validation_prompt TEXT for a prompted model")
    held_out = held_out_scorers(args, validation, device)
    keep_key = held_out_key(next(iter(held_out))) if args.keep_best == "held_out" else None
    if keep_key is not None:
        run.manager.keep = KeepBestCheckpoint(out, keep_key)
    samples = training_samples(args, accelerator, pipe, resolution, Path(args.cache_dir or out / "cache"))

    if run.resume_path is not None:
        LoraCheckpointing.check_base(run.resume_path, pipe.unet)  # before the adapter changes the U-Net's weights
    base_identity = WeightIdentity.of({"unet": pipe.unet})
    lora = prepare_lora_unet(pipe.unet, args.rank, args.lora_alpha, targets, args.gradient_checkpointing, args.seed)
    run.check_identity({**schedule_identity(args), "lora": lora_identity(lora), "acpo": config.to_dict(),
                        "data": samples.identity, "scorer": scorer.name, "model_class": type(pipe.unet).__name__,
                        "caption_dropout": args.caption_dropout})
    optimizer = make_optimizer(lora_parameters(pipe.unet), args.learning_rate, args.adam_weight_decay,
                               args.use_8bit_adam, device)
    LoraCheckpointing(pipe.unet, base_identity).register(accelerator)
    unet = run.prepare(pipe.unet, optimizer)  # the loss calls the prepared (DDP) U-Net, which syncs gradients
    pipe.unet.train()
    vae = getattr(pipe, "vae", None)
    loss_fn = ACPOLoss(unet, pipe.scheduler, scorer, config, vae=vae,
                       upcast_vae=vae is not None and pipeline_upcasts_vae(pipe))
    encoder = PromptEncoder(pipe, resolution) if is_conditional(pipe) else None
    run.load()
    rank, world = accelerator.process_index, accelerator.num_processes

    def micro_step(step: int, micro: int, s: int) -> dict:
        index = batch_indices(len(samples), args.train_batch_size, s, args.seed, world, rank)
        variants = draw_variants(samples.variants, len(index), args.seed, s, rank)  # crops and flips
        clean = samples.batch(index, device, run.weight_dtype, variants)
        generator = step_generator(args.seed, s, rank)  # caption dropout, then the loss's timesteps and noise
        drop = caption_dropout(len(index), args.caption_dropout, generator)
        terms = loss_fn(clean, samples.conditioning(index, encoder, device, variants, drop), generator=generator)
        return {k: terms[k] for k in TERMS}

    validator = ACPOValidation(pipe, validation, out, scorer, held_out, accelerator.trackers,
                               HeldOutGuard(checkpoint_validations(out, run.start))) if validation else None
    final: dict[str, float] = {}

    def validate(done: int) -> dict:
        scores = {}
        if accelerator.is_main_process:
            with accelerator.autocast():
                scores = validator(done)
            if done == args.max_train_steps:
                final.update(scores)
        return scores

    run.train(micro_step, lora_parameters(pipe.unet), len(samples), validate if validation is not None else None,
              postfix=("loss", "quality"))

    def save():
        if keep_key is None:
            path = save_lora(pipe.unet, out)
            message = f"saved the ACPO LoRA to {path}"
        else:
            last = save_lora(pipe.unet, out / "last")
            best = choose_export(out, keep_key, args.max_train_steps, final.get(keep_key))
            if best is not None and best[1] is not None and best[0] != args.max_train_steps:
                LoraCheckpointing(pipe.unet, base_identity).load(best[1])  # the best checkpoint's LoRA into the U-Net
            path = save_lora(pipe.unet, out)
            where = "no validation to choose by: the last step" if best is None else \
                f"step {best[0]} ({keep_key} {best[2]:.4g})"
            message = (f"saved the ACPO LoRA with the best held-out score, {where}, to {path}; the last step's LoRA to "
                       f"{last}")
        settings = recipe_settings(args, acpo=config.to_dict(), scorer=scorer_entry(scorer),
                                   lora=lora_identity(lora), data=samples.identity)
        write_model_card(out, kind="pixel_lora" if path.name == PEFT_WEIGHT_NAME else "acpo_lora",
                         **run_card(out, args.model, settings, push and push.repo_id))
        print(message)
        return path

    run.finish(save)
    if push is not None:
        push.push(out)
    return 0


def cli(argv=None) -> int:
    """``main`` with the training recipes' exit codes (:func:`qualityguide.train.setup.run_training`)."""
    return run_training(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
