"""`reuse`: the whole model output of the last full step is reused on skipped steps.

The coarsest caching there is (the "x% steps"-like baseline that still pays for every scheduler step): on a
skipped step the transformer is not run at all.
"""

from dataclasses import dataclass

from methods import register
from methods.fora import FORA, FORAConfig


@dataclass
class ReuseConfig(FORAConfig):
    name: str = "reuse"


@register("reuse")
class Reuse(FORA):
    """FORA's reuse rule applied to the single `model` site (the transformer's output)."""

    config_class = ReuseConfig
    roles = ("model",)
