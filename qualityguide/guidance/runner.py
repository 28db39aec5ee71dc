"""Resumable guided generation over a prompt list (used by ``recipes/guided_sampling.py`` and ``evals/guidance.py``).

Each job is one (prompt index, seed). Finished jobs are lines in ``results-<rank>.jsonl`` whose image
file exists; a rerun skips them, a kill loses at most the job in flight, and a line cut by a kill is
ignored (its job runs again and its image is overwritten).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..files import atomic_write, read_prompts, write_json  # noqa: F401  (read_prompts: the recipe reads it here)


@dataclass(frozen=True)
class Job:
    index: int
    prompt: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.index:05d}_{self.seed}"


def make_jobs(prompts: list[str], seeds_per_prompt: int = 1, base_seed: int = 0) -> list[Job]:
    """Jobs in a fixed order; the seed of a job depends only on its prompt index and repeat."""
    return [Job(i, p, base_seed + i * 1000 + r) for i, p in enumerate(prompts) for r in range(seeds_per_prompt)]


def check_settings(out: str | os.PathLike, settings: dict) -> None:
    """Bind an output folder to one set of generation settings: written on first use, refused if they differ
    later (a resumed run with another scale, model or step count would mix two experiments)."""
    path = Path(out) / "settings.json"
    wanted = json.loads(json.dumps(settings, default=str))
    if path.is_file():
        found = json.loads(path.read_text())
        diffs = [f"{k}: folder has {found.get(k)!r}, this run {wanted.get(k)!r}" for k in sorted(set(found) | set(wanted))
                 if found.get(k) != wanted.get(k)]
        if diffs:
            raise InputError(f"{out} holds results made with other settings ({'; '.join(diffs[:5])}). Fix: pass a new "
                             "--out folder, or rerun with the folder's settings to resume")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, wanted)


def finished(out: str | os.PathLike, jobs: list["Job"] | None = None) -> dict[str, dict]:
    """Records of jobs whose line is complete and whose image exists, from every process's JSONL.

    With ``jobs``, a record counts only if its prompt is still the job's prompt (an edited prompt file
    regenerates the changed lines).
    """
    out = Path(out)
    prompts = None if jobs is None else {job.key: job.prompt for job in jobs}
    done: dict[str, dict] = {}
    for path in sorted(out.glob("results-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # cut by a kill
            if prompts is not None and prompts.get(record.get("key")) != record.get("prompt"):
                continue
            if (out / record.get("image", "")).is_file():
                done[record["key"]] = record  # the latest line wins (a regenerated prompt)
    return done


def append_record(out: str | os.PathLike, rank: int, record: dict) -> None:
    """Append one line (fsynced). A line cut by a kill is first ended, so it cannot swallow the new record."""
    path = Path(out) / f"results-{rank:03d}.jsonl"
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            cut = handle.read(1) != b"\n"
    else:
        cut = False
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(("\n" if cut else "") + json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def generate(pipe, job: Job, guidance=None, steps: int = 30, guidance_scale: float = 7.5, **kwargs) -> torch.Tensor:
    """One image ``[1,3,H,W]`` in [0,1] for ``job`` (``guidance``: an attached QualityGuidance or None)."""
    generator = torch.Generator(device="cpu").manual_seed(job.seed)
    images = pipe(job.prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                  output_type="pt", callback_on_step_end=guidance, **kwargs).images
    return images.float().clamp(0, 1)


def save_image(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    array = (image[0].permute(1, 2, 0).cpu().numpy() * 255).round().clip(0, 255).astype("uint8")
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def timed_generate(pipe, job: Job, guidance=None, **kwargs) -> tuple[torch.Tensor, float]:
    """:func:`generate` and its wall time in seconds (GPU work included)."""
    from ..runtime import synchronize

    synchronize(pipe.device)
    start = time.perf_counter()
    image = generate(pipe, job, guidance, **kwargs)
    synchronize(pipe.device)
    return image, time.perf_counter() - start
