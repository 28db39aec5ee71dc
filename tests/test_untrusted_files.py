"""Model folders from other people: IQA-Adapter and LGDM head folders whose config.json or weights are hostile or
damaged are refused with one InputError (before any module of the config's size is built), and ``lgdm:DIR``
scores are bound to the head's content, not its path."""

from __future__ import annotations

import json
import resource
import shutil
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qualityguide import load_pipeline, load_scorer
from qualityguide.adapter import IQAAdapter, ReferenceIQAAdapter
from qualityguide.adapter.model import IQAAdapterConfig, weight_shapes
from qualityguide.errors import InputError
from qualityguide.lgdm import LGDM, HeadConfig, LGDMConfig, LGDMHead, LGDMScorer
from qualityguide.lgdm.head import weight_shapes as head_weight_shapes
from qualityguide.cli.scorefile import scorer_settings

NAMES = ["pyiqa:topiq_nr", "niqe-embedded"]
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
DEEP = "[" * 100_000 + "]" * 100_000  # json recurses once per bracket


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Bounded:
    """Asserts the block took under ``seconds`` and raised the process's peak memory by under ``mb``."""

    def __init__(self, seconds: float = 10.0, mb: float = 300.0):
        self.seconds, self.mb = seconds, mb

    def __enter__(self):
        self.start, self.rss = time.perf_counter(), _peak_rss_mb()
        return self

    def __exit__(self, *exc):
        assert time.perf_counter() - self.start < self.seconds
        assert _peak_rss_mb() - self.rss < self.mb
        return False


def _read(path) -> dict:
    """The tensors of a safetensors file, copied out of its memory map (the test then overwrites the file)."""
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def _edit_json(path, edit) -> None:
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload))


# ----------------------------------------------------------------------------- IQA-Adapter

@pytest.fixture()
def adapter_dir(tmp_path):
    adapter = IQAAdapter(NAMES, cross_attention_dim=32, layers=[[LAYER, 64, 32], [LAYER.replace("0.attn2", "1.attn2"),
                                                                                  64, 32]])
    return adapter.save_pretrained(tmp_path / "adapter")


@pytest.mark.parametrize("field, value, tensor", [("cross_attention_dim", 10**9, "projection.norm.weight"),
                                                  ("num_tokens", 10**9, "projection.image_embeds.bias")])
def test_adapter_config_asking_for_a_huge_model_is_refused_before_allocating(adapter_dir, field, value, tensor):
    _edit_json(adapter_dir / "config.json", lambda p: p["config"].update({field: value}))
    shown = [32] if field == "cross_attention_dim" else [128]
    with Bounded(), pytest.raises(InputError) as info:
        IQAAdapter.from_pretrained(adapter_dir)
    message = str(info.value)
    assert f"{field}={value}" in message and tensor in message and f"holds {shown}" in message
    assert "use the config.json saved with these weights" in message


def test_adapter_layers_asking_for_a_huge_layer_are_refused_before_allocating(adapter_dir):
    _edit_json(adapter_dir / "config.json", lambda p: p["config"].update(layers=[[LAYER, 10**10, 32], [LAYER, 64, 32]]))
    with Bounded(), pytest.raises(InputError, match=r"layers\[0\]=.*10000000000.*holds \[64, 32\]"):
        IQAAdapter.from_pretrained(adapter_dir)


@pytest.mark.parametrize("config", [
    IQAAdapterConfig(score_names=NAMES, cross_attention_dim=32, layers=[[LAYER, 64, 32]]),
    IQAAdapterConfig(score_names=["a"], num_tokens=3, cross_attention_dim=16, projection="mlp", hidden_dim=7),
    IQAAdapterConfig(score_names=["a"], num_tokens=2, cross_attention_dim=16, projection="mlp",
                     layers=[[LAYER, 8, 16]]),
])
def test_weight_shapes_equal_a_built_adapters(config):
    built = IQAAdapter(config.score_names, config.num_tokens, config.cross_attention_dim, config.projection,
                       config.hidden_dim, layers=config.layers)
    assert {k: v[0] for k, v in weight_shapes(config).items()} == {k: tuple(v.shape)
                                                                    for k, v in built.state_dict().items()}


def test_reference_adapter_weight_shapes_equal_a_built_one():
    built = ReferenceIQAAdapter("brisque", num_tokens=2, cross_attention_dim=16, layers=[[LAYER, 8, 16]])
    assert {k: v[0] for k, v in weight_shapes(built.config).items()} == {k: tuple(v.shape)
                                                                          for k, v in built.state_dict().items()}


@pytest.mark.parametrize("content, match", [
    (b"\x00" * 40, "is not a readable safetensors file"),
    (None, "is not a readable safetensors file"),  # the real file cut short
])
def test_adapter_corrupt_weights_are_one_input_error(adapter_dir, content, match):
    path = adapter_dir / "model.safetensors"
    path.write_bytes(content if content is not None else path.read_bytes()[:200])
    with pytest.raises(InputError, match=match):
        IQAAdapter.from_pretrained(adapter_dir)


@pytest.mark.parametrize("layers, match", [
    ([["x", "wide", 3]], r"layers\[0\]=\['x', 'wide', 3\]"),
    ([[1, 2]], r"layers\[0\]=\[1, 2\]"),
    ("abc", r"layers='abc'"),
    ([[LAYER, 64, 32.5]], r"layers\[0\]"),
])
def test_adapter_malformed_layers_are_one_input_error(adapter_dir, layers, match):
    _edit_json(adapter_dir / "config.json", lambda p: p["config"].update(layers=layers))
    with pytest.raises(InputError, match=match):
        IQAAdapter.from_pretrained(adapter_dir)


@pytest.mark.parametrize("text, match", [
    (DEEP, "nested too deeply"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ('"format"', "holds a JSON str, not an object"),
    ("{not json", "is not valid JSON"),
])
def test_adapter_config_that_is_no_json_object_is_one_input_error(adapter_dir, text, match):
    (adapter_dir / "config.json").write_text(text)
    with pytest.raises(InputError, match=match):
        IQAAdapter.from_pretrained(adapter_dir)


def test_adapter_unknown_config_field_is_named_with_the_closest_known_one(adapter_dir):
    _edit_json(adapter_dir / "config.json", lambda p: p["config"].update(num_token=4))
    with pytest.raises(InputError, match=r"unknown field\(s\) \['num_token'\].*did you mean 'num_tokens'.*known: kind"):
        IQAAdapter.from_pretrained(adapter_dir)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adapter_nan_or_inf_weights_are_refused_naming_the_tensor(adapter_dir, bad):
    path = adapter_dir / "model.safetensors"
    state = _read(path)
    state["layers.1.to_v_ip.0.weight"][3, 5] = bad
    save_file(state, str(path))
    with pytest.raises(InputError, match=r"tensor layers\.1\.to_v_ip\.0\.weight holds 1 NaN/inf value"):
        IQAAdapter.from_pretrained(adapter_dir)


def test_adapter_quantiles_nested_too_deeply_are_one_input_error(adapter_dir):
    (adapter_dir / "quantiles.json").write_text(DEEP)
    with pytest.raises(InputError, match="quantiles.*nested too deeply"):
        IQAAdapter.from_pretrained(adapter_dir)


# ----------------------------------------------------------------------------- LGDM head

SMALL = dict(image_size=32, num_steps=4, t_max=40, psi="none")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny:sd")


def _scorer(pipe, seed: int) -> LGDMScorer:
    model = LGDM.from_pipeline(pipe, LGDMConfig(**SMALL))
    head = LGDMHead(HeadConfig(num_steps=4, layer_dims=model.recorder.dims, hidden=(16, 8)))
    torch.manual_seed(seed)
    for p in head.mlp.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return LGDMScorer(model, head).eval()


@pytest.fixture(scope="module")
def head_a(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("heads") / "a"
    _scorer(pipe, 0).save_pretrained(folder)
    return folder


@pytest.fixture()
def head_dir(head_a, tmp_path):
    return shutil.copytree(head_a, tmp_path / "head")


def test_head_config_asking_for_a_huge_head_is_refused_before_allocating(head_dir):
    _edit_json(head_dir / "config.json", lambda p: p["head"].update(layer_dims=[10**11]))
    with Bounded(), pytest.raises(InputError, match=r"layer_dims=\[100000000000\].*feature_mean \[4, 100000000000\].*"
                                                    r"holds \[4, \d+\]"):
        LGDMHead.from_pretrained(head_dir)


def test_head_hidden_width_asking_for_a_huge_head_is_refused_before_allocating(head_dir):
    _edit_json(head_dir / "config.json", lambda p: p["head"].update(hidden=[10**10, 8]))
    with Bounded(), pytest.raises(InputError, match=r"hidden=\[10000000000, 8\].*mlp\.0\.bias.*holds \[16\]"):
        LGDMHead.from_pretrained(head_dir)


@pytest.mark.parametrize("config", [HeadConfig(num_steps=3, layer_dims=[4, 5], hidden=(6, 7)),
                                    HeadConfig(num_steps=2, layer_dims=[3], mixing="concat", hidden=(5, 2))])
def test_head_weight_shapes_equal_a_built_heads(config):
    assert {k: v[0] for k, v in head_weight_shapes(config).items()} == {
        k: tuple(v.shape) for k, v in LGDMHead(config).state_dict().items()}


@pytest.mark.parametrize("text, match", [
    (DEEP, "nested too deeply"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ("{not json", "is not valid JSON"),
    (b"\xff\xfe{}", "is not UTF-8"),
])
def test_head_config_that_is_no_json_object_is_one_input_error(head_dir, text, match):
    path = head_dir / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InputError, match=match):
        LGDMHead.from_pretrained(head_dir)


def test_head_unknown_fields_are_named_with_the_known_ones_and_a_close_match(head_dir):
    _edit_json(head_dir / "config.json", lambda p: p["head"].update(layer_dim=[3]))
    with pytest.raises(InputError, match=r"unknown field\(s\) \['layer_dim'\].*did you mean 'layer_dims'.*known: "
                                         r"num_steps, layer_dims, mixing, hidden, dropout"):
        LGDMHead.from_pretrained(head_dir)


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.update(layer_dims=["8", 4]), "layer_dims="),
    (lambda h: h.update(hidden="wide"), "hidden='wide'"),
    (lambda h: h.update(num_steps=None), "num_steps=None"),
    (lambda h: h.pop("num_steps"), "num_steps"),
    (lambda h: h.update(dropout="0.1"), "dropout"),
])
def test_head_fields_of_the_wrong_type_are_one_input_error(head_dir, edit, match):
    _edit_json(head_dir / "config.json", lambda p: edit(p["head"]))
    with pytest.raises(InputError, match=match):
        LGDMHead.from_pretrained(head_dir)


@pytest.mark.parametrize("folder, load, match", [
    ("adapter_dir", IQAAdapter.from_pretrained, "torch.save checkpoint.*never unpickled"),
    ("head_dir", LGDMHead.from_pretrained, "LGDM head weights .* torch.save checkpoint.*never unpickled"),
])
def test_pickle_named_safetensors_is_refused_not_unpickled(request, folder, load, match):
    directory = request.getfixturevalue(folder)
    torch.save(_read(directory / "model.safetensors"), directory / "model.safetensors")
    with pytest.raises(InputError, match=match):
        load(directory)


def test_head_nan_weights_are_refused_naming_the_tensor(head_dir):
    path = head_dir / "model.safetensors"
    state = _read(path)
    state["feature_std"][0, 0] = float("nan")
    save_file(state, str(path))
    with pytest.raises(InputError, match="tensor feature_std holds 1 NaN/inf"):
        LGDMHead.from_pretrained(head_dir)


@pytest.mark.parametrize("edit, match", [
    (lambda p: p.pop("model_key"), "no 'model_key' str"),
    (lambda p: p.update(lgdm=[1]), "no 'lgdm' dict"),
    (lambda p: p["lgdm"].update(num_step=4), r"unknown field\(s\) \['num_step'\].*did you mean 'num_steps'"),
    (lambda p: p["lgdm"].update(eta="0"), "eta"),
])
def test_scorer_metadata_problems_are_one_input_error(head_dir, pipe, edit, match):
    _edit_json(head_dir / "config.json", edit)
    with pytest.raises(InputError, match=match):
        LGDMScorer.from_pretrained(head_dir, pipeline=pipe)


@pytest.mark.parametrize("field, value, match", [
    ("image_size", 10**9, r"image_size must be an integer in \[8, 8192\]"),
    ("max_upscale", float("nan"), "max_upscale must be a finite number"),
    ("zeta1", float("nan"), "zeta1 must be a finite number"),
])
def test_lgdm_config_from_a_file_cannot_ask_for_gigapixel_or_nan_settings(field, value, match):
    data = json.loads(json.dumps({**SMALL, field: value}))  # as read back from a head's config.json
    with pytest.raises(InputError, match=match):
        LGDMConfig.from_dict(data)


def test_head_and_lgdm_config_steps_disagreeing_are_refused_before_a_backbone_loads(head_dir, monkeypatch):
    _edit_json(head_dir / "config.json", lambda p: p["lgdm"].update(num_steps=8, t_max=40))

    def no_backbone(*args, **kwargs):
        raise AssertionError("a backbone was loaded for a head that cannot use it")

    monkeypatch.setattr(LGDM, "from_pretrained", no_backbone)
    with pytest.raises(InputError, match="num_steps=4 but its LGDM config asks for num_steps=8"):
        LGDMScorer.from_pretrained(head_dir)


def _image(tmp_path):
    from PIL import Image

    path = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((40, 44, 3)) * 255).astype("uint8")).save(path)
    return path


@pytest.mark.parametrize("damage", ["pickle", "deep", "huge", "unknown"])
def test_cli_score_with_a_bad_head_is_one_line_exit_2(head_dir, tmp_path, capsys, damage):
    from qualityguide.cli import main

    if damage == "pickle":
        torch.save(_read(head_dir / "model.safetensors"), head_dir / "model.safetensors")
    elif damage == "deep":
        (head_dir / "config.json").write_text(DEEP)
    elif damage == "huge":
        _edit_json(head_dir / "config.json", lambda p: p["head"].update(layer_dims=[10**11]))
    else:
        _edit_json(head_dir / "config.json", lambda p: p["head"].update(mixng="concat"))
    out = tmp_path / "scores.csv"
    assert main(["score", str(_image(tmp_path)), "--scorer", f"lgdm:{head_dir}", "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qualityguide score: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(head_dir) in err


# ----------------------------------------------------------------------------- lgdm:DIR settings

def test_lgdm_settings_name_the_head_by_content(pipe, head_a, tmp_path, capsys):
    from qualityguide.cli import main

    folder = shutil.copytree(head_a, tmp_path / "head")
    image, out = _image(tmp_path), tmp_path / "scores.csv"
    argv = ["score", str(image), "--scorer", f"lgdm:{folder}", "-o", str(out), "--quiet"]
    assert main(argv) == 0
    first = out.read_bytes()
    settings_a = scorer_settings(load_scorer(f"lgdm:{folder}"))
    assert settings_a.startswith("scorer=lgdm:sha256=") and str(folder) not in settings_a
    assert settings_a in out.read_text()

    elsewhere = shutil.copytree(folder, tmp_path / "same-head-elsewhere")
    assert scorer_settings(load_scorer(f"lgdm:{elsewhere}")) == settings_a  # same content, another path

    _scorer(pipe, 1).save_pretrained(folder)  # refit into the same folder: other weights
    settings_b = scorer_settings(load_scorer(f"lgdm:{folder}"))
    assert settings_b != settings_a
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert repr(settings_a) in err and repr(settings_b) in err
    assert out.read_bytes() == first  # the refused file is unchanged


def test_lgdm_settings_name_a_reduced_precision_backbone(head_a):
    half = load_pipeline("tiny:sd", dtype=torch.float16)
    full = LGDMScorer.from_pretrained(head_a, pipeline=load_pipeline("tiny:sd"))
    scorer = LGDMScorer.from_pretrained(head_a, pipeline=half)
    assert scorer_settings(full) + ",float16" == scorer_settings(scorer)
