"""The ecosystem's own implementations, run through diffusers' hooks, as table rows beside ours:
`method=diffusers_taylorseer` (`TaylorSeerCacheConfig`), `method=diffusers_fbcache` (`FirstBlockCacheConfig`),
`method=diffusers_pab` (`PyramidAttentionBroadcastConfig`) and `method=diffusers_magcache` (`MagCacheConfig`).

These methods compute nothing themselves: the engine hands their config to `foca_bench.external`, which applies
diffusers' hook to the model for the engine's lifetime, resets its state at every generation and removes it on
exit. Their schedules are diffusers' own (e.g. TaylorSeerCache computes steps i < d and d + 1 + kN, see
docs/methods.md), and the record's full-step count is unknown (diffusers does not report it). MagCache's
magnitude ratios are per model (`conf/model_method/<model>_diffusers_magcache.yaml`, fitted by
`python -m foca_bench.calibrate_magcache`). FasterCache needs separate cond/uncond passes, which batched-CFG DiT
does not have; it comes with the models that support them.
"""

from dataclasses import dataclass, field
from typing import List, Optional

from torch import Tensor

from methods import register
from methods.base import FULL, CacheConfig, CacheMethod, Plan, SiteKey, Step


class _External(CacheMethod):
    roles = ()
    external = True

    def plan(self, step: Step) -> Plan:
        return FULL  # our engine never skips: diffusers' hooks do

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        pass

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        raise RuntimeError(f"{self.name} runs through diffusers' hooks; it has no forecast of its own.")

    def reset(self) -> None:
        pass


@dataclass
class DiffusersTaylorSeerConfig(CacheConfig):
    """`cache_interval=N`, `disable_cache_before_step=warmup` (at least 1: the hook cannot predict before it
    has computed a step, so a model default of `warmup=0` becomes 1 here), `max_order=O`, factors in
    `cache.dtype` (null: float32), on the modules our attention, MLP and fused sites cache."""

    name: str = "diffusers_taylorseer"
    N: int = 3
    O: int = 2


@register("diffusers_taylorseer")
class DiffusersTaylorSeer(_External):
    config_class = DiffusersTaylorSeerConfig


@dataclass
class DiffusersFBCacheConfig(CacheConfig):
    """threshold: First Block Cache's bound on the relative change of the first block's residual."""

    name: str = "diffusers_fbcache"
    threshold: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threshold < 0:
            raise ValueError(f"cache.threshold={self.threshold} must be >= 0 (0 computes every step).")


@register("diffusers_fbcache")
class DiffusersFBCache(_External):
    config_class = DiffusersFBCacheConfig
    schedule_free = True


@dataclass
class DiffusersPABConfig(CacheConfig):
    """Pyramid Attention Broadcast: self-attention recomputed every `N` steps while the scheduler timestep is in
    [`low`, `high`], reused in between (diffusers' `spatial_attention_*` settings)."""

    name: str = "diffusers_pab"
    N: int = 2
    low: int = 100
    high: int = 800

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.low < self.high:
            raise ValueError(f"cache.low={self.low}, cache.high={self.high}: need 0 <= low < high (timesteps).")


@register("diffusers_pab")
class DiffusersPAB(_External):
    config_class = DiffusersPABConfig


@dataclass
class DiffusersMagCacheConfig(CacheConfig):
    """MagCache (arXiv:2506.09045): the whole block stack is skipped (input + last residual) while the accumulated
    error sum |1 - prod(ratio)| of the model's magnitude ratios stays within `threshold`, at most `max_skip_steps`
    in a row, never in the first `retention_ratio` of the steps.

    Attributes:
        mag_ratios: the model's per-step residual magnitude ratios (`conf/model_method/<model>_diffusers_magcache.yaml`).
        steps: the number of sampling steps the hook interpolates the ratios to; null takes `sampler.steps`.
    """

    name: str = "diffusers_magcache"
    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    mag_ratios: List[float] = field(default_factory=list)
    steps: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threshold < 0:
            raise ValueError(f"cache.threshold={self.threshold} must be >= 0 (0 computes every step).")
        if self.max_skip_steps < 0 or not 0.0 <= self.retention_ratio <= 1.0:
            raise ValueError(f"cache.max_skip_steps={self.max_skip_steps} must be >= 0 and cache.retention_ratio="
                             f"{self.retention_ratio} in [0, 1].")


@register("diffusers_magcache")
class DiffusersMagCache(_External):
    config_class = DiffusersMagCacheConfig
    schedule_free = True
    model_specific = ("mag_ratios",)
    how_to_set = ("`python -m foca_bench.calibrate_magcache model=<name>` measures them and prints the YAML for "
                  "conf/model_method/<model>_diffusers_magcache.yaml")
