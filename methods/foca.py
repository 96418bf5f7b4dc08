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

`ours` is evaluated in the fused form `_numerics.foca_weights` derives (two kernels per site); tests check it
against `bdf2_predict`/`heun_correct`. Memory: at most four tensors per site (F_{i-1}, F_i, F_b, D); right after
a full step F_b is F_i. A forecast is written into the buffer of the forecast two steps back once nothing else
references it, so a run of skipped steps allocates nothing: a returned forecast is valid until the site's next
step (the `CacheMethod.forecast` contract; the engine's trace and `replay` copy what they keep).
"""

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from methods import register
from methods._numerics import anchored_extrapolate, cachedit_gain, divided_difference, extrapolate, foca_weights
from methods.base import CacheConfig, CacheMethod, SiteKey, Step

READINGS = ("ours", "cachedit", "lab")
LAB_WEIGHT = {"heun": 1.0 / 6.0, "none": 1.0 / 3.0}  # F_b + k (F_b - F_a): (7 F_b - F_a)/6, (4 F_b - F_a)/3


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

    # runs from before `cache.reading` existed computed `ours`: its records keep their ids (runner.identity)
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
    current: Tensor  # F_i
    t_current: float
    full: Tensor  # F_b, the last fully computed value
    t_full: float
    i_full: int  # b, the step index of F_b
    previous: Optional[Tensor] = None  # F_{i-1}
    t_previous: float = 0.0
    d_full: Optional[Tensor] = None  # D (divided by t_b - t_a for `ours`); None while only one full step exists
    current_is_ours: bool = False  # F_i is a forecast buffer only this state references
    spare: Optional[Tensor] = None  # F_{i-1} when it is ours: overwritten by the next forecast

    def push(self, value: Tensor, t: float, ours: bool = False) -> None:
        self.spare = self.current if self.current_is_ours else None
        self.previous, self.t_previous = self.current, self.t_current
        self.current, self.t_current, self.current_is_ours = value, t, ours


@register("foca")
class FoCa(CacheMethod):
    config_class = FoCaConfig

    def reset(self) -> None:
        self.state: dict[SiteKey, _SiteState] = {}

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        t = self.time(step)
        s = self.state.get(key)
        if s is None:
            self.state[key] = _SiteState(current=features, t_current=t, full=features, t_full=t, i_full=step.index)
            return
        # `ours` divides by the spacing of the two full steps; cache-dit and the lab's code do not
        ours = self.cfg.reading == "ours"
        s.d_full = divided_difference(features, s.full, t - s.t_full) if ours else features - s.full
        s.full, s.t_full, s.i_full = features, t, step.index
        s.push(features, t)

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        s = self.state[key]
        t = self.time(step)
        if s.d_full is None:
            # one full step so far: reuse F_b. (For `ours` this equals its BDF2-Heun step, whose every point is
            # then F_b; cache-dit does not advance its window here, which gives the same window at the next full
            # step, since every point pushed is F_b.)
            value = s.full
        elif self.cfg.reading == "ours":
            # bdf2_predict + heun_correct, fused into F_i + k1 (F_i - F_{i-1}) + k2 D_full (2 kernels)
            k1, k2 = foca_weights(t - s.t_current, s.t_current - s.t_previous, self.cfg.slope, self.cfg.corrector)
            # written into F_{i-1}'s buffer when it is a forecast of ours (no allocation, no page faults)
            value = extrapolate(s.current, s.previous, k1, s.d_full, k2, out=s.spare)
        elif self.cfg.reading == "cachedit":
            gain = cachedit_gain(step.index - s.i_full)
            value = anchored_extrapolate(s.full, s.d_full, s.current, s.previous, gain, out=s.spare)
        else:  # lab
            value = torch.add(s.full, s.d_full, alpha=LAB_WEIGHT[self.cfg.corrector], out=s.spare)
        s.push(value, t, ours=value is not s.full)
        return value
