"""Bootstrap confidence intervals for quality metrics, and paired comparisons of rows that share seeds.

Pure functions: values in, interval out. Two kinds of metric:

- per-sample metrics (ImageReward, CLIP score, SSIM, RelL2, class accuracy, VBench per-video scores) are a
  statistic of per-sample values: the mean, the mean over the samples that have a value (`nanmean`: VBench's color
  scores only some videos; a record keeps null for the others), or for PSNR over a set 10 log10(1 / mean MSE)
  (`STATISTICS`). Their interval is scipy's `stats.bootstrap` (percentile method) over samples;
- set metrics (FID, IS; VBench's total, quality and semantic scores, weighted means of several dimensions' means,
  each over its own videos) are functions of the whole set's features or per-sample rows. Their interval resamples
  the generated set's cached features or rows (never regenerates images) and recomputes the metric on each
  resample; the reference set's statistics stay fixed. Resampling with replacement biases FID far upward
  (duplicates shrink the covariance: on 200 toy samples the resampled FIDs centre near 1.5x the estimate), so the
  interval is the centred percentile one: the quantiles of the resampled values minus their mean, placed at the
  estimate (the bootstrap's spread, without its bias). In a paired difference the shared part of the bias cancels
  as well. Cost: one FID (a d x d covariance and matrix square root) per resample: about 1 ms at d = 64 (the toy
  classifier), about 1 s at d = 2048 (Inception), so FID-50k's 1000 resamples take about 20 CPU minutes.

Paired comparisons: every row of a table is generated from the same seeds (sample i of every row starts from the
same noise), so row A and the baseline B are compared by resampling sample *indices* once for both and
recomputing stat(A[idx]) - stat(B[idx]): the shared per-seed variation cancels, and a difference far smaller than
either row's interval can still be resolved. A difference is "distinguishable" when the 95% interval of the
paired difference excludes 0 (two-sided p < 0.05). Every interval uses `RESAMPLES` resamples drawn from
`numpy.random.default_rng(SEED)`, so a table regenerates to the digit.

torchmetrics' `BootStrapper` was considered: it keeps one copy of the wrapped metric per resample and resamples
inside `update`, so it cannot recompute an interval from a record, and for FID it would hold every copy's
feature states; scipy's bootstrap (per-sample) and the index resampling below (set metrics) work from stored
values.
"""

import warnings
from typing import Callable, Optional

import numpy as np
from scipy import linalg, stats

from evaluation.vbench_score import GROUPS, group_score

RESAMPLES = 2000  # per-sample metrics
SET_RESAMPLES = 500  # set metrics (FID/IS, VBench's totals): one metric evaluation per resample
SEED = 0
LEVEL = 0.95


def _psnr(mse: np.ndarray, axis: int = -1) -> np.ndarray:
    """PSNR (dB) of a set from its per-sample mean squared errors, data range 1: 10 log10(1 / mean MSE)."""
    return 10.0 * np.log10(1.0 / np.maximum(np.mean(mse, axis=axis), 1e-300))


STATISTICS: dict[str, Callable[..., np.ndarray]] = {"mean": np.mean, "nanmean": np.nanmean, "psnr": _psnr}


def interval(values, statistic: str = "mean", resamples: int = RESAMPLES, seed: int = SEED,
             level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over per-sample `values` (scipy.stats.bootstrap).

    Args:
        values: (n,) per-sample values.
        statistic: a key of `STATISTICS` (`mean`; `psnr` for per-sample MSEs).

    Returns:
        (low, high); (v, v) when every value is the same.
    """
    x = np.asarray(values, dtype=np.float64)
    fn = STATISTICS[statistic]
    if len(x) < 2 or np.all(x == x[0]):
        v = float(fn(x)) if len(x) else float("nan")
        return v, v
    res = stats.bootstrap((x,), fn, n_resamples=resamples, confidence_level=level, method="percentile",
                          vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired(a, b, statistic: str = "mean", resamples: int = RESAMPLES, seed: int = SEED,
           level: float = LEVEL) -> dict:
    """Paired bootstrap of stat(a) - stat(b), where a[i] and b[i] come from the same seed.

    Returns:
        {"difference", "interval": [low, high], "p" (two-sided bootstrap p-value), "distinguishable" (the
        interval excludes 0)}.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison of {a.shape} and {b.shape} values: rows must share their samples "
                         "(same benchmark, seeds and sample count).")
    fn = STATISTICS[statistic]
    diff = float(fn(a) - fn(b))
    if np.array_equal(a, b, equal_nan=True):
        return {"difference": 0.0, "interval": [0.0, 0.0], "p": 1.0, "distinguishable": False}
    res = stats.bootstrap((a, b), lambda x, y, axis=-1: fn(x, axis=axis) - fn(y, axis=axis), paired=True,
                          n_resamples=resamples, confidence_level=level, method="percentile", vectorized=True,
                          rng=np.random.default_rng(seed))
    return _verdict(diff, res.bootstrap_distribution, res.confidence_interval.low, res.confidence_interval.high)


def _verdict(diff: float, draws: np.ndarray, low: float, high: float) -> dict:
    p = min(1.0, 2.0 * min(np.mean(draws <= 0.0), np.mean(draws >= 0.0)))
    return {"difference": diff, "interval": [float(low), float(high)], "p": float(p),
            "distinguishable": bool(low > 0.0 or high < 0.0)}


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _centred(v: float, draws: np.ndarray) -> np.ndarray:
    """Resampled values moved so that their mean is the estimate (the centred percentile bootstrap)."""
    return draws - draws.mean() + v


def set_interval(features: np.ndarray, fn: Callable[[np.ndarray], float], resamples: int = SET_RESAMPLES,
                 seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Centred percentile interval of a set metric `fn(features)`, resampling the rows of `features` (n, d)."""
    v = fn(features)
    draws = _centred(v, np.array([fn(features[idx]) for idx in _indices(len(features), resamples, seed)]))
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def set_paired(a: np.ndarray, b: np.ndarray, fn: Callable[[np.ndarray], float], resamples: int = SET_RESAMPLES,
               seed: int = SEED, level: float = LEVEL) -> dict:
    """Paired bootstrap of fn(a) - fn(b) for a set metric, the same sample indices drawn for both rows (a[i], b[i]
    from the same seed); centred percentile interval as `set_interval`."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison of {len(a)} and {len(b)} samples: rows must share their samples.")
    diff = float(fn(a) - fn(b))
    draws = _centred(diff, np.array([fn(a[idx]) - fn(b[idx]) for idx in _indices(len(a), resamples, seed)]))
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return _verdict(diff, draws, lo, hi)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), as torchmetrics' and ADM's FID."""
    with warnings.catch_warnings():  # a resample with duplicates has a singular covariance: the real part is kept
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_against(mu: np.ndarray, sigma: np.ndarray) -> Callable[[np.ndarray], float]:
    """FID of a generated feature set (n, d) against the fixed real set's feature mean (d,) and covariance (d, d)."""
    return lambda fake: frechet_distance(np.mean(fake, 0), np.cov(np.asarray(fake, np.float64), rowvar=False),
                                         mu, sigma)


def set_statistic(statistic: str, arrays: dict) -> tuple[Callable[[np.ndarray], float], np.ndarray]:
    """A stored set metric's function and the per-sample rows it resamples, from its `statistic` (`fid`,
    `is/<splits>`, a VBench score of `vbench_score.GROUPS`) and `arrays` (`features`, `real_mu`, `real_sigma`;
    `logits`; `values`: per-video values, one column per dimension)."""
    if statistic in GROUPS:
        return group_score(statistic), arrays["values"]
    if statistic == "fid":
        return fid_against(arrays["real_mu"], arrays["real_sigma"]), arrays["features"]
    if statistic.startswith("is/"):
        splits = int(statistic.split("/")[1])
        return (lambda x: inception_score(x, splits)), arrays["logits"]
    raise ValueError(f"unknown set statistic {statistic!r}: expected `fid`, `is/<splits>` or one of {list(GROUPS)}.")


def inception_score(logits: np.ndarray, splits: int = 1) -> float:
    """Mean over `splits` chunks of exp(E_x KL(p(y|x) || p(y))), from class logits (n, classes); the rows are
    shuffled (a fixed permutation) first, as torchmetrics does, so class-ordered samples do not make one-class
    chunks."""
    x = np.asarray(logits, dtype=np.float64)
    x = x[np.random.default_rng(SEED).permutation(len(x))] if splits > 1 else x
    logp = x - np.logaddexp.reduce(x, axis=1, keepdims=True)
    scores = []
    for chunk in np.array_split(logp, splits):
        p = np.exp(chunk)
        marginal = np.log(p.mean(0, keepdims=True))
        scores.append(np.exp(np.mean(np.sum(p * (chunk - marginal), axis=1))))
    return float(np.mean(scores))


def summary(values, statistic: str = "mean", interval_: Optional[tuple[float, float]] = None) -> dict:
    """What a record keeps of a per-sample metric: the interval and what recomputes it (a NaN value, which
    `nanmean` skips, as null)."""
    lo, hi = interval(values, statistic) if interval_ is None else interval_
    per_sample = [None if np.isnan(v) else float(v) for v in np.asarray(values, dtype=np.float64)]
    return {"interval": [lo, hi], "statistic": statistic, "per_sample": per_sample,
            "bootstrap": {"resamples": RESAMPLES, "seed": SEED, "level": LEVEL, "method": "percentile"}}
