"""qualityguide.files: the one atomic write, its durability levels, hashes and the table of format tags."""

import hashlib
import json
import os
import stat

import pytest

from qualityguide import files
from qualityguide.files import FORMATS, atomic_write, file_sha256, json_sha256, write_json


def _count_fsyncs(monkeypatch) -> list[int]:
    calls = []
    real = os.fsync

    def counting(fd):
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_atomic_write_takes_bytes_text_or_a_writer_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    atomic_write(target, "café")
    assert target.read_bytes() == "café".encode("utf-8")
    atomic_write(target, lambda tmp: tmp.write_bytes(b"from a writer"))
    assert target.read_bytes() == b"from a writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_a_failing_writer_leaves_the_old_file_byte_identical(tmp_path):
    target = tmp_path / "keep.json"
    target.write_bytes(b'{"old": 1}')

    def half_then_crash(tmp):
        tmp.write_bytes(b'{"new"')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash, durability="folder")
    assert target.read_bytes() == b'{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]


@pytest.mark.parametrize("durability, fsyncs", [("none", 0), ("file", 1), ("folder", 2)])
def test_durability_is_what_the_caller_asked_for(tmp_path, monkeypatch, durability, fsyncs):
    calls = _count_fsyncs(monkeypatch)
    atomic_write(tmp_path / "x.txt", "x", durability=durability)
    assert len(calls) == fsyncs


def test_an_unknown_durability_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="durability='fsync'.*'none', 'file', 'folder'"):
        atomic_write(tmp_path / "x.txt", "x", durability="fsync")
    assert not list(tmp_path.iterdir())


def test_callers_keep_their_durability(tmp_path, monkeypatch):
    """A user's metadata.csv survives a power cut (file and folder fsynced); a cache manifest only renames."""
    from qualityguide.cli.imagefolder import write_atomic

    calls = _count_fsyncs(monkeypatch)
    write_atomic(tmp_path / "metadata.csv", b"file_name\n")
    assert len(calls) == 2
    calls.clear()
    from qualityguide.lgdm.cache import FeatureCache

    FeatureCache(tmp_path / "cache", manifest={"key": "k", "layout": {"num_steps": 1, "layer_dims": [2]}},
                 create=True)
    assert calls == []


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permissions")
def test_keep_mode_keeps_the_old_permissions_and_a_new_file_gets_the_usual_ones(tmp_path):
    target = tmp_path / "metadata.csv"
    target.write_text("a")
    os.chmod(target, 0o640)
    atomic_write(target, "b", keep_mode=True)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    umask = os.umask(0)
    os.umask(umask)
    fresh = atomic_write(tmp_path / "new.csv", "c", keep_mode=True)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask


def test_write_json_round_trips_with_the_callers_layout(tmp_path):
    path = write_json(tmp_path / "m.json", {"b": 1, "p": tmp_path}, indent=1, default=str)
    assert json.loads(path.read_text()) == {"b": 1, "p": str(tmp_path)}
    assert path.read_text() == json.dumps({"b": 1, "p": str(tmp_path)}, indent=1)


def test_hashes_match_an_independent_computation(tmp_path):
    data = os.urandom(3 * (1 << 20) + 5)  # more than one read block
    (tmp_path / "blob").write_bytes(data)
    assert file_sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    assert json_sha256({"a": 1, "b": [2, 3]}) == json_sha256({"b": [2, 3], "a": 1})
    assert json_sha256({"a": 1}) == hashlib.sha256(b'{"a": 1}').hexdigest()


def test_the_format_tags_are_the_strings_old_files_hold():
    """Changing one would make every file written before unreadable: the table is the single source."""
    from qualityguide import identity
    from qualityguide.adapter import model as adapter_model
    from qualityguide.lgdm import cache as lgdm_cache
    from qualityguide.train import checkpoints, latents, self_samples

    assert FORMATS == {"checkpoint": "qualityguide.checkpoint/1", "latent_cache": "qualityguide.latent_cache/1",
                       "self_samples": "qualityguide.self_samples/1",
                       "weights_identity": "qualityguide.weights_identity/1", "iqa_adapter": "qualityguide-iqa-adapter",
                       "lgdm_cache": 1, "labels": 1}
    assert (checkpoints.FORMAT, latents.FORMAT, self_samples.FORMAT, identity.FORMAT, adapter_model.FORMAT,
            lgdm_cache.FORMAT) == tuple(FORMATS[k] for k in ("checkpoint", "latent_cache", "self_samples",
                                                             "weights_identity", "iqa_adapter", "lgdm_cache"))
    assert files.MAX_PROMPT_CHARS == 10_000


def test_a_kill_while_refitting_a_head_into_its_folder_leaves_the_old_head(tmp_path, monkeypatch):
    import safetensors.torch

    from qualityguide.lgdm import HeadConfig, LGDMHead

    head = LGDMHead(HeadConfig(num_steps=2, layer_dims=[3, 5]))
    head.save_pretrained(tmp_path / "h", extra={"note": 1})
    before = {p.name: p.read_bytes() for p in (tmp_path / "h").iterdir()}

    def killed(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a header")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        head.save_pretrained(tmp_path / "h", extra={"note": 2})
    assert {p.name: p.read_bytes() for p in (tmp_path / "h").iterdir()} == before
