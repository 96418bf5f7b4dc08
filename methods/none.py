"""`none`: full computation at every step, the denominator of every reported speed-up."""

from dataclasses import dataclass

from torch import Tensor

from methods import register
from methods.base import FULL, CacheConfig, CacheMethod, Plan, SiteKey, Step


@dataclass
class NoneConfig(CacheConfig):
    """No knobs; the schedule fields are accepted and ignored."""

    name: str = "none"


@register("none")
class NoCache(CacheMethod):
    config_class = NoneConfig
    roles = ()
    schedule_free = True

    def plan(self, step: Step) -> Plan:
        return FULL

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        pass

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        raise RuntimeError("method `none` never forecasts: every step is computed.")

    def reset(self) -> None:
        pass
