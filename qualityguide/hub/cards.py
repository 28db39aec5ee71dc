"""Model cards: the ``README.md`` every saved model and recipe output carries, written with ``huggingface_hub``.

The card's YAML header (``ModelCardData``) holds what the hub indexes (``library_name: qualityguide``,
``base_model``, ``tags``, ``license``) and, under ``qualityguide:``, what this library knows about the artefact:
its kind, the base model spec, whether that base had random weights, the training settings and the final
validation numbers. The prose below it says what the artefact is and how to load it with plain diffusers/peft
and with qualityguide. Tests read the header (``ModelCard.load(path).data``), never the prose.

A ``README.md`` that qualityguide did not write (a user's own) is never replaced.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, printable
from ..files import atomic_write

CARD_FILE = "README.md"
LIBRARY_NAME = "qualityguide"
LICENSE = "apache-2.0"  # the library's own licence (pyproject.toml); pass the base model's where it differs
RANDOM_PREFIXES = ("tiny:", "random:")  # qualityguide's offline specs: models built with random weights


@dataclass(frozen=True)
class CardKind:
    """What a card says about one kind of artefact.

    Args:
        title: the card's heading.
        what: one paragraph: what the artefact is.
        plain: how to load it without qualityguide (a code snippet with ``{source}``), or None with ``plain_why``.
        ours: how to load it with qualityguide (a code snippet with ``{source}``).
        tags: the hub tags of this kind.
        plain_why: why plain diffusers/peft cannot load it (when ``plain`` is None).
    """

    title: str
    what: str
    plain: str | None
    ours: str
    tags: tuple[str, ...]
    plain_why: str = ""


KINDS = {
    "iqa_adapter": CardKind(
        "IQA-Adapter", "An IQA-Adapter (Abud et al., ICCV 2025): target quality scores become extra tokens for "
        "decoupled cross-attention, so a Stable Diffusion U-Net generates at a chosen quality.",
        'pipe.load_ip_adapter("{source}", subfolder="diffusers", weight_name="ip_adapter.safetensors")',
        'from qualityguide.adapter import IQAAdapter\nadapter = IQAAdapter.from_pretrained("{source}").attach(pipe)',
        ("ip-adapter", "iqa-adapter", "image-quality")),
    "reference_iqa_adapter": CardKind(
        "Reference IQA-Adapter", "A reference-image IQA-Adapter: the quality features of a reference image "
        "become extra tokens for decoupled cross-attention, so generation follows the reference's quality.",
        'pipe.load_ip_adapter("{source}", subfolder="diffusers", weight_name="ip_adapter.safetensors")',
        'from qualityguide.adapter import ReferenceIQAAdapter\n'
        'adapter = ReferenceIQAAdapter.from_pretrained("{source}").attach(pipe)',
        ("ip-adapter", "iqa-adapter", "image-quality")),
    "lgdm_head": CardKind(
        "LGDM head", "The regression head of LGDM (Saini et al. 2025): diffusion hyperfeatures extracted under "
        "Perceptual Manifold Guidance are mapped to a predicted mean opinion score.",
        None, 'from qualityguide.lgdm import LGDMHead\nhead = LGDMHead.from_pretrained("{source}")\n'
        'from qualityguide.scorers import load_scorer\nscorer = load_scorer("lgdm:{source}")',
        ("image-quality-assessment", "lgdm"),
        "the head reads LGDM's hyperfeatures, which only qualityguide extracts"),
    "lgdm_scorer": CardKind(
        "LGDM scorer", "An LGDM no-reference quality scorer (Saini et al. 2025): a regression head over diffusion "
        "hyperfeatures of the backbone named below, predicting a mean opinion score (higher is better).",
        None, 'from qualityguide.lgdm import LGDMScorer\nscorer = LGDMScorer.from_pretrained("{source}")',
        ("image-quality-assessment", "lgdm"),
        "the head reads LGDM's hyperfeatures, which only qualityguide extracts"),
    "acpo_lora": CardKind(
        "ACPO LoRA", "A LoRA for a Stable Diffusion U-Net fine-tuned with ACPO: a diffusion loss anchored to the "
        "base model plus a differentiable image-quality reward.",
        'pipe.load_lora_weights("{source}")',
        'from qualityguide.finetune import load_lora\nload_lora(pipe.unet, "{source}")',
        ("lora", "acpo", "image-quality")),
    "pixel_lora": CardKind(
        "ACPO LoRA (pixel-space U-Net)", "A LoRA in peft's format for a pixel-space diffusers UNet2DModel, "
        "fine-tuned with ACPO against a differentiable image-quality reward.",
        'from peft import PeftModel\nunet = PeftModel.from_pretrained(pipe.unet, "{source}")',
        'from qualityguide.finetune import load_lora\nload_lora(pipe.unet, "{source}")',
        ("lora", "peft", "acpo", "image-quality")),
}


def is_random_base(spec: str | None) -> bool:
    """Whether a model spec names one of qualityguide's randomly initialised test models (``tiny:``, ``random:``)."""
    return isinstance(spec, str) and spec.startswith(RANDOM_PREFIXES)


def _hub_id(spec: str | None) -> str | None:
    """``spec`` when it can be a hub id (``owner/name``): the only form the card's ``base_model`` may hold."""
    if not isinstance(spec, str) or is_random_base(spec) or Path(spec).expanduser().exists():
        return None
    parts = spec.split("/")
    return spec if len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) else None


def written_by_us(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model card qualityguide wrote (``library_name: qualityguide`` in its header)."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(Path(path), ignore_metadata_errors=True)
    except Exception:  # not a card at all (no YAML header, not text): the user's own file
        return False
    return getattr(card.data, "library_name", None) == LIBRARY_NAME and bool(getattr(card.data, LIBRARY_NAME, None))


def _plain(values: dict) -> dict:
    """``values`` as JSON would hold them (tuples as lists, paths and dtypes as text): safe YAML for any reader."""
    return json.loads(json.dumps(dict(values), default=str))


def _table(values: dict, header: str) -> str:
    return "\n".join([f"| {header} | value |", "|---|---|"] + [f"| {printable(str(k))} | {printable(str(v))} |"
                                                                for k, v in values.items()])


def build_model_card(kind: str, base_model: str | None = None, settings: dict | None = None,
                     validation: dict | None = None, grid: str | None = None, tags: list[str] | tuple = (),
                     license: str = LICENSE, source: str | None = None, summary: str | None = None):
    """The ``huggingface_hub.ModelCard`` of one artefact (see :func:`write_model_card` for the arguments)."""
    from huggingface_hub import ModelCard, ModelCardData

    if kind not in KINDS:
        raise InputError(f"kind={kind!r}: allowed {', '.join(KINDS)}")
    about = KINDS[kind]
    random_base = is_random_base(base_model)
    ours = {"kind": kind, "base_model_spec": base_model, "random_weights": random_base}
    if settings:
        ours["settings"] = _plain(settings)
    if validation:
        ours["validation"] = _plain(validation)
    if grid:
        ours["validation_grid"] = grid
    all_tags = {LIBRARY_NAME, *about.tags, *tags} | ({"random-weights"} if random_base else set())
    data = ModelCardData(library_name=LIBRARY_NAME, base_model=_hub_id(base_model), tags=sorted(all_tags),
                         license=license, **{LIBRARY_NAME: ours})
    source = source or "path/to/this/folder"
    lines = [f"# {about.title}", "", about.what + (f" {summary}" if summary else ""), ""]
    if base_model:
        lines += [f"Base model: `{printable(base_model)}`.", ""]
    if random_base:
        lines += [f"**Notice: the base model `{printable(base_model)}` had random weights** (a qualityguide test "
                  "model). This artefact only demonstrates the file layout and the training run; its outputs are "
                  "not meaningful images or quality predictions.", ""]
    lines += ["## How to load it", "", "With plain diffusers/peft:", ""]
    lines += (["```python", about.plain.format(source=source), "```"] if about.plain else
              [f"Not possible: {about.plain_why}."])
    lines += ["", "With qualityguide:", "", "```python", about.ours.format(source=source), "```", ""]
    if settings:
        lines += ["## Training settings", "", _table(settings, "setting"), ""]
    if grid or validation:
        lines += ["## Validation", ""]
        if grid:
            lines += [f"![validation grid]({grid})", ""]
        if validation:
            lines += ["Final numbers:", "", _table(validation, "metric"), ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(folder: str | os.PathLike, *, kind: str, base_model: str | None = None,
                     settings: dict | None = None, validation: dict | None = None, grid: str | None = None,
                     tags: list[str] | tuple = (), license: str = LICENSE, source: str | None = None,
                     summary: str | None = None) -> Path | None:
    """Write ``folder/README.md``, the model card of the artefact in ``folder`` (atomically).

    Args:
        folder: the saved model or recipe output (must exist).
        kind: one of :data:`KINDS` (``"iqa_adapter"``, ``"lgdm_head"``, ``"acpo_lora"``, ...).
        base_model: the model spec it was made for or from (a hub id becomes the card's ``base_model``; ``tiny:``
            and ``random:`` specs get a plain notice that the base had random weights).
        settings: the training settings, where known (loss weights, scorer specs with weight hashes, data size,
            steps, seed): JSON-like values, stored in the header and shown as a table.
        validation: the final measured numbers of the run (metric -> value).
        grid: the validation grid image, as a path relative to ``folder`` (it must exist there).
        tags: extra hub tags.
        license: the hub licence id.
        source: the hub id or folder the loading snippets name (default: a placeholder path).
        summary: a sentence appended to what the artefact is.

    Returns:
        The card's path, or None when ``folder`` holds a ``README.md`` qualityguide did not write (it is kept).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"model card folder {folder} does not exist; save the model first")
    if grid is not None and not (folder / grid).is_file():
        raise InputError(f"grid={grid!r}: no such file in {folder}; pass the grid image's path relative to the "
                         "folder (e.g. validation/step-100/grid.png)")
    path = folder / CARD_FILE
    if path.exists() and not written_by_us(path):
        return None
    card = build_model_card(kind, base_model, settings, validation, grid, tags, license, source, summary)
    return atomic_write(path, str(card), durability="file")


def scorer_entry(scorer) -> dict:
    """A scorer as a card records it: its spec, its settings name and the SHA-256 of its weights by content (so two
    runs with the same spec but other weights are told apart)."""
    from ..identity import state_sha256

    return {"spec": scorer.name, "settings": getattr(scorer, "settings_name", scorer.name),
            "weights_sha256": state_sha256(scorer)}


def run_results(output_dir: str | os.PathLike) -> tuple[dict, str | None]:
    """The final validation numbers and grid of a training run in ``output_dir``.

    Returns:
        ``(numbers, grid)``: the ``validation/...`` values of the last ``train_log.jsonl`` record holding any, with
        its ``step`` (1-based count of optimizer steps done); and ``validation/step-N/grid.png`` of the largest
        ``N`` (relative to ``output_dir``), or None. ``({}, None)`` for a run that validated nothing.
    """
    from ..train.log import LOG_NAME, read_log
    from ..train.run import VALIDATION_PREFIX

    output_dir = Path(output_dir)
    numbers: dict = {}
    if (output_dir / LOG_NAME).is_file():
        for record in reversed(read_log(output_dir)):
            found = {k[len(VALIDATION_PREFIX):]: v for k, v in record.items() if k.startswith(VALIDATION_PREFIX)}
            if found:
                numbers = {"step": record["step"] + 1, **found}
                break
    steps = [(int(p.name[len("step-"):]), p) for p in (output_dir / "validation").glob("step-*")
             if p.name[len("step-"):].isdigit() and (p / "grid.png").is_file()]
    grid = (max(steps)[1] / "grid.png").relative_to(output_dir).as_posix() if steps else None
    return numbers, grid


# The flags both training recipes share that a card records (those a recipe lacks are skipped).
RUN_FLAGS = ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
             "lr_warmup_steps", "adam_weight_decay", "max_grad_norm", "mixed_precision", "resolution",
             "max_train_samples", "seed")


def recipe_settings(args, **extra) -> dict:
    """A training recipe's settings for its card: the shared flags (:data:`RUN_FLAGS`) and the recipe's own
    (``extra``: loss weights, scorer entries, data size, ...)."""
    return {**{name: getattr(args, name) for name in RUN_FLAGS if hasattr(args, name)}, **extra}


def run_card(output_dir: str | os.PathLike, base_model: str | None, settings: dict,
             source: str | None = None) -> dict:
    """The :func:`write_model_card` arguments of a training recipe's output, with the run's final validation
    numbers and grid (:func:`run_results`).

    Args:
        output_dir: the recipe's ``--output_dir``.
        base_model: ``--pretrained_model_name_or_path``.
        settings: :func:`recipe_settings`.
        source: the hub id the loading snippets name (``--hub_model_id`` when pushing).
    """
    numbers, grid = run_results(output_dir)
    return {"base_model": base_model, "settings": settings, "validation": numbers or None, "grid": grid,
            "source": source}
