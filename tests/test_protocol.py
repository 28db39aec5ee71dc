import numpy as np
import pytest
from scipy import stats

from qualityguide.evaluation.datasets import load_iqa_dataset
from qualityguide.errors import InputError
from qualityguide.evaluation.stats import (bootstrap_ci, content_disjoint_split, correlations, fit_logistic, krcc,
                                   logistic4, plcc, srcc, summarize)


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    mos = rng.uniform(0, 1, 300)
    pred = np.tanh(3 * (mos - 0.5)) + rng.normal(0, 0.2, 300)
    pred[:20] = np.round(pred[:20], 1)  # ties
    return pred, mos


def test_against_scipy(pairs):
    pred, mos = pairs
    assert srcc(pred, mos) == pytest.approx(stats.spearmanr(pred, mos)[0], abs=1e-12)
    assert krcc(pred, mos) == pytest.approx(stats.kendalltau(pred, mos)[0], abs=1e-12)
    assert plcc(pred, mos, "none") == pytest.approx(stats.pearsonr(pred, mos)[0], abs=1e-12)
    tied = np.array([1, 1, 2, 2, 2, 3.0])
    assert krcc(tied, [1, 2, 3, 4, 5, 6]) == pytest.approx(stats.kendalltau(tied, [1, 2, 3, 4, 5, 6])[0])


@pytest.mark.parametrize("x,y,rho,tau,r", [
    # ranks x [1, 2.5, 2.5, 4], y [1, 3, 2, 4]: rho = 4.5 / sqrt(4.5 * 5); pairs: 5 concordant, 1 tied in x only
    ([1, 2, 2, 3], [1, 3, 2, 10], 3 / np.sqrt(10), 5 / np.sqrt(30), 9 / np.sqrt(100)),
    # ties in both: ranks x [1.5, 1.5, 3, 4], y [3, 1.5, 1.5, 4]; C=3, D=1, one tie in x only, one in y only
    ([1, 1, 2, 3], [2, 1, 1, 3], 2.25 / 4.5, 2 / np.sqrt(5 * 5), 1.75 / 2.75),
])
def test_hand_computed_values_with_ties(x, y, rho, tau, r):
    assert srcc(x, y) == pytest.approx(rho, abs=1e-12)
    assert krcc(x, y) == pytest.approx(tau, abs=1e-12)  # tau-b: (C - D) / sqrt((C + D + Tx)(C + D + Ty))
    assert plcc(x, y, "none") == pytest.approx(r, abs=1e-12)
    assert srcc(y, x) == pytest.approx(rho, abs=1e-12) and krcc(y, x) == pytest.approx(tau, abs=1e-12)


def test_constant_input_gives_nan_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's ConstantInputWarning would fail the test
        for pred, mos in (([2.0] * 5, [1, 2, 3, 4, 5]), ([1, 2, 3, 4, 5], [7.0] * 5)):
            values = correlations(pred, mos)
            assert all(np.isnan(v) for v in values.values()), values
        # a bootstrap whose resamples are sometimes constant keeps the finite ones
        lo, hi = bootstrap_ci([0, 0, 0, 1], [0, 1, 2, 3], srcc, n_boot=200)
        assert np.isfinite(lo) and np.isfinite(hi) and lo <= hi


def test_logistic_plcc_recovers_nonlinear_relation():
    x = np.linspace(-3, 3, 200)
    y = logistic4(x, 5.0, 1.0, 0.3, 0.7)
    params = fit_logistic(x, y)
    assert np.allclose(logistic4(x, *params), y, atol=1e-4)
    assert plcc(x, y, "logistic") == pytest.approx(1.0, abs=1e-6)
    assert plcc(x, y, "none") < 0.99
    # decreasing relations fit too, and report their direction (higher-is-better predictions)
    assert plcc(-x, y, "logistic") == pytest.approx(-1.0, abs=1e-6)


def _increasing_logistic_plcc(x: np.ndarray, y: np.ndarray) -> float:
    """Reference: a logistic that can only rise (upper = lower + exp(gap), positive width), fitted by
    scipy's curve_fit on standardised x, then scipy's pearsonr."""
    from scipy.optimize import curve_fit

    def rising(z, lower, gap, centre, log_width):
        return lower + np.exp(gap) / (1.0 + np.exp(-(z - centre) / np.exp(log_width)))

    z = (x - x.mean()) / x.std()
    params, _ = curve_fit(rising, z, y, p0=[y.min(), np.log(np.ptp(y)), 0.0, 0.0], maxfev=20000)
    return float(stats.pearsonr(rising(z, *params), y)[0])


@pytest.mark.parametrize("sign", [1, -1])
def test_logistic_plcc_carries_the_direction_of_an_anti_correlated_predictor(sign):
    """Higher is better: a predictor that falls as MOS rises gets a negative PLCC beside its negative SRCC (the
    free-direction fit alone reported +0.905 next to SRCC -0.879 here). Reference: the rising logistic of
    ``sign * x``, whose correlation is the predictor's with the sign of its direction."""
    rng = np.random.default_rng(3)
    mos = rng.uniform(1, 5, 300)
    pred = sign * (np.tanh(2 * (mos - 3)) + rng.normal(0, 0.25, 300))
    ours = plcc(pred, mos, "logistic")
    reference = sign * _increasing_logistic_plcc(sign * pred, mos)
    assert np.sign(ours) == np.sign(srcc(pred, mos)) == sign
    assert ours == pytest.approx(reference, abs=1e-4)
    assert abs(ours) > abs(plcc(pred, mos, "none"))  # the logistic still straightens the tanh
    assert correlations(pred, mos)["plcc"] == ours


def test_correlations_and_bootstrap(pairs):
    pred, mos = pairs
    result = correlations(pred, mos)
    assert set(result) == {"srcc", "krcc", "plcc_raw", "plcc"}
    lo, hi = bootstrap_ci(pred, mos, srcc, n_boot=200)
    assert lo < result["srcc"] < hi and hi - lo < 0.2
    with pytest.raises(InputError, match="same length"):
        srcc([1, 2, 3], [1, 2])
    with pytest.raises(InputError, match="finite"):
        srcc([1, 2, np.nan], [1, 2, 3])


def test_content_disjoint_split():
    contents = [f"ref{i // 5}" for i in range(200)]  # 40 references x 5 distortions
    train, val, test = content_disjoint_split(contents, seed=3)
    assert len(train) + len(val) + len(test) == 200
    groups = [set(np.asarray(contents)[idx]) for idx in (train, val, test)]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert abs(len(train) / 200 - 0.7) <= 0.05 and abs(len(test) / 200 - 0.2) <= 0.05
    again = content_disjoint_split(contents, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    other = content_disjoint_split(contents, seed=4)
    assert not np.array_equal(train, other[0])
    singles = content_disjoint_split(None, n=100, seed=0)
    assert [len(p) for p in singles] == [70, 10, 20]


def test_summarize():
    s = summarize([0.1, 0.5, 0.3])
    assert s["median"] == 0.3 and s["n"] == 3 and s["min"] == 0.1


def test_dataset_loading(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / f"{i}.png")
    (tmp_path / "mos.csv").write_text("image,mos,content\n0.png,1.5,a\n1.png,2.5,a\n2.png,3,b\n")
    ds = load_iqa_dataset(tmp_path)
    assert ds.column_names == ["image", "name", "mos", "content"]
    assert ds["mos"] == [1.5, 2.5, 3.0] and ds["content"] == ["a", "a", "b"]
    (tmp_path / "bad.csv").write_text("image,mos\n0.png,x\n")
    with pytest.raises(InputError, match="line 2: mos 'x'"):
        load_iqa_dataset(tmp_path, "bad.csv")
    (tmp_path / "missing.csv").write_text("image,mos\nnope.png,1\n")
    with pytest.raises(InputError, match="not found"):
        load_iqa_dataset(tmp_path, "missing.csv")
    (tmp_path / "cols.csv").write_text("file,score\n0.png,1\n")
    with pytest.raises(InputError, match=r"missing column\(s\) \['image', 'mos'\]"):
        load_iqa_dataset(tmp_path, "cols.csv")
    (tmp_path / "nocontent.csv").write_text("image,mos\n0.png,1\n1.png,2\n")
    assert load_iqa_dataset(tmp_path, "nocontent.csv")["content"] == ["0.png", "1.png"]


def test_plcc_logistic_degenerate_fit_falls_back_to_raw(monkeypatch):
    """Seen on a BIQ2021 split: the fit put the logistic's step (b4 ~ 0) outside every prediction, so the
    mapped values were constant and PLCC was NaN. The fallback reports the raw correlation."""
    import qualityguide.evaluation.stats as protocol

    rng = np.random.default_rng(5)
    pred, mos = rng.normal(size=120), rng.normal(size=120) + 0.3 * np.arange(120) / 120
    monkeypatch.setattr(protocol, "fit_logistic", lambda x, y: np.array([0.55, 0.67, 99.0, 0.005]))
    assert protocol.plcc(pred, mos, fit="logistic") == pytest.approx(protocol.plcc(pred, mos, fit="none"))
