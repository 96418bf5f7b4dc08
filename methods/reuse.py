"""`reuse`: the whole model output of the last full step is reused on skipped steps.

The coarsest caching there is (the "x% steps"-like baseline that still pays for every scheduler step): on a
skipped step the transformer is not run at all. A baseline of this project, not of a paper: it has no official
schedule and keeps the shared interval schedule (i < warmup or (i - warmup) % N == 0) of the interval methods, so
its rows line up step for step with TaylorSeer's and FoCa's at the same N; FORA's `cache.anchor` is not a knob here.
"""

from dataclasses import dataclass

from methods import register
from methods.base import CacheConfig, CacheMethod
from methods.fora import FORA


@dataclass
class ReuseConfig(CacheConfig):
    name: str = "reuse"
    N: int = 3


@register("reuse")
class Reuse(FORA):
    """FORA's reuse rule applied to the single `model` site (the transformer's output), on the shared schedule."""

    config_class = ReuseConfig
    roles = ("model",)
    is_full = CacheMethod.is_full
