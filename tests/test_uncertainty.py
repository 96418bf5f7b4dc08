"""Bootstrap intervals against closed forms, the paired test's false-positive rate and power, FID/IS against closed
forms, and records' intervals recomputed from what they store (evaluation/uncertainty.py, foca_bench/significance.py)."""

import os

import numpy as np
import pytest

from evaluation.uncertainty import (FrechetToReference, frechet_distance, inception_score, interval, paired,
                                    set_interval, set_paired, set_statistic, summary)
from foca_bench.significance import SAME, cell, compare, externalize, load_arrays


def test_interval_of_gaussian_samples_matches_the_closed_form():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=400)
    lo, hi = interval(x)
    half = 1.959964 * x.std(ddof=1) / np.sqrt(len(x))  # mean ± z sigma / sqrt(n)
    assert lo == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.1 * half)
    # the same through the set-metric path (any function of the rows), centred at the estimate
    slo, shi = set_interval(x[:, None], lambda rows: float(rows.mean()), resamples=2000)
    assert (shi - slo) / 2 == pytest.approx(half, rel=0.1)


def test_psnr_interval_is_over_the_set_psnr():
    mse = np.full(50, 1e-3)
    assert interval(mse, "psnr") == (pytest.approx(30.0), pytest.approx(30.0))  # identical samples: a point
    lo, hi = interval(np.random.default_rng(0).uniform(5e-4, 2e-3, 200), "psnr")
    assert lo < 10 * np.log10(1 / 1.25e-3) < hi


def test_paired_false_positive_rate_is_near_its_nominal_level():
    """Two rows from the same distribution sharing a per-seed part (as rows on the same seeds do): the test calls
    them different in about 5% of 400 trials."""
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        seed_part = rng.normal(0, 3.0, 80)
        a, b = seed_part + rng.normal(0, 1, 80), seed_part + rng.normal(0, 1, 80)
        hits += paired(a, b, resamples=999, seed=int(rng.integers(1 << 30)))["distinguishable"]
    assert 0.02 <= hits / 400 <= 0.09


def test_pairing_resolves_a_difference_smaller_than_either_interval():
    rng = np.random.default_rng(3)
    seed_part = rng.normal(0, 3.0, 100)
    a, b = seed_part + 0.3 + rng.normal(0, 0.3, 100), seed_part + rng.normal(0, 0.3, 100)
    lo, hi = interval(a)
    assert hi - lo > 0.6  # 0.3 is well inside either row's own interval
    verdict = paired(a, b)
    assert verdict["distinguishable"] and verdict["p"] < 0.01
    assert verdict["interval"][0] < 0.3 < verdict["interval"][1]
    assert paired(a, a) == {"difference": 0.0, "interval": [0.0, 0.0], "p": 1.0, "distinguishable": False}


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected)


@pytest.mark.parametrize("n", [12, 300])  # fewer samples than dimensions (the n x n Gram) and more (d x d)
def test_fid_of_features_matches_torch_fidelitys_statistics_and_metric(n):
    """FrechetToReference (eigenvalues of the Gram of x R, R the real covariance's root) against torch-fidelity's own
    `fid_features_to_statistics` and `fid_statistics_to_metric` (eigenvalues of S1 S2), rank-deficient sides
    included."""
    import torch
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(5)
    real = rng.gamma(0.5, 1.0, (40, 64)) @ rng.normal(size=(64, 64)) * 0.1  # 40 < 64 rows: a singular real sigma
    fake = rng.gamma(0.6, 1.0, (n, 64)) @ rng.normal(size=(64, 64)) * 0.1
    stats = [fid_features_to_statistics(torch.from_numpy(x)) for x in (fake, real)]
    expected = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    fid = FrechetToReference(stats[1]["mu"], stats[1]["sigma"])
    assert fid(fid.rows(fake)) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance(stats[0]["mu"], stats[0]["sigma"], stats[1]["mu"], stats[1]["sigma"]) == pytest.approx(
        expected, rel=1e-7)


def test_torch_fidelity_is_statistic_is_torch_fidelitys_and_closed_forms():
    import torch
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = np.random.default_rng(6).normal(0, 3, (50, 20))  # 50 / 4: uneven chunks
    expected = isc_features_to_metric(torch.from_numpy(logits), splits=4)["inception_score_mean"]
    fn, rows = set_statistic("torch_fidelity_is/4", {"logits": logits})
    assert fn(rows) == pytest.approx(expected, rel=1e-12)
    confident = np.eye(10)[np.arange(200) % 10] * 50.0  # certain, classes balanced: IS = 10
    fn, rows = set_statistic("torch_fidelity_is/1", {"logits": confident})
    assert fn(rows) == pytest.approx(10.0, rel=1e-6)
    fn, rows = set_statistic("torch_fidelity_is/4", {"logits": np.zeros((50, 10))})
    assert fn(rows) == pytest.approx(1.0)  # uniform predictions: IS = 1
    with pytest.raises(ValueError, match="torch_fidelity_is/<splits>"):
        set_statistic("torch_fidelity_is", {"logits": confident})


def test_inception_score_closed_forms():
    confident = np.eye(10)[np.arange(200) % 10] * 50.0  # certain, classes balanced: IS = 10
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    assert inception_score(confident, splits=10) < 10.0  # shuffled splits of 20: classes no longer balanced
    assert inception_score(np.zeros((50, 10))) == pytest.approx(1.0)  # uniform predictions: IS = 1


def test_set_paired_on_identical_rows_and_on_a_shift():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 1))
    mean = lambda rows: float(rows.mean())  # noqa: E731
    assert not set_paired(x, x, mean, resamples=200)["distinguishable"]
    assert set_paired(x + 0.5, x, mean, resamples=200)["distinguishable"]


def _record(values, arrays=None):
    metrics = {"ssim": {"value": float(np.mean(values)), "higher_is_better": True, **summary(values)}}
    if arrays is not None:
        metrics["fid"] = {"value": 1.0, "higher_is_better": False, "interval": [0.5, 1.5], "statistic": "fid",
                          "arrays": arrays}
    return {"benchmark": "toy_fid", "samples": {"count": len(values), "seeds": [0, len(values) - 1]},
            "metrics": metrics}


def test_records_keep_what_recomputes_their_intervals_and_compare_paired(tmp_path):
    rng = np.random.default_rng(4)
    real = rng.normal(size=(300, 4))
    stats = {"real_mu": real.mean(0), "real_sigma": np.cov(real, rowvar=False)}
    shared = rng.normal(0, 0.2, 60)
    base = _record(0.9 + shared, {"features": rng.normal(size=(60, 4)), **stats})
    near = _record(0.9 + shared + rng.normal(0, 1e-3, 60), {"features": rng.normal(size=(60, 4)), **stats})
    far = _record(0.5 + shared, {"features": rng.normal(2.0, 1.0, size=(60, 4)), **stats})
    rows = {}
    for name, rec in (("base", base), ("near", near), ("far", far)):
        path = tmp_path / f"{name}.json"
        externalize(rec, path)
        assert rec["metrics"]["fid"]["arrays"] == f"{name}.arrays.npz"
        rows[name] = (path, rec)
    assert load_arrays(rows["far"][0], "fid")["features"].shape == (60, 4)
    assert interval(base["metrics"]["ssim"]["per_sample"]) == tuple(base["metrics"]["ssim"]["interval"])
    assert not compare(rows["near"], rows["base"], "ssim")["distinguishable"]
    assert compare(rows["far"], rows["base"], "ssim")["distinguishable"]
    assert compare(rows["far"], rows["base"], "fid")["distinguishable"]  # from the features beside the records
    assert cell("0.900", near["metrics"]["ssim"], 3, compare(rows["near"], rows["base"], "ssim")).endswith(SAME)
    assert " ± " in cell("0.500", far["metrics"]["ssim"], 3, None)
    elsewhere = _record(0.5 + shared, {"features": rng.normal(size=(60, 4)), **stats, "real_mu": stats["real_mu"] + 1})
    externalize(elsewhere, tmp_path / "elsewhere.json")
    assert compare((tmp_path / "elsewhere.json", elsewhere), rows["base"], "fid") is None  # another reference set
    other = dict(far, samples={"count": 60, "seeds": [100, 159]})  # other seeds: no paired comparison
    assert compare((rows["far"][0], other), rows["base"], "ssim") is None


def test_a_set_metric_s_paired_verdict_is_kept_beside_the_record_until_the_arrays_change(tmp_path, monkeypatch):
    """`make tables` compares every ImageNet row's FID with DDIM-50's by resampling (an hour of CPU at 50k): the
    verdict is cached in `<run_id>.paired` (not read as a record), reused while both arrays files are unchanged."""
    from foca_bench import significance
    from foca_bench.records import record_files

    rng = np.random.default_rng(7)
    real = rng.normal(size=(200, 4))
    stats = {"real_mu": real.mean(0), "real_sigma": np.cov(real, rowvar=False)}
    rows = {}
    for name, shift in (("base", 0.0), ("far", 2.0)):
        rec = _record(rng.normal(size=30), {"features": rng.normal(shift, 1.0, size=(30, 4)), **stats})
        path = tmp_path / "toy_fid" / "toy_dit" / name / f"{name}.json"
        path.parent.mkdir(parents=True)
        externalize(rec, path)
        path.write_text("{}")
        rows[name] = (path, rec)
    first = compare(rows["far"], rows["base"], "fid")
    assert first["distinguishable"] and rows["far"][0].with_suffix(".paired").is_file()
    assert record_files(tmp_path) == sorted(p for p, _ in rows.values())  # the cache is no record
    calls = []
    monkeypatch.setattr(significance, "set_paired", lambda *a, **k: calls.append(1) or {"stale": True})
    assert compare(rows["far"], rows["base"], "fid") == first and not calls  # from the cache
    base_arrays = significance.arrays_path(rows["base"][0])
    os.utime(base_arrays, ns=(0, base_arrays.stat().st_mtime_ns + 10**9))  # the baseline's arrays rewritten
    assert compare(rows["far"], rows["base"], "fid") == {"stale": True} and calls == [1]  # recomputed
