"""Delta-DiT (arXiv:2406.01125): reuse of the deviation of a range of blocks, the rear blocks in the early
(outline) stage and the front blocks in the late (detail) stage.

At a full step every block runs and each block's residual (output minus input hidden states) is stored. At a
cached step (the interval schedule, `cache.N`) the `cache.blocks` blocks of the stage's range do not run: each
returns its input plus its stored residual, so the range adds its stored deviation Δ = F_out - F_in (the sum of
its blocks' residuals) to the fresh input, which is the paper's Δ-Cache; the other blocks run. Steps before
`cache.boundary` (sampling order) cache the last `blocks` blocks, later steps the first `blocks` blocks.

Defaults: `blocks` = half the depth and `boundary` = T/2. With DiT-XL/2 (28 blocks, 14 cached) and `warmup=1`
this reproduces the FLOPs of the FoCa paper's Table 3 Δ-DiT rows (N=2: 18.04 T, N=3: 16.14 T), which is how
those rows were configured as far as FLOPs tell.

`pattern` (default `D`: every cached step is a Δ-Cache step) orders the cached steps after each full step, repeated:
`D` a Δ-Cache step, `R` a step at which every block reuses its stored residual. `DR` is how the FLUX code that
produced the paper's Table 1 Δ-DiT rows runs (Shenyi-Z/TaylorSeer@288776d, TaylorSeer-FLUX/src/flux/modules/
cache_functions/cal_type.py: in its `Delta` mode an odd cache counter gives a `ToCa` step at fresh ratio 0, i.e.
nothing recomputed, before the `Delta-Cache` branch is reached); with the 38 single blocks cached it reproduces
those rows' FLOPs (docs/models.md).
"""

import re
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from methods import register
from methods.base import CacheConfig, CacheMethod, Plan, SiteKey, Step

_INDEX = re.compile(r"blocks\.(\d+)$")


@dataclass
class DeltaDiTConfig(CacheConfig):
    """Attributes:
    blocks: how many blocks a cached range holds; null: half the depth.
    boundary: the first step (sampling order) of the detail stage, from which the front blocks are cached
        instead of the rear ones; null: half the steps.
    pattern: the cached steps after each full step, repeated: `D` Δ-Cache, `R` every block reuses its residual.
    """

    name: str = "delta_dit"
    N: int = 2
    blocks: Optional[int] = None
    boundary: Optional[int] = None
    pattern: str = "D"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocks is not None and self.blocks < 1:
            raise ValueError(f"cache.blocks={self.blocks}: cache at least one block (null: half the depth).")
        if self.boundary is not None and self.boundary < 0:
            raise ValueError(f"cache.boundary={self.boundary} must be a step index >= 0 (null: half the steps).")
        if not self.pattern or set(self.pattern) - {"D", "R"}:
            raise ValueError(f"cache.pattern={self.pattern!r}: a non-empty string of D (a Δ-Cache step) and R (every "
                             "block reuses its residual), e.g. D or DR.")


def block_index(key: SiteKey) -> int:
    match = _INDEX.match(key.site)
    if match is None:
        raise ValueError(f"Delta-DiT caches per-block sites named blocks.<i>, got {key.site!r}")
    return int(match.group(1))


@register("delta_dit")
class DeltaDiT(CacheMethod):
    config_class = DeltaDiTConfig
    roles = ("block",)

    def reset(self) -> None:
        self.residual: dict[SiteKey, Tensor] = {}
        self.depth = 0  # learnt at the first (always full) step
        self.last_full = 0  # the last full step, where `pattern` restarts

    def cached_range(self, step: Step) -> range:
        k = self.cfg.blocks or self.depth // 2
        if k > self.depth:
            raise ValueError(f"cache.blocks={k} but the model has {self.depth} blocks.")
        if self.cfg.pattern[(step.index - self.last_full - 1) % len(self.cfg.pattern)] == "R":
            return range(0, self.depth)
        boundary = self.cfg.boundary if self.cfg.boundary is not None else (step.total or 0) // 2
        return range(self.depth - k, self.depth) if step.index < boundary else range(0, k)

    def plan(self, step: Step) -> Plan:
        plan = super().plan(step)
        if plan.full:
            self.last_full = step.index
        return plan

    def computes(self, key: SiteKey, step: Step, plan: Plan) -> bool:
        return plan.full or block_index(key) not in self.cached_range(step)

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        self.residual[key] = features
        match = _INDEX.match(key.site)  # `replay` drives a single unnamed site: plain residual reuse
        if match:
            self.depth = max(self.depth, int(match.group(1)) + 1)

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        return self.residual[key]
