"""WeightIdentity: the same weights in any precision or folder are accepted; other weights are refused, by name."""

import itertools

import pytest
import torch

from qualityguide import load_pipeline
from qualityguide.errors import InputError
from qualityguide.identity import (ABS_TOL, REL_TOL, SAMPLES_PER_TENSOR, WeightIdentity, WeightsMismatchError, _same,
                                   sample_positions)

TARGET = "unet.up_blocks.1.resnets.0.conv1.weight"


def modules(pipe):
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}


def target(pipe):
    return pipe.unet.up_blocks[1].resnets[0].conv1.weight


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny:sd")


@pytest.fixture(scope="module")
def identity(pipe):
    return WeightIdentity.of(modules(pipe))


def changed(edit):
    """A fresh tiny:sd (the same weights as ``pipe``) with ``edit(pipe)`` applied under no_grad."""
    other = load_pipeline("tiny:sd")
    with torch.no_grad():
        edit(other)
    return other


def test_tolerance_covers_every_half_precision_rounding_chain_and_is_tight():
    g = torch.Generator().manual_seed(0)
    magnitude = torch.exp2(torch.empty(400_000).uniform_(-30, 7, generator=g))  # fp16 subnormals up to 128
    x = magnitude * torch.randn(400_000, generator=g).sign()
    f16, b16 = torch.float16, torch.bfloat16
    chains = [[], [f16], [b16], [f16, b16], [b16, f16], [f16, b16, f16], [b16, f16, b16]]
    rounded = []
    for chain in chains:
        v = x
        for dtype in chain:
            v = v.to(dtype)
        rounded.append(v.float())
    worst = 0.0
    for a, b in itertools.combinations(rounded, 2):
        assert bool(_same(a, b).all())  # no false alarm for the same weights in any precision
        ratio = (a.double() - b.double()).abs() / (REL_TOL * torch.maximum(a.abs(), b.abs()).double() + ABS_TOL)
        worst = max(worst, float(ratio.max()))
    assert worst > 0.9  # some pairs use almost all of it: a tolerance of half the size would refuse them


def test_same_weights_in_any_precision_are_accepted(pipe, identity):
    def round_values(*dtypes):
        def edit(p):
            for param in p.unet.parameters():
                value = param
                for dtype in dtypes:
                    value = value.to(dtype)
                param.copy_(value.float())
        return edit

    for dtypes in [(torch.bfloat16,), (torch.float16,), (torch.float16, torch.bfloat16)]:
        assert identity.differences(modules(changed(round_values(*dtypes)))) == [], dtypes
    for dtype in (torch.bfloat16, torch.float16):
        half = load_pipeline("tiny:sd", dtype=dtype)  # the modules themselves in half precision
        assert identity.differences(modules(half)) == [], dtype
        # ... and the other way round: an identity taken in half precision accepts fp32 and double-rounded weights
        assert WeightIdentity.of(modules(half)).differences(modules(pipe)) == []
        assert WeightIdentity.of(modules(half)).differences(
            modules(changed(round_values(torch.float16, torch.bfloat16)))) == []


@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_weights_saved_to_another_folder_are_accepted(pipe, identity, tmp_path, dtype):
    source = load_pipeline("tiny:sd", dtype=dtype)
    source.save_pretrained(tmp_path / "copy")
    for load_dtype in (None, "fp32", dtype):
        reloaded = load_pipeline(str(tmp_path / "copy"), dtype=load_dtype)
        assert identity.differences(modules(reloaded)) == [], (dtype, load_dtype)
    # the identity file itself round-trips, and sample positions depend only on names and shapes
    path = identity.save(tmp_path / "id.safetensors")
    stored = WeightIdentity.load(path)
    assert stored.differences(modules(reloaded)) == []
    again = WeightIdentity.of(modules(reloaded))
    assert again.names == identity.names and torch.equal(again.positions, identity.positions)


@pytest.mark.parametrize("kind", ["multiplicative", "additive"])
def test_one_percent_random_change_of_one_up_block_matrix_is_refused(identity, kind):
    def edit(p):
        w = target(p)
        g = torch.Generator().manual_seed(1)
        noise = torch.randn(w.shape, generator=g)
        w.copy_(w * (1 + 0.01 * noise) if kind == "multiplicative" else w + 0.01 * w.std() * noise)

    other = changed(edit)
    problems = identity.differences(modules(other))
    assert len(problems) == 1 and problems[0].startswith(f"{TARGET}: ")
    assert "sampled values differ beyond half-precision rounding" in problems[0]
    with pytest.raises(WeightsMismatchError, match=rf"made with other weights \(1 of {identity.num_parameters} "
                                                   rf"parameters differ.*{TARGET}.*Fix: retrain"):
        identity.check(modules(other), "the test artifact was made with other weights", "retrain")


def test_a_change_just_beyond_rounding_is_refused(identity):
    other = changed(lambda p: target(p).mul_(1 + 1.5 * 2 ** -7))  # every element 1.5 bf16 steps (2**-7) away
    problems = identity.differences(modules(other))
    assert len(problems) == 1 and problems[0].startswith(f"{TARGET}: {SAMPLES_PER_TENSOR}/{SAMPLES_PER_TENSOR} sampled")


def test_a_large_edit_outside_the_sample_is_refused_by_the_norm(pipe, identity):
    w = target(pipe)
    sampled = set(sample_positions(TARGET, tuple(w.shape)).tolist())
    spot = next(i for i in range(w.numel()) if i not in sampled)

    def edit(p):
        flat = target(p).view(-1)
        flat[spot] = flat[spot] + 0.2 * target(p).norm()

    problems = identity.differences(modules(changed(edit)))
    assert len(problems) == 1 and problems[0].startswith(f"{TARGET}: norm ") and "sampled" not in problems[0]


def test_every_module_and_every_kind_of_parameter_is_covered(identity):
    names = ["vae.decoder.up_blocks.0.resnets.0.conv2.weight", "text_encoder.encoder.layers.1.mlp.fc1.weight",
             "unet.up_blocks.1.resnets.0.conv1.bias", "unet.up_blocks.0.attentions.0.norm.weight"]
    for name in names:
        def edit(p, name=name):
            prefix, rest = name.split(".", 1)
            w = modules(p)[prefix].get_parameter(rest)
            w.add_(0.01 * (w.abs().mean() + 1e-3) * torch.randn(w.shape, generator=torch.Generator().manual_seed(2)))

        problems = identity.differences(modules(changed(edit)))
        assert [p.split(":")[0] for p in problems] == [name], problems
    nan = identity.differences(modules(changed(lambda p: target(p).fill_(float("nan")))))
    assert [p.split(":")[0] for p in nan] == [TARGET]


def _add_lora(unet, relative: float):
    """A peft LoRA (rank 4) on every attention projection, B non-zero so that ||BA|| = relative * ||W||."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    targeted = []
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=g))
                b.mul_(relative * module.base_layer.weight.norm() / (b @ a).norm())
                targeted.append(f"unet.{name}.weight")
    return targeted


def test_a_fused_lora_is_refused_and_so_is_an_unfused_one(identity):
    other = load_pipeline("tiny:sd")
    targeted = _add_lora(other.unet, relative=0.01)
    assert len(targeted) >= 16
    unfused = identity.differences(modules(other))  # adapters loaded, not fused: extra parameters
    assert len(unfused) == 1 and unfused[0].startswith("other parameters: ") and "lora_A" in unfused[0]
    other.unet.fuse_lora()
    other.unet.unload_lora()  # W + BA in place, the LoRA modules gone: names and shapes as before
    assert [n for n, _ in other.unet.named_parameters() if "lora" in n] == []
    problems = identity.differences(modules(other))
    assert sorted(p.split(":")[0] for p in problems) == sorted(targeted)  # exactly the fused matrices, each one
    assert all("sampled values differ" in p for p in problems)


def test_shapes_and_bad_input_are_reported(pipe, identity, tmp_path):
    sdxl = load_pipeline("tiny:sdxl")
    problems = identity.differences(modules(sdxl))
    assert any(p.startswith("other parameters: ") for p in problems)
    assert any(": shape " in p for p in problems)
    with pytest.raises(InputError, match="samples_per_tensor"):
        WeightIdentity.of(modules(pipe), samples_per_tensor=0)
    with pytest.raises(InputError, match="does not exist"):
        WeightIdentity.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(InputError, match="cannot be read"):
        WeightIdentity.load(tmp_path / "bad.safetensors")
    with torch.device("meta"):
        lazy = torch.nn.Linear(4, 4)
    with pytest.raises(InputError, match="meta device"):
        WeightIdentity.of({"lazy": lazy})


def test_sample_positions_are_fixed_by_name_and_shape():
    a = sample_positions(TARGET, (32, 64, 3, 3))
    assert torch.equal(a, sample_positions(TARGET, (32, 64, 3, 3)))
    assert not torch.equal(a, sample_positions(TARGET + "x", (32, 64, 3, 3)))
    assert torch.equal(a, a.unique()) and int(a.min()) >= 0 and int(a.max()) < 32 * 64 * 9
    assert len(a) > 0.9 * SAMPLES_PER_TENSOR
    assert torch.equal(sample_positions("b", (5,)), torch.arange(5))  # small tensors: every element
