"""The kit every eval shares (``evals/common``): slugs, the report trio, the paired gain, the figure backend, flags."""

import json

import numpy as np
import pytest

from evals.common import figures, flags, report, stats
from qualityguide.errors import InputError, TrainingError
from qualityguide.evaluation.stats import bootstrap_ci


def test_slug_is_file_safe_and_keeps_the_old_spellings():
    assert report.slug("tiny:sd", "64px", "10steps") == "tiny_sd_64px_10steps"
    assert report.slug("stable-diffusion-v1-5/stable-diffusion-v1-5", "512px") == \
        "stable-diffusion-v1-5_stable-diffusion-v1-5_512px"  # what model.replace(":"/"/", "_") wrote
    assert report.slug("pyiqa:topiq_nr@384") == "pyiqa_topiq_nr_384" and report.slug("lgdm", 0.5) == "lgdm_0.5"


def test_write_report_writes_the_trio(tmp_path):
    drawn = []
    report.write_report(tmp_path / "new", "run", {"a": 1.5}, "| a |\n", lambda r, path: drawn.append((r, path)))
    assert json.loads((tmp_path / "new" / "run.json").read_text()) == {"a": 1.5}
    assert (tmp_path / "new" / "run.md").read_text() == "| a |\n"
    assert drawn == [({"a": 1.5}, tmp_path / "new" / "run.png")]
    report.write_report(tmp_path, "results", {"b": 2}, "b\n", json_stem="summary")
    assert json.loads((tmp_path / "summary.json").read_text()) == {"b": 2} and not (tmp_path / "results.json").exists()


def test_paired_gain_against_a_hand_computation():
    rng = np.random.default_rng(0)
    base = rng.normal(size=12)
    treated = base + rng.normal(0.3, 0.1, size=12)
    treated[4] = np.nan  # a refused image drops its pair
    got = stats.paired_gain(treated, base, n_boot=300)
    keep = np.arange(12) != 4
    diff = treated[keep] - base[keep]
    assert got["pairs"] == 11 and got["gain"] == pytest.approx(diff.mean())
    assert got["treated_mean"] == pytest.approx(treated[keep].mean()) and got["base_mean"] == pytest.approx(
        base[keep].mean())
    assert got["fraction_improved"] == pytest.approx((diff > 0).mean())
    assert got["gain_ci95"] == list(bootstrap_ci(diff, diff, lambda a, b: float(np.mean(a)), n_boot=300))
    assert got["gain_ci95"][0] <= got["gain"] <= got["gain_ci95"][1]


def test_paired_gain_needs_three_pairs_for_an_interval():
    """The guard one of the three old copies lacked: below three pairs there is no interval (None), not a crash."""
    two = stats.paired_gain(np.array([1.0, 2.0]), np.array([0.5, 2.5]))
    assert two["gain_ci95"] is None and two["pairs"] == 2 and two["gain"] == pytest.approx(0.0)
    none = stats.paired_gain(np.array([np.nan]), np.array([1.0]))
    assert none["pairs"] == 0 and np.isnan(none["gain"]) and none["gain_ci95"] is None


def test_figures_use_the_file_only_backend(tmp_path):
    plt = figures.pyplot()
    assert plt.get_backend().lower() == "agg"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    figures.save_figure(fig, tmp_path / "f.png", dpi=50)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.get_fignums()


def test_require_positive_exits_2_naming_the_flag_as_typed(capsys):
    parser = flags.eval_parser("an eval")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--limit", type=int, default=None)
    parser.require_positive(parser.parse_args(["--n_boot", "1"]), ("n_boot", "limit"))  # 1 and None pass
    with pytest.raises(SystemExit) as exc:
        parser.require_positive(parser.parse_args(["--n_boot", "0"]), ("n_boot",))
    assert exc.value.code == 2 and "error: --n-boot=0: must be >= 1" in capsys.readouterr().err


def test_bench_acpo_checks_its_sizes_while_parsing(capsys):
    from evals import bench_acpo

    for argv, message in ((["--repeats", "0"], "--repeats=0: must be >= 1"), (["--rank", "-1"], "--rank=-1"),
                          (["--height", "12"], "--height=12: must be a positive multiple of 8")):
        with pytest.raises(SystemExit) as exc:
            bench_acpo.parse_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert bench_acpo.parse_args(["--repeats", "2", "--height", "64"]).repeats == 2


def test_one_line_errors_turns_only_the_named_errors_into_one_line():
    with pytest.raises(SystemExit) as exc:
        with flags.one_line_errors("finetune"):
            raise InputError("--lora x: no such folder")
    assert exc.value.code == "finetune: --lora x: no such folder"
    with pytest.raises(TrainingError):  # not named: it keeps its traceback
        with flags.one_line_errors("acpo_toy", InputError):
            raise TrainingError("loss is nan")
    with flags.one_line_errors("guidance"):
        pass


def test_markdown_table_lines():
    assert report.markdown_table(["scorer", "n", "SRCC"], [["niqe", 9, "0.512"], ["brisque", 10, "0.600"]]) == [
        "| scorer | n | SRCC |", "|---|---|---|", "| niqe | 9 | 0.512 |", "| brisque | 10 | 0.600 |"]
    assert report.markdown_table(["a"], []) == ["| a |", "|---|"]


def test_permutation_test_against_a_hand_count():
    """p = (1 + #twins >= true) / (1 + N), ties against the true model; NaN twins dropped; the floor 1/(1+N)."""
    got = stats.permutation_test(0.5, [0.1, 0.5, -0.2, 0.9, float("nan"), 0.3, 0.0, 0.2, 0.4])
    assert got["twins"] == [0.1, 0.5, -0.2, 0.9, 0.3, 0.0, 0.2, 0.4] and got["of"] == 9
    assert got["rank"] == 3 and got["p"] == pytest.approx(3 / 9)  # 0.5 (a tie) and 0.9 are >= 0.5
    assert got["twin_mean"] == pytest.approx(np.mean(got["twins"])) and got["twin_sd"] == pytest.approx(
        np.std(got["twins"], ddof=1))
    top = stats.permutation_test(7.5, list(range(8)))  # above every twin
    assert top["rank"] == 1 and top["p"] == pytest.approx(1 / 9) == top["p_floor"]
    assert stats.permutation_test(-1.0, list(range(8)))["p"] == 1.0
    assert np.isnan(stats.permutation_test(float("nan"), [1.0])["p"]) and np.isnan(stats.permutation_test(1.0, [])["p"])


def test_part_store_keeps_finished_pieces_per_settings(tmp_path):
    import torch

    from evals.common.parts import PartStore

    store = PartStore(tmp_path, {"steps": 600, "seed": 0})
    assert store.load("adapter", keep_samples=True) == (None, {})
    samples = {"1.0": torch.rand(2, 3, 4, 4)}
    store.save("adapter", {"loss": 0.19, "stats": {"1.0": {"mean": [1.0]}}}, samples)
    store.save("twin-3", {"loss": 0.2}, {})
    record, kept = PartStore(tmp_path, {"seed": 0, "steps": 600}).load("adapter", keep_samples=True)  # key order
    assert record == {"loss": 0.19, "stats": {"1.0": {"mean": [1.0]}}} and torch.equal(kept["1.0"], samples["1.0"])
    assert PartStore(tmp_path, {"steps": 600, "seed": 0}).load("twin-3", keep_samples=False) == ({"loss": 0.2}, {})
    assert PartStore(tmp_path, {"steps": 300, "seed": 0}).load("adapter", keep_samples=False) == (None, {})
    (store.folder / "twin-3.json").write_text('{"loss": 0.')  # a damaged piece is measured again, not trusted
    assert store.load("twin-3", keep_samples=False) == (None, {})
    assert not [p for p in store.folder.iterdir() if ".tmp-" in p.name]
    nowhere = PartStore(None, {})
    nowhere.save("adapter", {"loss": 1.0}, samples)
    assert nowhere.load("adapter", keep_samples=True) == (None, {})
