"""Bad input gets one line naming the problem and the fix (exit 2, or 1 for failed files) and loses nothing.

Each test writes its own bad files in tmp_path; scorers are niqe-embedded, pyiqa:piqe or a random CNNIQA;
LGDM runs use tiny:sd at 32 px.
"""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from qualityguide import load_scorer
from qualityguide.cli import main
from qualityguide.evaluation.datasets import load_iqa_dataset
from qualityguide.errors import ImageError, InputError
from qualityguide.images import to_batch
from qualityguide.scorers.nss import load_brisque_params


def _one_line_error(capsys, *parts):
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def _photo(path, size=(200, 220), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)).save(path)
    return path


def _dataset(root, rows, n=3, encoding="utf-8"):
    for i in range(n):
        _photo(root / f"im{i}.png", size=(40, 44), seed=i)
    (root / "mos.csv").write_bytes(rows.encode(encoding) if isinstance(rows, str) else rows)
    return root


def _brisque_svr(path, n=5, features=36, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.save((torch.randn(n, generator=g), torch.rand(n, features, generator=g) * 2 - 1), path)
    return path


# ----------------------------------------------------------------------------- score: -o, --device


def test_output_naming_a_folder_is_refused(tmp_path, capsys):
    image = _photo(tmp_path / "a.png")
    (tmp_path / "out").mkdir()
    assert main(["score", str(image), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    _one_line_error(capsys, "is a folder", "scores.csv")
    assert list((tmp_path / "out").iterdir()) == []
    # a folder that does not exist yet, written as one: before, a file named "new" was created and written
    assert main(["score", str(image), "-o", str(tmp_path / "new") + "/", "--quiet"]) == 2
    _one_line_error(capsys, "is a folder", "new/scores.csv")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("device", ["meta", "cuda:7"])
def test_device_that_does_not_exist_is_refused_before_anything_is_written(tmp_path, capsys, device):
    image = _photo(tmp_path / "a.png")
    out = tmp_path / "s.csv"
    assert main(["score", str(image), "--device", device, "-o", str(out), "--quiet"]) == 2
    _one_line_error(capsys, f"--device {device}", "devices here: cpu", "--device cpu")
    assert not out.exists()


def test_load_scorer_refuses_a_device_this_machine_lacks(monkeypatch):
    for device in ("meta", "cuda:7"):
        with pytest.raises(InputError, match=rf"device='{device}'.*devices here: cpu.*device='cpu'"):
            load_scorer("niqe-embedded", device=device)
    with pytest.raises(InputError, match="not a torch device"):
        load_scorer("niqe-embedded", device="gpu0")
    # a machine with two GPUs: cuda:7 is named as missing and the two that exist are listed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputError, match=r"device='cuda:7': no such GPU; devices here: cpu, cuda:0, cuda:1"):
        load_scorer("niqe-embedded", device="cuda:7")


# ----------------------------------------------------------------------------- API: meta tensors, empty batches


@pytest.mark.parametrize("spec", ["niqe-embedded", "pyiqa:piqe"])
def test_meta_tensor_and_empty_batch_are_input_errors(spec):
    scorer = load_scorer(spec)
    with pytest.raises(InputError, match="meta device.*real device"):
        scorer(torch.empty(1, 3, 256, 256, device="meta"))
    with pytest.raises(InputError, match=r"the batch is empty \(shape \[0, 3, 256, 256\]\); pass at least one image"):
        scorer(torch.rand(0, 3, 256, 256))
    with pytest.raises(InputError, match="the batch is empty"):
        to_batch(torch.rand(0, 3, 8, 8))


@pytest.mark.parametrize("spec", ["niqe-embedded", "niqe-embedded@256", "pyiqa:piqe"])
def test_native_checks_its_input_like_forward(spec):
    """``scorer.native(x)`` (shown in the README) refuses what ``scorer(x)`` refuses, with the same message."""
    scorer = load_scorer(spec)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    for bad in [x * 255, x[:, :1], torch.full_like(x, float("nan"))]:
        with pytest.raises(InputError) as by_forward:
            scorer(bad)
        with pytest.raises(InputError) as by_native:
            scorer.native(bad)
        assert str(by_native.value) == str(by_forward.value)
    with pytest.raises(InputError, match="divide by 255"):
        scorer.native(x * 255)
    assert torch.equal(scorer.native(x), scorer.score_with_native(x)[1])


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr])
def test_sparse_tensor_is_an_input_error(layout):
    """A sparse tensor gave a NotImplementedError traceback; it is refused naming the layout and the fix."""
    x = torch.rand(1, 3, 200, 200, generator=torch.Generator().manual_seed(0))
    sparse = x.to_sparse(layout=layout)
    scorer = load_scorer("niqe-embedded")
    for call in (scorer, scorer.native, to_batch):
        with pytest.raises(InputError, match=r"layout torch\.sparse_\w+ \(not dense\).*\.to_dense\(\)"):
            call(sparse)
    assert torch.equal(scorer(sparse.to_dense()), scorer(x))


# ----------------------------------------------------------------------------- flat images, worded for the reader


def test_flat_image_message_is_worded_for_where_it_is_read(tmp_path, photo):
    scorer = load_scorer("niqe-embedded")
    with pytest.raises(ImageError) as one:
        scorer(torch.full((1, 3, 256, 256), 0.5))
    assert "the image is flat" in str(one.value)
    assert "batch index" not in str(one.value) and "CLI" not in str(one.value)
    with pytest.raises(ImageError, match=r"batch index \[1\] \(of 2\) are flat.*drop them from the batch"):
        scorer(torch.cat([photo, torch.ones_like(photo)]))
    Image.new("RGB", (256, 256), (255, 255, 255)).save(tmp_path / "white.png")
    _photo(tmp_path / "ok.png", size=(256, 256))
    assert main(["score", str(tmp_path), "-o", str(tmp_path / "s.csv"), "--quiet"]) == 1
    error = next(line for line in (tmp_path / "s.csv").read_text().splitlines() if "white.png" in line)
    assert "the image is flat" in error and "batch index" not in error and "CLI" not in error


# ----------------------------------------------------------------------------- demo


@pytest.mark.parametrize("size", ["0", "-5"])
def test_demo_size_not_positive_is_refused_leaving_no_folder(tmp_path, capsys, size):
    out = tmp_path / "demo"
    assert main(["demo", "--size", size, "--out", str(out), "--quiet"]) == 2
    _one_line_error(capsys, f"--size {size}", "positive whole number")
    assert not out.exists()


def test_demo_size_below_the_scorers_minimum_is_refused(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--size", "100", "--out", str(out), "--quiet"]) == 2
    _one_line_error(capsys, "--size 100", "minimum side of 192", "--size 192", "niqe-embedded@192")
    assert not out.exists()


def test_demo_out_that_is_a_file_or_holds_foreign_files_is_refused_unchanged(tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    assert main(["demo", "--out", str(existing), "--quiet"]) == 2
    _one_line_error(capsys, "--out", "not a folder")
    assert existing.read_text() == "mine"
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "report.md").write_text("my own report")
    assert main(["demo", "--out", str(folder), "--quiet"]) == 2
    _one_line_error(capsys, "report.md", "not written by `qualityguide demo`", "new folder")
    assert (folder / "report.md").read_text() == "my own report" and len(list(folder.iterdir())) == 1


def test_demo_has_the_weights_flag_its_messages_advise(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QUALITYGUIDE_BRISQUE_WEIGHTS", raising=False)
    svr = _brisque_svr(tmp_path / "svr.pth")
    out = tmp_path / "demo"
    assert main(["demo", "--scorer", "brisque", "--weights", str(svr), "--size", "48", "--out", str(out),
                 "--quiet"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["scorers"][0]["source"] == str(svr)
    capsys.readouterr()
    # with two scorers, a bare file is ambiguous: SPEC=FILE says which
    assert main(["demo", "--scorer", "brisque", "--scorer", "pyiqa:piqe", "--weights", str(svr), "--size", "48",
                 "--out", str(tmp_path / "d2"), "--quiet"]) == 2
    _one_line_error(capsys, "--weights brisque=FILE")
    assert not (tmp_path / "d2").exists()


# ----------------------------------------------------------------------------- dataset CSVs and --limit


def test_dataset_csv_excel_bom_is_read(tmp_path):
    root = _dataset(tmp_path / "d", "image,mos\nim0.png,1\nim1.png,2\n", encoding="utf-8-sig")
    assert load_iqa_dataset(root)["mos"] == [1.0, 2.0]


def test_dataset_csv_latin1_is_refused_naming_the_line(tmp_path, capsys):
    root = _dataset(tmp_path / "d", "image,mos,content\nim0.png,1,caf\u00e9\nim1.png,2,b\n", encoding="latin-1")
    with pytest.raises(InputError, match=r"not UTF-8 \(line 2.*Re-save it as UTF-8"):
        load_iqa_dataset(root)
    assert main(["lgdm", "extract", "--dataset", str(root), "--model", "tiny:sd", "--cache", str(tmp_path / "c"),
                 "--device", "cpu", "--quiet"]) == 2
    _one_line_error(capsys, "not UTF-8")
    assert not (tmp_path / "c").exists()


def test_dataset_csv_duplicate_rows_with_conflicting_mos_are_refused(tmp_path):
    root = _dataset(tmp_path / "d", "image,mos\nim0.png,1\nim1.png,2\n./im0.png,3\n")
    with pytest.raises(InputError, match=r"'./im0.png' is listed twice with different mos \(1.0 on line 2, 3.0 on "
                                         r"line 4\)"):
        load_iqa_dataset(root)
    (root / "same.csv").write_text("image,mos\nim0.png,1\nim0.png,1\n")  # the same label twice is no conflict
    assert load_iqa_dataset(root, "same.csv")["mos"] == [1.0, 1.0]


@pytest.mark.parametrize("limit", [0, -1])
def test_non_positive_limit_is_refused(tmp_path, limit):
    root = _dataset(tmp_path / "d", "image,mos\nim0.png,1\nim1.png,2\nim2.png,3\n")
    with pytest.raises(InputError, match=rf"limit {limit} \(--limit\): must be a positive number of rows"):
        load_iqa_dataset(root, limit=limit)
    assert load_iqa_dataset(root, limit=2)["mos"] == [1.0, 2.0]


# ----------------------------------------------------------------------------- lgdm extract


def test_lgdm_extract_missing_csv_and_file_as_cache_are_refused(tmp_path, capsys):
    root = _dataset(tmp_path / "d", "image,mos\nim0.png,1\nim1.png,2\n")
    assert main(["lgdm", "extract", "--dataset", str(root), "--csv", "nope.csv", "--model", "tiny:sd", "--cache",
                 str(tmp_path / "c"), "--device", "cpu", "--quiet"]) == 2
    _one_line_error(capsys, "nope.csv does not exist", "--csv")
    assert not (tmp_path / "c").exists()
    cache = tmp_path / "cache.txt"
    cache.write_text("not a cache")
    assert main(["lgdm", "extract", "--dataset", str(root), "--model", "tiny:sd", "--cache", str(cache),
                 "--device", "cpu", "--quiet"]) == 2
    _one_line_error(capsys, "--cache", "is a file, not a folder")
    assert cache.read_text() == "not a cache"


def test_lgdm_extract_names_each_failed_file_and_records_it_once(tmp_path, capsys):
    root = _dataset(tmp_path / "d", "image,mos\nim0.png,1\nbroken.png,2\n", n=1)
    (root / "broken.png").write_bytes(b"not a png")
    argv = ["lgdm", "extract", "--dataset", str(root), "--model", "tiny:sd", "--cache", str(tmp_path / "c"),
            "--device", "cpu", "--quiet", "--image-size", "32", "--num-steps", "2", "--t-max", "20", "--psi", "none"]
    for _ in range(2):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert re.search(r"^error: .*broken\.png: not an image", err, re.M), err
        assert "failed-000.jsonl" in err
    lines = (tmp_path / "c" / "failed-000.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["path"].endswith("broken.png")


# ----------------------------------------------------------------------------- weights files


def test_brisque_arrays_of_the_wrong_shape_are_refused_at_load(tmp_path):
    _brisque_svr(tmp_path / "narrow.pth", features=5)
    with pytest.raises(InputError, match=r"sv have shape \[5, 5\], expected \[N, 36\]"):
        load_scorer("brisque", weights=tmp_path / "narrow.pth")
    torch.save((torch.randn(4), torch.rand(5, 36)), tmp_path / "count.pth")
    with pytest.raises(InputError, match=r"sv_coef have shape \[4\], expected \[5\]"):
        load_scorer("brisque", weights=tmp_path / "count.pth")
    torch.save((torch.full((5,), float("nan")), torch.rand(5, 36)), tmp_path / "nan.pth")
    with pytest.raises(InputError, match="NaN/inf"):
        load_scorer("brisque", weights=tmp_path / "nan.pth")
    (tmp_path / "allmodel").write_text("svm_type epsilon_svr\nkernel_type rbf\ngamma 0.05\nrho 1\nSV\n"
                                       "0.5 1:0.1 40:0.2\n")
    with pytest.raises(InputError, match="feature indices 1..40, expected 1..36"):
        load_brisque_params(tmp_path / "allmodel")
    scorer = load_scorer("brisque", weights=_brisque_svr(tmp_path / "ok.pth"))  # the right shapes still load
    assert scorer.sv.shape == (5, 36)


def test_weights_folder_is_named_as_a_folder(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "brisque_svm_weights.pth").write_bytes(b"")
    for spec in ("brisque", "pyiqa:cnniqa"):
        with pytest.raises(InputError, match=r"is a folder, not a weights file \(it holds brisque_svm_weights.pth\)"):
            load_scorer(spec, weights=tmp_path / "w")


@pytest.fixture
def cnniqa_weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "cnniqa.pth"
    torch.save({"params": load_scorer("pyiqa:cnniqa", pretrained=None).net.state_dict()}, path)
    return path


def test_wrong_pyiqa_weights_are_named_not_blamed_on_a_download(tmp_path, cnniqa_weights):
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    with pytest.raises(InputError) as jpeg:
        load_scorer("pyiqa:cnniqa", weights=tmp_path / "photo.jpg")
    assert "is not a weights file: its bytes are a JPEG image" in str(jpeg.value)
    torch.save({"encoder.weight": torch.rand(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(InputError) as other:
        load_scorer("pyiqa:cnniqa", weights=tmp_path / "other.pth")
    message = str(other.value)
    assert f"{tmp_path / 'other.pth'} is not weights for cnniqa" in message and "CNNIQA_koniq10k" in message
    assert not re.search("internet|download", message, re.I)
    assert load_scorer("pyiqa:cnniqa", weights=cnniqa_weights).source == str(cnniqa_weights)


def test_scorers_status_checks_the_weights_file(tmp_path, capsys, monkeypatch, cnniqa_weights):
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    monkeypatch.setenv("QUALITYGUIDE_PYIQA_MUSIQ_WEIGHTS", str(tmp_path / "photo.jpg"))
    monkeypatch.setenv("QUALITYGUIDE_PYIQA_CNNIQA_WEIGHTS", str(cnniqa_weights))
    monkeypatch.setenv("QUALITYGUIDE_PYIQA_DBCNN_WEIGHTS", str(tmp_path))
    _brisque_svr(tmp_path / "narrow.pth", features=5)
    monkeypatch.setenv("QUALITYGUIDE_BRISQUE_WEIGHTS", str(tmp_path / "narrow.pth"))
    assert main(["scorers"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "offline: no" in lines["pyiqa:musiq"] and "JPEG image" in lines["pyiqa:musiq"]
    assert "offline: no" in lines["pyiqa:dbcnn"] and "is a folder" in lines["pyiqa:dbcnn"]
    assert "offline: no" in lines["brisque"] and "[5, 5]" in lines["brisque"]
    assert "offline: yes" in lines["pyiqa:cnniqa"]



def test_input_is_checked_once_per_call_and_also_for_a_native_set_on_the_instance(monkeypatch):
    from qualityguide.scorers import base

    calls = []
    original = base.check_batch
    monkeypatch.setattr(base, "check_batch", lambda *args: calls.append(args[1]) or original(*args))
    scorer = load_scorer("niqe-embedded")
    x = torch.rand(2, 3, 200, 200, generator=torch.Generator().manual_seed(1))
    scorer(x)
    assert calls == ["niqe-embedded input"]
    scorer.native = lambda images: images.mean((1, 2, 3))  # how evals swap in a reference implementation
    with pytest.raises(InputError, match="divide by 255"):
        scorer(x * 255)
