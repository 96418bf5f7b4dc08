"""cache-dit's own implementations (vipshop/cache-dit, the `cache-dit` package) as table rows beside ours:
`method=dbcache` (DBCache, its Dual Block Cache), `method=cachedit_taylorseer` and `method=cachedit_foca` (DBCache
with cache-dit's TaylorSeer (arXiv:2503.06923) or FoCa (arXiv:2508.16211) calibrator forecasting the cached residual).

DBCache, per step: the first `Fn` blocks always run; the relative L1 change of their residual (output minus input
hidden states) against the one stored at the last fully computed step, mean|R_prev - R| / mean|R_prev|, decides:
below `threshold` the middle blocks are skipped and the middle residual stored at the last computed step is added
(or, with a calibrator, its forecast), then the last `Bn` blocks run; otherwise every block runs and both residuals
are stored. The first `max_warmup_steps` steps always compute (every `warmup_interval`-th of them, the others may
cache), at most `max_cached_steps` steps cache in total and `max_continuous_cached_steps` in a row (-1: no
limit); threshold 0 computes every step.

Like the `diffusers_*` methods these compute nothing themselves: the engine hands their config to
`foca_bench.external`, which applies cache-dit to the transformer (`cache_dit.enable_cache` in its transformer-only
mode, with cache-dit's own block adapter for the model: DiT's block stack; FLUX's double and single blocks as one
stack; HunyuanVideo's two stacks, each with its own decision) for the engine's lifetime, refreshes its contexts at
every generation and removes it on exit. Defaults are cache-dit's own (`DBCacheConfig`: F8B0, threshold 0.08, 8
warm-up steps, no step limits; TaylorSeer order 1 on both streams).
"""

from dataclasses import dataclass
from typing import Optional

from methods import register
from methods.base import CacheConfig
from methods.diffusers_hooks import External


@dataclass
class DBCacheConfig(CacheConfig):
    """cache-dit's `DBCacheConfig` knobs.

    Attributes:
        Fn: `Fn_compute_blocks`, the leading blocks that always run (their residual is the signal).
        Bn: `Bn_compute_blocks`, the trailing blocks that always run.
        threshold: `residual_diff_threshold` (0 computes every step).
        max_warmup_steps, warmup_interval, max_cached_steps, max_continuous_cached_steps: cache-dit's step limits.
        steps: `num_inference_steps`, after which cache-dit starts a new context by itself; null takes
            `sampler.steps` (the engine also refreshes the contexts before every generation).
        separate_cfg: the model runs separate cond and uncond passes (`enable_separate_cfg`: cache-dit then keeps
            a second state for every other call); HunyuanVideo with `model.true_cfg_scale > 1` needs it.
    """

    name: str = "dbcache"
    Fn: int = 8
    Bn: int = 0
    threshold: float = 0.08
    max_warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    steps: Optional[int] = None
    separate_cfg: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.Fn < 1 or self.Bn < 0:
            raise ValueError(f"cache.Fn={self.Fn}, cache.Bn={self.Bn}: DBCache needs Fn >= 1 leading blocks (their "
                             "residual is its signal) and Bn >= 0 trailing ones.")
        if self.threshold < 0:
            raise ValueError(f"cache.threshold={self.threshold} must be >= 0 (0 computes every step).")
        if self.max_warmup_steps < 0 or self.warmup_interval < 1:
            raise ValueError(f"cache.max_warmup_steps={self.max_warmup_steps} must be >= 0 and cache.warmup_interval="
                             f"{self.warmup_interval} >= 1.")
        if self.max_cached_steps < -1 or self.max_continuous_cached_steps < -1:
            raise ValueError("cache.max_cached_steps and cache.max_continuous_cached_steps must be >= 0, or -1 (no "
                             "limit).")


@register("dbcache")
class DBCache(External):
    config_class = DBCacheConfig
    schedule_free = True
    adaptive = True  # decides from feature values: no FLOP count on the meta device


@dataclass
class CacheDiTTaylorSeerConfig(DBCacheConfig):
    """DBCache with cache-dit's `TaylorSeerCalibratorConfig` on the cached residual of both streams.

    Attributes:
        O: `taylorseer_order`.
    """

    name: str = "cachedit_taylorseer"
    O: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.O < 0:
            raise ValueError(f"cache.O={self.O}: the Taylor order must be >= 0 (cache-dit's default is 1).")


@register("cachedit_taylorseer")
class CacheDiTTaylorSeer(DBCache):
    config_class = CacheDiTTaylorSeerConfig


@dataclass
class CacheDiTFoCaConfig(DBCacheConfig):
    """DBCache with cache-dit's `FoCaCalibratorConfig` (no knobs of its own) on the cached residual of both streams."""

    name: str = "cachedit_foca"


@register("cachedit_foca")
class CacheDiTFoCa(DBCache):
    config_class = CacheDiTFoCaConfig
