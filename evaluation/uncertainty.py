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
  as well. Cost: one FID per resample, a Gram of the n resampled rows and a symmetric eigensolve
  (`FrechetToReference`): about 0.4 ms at d = 64 (the toy classifier); at d = 2048 (Inception) 0.84 s + 78 us per
  sample on one core, so FID-50k's `SET_RESAMPLES` = 500 resamples take about 40 core-minutes (IS: about 2;
  docs/statistics.md).

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

from typing import Callable, Iterable, Optional

import numpy as np
from scipy import linalg, special, stats
from tqdm import tqdm

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


def _resamples(n: int, resamples: int, seed: int, progress: Optional[str] = None) -> Iterable[np.ndarray]:
    """The resamples' index rows (resamples, n), behind a progress bar labelled `progress` that shows once a loop runs
    past 2 s (an FID-50k resample takes seconds; the toy's, milliseconds)."""
    indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    return tqdm(indices, desc=progress, unit="resample", delay=2.0, disable=progress is None)


def _centred(v: float, draws: np.ndarray) -> np.ndarray:
    """Resampled values moved so that their mean is the estimate (the centred percentile bootstrap)."""
    return draws - draws.mean() + v


def set_interval(features: np.ndarray, fn: Callable[[np.ndarray], float], resamples: int = SET_RESAMPLES,
                 seed: int = SEED, level: float = LEVEL, progress: Optional[str] = None) -> tuple[float, float]:
    """Centred percentile interval of a set metric `fn(features)`, resampling the rows of `features` (n, d).

    Args:
        progress: a progress bar's label; None: no bar.
    """
    v = fn(features)
    draws = _centred(v, np.array([fn(features[idx]) for idx in _resamples(len(features), resamples, seed, progress)]))
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def set_paired(a: np.ndarray, b: np.ndarray, fn: Callable[[np.ndarray], float], resamples: int = SET_RESAMPLES,
               seed: int = SEED, level: float = LEVEL, progress: Optional[str] = None) -> dict:
    """Paired bootstrap of fn(a) - fn(b) for a set metric, the same sample indices drawn for both rows (a[i], b[i]
    from the same seed); centred percentile interval as `set_interval` (`progress`: its progress bar's label)."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison of {len(a)} and {len(b)} samples: rows must share their samples.")
    diff = float(fn(a) - fn(b))
    draws = _centred(diff, np.array([fn(a[idx]) - fn(b[idx]) for idx in _resamples(len(a), resamples, seed, progress)]))
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return _verdict(diff, draws, lo, hi)


def _psd_root(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (d, d) (eigenvalues clipped at 0: a rank-deficient one stays real)."""
    w, v = linalg.eigh(np.asarray(sigma, np.float64))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _fid(mu1: np.ndarray, trace1: float, eigenvalues: np.ndarray, mu2: np.ndarray, trace2: float) -> float:
    """||mu1 - mu2||^2 + Tr S1 + Tr S2 - 2 Tr (S1 S2)^(1/2), given the eigenvalues of S2^(1/2) S1 S2^(1/2): those of
    S1 S2 (torch-fidelity takes np.linalg.eigvals of S1 S2, torchmetrics and ADM sqrtm), from a symmetric solver, so
    they are real even for the rank-deficient covariance of a resample with duplicates."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + trace1 + trace2 - 2.0 * np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), as torchmetrics', ADM's and torch-fidelity's FID."""
    root = _psd_root(sigma2)
    return _fid(mu1, np.trace(sigma1), linalg.eigvalsh(root @ sigma1 @ root), mu2, np.trace(sigma2))


class FrechetToReference:
    """FID of generated feature sets against a fixed reference's feature mean (d,) and covariance (d, d), for
    resampling. `rows(features)` puts each sample's features x beside x R (R: the reference covariance's symmetric
    square root), so the product by R is paid once, not per resample; a resample's Tr (S R^2)^(1/2) then comes from
    the Gram of its centred x R rows: n x n when n < d (a test's few images), d x d otherwise (FID-50k)."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray) -> None:
        self.mu, self.root, self.trace = np.asarray(mu, np.float64), _psd_root(sigma), float(np.trace(sigma))

    def rows(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, np.float64)
        return np.hstack([x, x @ self.root])  # (n, 2d)

    def __call__(self, rows: np.ndarray) -> float:
        d = len(self.mu)
        mean = rows.mean(0)
        c = (rows - mean) / np.sqrt(len(rows) - 1)  # (n, 2d): [xc | xc R], the sample covariance S = xc^T xc
        xc, zc = c[:, :d], c[:, d:]
        gram = zc @ zc.T if len(rows) < d else zc.T @ zc  # the same nonzero eigenvalues as R S R
        return _fid(mean[:d], float(np.einsum("ij,ij->", xc, xc)), linalg.eigvalsh(gram), self.mu, self.trace)


class TorchFidelityIS:
    """torch-fidelity's Inception Score (`torch_fidelity.metric_isc.isc_features_to_metric`: the rows in its fixed
    order, `np.random.RandomState(2020)`; chunk i = rows [i n // splits, (i + 1) n // splits)), for resampling.
    `rows(logits)` keeps each sample's class probabilities p and its sum p log p, so a resample needs no logarithm
    per sample and class: a chunk's mean KL(p_i || q) is mean_i sum p_i log p_i - sum q log q, q the chunk's mean p
    (50k x 1008 logits: 0.24 s a resample, against 1.35 s for torch-fidelity's own function on one core)."""

    def __init__(self, splits: int) -> None:
        self.splits = splits

    def rows(self, logits: np.ndarray) -> np.ndarray:
        logp = special.log_softmax(np.asarray(logits, np.float64), axis=1)
        p = np.exp(logp)
        return np.hstack([p, np.sum(p * logp, axis=1, keepdims=True)])  # (n, classes + 1)

    def __call__(self, rows: np.ndarray) -> float:
        n, k = len(rows), self.splits
        order = np.random.RandomState(2020).permutation(n)
        scores = []
        for chunk in (rows[order[i * n // k:(i + 1) * n // k]] for i in range(k)):
            q = chunk[:, :-1].mean(0)
            scores.append(np.exp(chunk[:, -1].mean() - special.xlogy(q, q).sum()))
        return float(np.mean(scores))


def set_statistic(statistic: str, arrays: dict) -> tuple[Callable[[np.ndarray], float], np.ndarray]:
    """A stored set metric's function and the per-sample rows it resamples (`FrechetToReference.rows`,
    `TorchFidelityIS.rows`, or the stored rows), from its `statistic` (`fid`, `is/<splits>`,
    `torch_fidelity_is/<splits>`, a VBench score of `vbench_score.GROUPS`) and `arrays` (`features`, `real_mu`,
    `real_sigma`; `logits`; `values`: per-video values, one column per dimension)."""
    if statistic in GROUPS:
        return group_score(statistic), arrays["values"]
    if statistic == "fid":
        fid = FrechetToReference(arrays["real_mu"], arrays["real_sigma"])
        return fid, fid.rows(arrays["features"])
    kind, _, splits = statistic.partition("/")
    if kind == "is" and splits.isdigit():
        return (lambda x: inception_score(x, int(splits))), arrays["logits"]
    if kind == "torch_fidelity_is" and splits.isdigit():
        score = TorchFidelityIS(int(splits))
        return score, score.rows(arrays["logits"])
    raise ValueError(f"unknown set statistic {statistic!r}: expected `fid`, `is/<splits>`, "
                     f"`torch_fidelity_is/<splits>` or one of {list(GROUPS)}.")


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


def set_summary(statistic: str, arrays: dict, progress: bool = False) -> dict:
    """What a record keeps of a set metric (`set_statistic`'s `statistic` over `arrays`): its interval and the arrays
    that recompute it, which `foca_bench.significance.externalize` moves beside the record."""
    fn, rows = set_statistic(statistic, arrays)
    bounds = set_interval(rows, fn, progress=f"<{statistic}> bootstrap interval" if progress else None)
    return {"interval": list(bounds), "statistic": statistic, "arrays": arrays,
            "bootstrap": {"resamples": SET_RESAMPLES, "seed": SEED, "level": LEVEL, "method": "centred percentile"}}


def summary(values, statistic: str = "mean", interval_: Optional[tuple[float, float]] = None) -> dict:
    """What a record keeps of a per-sample metric: the interval and what recomputes it (a NaN value, which
    `nanmean` skips, as null)."""
    lo, hi = interval(values, statistic) if interval_ is None else interval_
    per_sample = [None if np.isnan(v) else float(v) for v in np.asarray(values, dtype=np.float64)]
    return {"interval": [lo, hi], "statistic": statistic, "per_sample": per_sample,
            "bootstrap": {"resamples": RESAMPLES, "seed": SEED, "level": LEVEL, "method": "percentile"}}
