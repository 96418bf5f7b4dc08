"""TaylorSeer (arXiv:2503.06923): Taylor-series forecasting of cached features (eq. 4 of the FoCa paper).

Computed as the official TaylorSeer code does (`taylor_utils/__init__.py` of TaylorSeer-DiT, -FLUX and
-HunyuanVideo): at each full step the (k+1)-th factor is (new k-th factor - previous k-th factor) / (time between
the last two full steps); a skipped step evaluates the truncated Taylor sum sum_k factor_k / k! * d^k at its
distance d from the last full step. Difference factors are formed only at full steps i > first_enhance - 2
(`cache.first_enhance`, per model: 2 on DiT, 3 on FLUX, 1 on HunyuanVideo), so on FLUX the factors start at the
third full step and the first cache window is order 1; order k is available from the (k+1)-th full step that
forms factors. The official code's `first_enhance` also sets its leading full steps (i < first_enhance), which
is `cache.warmup` = first_enhance - 1 here. The sum is a linear combination of the factors (`forecast_terms`),
which the engine can fuse into a compiled skipped step.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from methods import register
from methods._numerics import taylor_factors, taylor_weights
from methods.base import CacheConfig, CacheMethod, SiteKey, Step, Terms


@dataclass
class TaylorSeerConfig(CacheConfig):
    """Attributes:
    O: Taylor order (number of difference factors); needs O+1 factor-forming full steps before it is used in full.
    first_enhance: the official code's `first_enhance`: difference factors are formed only at full steps
        i > first_enhance - 2. Null takes the model's official value (`conf/model_method/<model>_taylorseer.yaml`), else
        `warmup + 1` (every official configuration has warmup = first_enhance - 1). 1 (or 0) forms them from
        the second full step whatever the warm-up: a deviation from the official code on FLUX (first_enhance=3).
    """

    name: str = "taylorseer"
    N: int = 3
    O: int = 2
    first_enhance: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.O <= 4:
            raise ValueError(f"cache.O={self.O}: the Taylor order must be in 0..4 (the official code uses <= 4; "
                             "higher orders amplify finite-difference noise).")
        if self.first_enhance is not None and self.first_enhance < 0:
            raise ValueError(f"cache.first_enhance={self.first_enhance} must be >= 0 (or null for the model's "
                             "official value).")


@register("taylorseer")
class TaylorSeer(CacheMethod):
    config_class = TaylorSeerConfig
    fusable = True

    def reset(self) -> None:
        self.factors: dict[SiteKey, list[Tensor]] = {}
        self.last_time: dict[SiteKey, float] = {}
        first_enhance = self.cfg.first_enhance
        self.factors_from = ((self.cfg.warmup or 0) + 1 if first_enhance is None else first_enhance) - 1
        self.zeros: dict[SiteKey, list[Tensor]] = {}  # stand-ins for orders not formed yet

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        t = self.time(step)
        # the official `step > first_enhance - 2`: before it, a full step keeps only factor 0
        previous = self.factors.get(key, []) if step.index >= self.factors_from else []
        dt = t - self.last_time[key] if key in self.last_time else 1.0  # unused while `previous` is empty
        self.factors[key] = taylor_factors(features, previous, dt, self.cfg.O)
        self.last_time[key] = t
        if len(self.factors[key]) == self.cfg.O + 1:
            self.zeros.pop(key, None)

    def forecast_terms(self, key: SiteKey, step: Step) -> Terms:
        factors = self.factors[key]
        weights = taylor_weights(len(factors), self.time(step) - self.last_time[key])
        missing = self.cfg.O + 1 - len(factors)  # orders not formed yet: zeros at weight 0, so the arity is fixed
        if missing and len(self.zeros.get(key, ())) != missing:  # (distinct tensors: aliased ones recompile)
            self.zeros[key] = [torch.zeros_like(factors[0]) for _ in range(missing)]
        return Terms((*factors, *self.zeros.get(key, ())), (*weights, *[0.0] * missing))
