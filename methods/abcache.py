"""AB-Cache (Yu et al., arXiv:2504.10540): an Adams-Bashforth-style forecast of cached features from the last k
steps.

The paper reads the denoising step through the second-order Adams-Bashforth method, which makes consecutive outputs
linearly related, F_{n+1} ~ 2 F_n - F_{n-1}, and extends it to order k: a step that is not computed takes
F_{n+1} = sum_{j=1..k} (-1)^(j+1) C(k, j) F_{n+1-j}, the binomial combination of the site's last k values, which
is exact when the trajectory is a polynomial of degree < k in the step (truncation error O(h^k)). The last k values
are the site's trajectory on the step grid, computed or forecast, as the paper's recursion over consecutive steps
uses them; while fewer than k exist, the order is the number that do (one: reuse). Which steps are computed is the
shared interval schedule (`cache.N`, `cache.warmup`).

With `cache.time=sigma` the weights are the Lagrange extrapolation weights at the scheduler's times (the binomial
ones on a uniform grid). Deviation from the paper: it caches the model output of a whole step; like the other
forecasting methods here, this caches each attention and MLP output (`roles`), which covers the whole-output variant
when an adapter's only site is the model.
"""

from dataclasses import dataclass

from torch import Tensor

from methods import register
from methods._numerics import extrapolation_weights
from methods.base import CacheConfig, CacheMethod, SiteKey, Step


@dataclass
class ABCacheConfig(CacheConfig):
    """Attributes:
    k: the order: how many past values a forecast combines (2: the paper's second-order relation).
    """

    name: str = "abcache"
    N: int = 4
    k: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.k <= 6:
            raise ValueError(f"cache.k={self.k}: the order must be in 1..6 (k=1 reuses the last value; high orders "
                             "amplify the noise of the features).")


@register("abcache")
class ABCache(CacheMethod):
    config_class = ABCacheConfig

    def reset(self) -> None:
        self.history: dict[SiteKey, list[tuple[float, Tensor]]] = {}  # the last k (time, value), oldest first

    def _push(self, key: SiteKey, t: float, value: Tensor) -> None:
        past = self.history.setdefault(key, [])
        past.append((t, value))
        del past[: -self.cfg.k]

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        self._push(key, self.time(step), features)

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        past = self.history[key]
        t = self.time(step)
        weights = extrapolation_weights([s for s, _ in past], t)
        value = past[-1][1] * weights[-1]
        for w, (_, f) in zip(weights[:-1], past):
            value.add_(f, alpha=w)
        self._push(key, t, value)
        return value
