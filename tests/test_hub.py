"""The hub side of every saved model: ModelHubMixin round trips (new and old layouts), push_to_hub through a
recorder of the two network calls, local_files_only/revision/cache_dir against a hub cache built here, and the
model cards' fields."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelHubMixin

from qualityguide.adapter import IQAAdapter, ReferenceIQAAdapter
from qualityguide.adapter.conditions import ScoreQuantiles
from qualityguide.adapter.model import FORMAT
from qualityguide.hub import write_model_card
from qualityguide.errors import InputError, WeightsNotFoundError
from qualityguide.identity import IDENTITY_FILE, WeightIdentity
from qualityguide.lgdm import LGDM, HeadConfig, LGDMConfig, LGDMHead, LGDMScorer
from qualityguide.pipelines import load_pipeline

NAMES = ["pyiqa:topiq_nr", "pyiqa:laion_aes"]
LAYERS = [["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", 64, 32],
          ["up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", 64, 32]]


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and buffer random, so a round trip that drops or swaps a tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return module


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _adapter(seed: int = 0) -> IQAAdapter:
    quantiles = ScoreQuantiles.fit({n: torch.linspace(0, 1, 50).numpy() + i for i, n in enumerate(NAMES)})
    return _randomised(IQAAdapter(NAMES, cross_attention_dim=32, layers=LAYERS, quantiles=quantiles), seed)


def _reference(seed: int = 0) -> ReferenceIQAAdapter:
    return _randomised(ReferenceIQAAdapter("brisque", cross_attention_dim=32, layers=LAYERS), seed)


def _head(seed: int = 0) -> LGDMHead:
    head = _randomised(LGDMHead(HeadConfig(num_steps=2, layer_dims=[3, 5], hidden=(8, 4))), seed)
    head.metadata = {"backbone_spec": "tiny:sd", "note": seed}
    return head.eval()


def _old_adapter_files(adapter, folder: Path) -> Path:
    """The files the adapter writer of the previous version wrote (no model card), by hand."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    payload = {"format": FORMAT, "config": asdict(adapter.config), "diffusers_layout": None}
    (folder / "config.json").write_text(json.dumps(payload, indent=2))
    if getattr(adapter, "quantiles", None) is not None:
        (folder / "quantiles.json").write_text(adapter.quantiles.to_json())
    return folder


def _old_head_files(head: LGDMHead, folder: Path, legacy: bool) -> Path:
    """A head folder as the previous version wrote it (config.json/model.safetensors), or the one before
    (head_config.json/head.safetensors), by hand."""
    from safetensors.torch import save_file

    config, weights = ("head_config.json", "head.safetensors") if legacy else ("config.json", "model.safetensors")
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / weights))
    (folder / config).write_text(json.dumps({"head": asdict(head.config), **head.metadata}, indent=2))
    return folder


@pytest.mark.parametrize("build", [_adapter, _reference, _head], ids=["adapter", "reference", "head"])
def test_classes_take_the_hub_mixin_and_round_trip(build, tmp_path):
    model = build()
    assert isinstance(model, ModelHubMixin)
    model.save_pretrained(tmp_path / "new")
    loaded = type(model).from_pretrained(tmp_path / "new")
    assert type(loaded) is type(model) and _same_state(loaded, model)
    card = ModelCard.load(tmp_path / "new" / "README.md")
    assert card.data.library_name == "qualityguide" and card.data.qualityguide["kind"] == model.card_kind
    if isinstance(model, IQAAdapter):
        assert loaded.quantiles.table.keys() == model.quantiles.table.keys()
    if isinstance(model, LGDMHead):
        assert loaded.metadata == model.metadata  # an attribute, not a (head, metadata) tuple


@pytest.mark.parametrize("build, write", [(_adapter, _old_adapter_files), (_reference, _old_adapter_files),
                                          (_head, lambda h, f: _old_head_files(h, f, legacy=False)),
                                          (_head, lambda h, f: _old_head_files(h, f, legacy=True))],
                         ids=["adapter", "reference", "head", "head-legacy-names"])
def test_folders_written_by_the_previous_version_still_load(build, write, tmp_path):
    model = build(seed=3)
    folder = write(model, tmp_path / "old")
    loaded = type(model).from_pretrained(folder)
    assert _same_state(loaded, model)
    if isinstance(model, LGDMHead):
        assert loaded.metadata == model.metadata


@pytest.fixture(scope="module")
def scorer_parts():
    pipe = load_pipeline("tiny:sd")
    model = LGDM.from_pipeline(pipe, LGDMConfig(image_size=32, num_steps=2, t_max=20, psi="none"))
    head = LGDMHead(HeadConfig(num_steps=2, layer_dims=model.recorder.dims, hidden=(16, 8)))
    torch.manual_seed(0)
    torch.nn.init.normal_(head.mlp[-1].weight, std=0.5)
    return pipe, LGDMScorer(model, head).eval()


def test_lgdm_scorer_round_trips_with_card_and_old_folders_still_load(scorer_parts, tmp_path):
    pipe, scorer = scorer_parts
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = scorer(x)
    folder = scorer.save_pretrained(tmp_path / "scorer")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        IDENTITY_FILE]
    data = ModelCard.load(folder / "README.md").data
    assert data.qualityguide["kind"] == "lgdm_scorer" and data.qualityguide["base_model_spec"] == "tiny:sd"
    assert data.qualityguide["random_weights"] is True and "random-weights" in data.tags
    assert data.qualityguide["settings"]["lgdm"]["num_steps"] == 2 and data.base_model is None  # tiny: is no hub id
    old = shutil.copytree(folder, tmp_path / "old")
    (old / "README.md").unlink()  # what the previous version wrote: the same files, no card
    for source in (folder, old):
        loaded = LGDMScorer.from_pretrained(source, pipeline=pipe)
        assert isinstance(loaded, ModelHubMixin)
        with torch.no_grad():
            assert torch.equal(loaded(x), expected)


def _hub_cache(root: Path, repo_id: str, folder: Path, commit: str, ref: str = "main") -> None:
    """The hub cache layout huggingface_hub reads: models--owner--name/snapshots/COMMIT/, refs/REF."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


@pytest.mark.parametrize("build", [_adapter, _reference, _head], ids=["adapter", "reference", "head"])
def test_local_files_only_revision_and_cache_dir_read_a_hub_cache(build, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder named like the hub id
    first, second = build(seed=1), build(seed=2)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    cache = tmp_path / "cache"
    main_commit, v2_commit = "1" * 40, "2" * 40
    _hub_cache(cache, "someone/model", tmp_path / "first", main_commit)
    _hub_cache(cache, "someone/model", tmp_path / "second", v2_commit, ref="v2")
    cls = type(first)
    main = cls.from_pretrained("someone/model", cache_dir=cache, local_files_only=True)
    assert _same_state(main, first)
    assert _same_state(cls.from_pretrained("someone/model", cache_dir=cache, local_files_only=True,
                                           revision="v2"), second)
    assert _same_state(cls.from_pretrained("someone/model", cache_dir=cache, local_files_only=True,
                                           revision=main_commit), first)
    if isinstance(first, LGDMHead):
        assert main.metadata == first.metadata
    with pytest.raises(WeightsNotFoundError, match="'someone/other' is neither a local folder nor a hub"):
        cls.from_pretrained("someone/other", cache_dir=cache, local_files_only=True)


@pytest.fixture()
def recorder(hub_recorder):
    """The push's network calls recorded (conftest's ``hub_recorder``)."""
    return hub_recorder


@pytest.mark.parametrize("build", [_adapter, _head], ids=["adapter", "head"])
def test_push_to_hub_uploads_exactly_the_saved_files_with_the_card(build, recorder, tmp_path):
    model = build()
    url = model.push_to_hub("someone/model", token="hf_secret", private=True,
                            model_card_kwargs={"settings": {"steps": 7}})
    assert url == "https://huggingface.co/someone/model/commit/0"
    assert [c["call"] for c in recorder] == ["create_repo", "upload_folder"]
    create, upload = recorder
    assert create["repo_id"] == upload["repo_id"] == "someone/model" and create["private"] is True
    assert create["token"] == upload["token"] == "hf_secret" and upload["repo_type"] == "model"
    local = model.save_pretrained(tmp_path / "local")
    expected = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert set(upload["files"]) == expected and "README.md" in expected
    for name in expected - {"README.md"}:  # the weights and configs byte for byte; the card names the repo id
        assert upload["files"][name] == (local / name).read_bytes(), name
    card = ModelCard(upload["files"]["README.md"].decode())
    assert card.data.qualityguide["settings"] == {"steps": 7} and "someone/model" in card.text
    # save_pretrained(push_to_hub=True) pushes the same way, to the folder's name by default
    recorder.clear()
    model.save_pretrained(tmp_path / "model-two", push_to_hub=True, token="hf_secret")
    assert recorder[0]["repo_id"] == "model-two" and recorder[1]["call"] == "upload_folder"


def test_mixin_config_argument_is_refused(tmp_path):
    with pytest.raises(InputError, match="config=.*drop config="):
        _head().save_pretrained(tmp_path, config={"a": 1})


def test_cards_hold_the_fields(tmp_path):
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "grid.png").write_bytes(b"png")
    path = write_model_card(tmp_path, kind="acpo_lora", base_model="runwayml/stable-diffusion-v1-5",
                            settings={"loss_weights": {"anchor": 1.0, "quality": 0.1}, "seed": 3, "steps": (1, 2)},
                            validation={"topiq_nr": 0.61}, grid="validation/grid.png", tags=["extra"])
    data = ModelCard.load(path).data
    assert data.library_name == "qualityguide" and data.license == "apache-2.0"
    assert data.base_model == "runwayml/stable-diffusion-v1-5"
    assert {"qualityguide", "lora", "acpo", "extra"} <= set(data.tags) and "random-weights" not in data.tags
    ours = data.qualityguide
    assert ours["random_weights"] is False and ours["settings"]["steps"] == [1, 2]
    assert ours["settings"]["loss_weights"] == {"anchor": 1.0, "quality": 0.1}
    assert ours["validation"] == {"topiq_nr": 0.61} and ours["validation_grid"] == "validation/grid.png"
    for spec in ("tiny:sd", "random:sd15"):
        data = ModelCard.load(write_model_card(tmp_path, kind="pixel_lora", base_model=spec)).data
        assert data.qualityguide["random_weights"] is True and data.base_model is None
        assert "random-weights" in data.tags and "validation" not in data.qualityguide


def test_cards_refuse_bad_input_and_keep_a_users_readme(tmp_path):
    with pytest.raises(InputError, match="kind='nope': allowed iqa_adapter"):
        write_model_card(tmp_path, kind="nope")
    with pytest.raises(InputError, match="grid='missing.png': no such file"):
        write_model_card(tmp_path, kind="acpo_lora", grid="missing.png")
    with pytest.raises(InputError, match="does not exist"):
        write_model_card(tmp_path / "nowhere", kind="acpo_lora")
    readme = tmp_path / "README.md"
    readme.write_text("# my own notes\n")
    assert write_model_card(tmp_path, kind="acpo_lora") is None
    _head().save_pretrained(tmp_path)
    assert readme.read_text() == "# my own notes\n"  # never replaced


def test_a_failed_save_leaves_the_previous_files_byte_identical(tmp_path, monkeypatch):
    import safetensors.torch

    for model in (_adapter(), _head()):
        folder = model.save_pretrained(tmp_path / type(model).__name__)
        before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

        def broken(state, path, metadata=None):
            Path(path).write_bytes(b"half a file")
            raise OSError("disk full")

        monkeypatch.setattr(safetensors.torch, "save_file", broken)
        with pytest.raises(OSError, match="disk full"):
            type(model).save_pretrained(_randomised(model, 9), folder)
        monkeypatch.undo()
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_lgdm_scorer_pushes_its_head_folder(scorer_parts, recorder, tmp_path):
    _, scorer = scorer_parts
    scorer.push_to_hub("someone/lgdm-tiny")
    upload = recorder[1]
    local = scorer.save_pretrained(tmp_path / "local")
    assert set(upload["files"]) == {"README.md", "config.json", "model.safetensors", IDENTITY_FILE}
    for name in ("config.json", "model.safetensors"):
        assert upload["files"][name] == (local / name).read_bytes(), name
    # the identity by content: safetensors writes its metadata keys in no fixed order
    (tmp_path / "pushed.safetensors").write_bytes(upload["files"][IDENTITY_FILE])
    pushed, kept = (WeightIdentity.load(p) for p in (tmp_path / "pushed.safetensors", local / IDENTITY_FILE))
    modules = scorer.lgdm.backbone_modules()
    assert pushed.differences(modules) == kept.differences(modules) == []
    assert ModelCard(upload["files"]["README.md"].decode()).data.qualityguide["kind"] == "lgdm_scorer"


def test_lgdm_scorer_model_revision_reaches_the_backbone_loader(scorer_parts, tmp_path, monkeypatch):
    _, scorer = scorer_parts
    folder = scorer.save_pretrained(tmp_path / "scorer")
    seen = {}

    def loader(spec, config, **kwargs):
        seen.update(spec=spec, **kwargs)
        raise InputError("stopped before loading")

    monkeypatch.setattr(LGDM, "from_pretrained", loader)
    with pytest.raises(InputError, match="stopped before loading"):
        LGDMScorer.from_pretrained(folder, model_revision="v1.1")  # revision= is the head repository's
    assert seen["spec"] == "tiny:sd" and seen["revision"] == "v1.1"


def test_hub_arguments_reach_the_download_and_only_the_models_files_are_asked_for(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    folder = _adapter().save_pretrained(tmp_path / "saved")
    seen = []

    def snapshot_download(repo_id, **kwargs):  # the one network call of a load, replaced
        seen.append({"repo_id": repo_id, **kwargs})
        return str(folder.parent)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = IQAAdapter.from_pretrained("someone/model", token="hf_x", revision="v3", cache_dir=tmp_path / "c",
                                        force_download=True, subfolder="saved")
    assert _same_state(loaded, _adapter())
    assert seen == [{"repo_id": "someone/model", "revision": "v3", "cache_dir": tmp_path / "c", "token": "hf_x",
                     "local_files_only": False, "force_download": True,
                     "allow_patterns": ["saved/config.json", "saved/model.safetensors", "saved/quantiles.json"]}]
