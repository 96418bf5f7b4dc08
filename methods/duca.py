"""DuCa, dual feature caching (Zou et al., arXiv:2412.18911): ToCa's partial steps alternated with aggressive ones.

After each full step the cached steps follow `pattern`, repeated: `C` a conservative step (ToCa's partial step:
the top-scored share of each MLP's tokens is recomputed, `methods.toca`), `A` an aggressive step (every site
reused whole, as FORA does, with nothing recomputed). The paper's alternation is `CA`: the cheap aggressive step's
error is corrected by the next conservative one. Everything else (scores, ratio and force schedules) is ToCa's.

Not reproduced: DuCa's own token score (its "V-caching"); its official code was not available to check, so
`cache.score` offers ToCa's `attention` score and the flash-attention-friendly `random` one (the default here,
which the DuCa paper reports as close to importance-based selection). docs/methods.md records this.
"""

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from methods import register
from methods.base import SiteKey, Step, Tokens
from methods.toca import ToCa, ToCaConfig


@dataclass
class DuCaConfig(ToCaConfig):
    """Attributes:
    pattern: the cached steps after each full step, repeated: `C` conservative (ToCa), `A` aggressive (reuse).
    """

    name: str = "duca"
    N: int = 3
    score: str = "random"
    pattern: str = "CA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.pattern or set(self.pattern) - {"C", "A"}:
            raise ValueError(f"cache.pattern={self.pattern!r}: a non-empty string of C (conservative: ToCa's partial "
                             "step) and A (aggressive: reuse every site), e.g. CA.")


@register("duca")
class DuCa(ToCa):
    config_class = DuCaConfig

    def reset(self) -> None:
        super().reset()
        self.last_full: dict[SiteKey, int] = {}

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        super().update(key, step, features)
        self.last_full[key] = step.index

    def kind(self, key: SiteKey, step: Step) -> str:
        """`C` or `A`: this cached step's place in the pattern after the site's last full step."""
        return self.cfg.pattern[(step.index - self.last_full[key] - 1) % len(self.cfg.pattern)]

    def wants_attention(self, step: Step) -> bool:
        return super().wants_attention(step) and "C" in self.cfg.pattern

    def select(self, key: SiteKey, step: Step, tokens: Tokens) -> Optional[Tensor]:
        if key not in self.last_full or self.kind(key, step) == "A":
            return None
        return super().select(key, step, tokens)
