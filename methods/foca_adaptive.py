"""Adaptive FoCa (foca-bench's own; not in the FoCa paper, arXiv:2508.16211): FoCa's forecasts, with the full
steps chosen by FoCa's own local error estimate instead of a fixed interval.

FoCa is a predictor-corrector: at a skipped step it predicts F^ (BDF2) and corrects it (Heun). As in an ODE
solver's embedded pair, the gap between the two is a local error estimate that costs no model evaluation:

    e_i = ||F_{i+1} - F^_{i+1}|| / ||F_{i+1}||   (pooled over every site and CFG branch: the relative norm of the
                                                   concatenated features)

At each step after the warm-up the method accumulates A += e_i of the step it is about to skip, and computes the
step in full instead when A + e_i >= `cache.tol` (A then restarts at 0), so `tol=0` computes every step.
`cache.min_interval` steps at least, and `cache.N` steps at most, separate two full steps (N is the maximum
interval, as it is the interval of fixed-N FoCa). Until two full steps exist there is no estimate and every step
is computed. The forecast itself is `method=foca`'s, in every reading with a predictor to compare with: `ours`
(BDF2 vs BDF2+Heun) and `lab` ((4 F_b - F_a)/3 vs its Heun average); `cachedit` has no predictor-only form.

Cost. Every forecast is a combination of three anchors per site, (F_b, P, D) (`methods/foca.py`), which change
only at full steps, so ||sum_j w_j A_j||^2 = w^T G w with G the 3x3 Gram matrix of the anchors. G is computed
once per site at each full step (in the basis (F_b, F_b - P, D), where the forecasts' differences have no F_b
component, so float32 cancellation does not enter), and the estimate at a skipped step is float arithmetic on
3-vectors: no tensor is read, and the skipped step stays fusable (`forecast_terms`). Under `torch.distributed`
(ranks holding shards of the tokens) the Gram matrices are all-reduced, one call per full step for all sites, so
every rank holds the whole tensor's inner products and decides alike, as TeaCache's all-reduced change does.
Calibration, `tol` to full steps on a model: `python -m foca_bench.calibrate_foca_adaptive model=<model>`.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from methods import register
from methods.base import FORECAST, FULL, Plan, SiteKey, Step
from methods.foca import FoCa, FoCaConfig, Weights


@dataclass
class FoCaAdaptiveConfig(FoCaConfig):
    """Attributes (besides FoCa's reading, slope, corrector):
    tol: threshold on the accumulated relative predictor-corrector gap (0: every step computed).
    min_interval: fewest steps between two full steps (1: consecutive full steps allowed).
    N: most steps between two full steps.
    """

    name: str = "foca_adaptive"
    N: int = 5
    tol: float = 0.05
    min_interval: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tol < 0:
            raise ValueError(f"cache.tol={self.tol}: the error threshold must be >= 0 (0 computes every step).")
        if not 1 <= self.min_interval <= self.N:
            raise ValueError(f"cache.min_interval={self.min_interval}: choose 1 <= min_interval <= cache.N "
                             f"(={self.N}, the maximum interval).")
        if self.reading == "cachedit":
            raise ValueError("cache.reading=cachedit: cache-dit's calibrator has no predictor-only value to compare "
                             "its corrected one with; use cache.reading=ours or lab with method=foca_adaptive.")


def _basis(w: Weights) -> np.ndarray:
    """Weights over (F_b, P, D) as weights over the Gram basis (F_b, F_b - P, D)."""
    return np.array([w[0] + w[1], -w[1], w[2]])


@register("foca_adaptive")
class FoCaAdaptive(FoCa):
    config_class = FoCaAdaptiveConfig
    decides_from_features = True  # its schedule needs feature values: no FLOPs count on the meta device

    def reset(self) -> None:
        super().reset()
        self.grams: dict[SiteKey, np.ndarray] = {}  # (3, 3) per site, all-reduced, float64
        self.pending: dict[SiteKey, Tensor] = {}  # Gram matrices of this full step's anchors, not yet reduced
        self.accumulated = 0.0
        self.last_full: Optional[int] = None
        self.estimates: list[Optional[float]] = []  # e_i per planned step (None: no estimate), for calibration
        self.decisions: list[bool] = []

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        super().update(key, step, features)
        s = self.state[key]
        if s.d_full is not None:
            x = torch.stack([s.full, s.full - s.before, s.d_full]).flatten(1).float()  # (3, numel)
            self.pending[key] = x @ x.T  # (3, 3)

    def _reduce(self) -> None:
        """The Gram matrices of the last full step, summed over ranks: one all-reduce and one host sync."""
        if not self.pending:
            return
        keys = sorted(self.pending)  # the same order on every rank
        stacked = torch.stack([self.pending[k] for k in keys]).double()  # (K, 3, 3)
        if stacked.device.type == "meta":  # a memory plan's dry run: no values, so no estimate (every step full);
            self.pending.clear()            # runs on meta weights are refused at validation (`decides_from_features`)
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stacked)  # SUM over ranks: inner products of the whole tensors
        for k, g in zip(keys, stacked.cpu().numpy()):
            self.grams[k] = g
        self.pending.clear()

    def estimate(self, step: Step) -> Optional[float]:
        """e at `step`: the relative norm of (corrected - predicted), pooled over sites; None without an estimate."""
        self._reduce()
        if not self.state or any(s.d_full is None or key not in self.grams for key, s in self.state.items()):
            return None
        gap = norm = 0.0
        for key, s in self.state.items():
            g = self.grams[key]
            corrected = _basis(self.point(s, step, "heun"))
            delta = corrected - _basis(self.point(s, step, "none"))
            gap += float(delta @ g @ delta)
            norm += float(corrected @ g @ corrected)
        return float(np.sqrt(max(gap, 0.0) / max(norm, 1e-30)))

    def plan(self, step: Step) -> Plan:
        warmup = self.cfg.warmup or 0
        elapsed = None if self.last_full is None else step.index - self.last_full
        e = None if step.index < warmup else self.estimate(step)
        if e is None or elapsed >= self.cfg.N:
            full = True
        elif elapsed < self.cfg.min_interval:
            full = False
        else:
            full = self.accumulated + e >= self.cfg.tol
        if full:
            self.accumulated, self.last_full = 0.0, step.index
        else:
            self.accumulated += e
        self.estimates.append(e)
        self.decisions.append(full)
        return FULL if full else FORECAST
