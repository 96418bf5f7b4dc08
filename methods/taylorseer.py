"""TaylorSeer (arXiv:2503.06923): Taylor-series forecasting of cached features (eq. 4 of the FoCa paper).

Computed as the official TaylorSeer code does: at each full step the (k+1)-th factor is
(new k-th factor - previous k-th factor) / (time between the last two full steps), so order k becomes
available at the (k+1)-th full step; a skipped step evaluates the truncated Taylor sum
sum_k factor_k / k! * d^k at its distance d from the last full step.

Deviation from the official code: it forms difference factors only after `first_enhance - 2` steps; here
they are formed from the second full step on, whatever `cache.warmup` is.
"""

from dataclasses import dataclass

from torch import Tensor

from methods import register
from methods._numerics import taylor_eval, taylor_factors
from methods.base import CacheConfig, CacheMethod, SiteKey, Step


@dataclass
class TaylorSeerConfig(CacheConfig):
    """Attributes:
    O: Taylor order (number of difference factors); needs O+1 full steps before it is used in full.
    """

    name: str = "taylorseer"
    N: int = 3
    O: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.O <= 4:
            raise ValueError(f"cache.O={self.O}: the Taylor order must be in 0..4 (the official code uses <= 4; "
                             "higher orders amplify finite-difference noise).")


@register("taylorseer")
class TaylorSeer(CacheMethod):
    config_class = TaylorSeerConfig

    def reset(self) -> None:
        self.factors: dict[SiteKey, list[Tensor]] = {}
        self.last_time: dict[SiteKey, float] = {}

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        t = self.time(step)
        previous = self.factors.get(key, [])
        dt = t - self.last_time[key] if key in self.last_time else 1.0  # unused while `previous` is empty
        self.factors[key] = taylor_factors(features, previous, dt, self.cfg.O)
        self.last_time[key] = t

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        return taylor_eval(self.factors[key], self.time(step) - self.last_time[key])
