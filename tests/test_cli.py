import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch.nn.functional as F
from PIL import Image

from qualityguide import __version__, load_scorer
from qualityguide.cli import main
from qualityguide.images import load_image
from qualityguide.cli.score import FIELDS


def _photos(folder, n=5, size=200, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = np.asarray(Image.open(__import__("qualityguide").scorers.niqe_fit.bundled_photo("skimage", "coffee.png"))
                      .convert("RGB").resize((size + 40, size)), dtype=np.float32)
    for i in range(n):
        noisy = np.clip(base + rng.normal(0, 4 * i, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"img{i}.png")
    return folder


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_version_and_scorers(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out
    assert main(["scorers"]) == 0
    out = capsys.readouterr().out
    assert "niqe-embedded" in out and "offline: yes" in out
    assert "pyiqa:musiq" in out


def test_score_folder_and_resume(tmp_path, capsys):
    folder = _photos(tmp_path / "imgs")
    out = tmp_path / "scores.csv"
    assert main(["score", str(folder), "--output", str(out), "--batch-size", "2", "--quiet"]) == 0
    rows = _rows(out)
    assert list(rows[0].keys()) == FIELDS and len(rows) == 5
    scores = [float(r["score"]) for r in rows]
    assert all(np.isfinite(scores)) and not any(r["error"] for r in rows)
    assert scores[0] > scores[-1]  # more noise, lower score
    assert all(float(r["score"]) == pytest.approx(-float(r["native_score"])) for r in rows)
    # rerun: nothing scored twice
    assert main(["score", str(folder), "--output", str(out), "--quiet"]) == 0
    assert len(_rows(out)) == 5
    assert "0 scored, 0 failed, 5 already" in capsys.readouterr().err


def test_resume_after_kill_mid_write(tmp_path):
    folder = _photos(tmp_path / "imgs")
    out = tmp_path / "scores.csv"
    main(["score", str(folder), "--output", str(out), "--quiet"])
    full = _rows(out)
    text = out.read_text()
    lines = text.splitlines(keepends=True)
    # simulate a kill: two complete rows survive and the third is cut in the middle
    out.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    assert main(["score", str(folder), "--output", str(out), "--quiet"]) == 0
    resumed = _rows(out)
    assert sorted(r["path"] for r in resumed) == sorted(r["path"] for r in full)
    by_path = {r["path"]: r["score"] for r in full}
    assert all(by_path[r["path"]] == r["score"] for r in resumed)


def test_bad_files_reported_and_run_continues(tmp_path, capsys):
    folder = _photos(tmp_path / "imgs", n=2)
    (folder / "broken.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(folder / "small.png")
    Image.new("RGB", (256, 256), (255, 255, 255)).save(folder / "white.png")
    out = tmp_path / "scores.csv"
    code = main(["score", str(folder), "--output", str(out), "--batch-size", "8", "--quiet"])
    assert code == 1
    rows = {r["path"].split("/")[-1]: r for r in _rows(out)}
    assert len(rows) == 6
    assert rows["img0.png"]["score"] and rows["img1.png"]["score"]
    assert "not an image" in rows["broken.jpg"]["error"] and rows["broken.jpg"]["score"] == ""
    assert "empty" in rows["empty.png"]["error"]
    assert ">= 192" in rows["small.png"]["error"]
    assert "flat" in rows["white.png"]["error"]
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "Traceback" not in err
    # a rerun does not duplicate failed rows; --retry-failed retries them without duplicates
    assert main(["score", str(folder), "--output", str(out), "--quiet"]) == 1
    assert len(_rows(out)) == 6
    (folder / "broken.jpg").unlink()
    Image.new("RGB", (256, 256)).save(folder / "empty.png")  # now flat black: still fails, still one row
    assert main(["score", str(folder), "--output", str(out), "--quiet", "--retry-failed"]) == 1
    rows = _rows(out)
    assert len(rows) == 6 and len({r["path"] for r in rows}) == 6
    # only files given to this run are retried: the deleted broken.jpg keeps its error row
    assert "not an image" in {r["path"].split("/")[-1]: r for r in rows}["broken.jpg"]["error"]


def test_usage_errors_exit_2_without_traceback(tmp_path, capsys):
    folder = _photos(tmp_path / "imgs", n=1)
    assert main(["score", str(folder), "--scorer", "brisqe", "--output", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'brisque'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert main(["score", str(folder), "--output", str(tmp_path / "other.csv")]) == 2
    assert "columns" in capsys.readouterr().err
    assert main(["score", str(folder), "--batch-size", "0", "--output", str(tmp_path / "x.csv")]) == 2
    assert main(["score", str(folder), "--scorer", "brisque", "--weights", str(tmp_path / "no.pth"),
                 "--output", str(tmp_path / "x.csv")]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["score"])
    assert exc.value.code == 2


def test_weights_flag(tmp_path, params):
    folder = _photos(tmp_path / "imgs", n=2)
    out = tmp_path / "b.csv"
    assert main(["score", str(folder), "--scorer", "brisque", "--weights", str(params / "brisque_live_svm.pth"),
                 "--output", str(out), "--quiet"]) == 0
    assert len(_rows(out)) == 2


def test_console_script_demo(tmp_path):
    """The README's first quick-start command, as a subprocess (installed console entry point)."""
    result = subprocess.run([sys.executable, "-m", "qualityguide.cli", "demo", "--out", str(tmp_path / "demo"),
                             "--size", "256", "--quiet"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "ranked correctly" in result.stdout
    report = json.loads((tmp_path / "demo" / "results.json").read_text())
    series = report["series"]
    assert len(series) == 12
    # the default scorer ranks most series correctly and every clean photo above its strongest distortion
    assert sum(row["niqe-embedded"]["monotone"] for row in series) >= 9
    assert all(row["niqe-embedded"]["scores"][0] > row["niqe-embedded"]["scores"][-1] for row in series)
    sheet = Image.open(tmp_path / "demo" / "contact_sheet.png")
    assert sheet.size[0] > 400 and sheet.size[1] > 400
    assert (tmp_path / "demo" / "report.md").read_text().startswith("# qualityguide demo")


def _hub_backed_lgdm_head(tmp_path):
    """An LGDM head whose backbone is a hub id, cached offline under tmp_path/hub (diffusers then logs
    hub-connection notices, and importing it pulls in bitsandbytes where installed)."""
    from qualityguide import load_pipeline
    from qualityguide.lgdm import LGDM, HeadConfig, LGDMConfig, LGDMHead, LGDMScorer

    snapshot = tmp_path / "hub" / "models--someone--tiny-sd" / "snapshots" / ("0" * 40)
    load_pipeline("tiny:sd").save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    pipe = load_pipeline("someone/tiny-sd", cache_dir=str(tmp_path / "hub"))
    model = LGDM.from_pipeline(pipe, LGDMConfig(image_size=32, num_steps=2, t_max=20, psi="none"))
    LGDMScorer(model, LGDMHead(HeadConfig(num_steps=2, layer_dims=model.recorder.dims))).save_pretrained(
        tmp_path / "head")
    return tmp_path / "head"


def test_score_stderr_holds_only_our_lines(tmp_path):
    """A CLI run prints no third-party warnings; --quiet also drops every progress bar; our own lines stay."""
    import os
    import re

    head = _hub_backed_lgdm_head(tmp_path)
    folder = _photos(tmp_path / "imgs", n=1, size=64)
    (folder / "broken.png").write_text("not an image")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}  # no quieting inherited
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    ours = re.compile(r"error: .*broken\.png: not an image|1 scored, 1 failed, 0 already in ")
    bar = re.compile(r".+: +\d+%\|.*\]$")  # a tqdm bar state (ours, and the loaders' while not quiet)
    for flags in ([], ["--quiet"]):
        run = subprocess.run([sys.executable, "-m", "qualityguide.cli", "score", str(folder), "--scorer", f"lgdm:{head}",
                              "-o", str(tmp_path / f"scores{len(flags)}.csv"), *flags],
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 1, run.stderr
        lines = [line.strip() for line in re.split(r"[\r\n]|\x1b\[A", run.stderr) if line.strip()]
        if not flags:
            assert any(line.startswith("scoring (lgdm:") for line in lines)
            lines = [line for line in lines if not bar.match(line)]
        assert len(lines) == 2 and all(ours.match(line) for line in lines), run.stderr


# Run as `python -c`: the CLI, with the lines bitsandbytes and the `kernels` package print on CPUs with AVX512-BF16
# (and diffusers' logger, and a third-party Python warning) emitted during the command, whatever this CPU is.
_NOISY_CLI = """
import logging, sys, warnings
from qualityguide.cli import commands as cli
score = cli._cmd_score
def noisy_score(args):
    for name in ("kernels._internals.hf_hub", "bitsandbytes.backends.cpu.ops", "diffusers.pipelines"):
        logging.getLogger(name).warning("third-party noise from %s", name)
    warnings.warn_explicit("third-party warning", UserWarning, "ops.py", 1, module="kernels.layer")
    return score(args)
cli._cmd_score = noisy_score
sys.exit(cli.main(sys.argv[1:]))
"""


def test_score_stderr_drops_kernels_and_bitsandbytes_lines_on_any_cpu(tmp_path):
    import os

    folder = _photos(tmp_path / "imgs", n=1)
    (folder / "broken.png").write_text("not an image")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}  # no quieting inherited
    run = subprocess.run([sys.executable, "-c", _NOISY_CLI, "score", str(folder), "--scorer", "niqe-embedded",
                          "-o", str(tmp_path / "scores.csv"), "--quiet"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 1, run.stderr
    lines = [line.strip() for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and "broken.png: not an image" in lines[0] and "1 scored, 1 failed" in lines[1], run.stderr


def test_third_party_quieting_keeps_our_warnings(monkeypatch):
    import logging
    import os
    import warnings

    from qualityguide.runtime import quiet_third_party

    monkeypatch.setattr(os, "environ", {**os.environ, "TRANSFORMERS_VERBOSITY": "info"})
    monkeypatch.delitem(os.environ, "DIFFUSERS_VERBOSITY", raising=False)
    level = logging.getLogger("bitsandbytes").level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party(quiet=False)
        for module in ("qualityguide.lgdm.cache", "diffusers.pipelines.pipeline_utils", "transformers", "peft.tuners"):
            warnings.warn_explicit(f"from {module}", RuntimeWarning, "x.py", 1, module=module)
    logging.getLogger("bitsandbytes").setLevel(level)
    # ours and packages not named stay; the user's own verbosity choice wins
    assert [str(w.message) for w in caught] == ["from qualityguide.lgdm.cache", "from peft.tuners"]
    assert os.environ["DIFFUSERS_VERBOSITY"] == "error" and os.environ["TRANSFORMERS_VERBOSITY"] == "info"


def test_scorers_offline_status_is_honest(capsys, tmp_path, monkeypatch):
    from pyiqa.utils import download_util

    monkeypatch.setattr(download_util, "DEFAULT_CACHE_DIR", str(tmp_path))  # empty pyiqa cache (where pyiqa looks)
    assert main(["scorers"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "offline: yes" in lines["niqe-embedded"] and "offline: yes" in lines["pyiqa:piqe"]
    assert "offline: no" in lines["pyiqa:musiq"] and "offline: no" in lines["niqe"]


def test_scorer_size_in_the_spec(tmp_path, capsys):
    """`--scorer SPEC@SIZE` scores images below the metric's minimum; its name (the spec) is what it reports."""
    folder = _photos(tmp_path / "imgs", n=3, size=120)  # 120x160: below NIQE's 192 px
    assert main(["score", str(folder), "--output", str(tmp_path / "plain.csv"), "--quiet"]) == 1
    assert all("adding @192" in r["error"] for r in _rows(tmp_path / "plain.csv"))
    out = tmp_path / "sized.csv"
    assert main(["score", str(folder), "--scorer", "niqe-embedded@192", "--output", str(out), "--quiet"]) == 0
    rows = _rows(out)
    assert len(rows) == 3 and not any(r["error"] for r in rows)
    plain = load_scorer("niqe-embedded")
    for row in rows:  # each score is plain NIQE on the image enlarged to 192x256 (short side 192)
        image = load_image(row["path"])[None]
        by_hand = F.interpolate(image, size=(192, 256), mode="bilinear", align_corners=False)
        assert float(row["score"]) == pytest.approx(float(plain(by_hand)), rel=1e-5)
    capsys.readouterr()
    assert main(["score", str(folder), "--scorer", "niqe-embedded@12x", "--output", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert "niqe-embedded@12x" in err and "positive whole number" in err and len(err.strip().splitlines()) == 1


def test_scorer_size_suffix_is_bounded(tmp_path, capsys):
    """An absurd @SIZE is refused at parse time (it asked for 120 GB, or raised OverflowError), one line."""
    folder = _photos(tmp_path / "imgs", n=1)
    for spec in ["niqe-embedded@100000", "niqe-embedded@" + "9" * 20, "niqe-embedded@\u00b2"]:
        assert main(["score", str(folder), "--scorer", spec, "--output", str(tmp_path / "x.csv")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and spec in err
    assert main(["score", str(folder), "--scorer", "niqe-embedded@100000", "--output", str(tmp_path / "x.csv")]) == 2
    assert "at most 8192 px" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at most 8192"):
        load_scorer("niqe-embedded", size=10**20)
    assert not (tmp_path / "x.csv").exists()


def test_a_strip_that_would_resize_past_the_cap_fails_alone(tmp_path, capsys):
    """A 1x20000 px PNG under @192 would be 192x3840000 px (8.8 GB): its own error row; the others are scored."""
    folder = _photos(tmp_path / "imgs", n=2)
    Image.fromarray(np.full((1, 20000, 3), 128, np.uint8)).save(folder / "a_strip.png")  # sorts first
    out = tmp_path / "out.csv"
    assert main(["score", str(folder), "--scorer", "niqe-embedded@192", "--output", str(out), "--quiet"]) == 1
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in _rows(out)}
    assert rows["img0.png"]["score"] and rows["img1.png"]["score"]
    error = rows["a_strip.png"]["error"]
    assert "3840000x192" in error and "67,108,864 px" in error and not rows["a_strip.png"]["score"]
    assert "Traceback" not in capsys.readouterr().err
