"""`qualityguide label`: score columns in an imagefolder's metadata.csv (qualityguide.cli.label, .imagefolder)."""

import csv
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from qualityguide import load_scorer
from qualityguide.cli import main
from qualityguide.errors import InputError
from qualityguide.images import load_image
from qualityguide.cli.label import OWNED, RECORD, _Owned, label_folder
from qualityguide.scorers.base import QualityScorer


class Mean(QualityScorer):
    """10 x the mean pixel value: cheap, and easy to compute independently with numpy."""

    name = "mean"

    def native(self, images):
        return images.mean(dim=(1, 2, 3)) * 10


class Interrupting(Mean):
    """The same scores (same name, so the same settings), but Ctrl-C once ``limit`` images were scored."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.seen = limit, 0

    def native(self, images):
        self.seen += images.shape[0]
        if self.seen > self.limit:
            raise KeyboardInterrupt
        return super().native(images)


class NaNFor(Mean):
    """NaN for images whose mean is above ``threshold`` (a metric that breaks on some content)."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold = threshold

    def native(self, images):
        values = super().native(images)
        return torch.where(values > self.threshold, torch.full_like(values, float("nan")), values)


def _images(folder, names, size=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        level = 40 + 40 * i  # different means, so rows cannot be swapped unnoticed
        pixels = np.clip(level + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
    return folder


def _table(path):
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return list(csv.reader(handle))


def _by_name(path):
    rows = _table(path)
    return {row[rows[0].index("file_name")]: dict(zip(rows[0], row)) for row in rows[1:]}


def _numpy_mean(path):
    return float(np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).mean() / 255 * 10)


def test_cells_equal_the_scorer_on_each_image(tmp_path):
    folder = _images(tmp_path / "d", ["a.png", "b.png"], size=(240, 200))
    niqe = load_scorer("niqe-embedded")
    summary = label_folder(folder, {"niqe-embedded": niqe, "mean": Mean()}, batch_size=2, progress=False)
    assert summary.ok and summary.added_rows == 2 and summary.scored == {"niqe-embedded": 2, "mean": 2}
    rows = _table(folder / "metadata.csv")
    assert rows[0] == ["file_name", "niqe-embedded", "mean"] and [r[0] for r in rows[1:]] == ["a.png", "b.png"]
    for name, niqe_cell, mean_cell in rows[1:]:
        with torch.no_grad():
            expected = float(niqe(load_image(folder / name)[None])[0])
        assert float(niqe_cell) == pytest.approx(expected, rel=1e-6)  # higher-is-better: -NIQE
        assert float(niqe_cell) < 0
        assert float(mean_cell) == pytest.approx(_numpy_mean(folder / name), rel=1e-6)


def test_existing_columns_rows_and_order_kept(tmp_path):
    folder = _images(tmp_path / "d", ["a.png", "b.png", "c.png", "d.png", "sub/e.png"])
    original = ('\ufefffile_name,text,weight\r\n'
                'c.png,"a cat, on a mat",1\r\n'
                'gone.png,"two\r\nlines ""quoted""",2\r\n'
                './a.png,caf\u00e9,\r\n'
                'sub/e.png,nested,3\r\n')
    (folder / "metadata.csv").write_bytes(original.encode("utf-8"))
    summary = label_folder(folder, {"mean": Mean()}, progress=False)
    data = (folder / "metadata.csv").read_bytes()
    assert data.startswith("\ufeff".encode()) and b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    old = list(csv.reader(io.StringIO(original[1:], newline="")))
    assert rows[0] == old[0] + ["mean"]
    assert [r[:3] for r in rows[1:5]] == old[1:]  # every old cell, in the old order
    assert [r[0] for r in rows[5:]] == ["b.png", "d.png"]  # images the file did not name, appended sorted
    assert rows[5][1:3] == ["", ""]
    mean = {r[0]: r[3] for r in rows[1:]}
    for name in ("c.png", "./a.png", "b.png", "d.png"):
        assert float(mean[name]) == pytest.approx(_numpy_mean(folder / name), rel=1e-6)
    assert mean["gone.png"] == "" and summary.missing == ["gone.png"]
    assert mean["sub/e.png"] == ""
    assert summary.unlabelled == [("sub/e.png", "in a sub-folder: pass --recursive to label it")]
    # --recursive labels the nested image in its existing row and adds no row
    summary = label_folder(folder, {"mean": Mean()}, recursive=True, progress=False)
    assert summary.added_rows == 0 and summary.scored == {"mean": 1}
    assert float(_by_name(folder / "metadata.csv")["sub/e.png"]["mean"]) == pytest.approx(
        _numpy_mean(folder / "sub/e.png"), rel=1e-6)


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path):
    names = [f"img{i}.png" for i in range(5)]
    whole, cut = _images(tmp_path / "whole", names), _images(tmp_path / "cut", names)
    for folder in (whole, cut):
        (folder / "metadata.csv").write_text("file_name,text\nimg3.png,three\n")
    label_folder(whole, {"mean": Mean()}, batch_size=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        label_folder(cut, {"mean": Interrupting(limit=3)}, batch_size=2, progress=False)
    assert (cut / "metadata.csv").read_text() == "file_name,text\nimg3.png,three\n"  # untouched until the end
    score_file = next((cut / OWNED).glob("mean-*.csv"))
    assert len(_table(score_file)) == 1 + 2  # the first batch was kept, the one in flight lost
    # a kill in the middle of writing a row: the partial row is cut off and redone
    score_file.write_bytes(score_file.read_bytes()[:-7])
    rerun = Interrupting(limit=100)
    summary = label_folder(cut, {"mean": rerun}, batch_size=2, progress=False)
    assert rerun.seen == 4 and summary.scored == {"mean": 4}  # img0 was kept; nothing scored twice
    assert (cut / "metadata.csv").read_bytes() == (whole / "metadata.csv").read_bytes()
    rows = _table(cut / "metadata.csv")
    assert sorted(r[0] for r in rows[1:]) == names and len(rows) == 6
    # a further rerun scores nothing and changes nothing
    again = Interrupting(limit=0)
    label_folder(cut, {"mean": again}, progress=False)
    assert again.seen == 0 and (cut / "metadata.csv").read_bytes() == (whole / "metadata.csv").read_bytes()


def test_foreign_column_refused_without_overwrite(tmp_path):
    folder = _images(tmp_path / "d", ["a.png", "b.png"])
    original = b"file_name,mean\na.png,0.5\nb.png,0.7\n"
    (folder / "metadata.csv").write_bytes(original)
    with pytest.raises(InputError, match=r"'mean'.*not written by `qualityguide label`.*--overwrite"):
        label_folder(folder, {"mean": Mean()}, progress=False)
    assert (folder / "metadata.csv").read_bytes() == original
    label_folder(folder, {"mean": Mean()}, overwrite=True, progress=False)
    rows = _by_name(folder / "metadata.csv")
    assert float(rows["a.png"]["mean"]) == pytest.approx(_numpy_mean(folder / "a.png"), rel=1e-6)
    label_folder(folder, {"mean": Mean()}, progress=False)  # now recorded as label's own: no --overwrite needed


def test_settings_change_refused_and_overwrite_relabels(tmp_path):
    folder = _images(tmp_path / "d", ["a.png", "b.png"])
    label_folder(folder, {"q": Mean()}, progress=False)
    other = Mean()
    other.name = "mean@64"  # another scorer's values must not enter the same column
    before = (folder / "metadata.csv").read_bytes()
    with pytest.raises(InputError, match=r"column 'q' was labelled with settings 'scorer=mean'.*'scorer=mean@64'"):
        label_folder(folder, {"q": other}, progress=False)
    assert (folder / "metadata.csv").read_bytes() == before
    summary = label_folder(folder, {"q": other}, overwrite=True, progress=False)
    assert summary.scored == {"q": 2}  # labelled afresh, not mixed with the old rows
    assert "scorer=mean@64" in (folder / OWNED / RECORD).read_text()


def test_bad_image_leaves_empty_cell_and_exit_1(tmp_path, capsys):
    folder = _images(tmp_path / "d", ["a.png", "b.png"], size=(240, 200))
    (folder / "bad.jpg").write_text("not an image")
    args = ["label", str(folder), "--scorer", "niqe-embedded", "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        line for line in err.splitlines() if "bad.jpg" in line and "not an image" in line]
    assert "Traceback" not in err
    rows = _by_name(folder / "metadata.csv")
    assert rows["bad.jpg"]["niqe-embedded"] == "" and rows["a.png"]["niqe-embedded"] and rows["b.png"]["niqe-embedded"]
    assert main(args) == 1 and len(_table(folder / "metadata.csv")) == 4  # still failed, no duplicate row
    (folder / "bad.jpg").unlink()
    (folder / "b.png").unlink()  # scored before: a deleted image loses its score
    assert main(args) == 0  # their rows stay, reported as naming missing files
    assert "2 row(s) name files that do not exist (b.png, bad.jpg)" in capsys.readouterr().err
    rows = _by_name(folder / "metadata.csv")
    assert rows["b.png"]["niqe-embedded"] == "" and rows["a.png"]["niqe-embedded"] and len(rows) == 3


def test_non_finite_scores_never_written(tmp_path):
    folder = _images(tmp_path / "d", ["dark.png", "mid.png", "light.png"])
    summary = label_folder(folder, {"mean": NaNFor(threshold=_numpy_mean(folder / "mid.png") + 0.1)}, progress=False)
    rows = _by_name(folder / "metadata.csv")
    assert rows["light.png"]["mean"] == "" and rows["dark.png"]["mean"] and rows["mid.png"]["mean"]
    assert [(n, c) for n, c, _ in summary.failures] == [("light.png", "mean")] and not summary.ok
    assert "non-finite" in summary.failures[0][2]
    recorded = _table(next((folder / OWNED).glob("mean-*.csv")))
    assert [row[1:2] + row[3:4] for row in recorded[1:] if row[0] == "light.png"] == [["", ""]]
    assert all(np.isfinite(float(cell)) for row in recorded[1:] for cell in (row[1], row[3]) if cell)


def test_metadata_without_file_name_refused(tmp_path, capsys):
    folder = _images(tmp_path / "d", ["a.png"])
    (folder / "metadata.csv").write_text("image,text\na.png,x\n")
    assert main(["label", str(folder), "--scorer", "niqe-embedded", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "metadata.csv has no 'file_name' column" in err and "fix" in err and len(err.strip().splitlines()) == 1
    assert (folder / "metadata.csv").read_text() == "image,text\na.png,x\n" and not (folder / ".qualityguide").exists()
    (folder / "metadata.csv").write_bytes(b"file_name,text\na.png,caf\xe9\n")
    with pytest.raises(InputError, match="not UTF-8"):
        label_folder(folder, {"mean": Mean()}, progress=False)
    (folder / "metadata.csv").write_text("file_name,text\na.png,x,extra\n")
    with pytest.raises(InputError, match="record 2 has 3 cells"):
        label_folder(folder, {"mean": Mean()}, progress=False)


@pytest.mark.parametrize("bad_line,line", [
    ('b.png,"a caption whose quote is never closed\r\n', 3),   # would fold the rows below into one caption
    ('b.png,"closed" then text\r\n', 3),                      # text after a closing quote
])
def test_malformed_metadata_csv_refused_unchanged_naming_the_line(tmp_path, capsys, bad_line, line):
    folder = _images(tmp_path / "d", ["a.png", "b.png", "c.png", "d.png"])
    original = ("file_name,text\r\na.png,first\r\n" + bad_line + "c.png,third\r\nd.png,fourth\r\n").encode()
    (folder / "metadata.csv").write_bytes(original)
    assert main(["label", str(folder), "--scorer", "niqe-embedded", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"starting on line {line} is not valid CSV" in err and "unchanged" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (folder / "metadata.csv").read_bytes() == original


def test_other_metadata_files_hidden_files_and_lock(tmp_path):
    folder = _images(tmp_path / "d", ["a.png", ".hidden.png"])
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(InputError, match="metadata.jsonl: datasets would read it"):
        label_folder(folder, {"mean": Mean()}, progress=False)
    (folder / "metadata.jsonl").unlink()
    summary = label_folder(folder, {"mean": Mean()}, progress=False)
    assert [r[0] for r in _table(folder / "metadata.csv")[1:]] == ["a.png"] and "hidden" in summary.notes[0]
    owned = _Owned(folder)  # another run holding the folder
    try:
        with pytest.raises(InputError, match="being labelled by another"):
            label_folder(folder, {"mean": Mean()}, progress=False)
    finally:
        owned.close()


def test_killed_metadata_write_leaves_the_old_file(tmp_path, monkeypatch):
    folder = _images(tmp_path / "d", ["a.png"])
    (folder / "metadata.csv").write_text("file_name,text\na.png,x\n")

    replace, seen = os.replace, []

    def killed(src, dst):  # Ctrl-C at the last moment of the metadata write (after the temporary file is complete)
        seen.append(os.path.basename(dst))
        if seen[-1] == "metadata.csv":
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        label_folder(folder, {"mean": Mean()}, progress=False)
    monkeypatch.undo()
    assert seen == [RECORD, "metadata.csv"]  # the ownership record is written first
    assert (folder / "metadata.csv").read_text() == "file_name,text\na.png,x\n"
    assert sorted(p.name for p in folder.iterdir()) == [".qualityguide", "a.png", "metadata.csv"]  # no temp file left


def test_datasets_imagefolder_reads_score_columns_as_floats(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = _images(tmp_path / "d", ["a.png", "b.png", "c.png"])
    (folder / "metadata.csv").write_text("file_name,text\nb.png,bee\n")
    (folder / "bad.png").write_bytes(b"")
    summary = label_folder(folder, {"mean": Mean(), "pyiqa:x@8": Mean()}, progress=False)
    assert [(n, c) for n, c, _ in summary.failures] == [("bad.png", "mean"), ("bad.png", "pyiqa:x@8")]
    train = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(tmp_path / "hf"))["train"]
    assert train.features["mean"] == datasets.Value("float64")
    assert train.features["pyiqa:x@8"] == datasets.Value("float64")
    assert train["text"][:] == ["bee", None, None, None]  # rows in metadata order: b, then a, bad, c
    expected = [_numpy_mean(folder / name) for name in ("b.png", "a.png")]
    assert train["mean"][:2] == pytest.approx(expected, rel=1e-6) and train["mean"][2] is None
    assert train[0]["image"].size == (48, 40)


def test_cli_usage_errors(tmp_path, capsys):
    folder = _images(tmp_path / "d", ["a.png"])
    for args, message in [
        (["--scorer", "mean", "--scorer", "mean"], "given twice"),
        (["--scorer", "niqe-embedded", "--weights", "w.pth"], "takes no weights"),
        (["--scorer", "niqe-embedded", "--scorer", "brisque", "--weights", "w.pth"], "say which one"),
        (["--scorer", "brisqe"], "Did you mean 'brisque'"),
        (["--scorer", "niqe-embedded", "--batch-size", "0"], "--batch-size must be"),
    ]:
        assert main(["label", str(folder), *args, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert main(["label", str(tmp_path / "nope"), "--scorer", "niqe-embedded"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not (folder / "metadata.csv").exists()
    with pytest.raises(SystemExit) as exc:
        main(["label", str(folder)])  # --scorer is required
    assert exc.value.code == 2


def test_avif_is_not_labelled_where_datasets_would_not_load_it(tmp_path):
    """Folders now take AVIF (Pillow opens it); datasets' imagefolder does not, so `label` leaves it out, noted."""
    from qualityguide.cli.imagefolder import loaded_extensions

    pytest.importorskip("PIL.AvifImagePlugin")
    if ".avif" in (loaded_extensions() or {".avif"}):
        pytest.skip("this datasets loads AVIF")
    folder = _images(tmp_path / "d", ["a.png", "b.avif"])
    summary = label_folder(folder, {"mean": Mean()}, progress=False)
    assert [row[0] for row in _table(folder / "metadata.csv")[1:]] == ["a.png"]
    notes = [note for note in summary.notes if "datasets' imagefolder does not load (.avif)" in note]
    assert len(notes) == 1 and "b.avif" in notes[0]
