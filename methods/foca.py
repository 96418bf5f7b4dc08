"""FoCa, Forecast-then-Calibrate (arXiv:2508.16211): BDF2 predictor plus Heun corrector on cached features.

FoCa has no official code and the paper's eqs. 6-8 are ambiguous; `cache.reading` picks one of three readings
(docs/methods.md compares them: `make readings`). Per site we keep the last two trajectory points F_{i-1}, F_i
(computed or forecast, with their times), the last full step b (value F_b, index, time) and D, the difference of
F_b and the full step before it, a. While only one full step exists, every reading reuses F_b.

`reading=ours` (foca-bench's): D_full = (F_b - F_a) / (t_b - t_a). At a skipped step i+1, with
h = t_{i+1} - t_i and w = h / (t_i - t_{i-1}):
1. slope s = D_full                                   (`slope=full`, the default)
         or s = (F_i - F_{i-1}) / (t_i - t_{i-1})     (`slope=local`: "the two most recent timesteps");
2. BDF2 predictor F^ = (1+w)^2/(1+2w) F_i - w^2/(1+2w) F_{i-1} + h (1+w)/(1+2w) s   (w = 1: eq. 7);
   (with the local slope this is exactly linear extrapolation F_i + w (F_i - F_{i-1}));
3. Heun corrector F_{i+1} = F_i + h/2 (D_full + (F^ - F_i)/h)   (`corrector=heun`, eq. 8, with D_full as the
   slope at "the latest fully computed step" and (F^ - F_i)/h as the slope at the predicted end);
   `corrector=none` keeps F^ (the paper's BDF2-only ablation, Figure 7);
4. F_{i+1} becomes the newest trajectory point.

`reading=cachedit` (cache-dit's `FoCaCalibrator`; vipshop/cache-dit@f86744a,
src/cache_dit/caching/cache_contexts/calibrators/foca.py:170-205): anchored at F_b, with e = i+1 - b steps since
it, D = F_b - F_a NOT divided by the spacing, and d = F_i - F_{i-1} (trajectory points, forecasts included):
    F_{i+1} = F_b + g(e) (D + d),   g(e) = e/2 for e <= 3, else 9/(2e)
(beyond 3 steps cache-dit blends 3/e of the value at e = 3 with 1 - 3/e of F_b). It counts steps: `time=step`.

`reading=lab` (the FoCa authors' lab's code; yiming-l21/CFGCache@bf339cb,
models/qwen_image/taylor_utils/__init__.py:97-136): from the last two full steps only, whatever the distance,
    F^ = (4 F_b - F_a) / 3,   F_{i+1} = (F_b + F^) / 2 = F_b + (F_b - F_a) / 6   (`corrector=none`: F^).

Every reading's forecast is linear in the trajectory points and D (`ours`: F_i + k1 (F_i - F_{i-1}) + k2 D_full,
`_numerics.foca_weights`), so every point since the last full step b lies in the span of three anchors: F_b, P (the
point before b) and D. A point is kept as its three weights, a forecast is those weights applied (`forecast_terms`:
the engine can fuse it into a compiled skipped step), and a skipped step writes no tensor; the next full step
materializes the last point as its P. Memory: three tensors per site (F_b, P, D). Tests check `ours` against
`bdf2_predict`/`heun_correct` and the other readings against their sources' formulas (tests/test_foca_readings.py).
"""

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from methods import register
from methods._numerics import cachedit_gain, combine, divided_difference, foca_weights
from methods.base import CacheConfig, CacheMethod, SiteKey, Step, Terms

READINGS = ("ours", "cachedit", "lab")
LAB_WEIGHT = {"heun": 1.0 / 6.0, "none": 1.0 / 3.0}  # F_b + k (F_b - F_a): (7 F_b - F_a)/6, (4 F_b - F_a)/3
Weights = tuple[float, float, float]  # a trajectory point over the anchors (F_b, P, D)
AT_FULL, AT_P, D_ONLY = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)


@dataclass
class FoCaConfig(CacheConfig):
    """Attributes:
    reading: which reading of eqs. 6-8: `ours`, `cachedit` (cache-dit's FoCaCalibrator) or `lab` (the grouped
        solver of the FoCa authors' lab's code); docs/methods.md.
    slope: `reading=ours` only: `full` (two most recent full steps) or `local` (two most recent trajectory points).
    corrector: `heun` (FoCa) or `none` (BDF2-only ablation); `reading=ours` and `lab`.
    """

    name: str = "foca"
    N: int = 5
    reading: str = "ours"
    slope: str = "full"
    corrector: str = "heun"

    # runs from before `cache.reading` existed computed `ours`: its records keep their ids (foca_bench.identity)
    omit_from_identity: ClassVar[dict[str, Any]] = {"reading": "ours"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reading not in READINGS:
            raise ValueError(f"cache.reading={self.reading!r}: choose `ours`, `cachedit` (cache-dit's calibrator) "
                             "or `lab` (the FoCa authors' lab's grouped solver); docs/methods.md compares them.")
        if self.slope not in ("local", "full"):
            raise ValueError(f"cache.slope={self.slope!r}: choose `local` (two most recent trajectory points) "
                             "or `full` (two most recent full steps).")
        if self.corrector not in ("heun", "none"):
            raise ValueError(f"cache.corrector={self.corrector!r}: choose `heun` (FoCa) or `none` (BDF2 only).")
        if self.reading != "ours" and self.slope != "full":
            raise ValueError(f"cache.slope={self.slope} is a knob of cache.reading=ours; reading={self.reading} "
                             "takes no slope choice: drop cache.slope.")
        if self.reading == "cachedit" and self.corrector != "heun":
            raise ValueError("cache.corrector=none: cache-dit's calibrator has no BDF2-only mode; use "
                             "cache.reading=ours or lab for the ablation.")
        if self.reading == "cachedit" and self.time != "step":
            raise ValueError(f"cache.time={self.time}: cache-dit's calibrator counts steps since the last full "
                             "step; use cache.time=step with cache.reading=cachedit.")


@dataclass
class _SiteState:
    full: Tensor  # F_b, the last fully computed value
    t_full: float
    i_full: int  # b, the step index of F_b
    before: Optional[Tensor] = None  # P, the trajectory point before b (None after the first full step)
    d_full: Optional[Tensor] = None  # D (divided by t_b - t_a for `ours`); None while only one full step exists
    current: Weights = AT_FULL  # F_i over the anchors
    t_current: float = 0.0
    previous: Optional[Weights] = None  # F_{i-1} over the anchors; None while F_i is the only point
    t_previous: float = 0.0
    zeros: tuple[Tensor, ...] = ()  # stand-ins for missing anchors, until the next full step

    def anchors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(F_b, P, D), a missing anchor standing in as zeros (its weight is 0): distinct tensors, since aliased
        inputs would make the engine compile a second graph."""
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
            self.state[key] = _SiteState(full=features, t_full=t, i_full=step.index, t_current=t)
            return
        # `ours` divides by the spacing of the two full steps; cache-dit and the lab's code do not
        ours = self.cfg.reading == "ours"
        d_full = divided_difference(features, s.full, t - s.t_full) if ours else features - s.full
        before = s.full if s.current == AT_FULL else combine(s.anchors(), s.current)  # F_i becomes F_{i-1}
        self.state[key] = _SiteState(full=features, t_full=t, i_full=step.index, before=before, d_full=d_full,
                                     t_current=t, previous=AT_P, t_previous=s.t_current)

    def forecast_terms(self, key: SiteKey, step: Step) -> Terms:
        s = self.state[key]
        point = self.point(s, step, self.cfg.corrector)
        s.push(point, self.time(step))
        return Terms(s.anchors(), point)

    def point(self, s: _SiteState, step: Step, corrector: str) -> Weights:
        """The forecast at `step` over the anchors (F_b, P, D), with `corrector` (`heun` or `none`); reads `s`
        without advancing it."""
        t = self.time(step)
        if s.d_full is None:
            # one full step so far: reuse F_b. (For `ours` this equals its BDF2-Heun step, whose every point is
            # then F_b; cache-dit does not advance its window here, which gives the same window at the next full
            # step, since every point pushed is F_b.)
            point = AT_FULL
        elif self.cfg.reading == "ours":
            # bdf2_predict + heun_correct, fused: F_i + k1 (F_i - F_{i-1}) + k2 D_full, on the anchors' weights
            k1, k2 = foca_weights(t - s.t_current, s.t_current - s.t_previous, self.cfg.slope, corrector)
            point = tuple(c + k1 * (c - p) + k2 * d for c, p, d in zip(s.current, s.previous, D_ONLY))
        elif self.cfg.reading == "cachedit":
            # F_b + g(e) (D + F_i - F_{i-1})
            gain = cachedit_gain(step.index - s.i_full)
            point = tuple(b + gain * (d + c - p) for b, d, c, p in zip(AT_FULL, D_ONLY, s.current, s.previous))
        else:  # lab: F_b + k D
            point = tuple(b + LAB_WEIGHT[corrector] * d for b, d in zip(AT_FULL, D_ONLY))
        return point
