"""DuCa, dual feature caching (Zou et al., arXiv:2412.18911), as its official code (Shenyi-Z/DuCa) runs it.

ToCa's machinery (`methods.toca`) with two kinds of cached step: a conservative step (`C`) is ToCa's partial step
(the top-scored share of each MLP's tokens recomputed, attention reused); an aggressive step (`A`) runs no block
at all and reuses the output of the whole block stack from the previous step (`cache['noise']` of DuCa-DiT's
`models.py`; `aggressive_feature` of TaylorSeer-HunyuanVideo's DuCa mode): the method caches the stack site
(role `blocks`, `stack_output`) at every step whose blocks run. `cache.pattern` orders the cached steps:
`countdown` (DuCa-DiT's `cal_type`: conservative when the countdown s mod the force interval is odd) or a string
of C/A repeated after each force step (`CA`: the counter parity of TaylorSeer-HunyuanVideo's DuCa mode).
On DiT's force schedule the blocks after the first decide after the first block's force step has reset the
interval (as `cal_type` runs per block): at a step where only the first block is forced and the others are
aggressive, the first block refreshes its caches and the stack's output is still the previous one.
Settings (DuCa-DiT's command): fresh_ratio 0.05, the ddim50 recipe, attention score, s4 bonus 0.8.
"""

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import Tensor

from methods import register
from methods.base import Plan, SiteKey, Step, Tokens
from methods.toca import ToCa, ToCaConfig


@dataclass
class DuCaConfig(ToCaConfig):
    """Attributes:
    pattern: the cached steps' kinds: `countdown`, or a string of C (conservative: ToCa) and A (aggressive: the
        stack's output reused) repeated after each force step, e.g. CA. Null: the model's official order.
    """

    OFFICIAL: ClassVar[dict] = {**ToCaConfig.OFFICIAL, "fresh_ratio": 0.05, "spatial_bonus": 0.8,
                                "pattern": "countdown"}
    name: str = "duca"
    pattern: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern != "countdown" and (not self.pattern or set(self.pattern) - {"C", "A"}):
            raise ValueError(f"cache.pattern={self.pattern!r}: `countdown` or a non-empty string of C (conservative: "
                             "ToCa's partial step) and A (aggressive: the block stack's output reused), e.g. CA.")


@register("duca")
class DuCa(ToCa):
    config_class = DuCaConfig
    roles = ("attn", "mlp", "fused", "blocks")
    stack_output = True

    @property
    def pattern(self) -> str:
        return self.cfg.pattern

    def reset(self) -> None:
        super().reset()
        self.output: dict[SiteKey, Tensor] = {}  # the block stack's output at its last computed step, per branch

    def stack(self, key: SiteKey) -> bool:
        info = self.site_info.get(key.site)
        return info is not None and info.role == "blocks"

    def computes(self, key: SiteKey, step: Step, plan: Plan) -> bool:
        if self.stack(key):  # the blocks run unless the whole step is aggressive
            return self.kinds(step)[0] != "A"
        return super().computes(key, step, plan)

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        if not self.stack(key):
            super().update(key, step, features)
        elif self.kinds(step)[1] != "A":  # else only the first block was forced: the previous output stays
            self.output[key] = features

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        return self.output[key] if self.stack(key) else super().forecast(key, step)

    def select(self, key: SiteKey, step: Step, tokens: Tokens) -> Optional[Tensor]:
        if self.kind(key, step) == "A":  # a site of a block that does not run (replay: reused whole)
            return None
        return super().select(key, step, tokens)
