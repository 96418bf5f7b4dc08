"""SmoothCache (Liu et al., CVPR Workshops 2025, arXiv:2411.10510): a static per-layer-type schedule of which steps
compute each layer type and which reuse its last output, derived from a calibration run's representation errors.

Calibration (`python -m foca_bench.calibrate_smoothcache model=<model>`, as the official `CalibrationHelper`): one
full-compute generation; for every site and every lookahead j = 1..n (n = 3 by default), the relative L1 error
between its output at step i and at step i + j, ||F_i - F_{i+j}||_1 / ||F_{i+j}||_1 over the whole batch, averaged
over the sites of each layer type (the last part of the site name: `attn`, `mlp`, ...) into `errors[type][j-1]`
(T - j values). The schedule of a type (the official `_scan_nrows_sublists`): scanning steps i = 0, 1, ..., the
longest lookahead j whose error at i is <= `alpha` computes step i and reuses it for the next j steps; if none
does, step i is computed and the scan moves on by one; the first and last steps are always computed. A site
computes when its type's schedule says so (or when it has no output yet) and otherwise reuses its last output;
a type without calibration always computes.

Deviation from the official code, on purpose: `alpha=0` computes every step even where a calibrated error is
exactly 0 (the official `<=` would skip it), so alpha 0 is the uncached model.
"""

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List

from torch import Tensor

from methods import register
from methods.base import FORECAST, FULL, CacheConfig, CacheMethod, Plan, SiteKey, Step


@dataclass
class SmoothCacheConfig(CacheConfig):
    """Attributes:
    alpha: the error threshold under which a layer type reuses its output (0: every step computed).
    errors: the calibration, {layer type: [errors at lookahead 1 (T-1 values), lookahead 2 (T-2), ...]}; empty takes
        the model's (`conf/model_method/<model>_smoothcache.yaml`).
    """

    name: str = "smoothcache"
    alpha: float = 0.15
    errors: Dict[str, List[List[float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0:
            raise ValueError(f"cache.alpha={self.alpha}: SmoothCache's error threshold must be >= 0 (0 computes every "
                             "step; the FoCa paper's DiT-XL/2 row uses 0.22).")
        for kind, rows in self.errors.items():
            lengths = [len(row) for row in rows]
            if not rows or lengths != list(range(lengths[0], lengths[0] - len(rows), -1)):
                raise ValueError(f"cache.errors.{kind}: expected one list per lookahead j = 1..n, of T - j errors "
                                 f"each, got lengths {lengths}; rerun `python -m foca_bench.calibrate_smoothcache`.")


@lru_cache(maxsize=None)
def smoothcache_schedule(rows: tuple[tuple[float, ...], ...], alpha: float, steps: int) -> tuple[bool, ...]:
    """Which of `steps` steps compute a layer type (True) from its averaged errors per lookahead (`rows[j-1]`)."""
    schedule = [True] * steps
    i = 0
    while i < steps:
        for j in range(len(rows), 0, -1):  # the longest reuse first
            if alpha > 0 and i < len(rows[j - 1]) and rows[j - 1][i] <= alpha:
                for s in range(i + 1, min(i + j + 1, steps)):
                    schedule[s] = False
                i += j + 1
                break
        else:
            i += 1
    schedule[0] = schedule[-1] = True
    return tuple(schedule)


def layer_type(key: SiteKey) -> str:
    """A site's layer type, as SmoothCache groups layers: the last part of its name (`blocks.3.attn` -> `attn`)."""
    return key.site.rsplit(".", 1)[-1]


@register("smoothcache")
class SmoothCache(CacheMethod):
    config_class = SmoothCacheConfig
    schedule_free = True  # the calibration and alpha decide, not N/warmup
    model_specific = ("errors",)
    how_to_set = "measure them with `python -m foca_bench.calibrate_smoothcache model=<model>`"

    def reset(self) -> None:
        self.cache: dict[SiteKey, Tensor] = {}

    def schedules(self, steps: int) -> dict[str, tuple[bool, ...]]:
        """Each calibrated layer type's schedule over `steps` steps."""
        out = {}
        for kind, rows in self.cfg.errors.items():
            if len(rows[0]) != steps - 1:
                raise ValueError(f"cache.errors.{kind} was calibrated for {len(rows[0]) + 1} steps but this run has "
                                 f"{steps}: recalibrate with `python -m foca_bench.calibrate_smoothcache "
                                 f"sampler.steps={steps} ...`.")
            out[kind] = smoothcache_schedule(tuple(map(tuple, rows)), float(self.cfg.alpha), steps)
        return out

    def plan(self, step: Step) -> Plan:
        if step.total is None:
            raise ValueError("SmoothCache's schedule depends on the number of steps: pass `total`.")
        computed = all(schedule[step.index] for schedule in self.schedules(step.total).values())
        return FULL if computed else FORECAST

    def computes(self, key: SiteKey, step: Step, plan: Plan) -> bool:
        if plan.full or key not in self.cache:
            return True
        schedule = self.schedules(step.total).get(layer_type(key))
        return schedule is None or schedule[step.index]

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        self.cache[key] = features

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        return self.cache[key]
