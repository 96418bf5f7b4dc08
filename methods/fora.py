"""FORA (arXiv:2407.01425): per-site reuse of the last computed attention and MLP outputs.

On a skipped step every cached site returns its value from the last full step (eq. 3 of the FoCa paper).
"""

from dataclasses import dataclass

from torch import Tensor

from methods import register
from methods.base import CacheConfig, CacheMethod, SiteKey, Step, Terms


@dataclass
class FORAConfig(CacheConfig):
    name: str = "fora"
    N: int = 3


@register("fora")
class FORA(CacheMethod):
    config_class = FORAConfig
    fusable = True

    def reset(self) -> None:
        self.last: dict[SiteKey, Tensor] = {}

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        self.last[key] = features

    def forecast_terms(self, key: SiteKey, step: Step) -> Terms:
        return Terms((self.last[key],), (1.0,))
