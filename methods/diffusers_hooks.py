"""The ecosystem's own implementations, run through diffusers' hooks, as table rows beside ours:
`method=diffusers_taylorseer` (`TaylorSeerCacheConfig`), `method=diffusers_fbcache` (`FirstBlockCacheConfig`),
`method=diffusers_pab` (`PyramidAttentionBroadcastConfig`), `method=diffusers_magcache` (`MagCacheConfig`) and
`method=diffusers_fastercache` (`FasterCacheConfig`).

These methods compute nothing themselves: the engine hands their config to `foca_bench.external`, which applies
diffusers' hook to the model for the engine's lifetime, resets its state at every generation and removes it on
exit. Their schedules are diffusers' own (e.g. TaylorSeerCache computes steps i < d and d + 1 + kN, see
docs/methods.md), and the record's full-step count is unknown (diffusers does not report it). MagCache's
magnitude ratios are per model (`conf/model_method/<model>_diffusers_magcache.yaml`, fitted by
`python -m foca_bench.calibrate_magcache`). FasterCache (arXiv:2410.19355) reads a batched-CFG forward as
[uncond; cond] halves, the reverse of DiT's order, so it asks the adapter for uncond first (`uncond_first`).
"""

from dataclasses import dataclass, field
from typing import List, Optional

from torch import Tensor

from methods import register
from methods.base import FULL, CacheConfig, CacheMethod, Plan, SiteKey, Step


class External(CacheMethod):
    """A method run by another project's hooks (`foca_bench.external`): our engine computes every step."""

    roles = ()
    external = True

    def plan(self, step: Step) -> Plan:
        return FULL  # our engine never skips: the other project's hooks do

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        pass

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        raise RuntimeError(f"{self.name} runs through another project's hooks; it has no forecast of its own.")

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
class DiffusersTaylorSeer(External):
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
class DiffusersFBCache(External):
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
class DiffusersPAB(External):
    config_class = DiffusersPABConfig


@dataclass
class DiffusersMagCacheConfig(CacheConfig):
    """MagCache (arXiv:2506.09045): the whole block stack is skipped (input + last residual) while the accumulated
    error sum |1 - prod(ratio)| of the model's magnitude ratios stays within `threshold`, at most `max_skip_steps`
    in a row, never in the first `retention_ratio` of the steps.

    Attributes:
        mag_ratios: the model's per-step residual magnitude ratios
            (`conf/model_method/<model>_diffusers_magcache.yaml`).
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
class DiffusersMagCache(External):
    config_class = DiffusersMagCacheConfig
    schedule_free = True
    model_specific = ("mag_ratios",)
    how_to_set = ("`python -m foca_bench.calibrate_magcache model=<name>` measures them and prints the YAML for "
                  "conf/model_method/<model>_diffusers_magcache.yaml")


@dataclass
class DiffusersFasterCacheConfig(CacheConfig):
    """FasterCache (arXiv:2410.19355), diffusers' `FasterCacheConfig` with its defaults.

    Attributes:
        N: `spatial_attention_block_skip_range`: each self-attention is computed every N-th call and extrapolated in
            between, t_out + (t_out - t_2_out) x `attention_weight`, while the timestep is inside `attention_range`.
        uncond_N: `unconditional_batch_skip_range`: inside `uncond_range`, a batched-CFG forward runs its
            unconditional half only every uncond_N-th step; in between it is the conditional output plus the last
            computed (uncond - cond) low- and high-frequency difference, scaled by `alpha_low_frequency` inside
            `low_frequency_range` and `alpha_high_frequency` inside `high_frequency_range` (CFG-Cache).
    A guidance-distilled model (FLUX, HunyuanVideo: no CFG batch) gets the attention part only. N=1 and uncond_N=1
    compute everything.
    """

    name: str = "diffusers_fastercache"
    N: int = 2
    attention_range: List[float] = field(default_factory=lambda: [-1, 681])
    attention_weight: float = 0.5
    uncond_N: int = 5
    uncond_range: List[float] = field(default_factory=lambda: [-1, 641])
    alpha_low_frequency: float = 1.1
    alpha_high_frequency: float = 1.1
    low_frequency_range: List[float] = field(default_factory=lambda: [99, 901])
    high_frequency_range: List[float] = field(default_factory=lambda: [-1, 301])

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.uncond_N < 1:
            raise ValueError(f"cache.uncond_N={self.uncond_N}: the unconditional half runs every uncond_N-th step, "
                             "so it must be >= 1 (1 runs it every step).")
        for key in ("attention_range", "uncond_range", "low_frequency_range", "high_frequency_range"):
            low_high = list(getattr(self, key))
            if len(low_high) != 2 or not low_high[0] < low_high[1]:
                raise ValueError(f"cache.{key}={low_high}: give [low, high] timesteps with low < high.")


@register("diffusers_fastercache")
class DiffusersFasterCache(External):
    config_class = DiffusersFasterCacheConfig
    uncond_first = True  # its CFG-Cache reads a batched CFG forward as [uncond; cond]
