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

Steps 2-3 are evaluated in the fused form `_numerics.foca_weights` derives (two kernels per site);
tests check it against `bdf2_predict`/`heun_correct`. Memory: at most four tensors per site (F_{i-1}, F_i,
F_b, D_full); right after a full step F_b is F_i. A forecast is written into the buffer of the forecast two
steps back once nothing else references it, so a run of skipped steps allocates nothing: a returned forecast
is valid until the site's next step (the `CacheMethod.forecast` contract; the engine's trace and `replay`
copy what they keep).
"""

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from methods import register
from methods._numerics import divided_difference, extrapolate, foca_weights
from methods.base import CacheConfig, CacheMethod, SiteKey, Step


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
    current: Tensor  # F_i
    t_current: float
    full: Tensor  # F_b, the last fully computed value
    t_full: float
    previous: Optional[Tensor] = None  # F_{i-1}
    t_previous: float = 0.0
    d_full: Optional[Tensor] = None  # D_full; None (zero) while only one full step exists
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
            self.state[key] = _SiteState(current=features, t_current=t, full=features, t_full=t)
            return
        s.d_full = divided_difference(features, s.full, t - s.t_full)
        s.full, s.t_full = features, t
        s.push(features, t)

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        s = self.state[key]
        t = self.time(step)
        if s.previous is None:
            value = s.current
        else:
            # bdf2_predict + heun_correct, fused into F_i + k1 (F_i - F_{i-1}) + k2 D_full (2 kernels)
            k1, k2 = foca_weights(t - s.t_current, s.t_current - s.t_previous, self.cfg.slope, self.cfg.corrector)
            # written into F_{i-1}'s buffer when it is a forecast of ours (no allocation, no page faults)
            value = extrapolate(s.current, s.previous, k1, s.d_full, k2, out=s.spare)
        s.push(value, t, ours=value is not s.current)
        return value
