"""FoCa, Forecast-then-Calibrate (arXiv:2508.16211): BDF2 predictor plus Heun corrector on cached features.

The paper's eqs. 6-8 are ambiguous; this is the reading foca-bench implements (docs/methods.md discusses it).
Per site we keep the last two trajectory points F_{i-1}, F_i (computed or forecast, with their times) and the
last full step b with D_full = (F_b - F_a) / (t_b - t_a) over the two most recent full steps a < b (zero while
only one full step exists).

At a skipped step i+1, with h = t_{i+1} - t_i and w = h / (t_i - t_{i-1}):
1. slope s = (F_i - F_{i-1}) / (t_i - t_{i-1})        (`slope=local`, default: "the two most recent timesteps")
         or s = D_full                                (`slope=full`);
2. BDF2 predictor F^ = (1+w)^2/(1+2w) F_i - w^2/(1+2w) F_{i-1} + h (1+w)/(1+2w) s   (w = 1: eq. 7);
   (with the local slope this is exactly linear extrapolation F_i + w (F_i - F_{i-1}));
3. Heun corrector F_{i+1} = F_i + h/2 (D_full + (F^ - F_i)/h)   (`corrector=heun`, eq. 8, with D_full as the
   slope at "the latest fully computed step" and (F^ - F_i)/h as the slope at the predicted end);
   `corrector=none` keeps F^ (the paper's BDF2-only ablation, Figure 7);
4. F_{i+1} becomes the newest trajectory point.
While fewer than two trajectory points exist a skipped step reuses F_i (and that value becomes a point too).

Steps 2-3 are F_i + k1 (F_i - F_{i-1}) + k2 D_full (`_numerics.foca_weights`), linear in the points, so every
point since the last full step b lies in the span of three anchors: F_b, P (the point before b) and D_full. A
point is kept as its three weights, a forecast is those weights applied (`forecast_terms`: the engine can fuse
it into a compiled skipped step), and a skipped step writes no tensor; the next full step materializes the last
point as its P. Memory: three tensors per site (F_b, P, D_full).
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from methods import register
from methods._numerics import combine, divided_difference, foca_weights
from methods.base import CacheConfig, CacheMethod, SiteKey, Step, Terms

Weights = tuple[float, float, float]  # a trajectory point over the anchors (F_b, P, D_full)
AT_FULL, AT_P, D_ONLY = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)


@dataclass
class FoCaConfig(CacheConfig):
    """Attributes:
    slope: `local` (two most recent trajectory points) or `full` (two most recent full steps).
    corrector: `heun` (FoCa) or `none` (BDF2-only ablation).
    """

    name: str = "foca"
    N: int = 5
    slope: str = "local"
    corrector: str = "heun"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.slope not in ("local", "full"):
            raise ValueError(f"cache.slope={self.slope!r}: choose `local` (two most recent trajectory points) "
                             "or `full` (two most recent full steps).")
        if self.corrector not in ("heun", "none"):
            raise ValueError(f"cache.corrector={self.corrector!r}: choose `heun` (FoCa) or `none` (BDF2 only).")


@dataclass
class _SiteState:
    full: Tensor  # F_b, the last fully computed value
    t_full: float
    before: Optional[Tensor] = None  # P, the trajectory point before b (None after the first full step)
    d_full: Optional[Tensor] = None  # D_full; None (zero) while only one full step exists
    current: Weights = AT_FULL  # F_i over the anchors
    t_current: float = 0.0
    previous: Optional[Weights] = None  # F_{i-1} over the anchors; None while F_i is the only point
    t_previous: float = 0.0
    zeros: tuple[Tensor, ...] = ()  # stand-ins for missing anchors, until the next full step

    def anchors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(F_b, P, D_full), a missing anchor standing in as zeros (its weight is 0): distinct tensors, since
        aliased inputs would make the engine compile a second graph."""
        if (self.before is None or self.d_full is None) and not self.zeros:
            self.zeros = (torch.zeros_like(self.full), torch.zeros_like(self.full))
        before = self.zeros[0] if self.before is None else self.before
        return self.full, before, self.zeros[1] if self.d_full is None else self.d_full

    def push(self, point: Weights, t: float) -> None:
        self.previous, self.t_previous = self.current, self.t_current
        self.current, self.t_current = point, t


@register("foca")
class FoCa(CacheMethod):
    config_class = FoCaConfig
    fusable = True

    def reset(self) -> None:
        self.state: dict[SiteKey, _SiteState] = {}

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        t = self.time(step)
        s = self.state.get(key)
        if s is None:
            self.state[key] = _SiteState(full=features, t_full=t, t_current=t)
            return
        d_full = divided_difference(features, s.full, t - s.t_full)
        before = s.full if s.current == AT_FULL else combine(s.anchors(), s.current)  # F_i becomes F_{i-1}
        self.state[key] = _SiteState(full=features, t_full=t, before=before, d_full=d_full, t_current=t,
                                     previous=AT_P, t_previous=s.t_current)

    def forecast_terms(self, key: SiteKey, step: Step) -> Terms:
        s = self.state[key]
        t = self.time(step)
        if s.previous is None:
            point = s.current
        else:
            k1, k2 = foca_weights(t - s.t_current, s.t_current - s.t_previous, self.cfg.slope, self.cfg.corrector)
            # F_i + k1 (F_i - F_{i-1}) + k2 D_full, on the anchors' weights (D_full is zero while it is missing)
            k2 = 0.0 if s.d_full is None else k2
            point = tuple(c + k1 * (c - p) + k2 * d for c, p, d in zip(s.current, s.previous, D_ONLY))
        s.push(point, t)
        return Terms(s.anchors(), point)
