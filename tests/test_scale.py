"""`score` and `label` over `accelerate launch` processes (qualityguide.cli.shards)."""

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qualityguide import load_scorer
from qualityguide.cli import main
from qualityguide.cli.scorefile import ScoreFile
from qualityguide.cli.shards import merge_parts, part_path, parts_folder

SCORER = "niqe-embedded@192"
LAUNCH = ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "-m", "qualityguide.cli"]


def _images(folder: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        smooth = rng.uniform(0, 1, (8, 10, 3)).repeat(8, 0).repeat(8, 1)  # 64x80, more or less blocky and noisy
        image = (1 - i / n) * smooth + (i / n) * rng.uniform(0, 1, smooth.shape)
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


def _launcher() -> str:
    return shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")


def _env(**extra) -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_launcher(), *LAUNCH, *args], env=_env(), capture_output=True, text=True, timeout=600)


def _rows(output: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(output.read_text("utf-8"), newline="")))[1:]


@pytest.mark.slow
def test_score_two_processes_write_the_file_one_process_writes(tmp_path):
    data = _images(tmp_path / "data", 9)  # 9 over 2 processes: shares of 5 and 4
    flags = ["--scorer", SCORER, "--batch-size", "2", "--quiet"]
    run = _launch("score", str(data), "-o", str(tmp_path / "multi.csv"), *flags)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "9 scored, 0 failed, 0 already in" in run.stderr  # the main process reports every process's work
    assert run.stderr.count(" scored, ") == 1  # ... and only it
    assert main(["score", str(data), "-o", str(tmp_path / "single.csv"), *flags]) == 0
    assert (tmp_path / "multi.csv").read_bytes() == (tmp_path / "single.csv").read_bytes()
    assert not parts_folder(tmp_path / "multi.csv").exists()
    paths = [row[0] for row in _rows(tmp_path / "multi.csv")]
    assert len(paths) == len(set(paths)) == 9


@pytest.mark.slow
def test_label_two_processes_write_the_metadata_one_process_writes(tmp_path):
    for name in ("multi", "single"):
        _images(tmp_path / name, 7)
        (tmp_path / name / "metadata.csv").write_text("file_name,caption\nimg003.png,a cat\n", encoding="utf-8")
    flags = ["--scorer", SCORER, "--scorer", "niqe-embedded@224", "--batch-size", "2", "--quiet"]
    run = _launch("label", str(tmp_path / "multi"), *flags)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("7 images; scored now") == 1
    assert main(["label", str(tmp_path / "single"), *flags]) == 0
    assert (tmp_path / "multi" / "metadata.csv").read_bytes() == (tmp_path / "single" / "metadata.csv").read_bytes()
    owned = tmp_path / "multi" / ".qualityguide" / "labels"
    assert sorted(p.name for p in owned.iterdir()) == sorted(p.name for p in (owned.parents[2] / "single" /
                                                                              ".qualityguide" / "labels").iterdir())


def _pid_of_rank(token: str, rank: int) -> int | None:
    """The process of this launch (its environment holds ``token``) with RANK ``rank``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"QG_TEST_TOKEN={token}".encode() in environ and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the process to kill through /proc")
def test_score_killed_process_then_rerun_loses_and_duplicates_nothing(tmp_path):
    data = _images(tmp_path / "data", 40)
    output = tmp_path / "scores.csv"
    args = ["score", str(data), "-o", str(output), "--scorer", SCORER, "--batch-size", "1", "--quiet"]
    token = uuid.uuid4().hex
    launch = subprocess.Popen([_launcher(), *LAUNCH, *args], env=_env(QG_TEST_TOKEN=token),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = part_path(output, 1)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and launch.poll() is None:
            if part.exists() and part.read_bytes().count(b"\n") >= 3:  # the header and two rows: mid-run
                pid = _pid_of_rank(token, 1)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    break
            time.sleep(0.02)
        assert launch.wait(timeout=120) != 0  # the launcher stops the other process too
    finally:
        if launch.poll() is None:
            launch.kill()
    killed_rows = part.read_bytes().count(b"\n") - 1
    assert 2 <= killed_rows < 20, killed_rows  # process 1 was stopped inside its share of 20
    rerun = _launch(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not parts_folder(output).exists()
    rows = _rows(output)
    paths = [row[0] for row in rows]
    assert len(paths) == len(set(paths)) == 40  # nothing lost, nothing twice
    assert main(["score", str(data), "-o", str(tmp_path / "single.csv"), "--scorer", SCORER, "--quiet"]) == 0
    assert {row[0]: row for row in rows} == {row[0]: row for row in _rows(tmp_path / "single.csv")}


@pytest.mark.slow
def test_main_process_refusal_stops_every_process(tmp_path):
    data = _images(tmp_path / "data", 3)
    output = tmp_path / "notes.csv"
    output.write_bytes(b"name,notes\nx,y\n")
    run = _launch("score", str(data), "-o", str(output), "--scorer", SCORER, "--quiet")
    assert run.returncode != 0
    assert "exists and is not a qualityguide scores CSV" in run.stderr
    assert "process 1: stopped, as the main process refused the run (its own error line says why)" in run.stderr
    assert run.stderr.count("is not a qualityguide scores CSV") == 1  # said once, by the main process
    assert output.read_bytes() == b"name,notes\nx,y\n"
    assert not parts_folder(output).exists()


def _table(path: Path, rows: list[tuple[str, str]]) -> None:
    with ScoreFile.open(path, "scorer=mean") as table:
        table.append([{"path": p, "score": s, "error": "", "native_score": s} for p, s in rows])


def test_merge_parts_in_rank_order_once(tmp_path):
    output = tmp_path / "scores.csv"
    _table(output, [("/a", "1")])
    _table(part_path(output, 1), [("/c", "3")])
    _table(part_path(output, 0), [("/b", "2"), ("/a", "9")])  # "/a" is already merged: kept as it is
    snapshot = {p.name: p.read_bytes() for p in parts_folder(output).iterdir()}
    with ScoreFile.open(output, "scorer=mean") as table:
        assert merge_parts(table) == 2
    assert [row[:2] for row in _rows(output)] == [["/a", "1"], ["/b", "2"], ["/c", "3"]]
    assert not parts_folder(output).exists()
    merged = output.read_bytes()
    parts_folder(output).mkdir()  # as if killed after the merged file replaced the old one, before the cleanup
    for name, data in snapshot.items():
        (parts_folder(output) / name).write_bytes(data)
    with ScoreFile.open(output, "scorer=mean") as table:
        assert merge_parts(table) == 0
    assert output.read_bytes() == merged and not parts_folder(output).exists()


def test_failed_merge_keeps_parts_and_output(tmp_path, monkeypatch):
    import qualityguide.cli.scorefile as scorefile

    output = tmp_path / "scores.csv"
    _table(output, [("/a", "1")])
    _table(part_path(output, 0), [("/b", "2")])
    before = output.read_bytes(), part_path(output, 0).read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scorefile, "atomic_write", killed)
    with ScoreFile.open(output, "scorer=mean") as table, pytest.raises(KeyboardInterrupt):
        merge_parts(table)
    assert (output.read_bytes(), part_path(output, 0).read_bytes()) == before


def test_one_process_run_takes_over_a_sharded_runs_parts(tmp_path):
    data = _images(tmp_path / "data", 4)
    output = tmp_path / "scores.csv"
    assert main(["score", str(data / "img000.png"), str(data / "img001.png"), "-o", str(tmp_path / "ref.csv"),
                 "--scorer", SCORER, "--quiet"]) == 0
    parts_folder(output).mkdir()
    shutil.copy(tmp_path / "ref.csv", part_path(output, 1))  # what a killed 2-process run left
    assert main(["score", str(data), "-o", str(output), "--scorer", SCORER, "--quiet"]) == 0
    rows = _rows(output)
    assert [row[0] for row in rows] == [str((data / f"img{i:03d}.png").resolve()) for i in range(4)]
    assert rows[:2] == _rows(tmp_path / "ref.csv")  # taken over, not scored again
    assert not parts_folder(output).exists()


def test_plain_run_does_not_import_accelerate(tmp_path):
    data = _images(tmp_path / "data", 1)
    code = ("import sys; from qualityguide.cli import main; "
            f"assert main(['score', {str(data)!r}, '-o', {str(tmp_path / 's.csv')!r}, '--scorer', {SCORER!r}, "
            "'--quiet']) == 0; print('accelerate' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"


def test_cuda_means_each_process_its_own_gpu(monkeypatch):
    import torch

    from qualityguide.cli.shards import process_device
    from qualityguide.errors import InputError

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert process_device(cuda) == cuda  # not launched: torch's current GPU, as ever
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_device(cuda) == torch.device("cuda", 1)
    assert process_device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # an index given is kept
    assert process_device(cpu) == cpu
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(InputError, match="process 2 has none: this machine has 2 GPU.*--num_processes"):
        process_device(cuda)


def test_label_takes_over_the_parts_of_a_killed_sharded_run(tmp_path):
    from qualityguide.cli.label import OWNED, label_folder
    from qualityguide.scorers.base import QualityScorer

    class Counting(QualityScorer):
        name = "mean"

        def __init__(self):
            super().__init__()
            self.seen = 0

        def native(self, images):
            self.seen += images.shape[0]
            return images.mean(dim=(1, 2, 3))

    _images(tmp_path, 2)
    first = Counting()
    label_folder(tmp_path, {"mean": first}, progress=False)
    column_file = next(p for p in (tmp_path / OWNED).glob("mean-*.csv"))
    parts_folder(column_file).mkdir()
    column_file.rename(part_path(column_file, 1))  # as if a sharded run's process 1 scored them and was killed
    (tmp_path / "metadata.csv").unlink()
    _images(tmp_path / "more", 3, seed=1)
    for image in (tmp_path / "more").iterdir():
        image.rename(tmp_path / f"new-{image.name}")
    again = Counting()
    summary = label_folder(tmp_path, {"mean": again}, progress=False)
    assert again.seen == 3 and summary.scored["mean"] == 3  # the two in the part were not scored again
    assert not parts_folder(column_file).exists()
    rows = _rows(tmp_path / "metadata.csv")
    assert len(rows) == 5 and all(row[1] for row in rows)


def test_label_overwrite_with_other_settings_drops_the_old_settings_parts(tmp_path):
    from qualityguide.cli.label import OWNED, label_folder

    _images(tmp_path, 2)
    label_folder(tmp_path, {"q": load_scorer("niqe-embedded@192")}, progress=False)
    column_file = next((tmp_path / OWNED).glob("q-*.csv"))
    parts_folder(column_file).mkdir()
    shutil.copy(column_file, part_path(column_file, 0))  # a killed sharded run's rows, made with the old settings
    summary = label_folder(tmp_path, {"q": load_scorer("niqe-embedded@224")}, overwrite=True, progress=False)
    assert summary.scored["q"] == 2 and not parts_folder(column_file).exists()
    with ScoreFile.open(column_file, "scorer=niqe-embedded@224") as table:
        assert len(table.rows) == 2
