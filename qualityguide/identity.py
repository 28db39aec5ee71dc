"""Identity of model weights by content: are these the weights an artifact was made for?

A feature cache, a trained head or an adapter is valid only for the base weights it was made with.
:class:`WeightIdentity` records, for every floating-point parameter of some named modules, its name,
shape, norm and a fixed sample of its elements; :meth:`WeightIdentity.check` compares live modules
with it and refuses other weights, naming the parameters that differ.

The tolerance is half-precision rounding. All roundings of one fp32 value to fp32, fp16, bf16 or
any chain of them (fp32 -> fp16 -> bf16, ...) lie between the same two neighbouring bf16 numbers,
so any two of them differ by at most one bf16 step: ``|a - b| <= 2**-7 * max(|a|, |b|)``, plus
``2**-24`` where fp16's subnormals (below 6.1e-5) are coarser (``tests/test_identity.py`` checks
this on every chain). bf16's unit roundoff is 2**-8 and two roundings can land a step apart, so a
tighter relative tolerance would refuse the same weights loaded in another precision.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import InputError
from .files import FORMATS, atomic_write

REL_TOL = 2.0 ** -7   # one bf16 step, relative to the larger value
ABS_TOL = 2.0 ** -24  # fp16 subnormal spacing
NORM_SLACK = 1e-5     # float32 summation error of a norm, relative
SAMPLES_PER_TENSOR = 64
IDENTITY_FILE = "weights_identity.safetensors"
FORMAT = FORMATS["weights_identity"]


class WeightsMismatchError(InputError):
    """Weights differ from the ones an artifact (cache, head, adapter) was made for."""


def state_sha256(module: nn.Module) -> str:
    """SHA-256 (hex) of a module's state by content (names, shapes, float32 values), one tensor at a time so memory
    stays bounded: what a model card or a scores file records for weights held only in memory."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def sample_positions(name: str, shape: tuple[int, ...], count: int = SAMPLES_PER_TENSOR) -> torch.Tensor:
    """Positions (flattened, row-major, sorted, distinct) sampled from a parameter: every element when it has at
    most ``count``, else up to ``count`` drawn from SHAKE-256 of its name and shape (the same on every machine and
    library version; identities also store them, so a later change of this rule cannot break old files)."""
    n = math.prod(shape)
    if n <= count:
        return torch.arange(n, dtype=torch.int64)
    digest = hashlib.shake_256(f"{name}|{tuple(shape)}".encode()).digest(8 * count)
    drawn = np.frombuffer(digest, dtype="<u8") % np.uint64(n)
    return torch.from_numpy(np.unique(drawn).astype(np.int64))


def _parameters(modules: Mapping[str, nn.Module | None]) -> dict[str, torch.Tensor]:
    """Floating-point parameters of each module, named ``<module>.<parameter>``."""
    params = {}
    for prefix, module in modules.items():
        if module is None:
            continue
        for name, param in module.named_parameters():
            if not param.is_floating_point():
                continue
            if param.device.type == "meta":
                raise InputError(f"{prefix}.{name} is on the meta device (sequential CPU offload or a lazy load), so "
                                 "its weights cannot be read; load the model without enable_sequential_cpu_offload "
                                 "to check its identity")
            params[f"{prefix}.{name}"] = param.detach()
    return params


def _measure(tensors: list[torch.Tensor], positions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Norms (float64 ``[P]``) and the values at ``positions`` (float32, concatenated), read on each tensor's device
    (one transfer per device)."""
    norms = torch.zeros(len(tensors), dtype=torch.float64)
    counts = [len(p) for p in positions]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    values = torch.zeros(int(offsets[-1]), dtype=torch.float32)
    by_device: dict[torch.device, list[int]] = {}
    for i, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(i)
    for device, indices in by_device.items():
        where = torch.cat([positions[i] for i in indices]).to(device).split([counts[i] for i in indices])
        dev_norms, dev_values = [], []
        for i, pos in zip(indices, where):
            tensor = tensors[i]
            dev_norms.append(torch.linalg.vector_norm(tensor, dtype=torch.float32))
            # unravel instead of flatten: no copy of non-contiguous (channels_last) weights
            picked = tensor[torch.unravel_index(pos, tensor.shape)] if tensor.dim() else tensor.reshape(1)[pos]
            dev_values.append(picked.float())
        norms[indices] = torch.stack(dev_norms).cpu().double()
        flat = torch.cat(dev_values).cpu()
        start = 0
        for i in indices:
            values[offsets[i]:offsets[i + 1]] = flat[start:start + counts[i]]
            start += counts[i]
    return norms, values


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: equal up to half-precision rounding (NaN equals NaN, inf equals the same inf)."""
    a, b = a.double(), b.double()
    tol = REL_TOL * torch.maximum(a.abs(), b.abs()) + ABS_TOL
    return (a == b) | ((a - b).abs() <= tol) | (a.isnan() & b.isnan())


def _norms_same(a: float, b: float, n: int) -> bool:
    """Whether two norms can come from tensors equal elementwise up to :func:`_same`: from ``|a_i - b_i| <=
    r*max(|a_i|,|b_i|) + t`` follows ``| ||a|| - ||b|| | <= (r*min(||a||,||b||) + t*sqrt(n)) / (1 - r)``."""
    if a == b or (math.isnan(a) and math.isnan(b)):
        return True
    tol = (REL_TOL * min(a, b) + ABS_TOL * math.sqrt(n)) / (1 - REL_TOL) + NORM_SLACK * max(a, b)
    return abs(a - b) <= tol


@dataclass(eq=False)
class WeightIdentity:
    """Names, shapes, norms and sampled elements of every floating-point parameter of some named modules.

    What it catches: any change of a parameter's name or shape; any dense change larger than half-precision
    rounding (a fine-tune, a fused LoRA, another checkpoint): a random change of 1% of each element, or of 1% of
    the tensor's standard deviation, moves 40-60% of the elements past the tolerance, so all 64 samples pass by
    chance with probability below 1e-15 per tensor; an additive change of 0.1% of the std still flags ~7-9% of
    the elements (a miss chance below 1% per tensor; measured by ``evals/bench_identity.py``); and a sparse
    change that moves a tensor's norm by more than ~0.8% (``2**-7``). Adapters that are loaded but not fused
    add parameters and are refused by name.

    What it cannot see: changes confined to elements outside the sample that move the norm by less than ~0.8%
    (a few edited rows of a large matrix, e.g. one new token embedding); changes within half-precision rounding
    (by design: ``|change| <= 2**-7 * |w|`` everywhere, e.g. a LoRA scaled down to that size; in between,
    detection is partial: a random 0.3% change of each element was refused in 6 of 10 trials); buffers, and
    anything that is not a parameter (tokenizer, scheduler, configs: compare those separately). It is a
    tolerance check, not a cryptographic hash: an edit made to avoid the (public, deterministic) sample
    positions is not detected.

    Build with :meth:`of`, store with :meth:`save` (safetensors, next to the artifact), read with :meth:`load`,
    compare live modules with :meth:`differences` / :meth:`check`.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    norms: torch.Tensor       # float64 [P]
    counts: torch.Tensor      # int64 [P]: samples per parameter
    positions: torch.Tensor   # int64 [S]: flattened positions, parameter after parameter
    values: torch.Tensor      # float32 [S]

    @classmethod
    @torch.no_grad()
    def of(cls, modules: Mapping[str, nn.Module | None], samples_per_tensor: int = SAMPLES_PER_TENSOR
           ) -> "WeightIdentity":
        """The identity of ``modules`` (e.g. ``{"unet": pipe.unet, "vae": pipe.vae}``; None entries are skipped).

        Reads every parameter once (its norm) on the device it lives on; nothing is moved or converted in place.

        Args:
            modules: name -> module; parameters are named ``<name>.<parameter name>``.
            samples_per_tensor: elements sampled per parameter (all of them in smaller parameters).
        """
        if not isinstance(samples_per_tensor, int) or samples_per_tensor < 1:
            raise InputError(f"samples_per_tensor must be a positive integer, got {samples_per_tensor!r}")
        params = _parameters(modules)
        if not params:
            raise InputError(f"modules {sorted(modules)} have no floating-point parameters to identify")
        names = list(params)
        shapes = [tuple(params[n].shape) for n in names]
        positions = [sample_positions(n, s, samples_per_tensor) for n, s in zip(names, shapes)]
        norms, values = _measure([params[n] for n in names], positions)
        return cls(names, shapes, norms, torch.tensor([len(p) for p in positions], dtype=torch.int64),
                   torch.cat(positions), values)

    @property
    def num_parameters(self) -> int:
        return len(self.names)

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    # ----------------------------------------------------------------- compare
    @torch.no_grad()
    def differences(self, modules: Mapping[str, nn.Module | None]) -> list[str]:
        """What differs between ``modules`` and the weights this identity was taken from (empty: the same weights,
        up to half-precision rounding). One entry per differing parameter; missing/extra parameters first."""
        params = _parameters(modules)
        problems = []
        known = set(self.names)
        only_here = [n for n in params if n not in known]
        only_there = [n for n in self.names if n not in params]
        if only_here or only_there:
            examples = ", ".join([f"{n} (only here)" for n in only_here[:2]] +
                                 [f"{n} (only in the reference)" for n in only_there[:2]])
            problems.append(f"other parameters: {len(only_here)} only in these weights, {len(only_there)} only in "
                            f"the reference ({examples})")
        offsets = np.concatenate([[0], np.cumsum(self.counts.numpy())]).astype(int)
        compared = []
        for i, (name, shape) in enumerate(zip(self.names, self.shapes)):
            if name not in params:
                continue
            if tuple(params[name].shape) != shape:
                problems.append(f"{name}: shape {tuple(params[name].shape)} here, {shape} in the reference")
                continue
            compared.append(i)
        if not compared:
            return problems
        tensors = [params[self.names[i]] for i in compared]
        positions = [self.positions[offsets[i]:offsets[i + 1]] for i in compared]
        norms, values = _measure(tensors, positions)
        reference = torch.cat([self.values[offsets[i]:offsets[i + 1]] for i in compared])
        same = _same(reference, values)
        start = 0
        for j, i in enumerate(compared):
            name, count = self.names[i], len(positions[j])
            ok = same[start:start + count]
            a, b = reference[start:start + count].double(), values[start:start + count].double()
            start += count
            why = []
            if not bool(ok.all()):
                bad = ~ok
                change = ((a - b).abs() / torch.maximum(a.abs(), b.abs()).clamp_min(ABS_TOL))[bad]
                largest = float(change.nan_to_num(math.inf).max())
                why.append(f"{int(bad.sum())}/{count} sampled values differ beyond half-precision rounding "
                           f"(largest relative change {largest:.1e})")
            na, nb = float(self.norms[i]), float(norms[j])
            if not _norms_same(na, nb, math.prod(self.shapes[i])):
                rel = abs(na - nb) / max(na, nb) if max(na, nb) > 0 else math.inf
                why.append(f"norm {nb:.6g} here, {na:.6g} in the reference (relative change {rel:.1e}, more than "
                           "rounding allows)")
            if why:
                problems.append(f"{name}: " + "; ".join(why))
        return problems

    def check(self, modules: Mapping[str, nn.Module | None], what: str, fix: str) -> None:
        """Raise :class:`WeightsMismatchError` naming the differing parameters unless ``modules`` hold these weights.

        Args:
            modules: as for :meth:`of`.
            what: the refusal, e.g. ``"feature cache feats/ was extracted with other backbone weights"``.
            fix: what the user can do, e.g. ``"use a new --cache folder for these weights"``.
        """
        problems = self.differences(modules)
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise WeightsMismatchError(f"{what} ({len(problems)} of {self.num_parameters} parameters differ beyond "
                                       f"half-precision rounding: {shown}). Fix: {fix}")

    # ----------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (atomically: a temporary name, then renamed)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"norms": self.norms, "counts": self.counts, "positions": self.positions, "values": self.values}
        metadata = {"format": FORMAT, "names": json.dumps(self.names),
                    "shapes": json.dumps([list(s) for s in self.shapes])}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WeightIdentity":
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"weights identity {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in ("norms", "counts", "positions", "values")}
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            names, shapes = json.loads(meta["names"]), [tuple(s) for s in json.loads(meta["shapes"])]
            samples = int(tensors["counts"].sum())
            if not len(names) == len(shapes) == len(tensors["norms"]) == len(tensors["counts"]) or \
                    not samples == len(tensors["positions"]) == len(tensors["values"]):
                raise ValueError("inconsistent sizes")
        except Exception as exc:
            raise InputError(f"weights identity {path} cannot be read ({type(exc).__name__}: {exc}); it was not "
                             "written by qualityguide's WeightIdentity.save or is damaged. Fix: rebuild the artifact "
                             "it belongs to") from None
        return cls(names, shapes, tensors["norms"].double(), tensors["counts"].long(), tensors["positions"].long(),
                   tensors["values"].float())
