"""FORA (arXiv:2407.01425): per-site reuse of the last computed attention and MLP outputs.

On a skipped step every cached site returns its value from the last full step (eq. 3 of the FoCa paper).

Schedule (`cache.anchor`), as the official codes place the full steps over T steps i = 0..T-1:
- `last`: FORA's own DiT code (prathebaselva/FORA) and ToCa's DiT code in its FORA mode count the steps down,
  s = T-1-i, and compute s = T-1 (the first step) and every s with s % N == 0, so the last step is always
  computed: i = 0 and i = T-1 (mod N). `cache.warmup` leading steps are computed too.
- `first`: the shared interval schedule, i < warmup or (i - warmup) % N == 0. TaylorSeer's and ToCa's FLUX code
  (and TaylorSeer's HunyuanVideo code) in their FORA mode count up and compute i = 0 (mod N): `first` with
  `warmup=0`, which `conf/model_method/flux_fora.yaml` and `hunyuan_video_fora.yaml` set on those models.
Deviation from the official code (an option, not a default): `anchor=first` on DiT, the schedule FORA had here
before. Tested against emulations of each official loop in tests/test_fora.py.
"""

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from methods import register
from methods.base import CacheConfig, CacheMethod, SiteKey, Step, Terms

ANCHORS = ("last", "first")


@dataclass
class FORAConfig(CacheConfig):
    """Attributes:
    anchor: `last` (count from the last step: i = 0 or i = T-1 (mod N), FORA's DiT code) or `first` (count from the
        first step after `warmup`: the shared interval schedule; the FLUX and HunyuanVideo codes' FORA mode).
    """

    name: str = "fora"
    N: int = 3
    anchor: str = "last"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.anchor not in ANCHORS:
            raise ValueError(f"cache.anchor={self.anchor!r}: choose `last` (FORA's DiT code: full steps counted down "
                             "from the last step) or `first` (counted from the first step after cache.warmup).")


def anchored_at_last(index: int, total: Optional[int], N: int, warmup: int) -> bool:
    """FORA's countdown schedule: step `index` of `total` is full when it is the first step, one of the `warmup`
    leading steps, or its countdown index total-1-index is a multiple of N (so the last step always is)."""
    if total is None:
        raise ValueError("FORA with cache.anchor=last counts steps down from the last one: pass `total`.")
    return index == 0 or index < warmup or (total - 1 - index) % N == 0


@register("fora")
class FORA(CacheMethod):
    config_class = FORAConfig
    fusable = True

    def is_full(self, index: int, total: Optional[int] = None) -> bool:
        if self.cfg.anchor == "first":
            return super().is_full(index, total)
        return anchored_at_last(index, total, self.cfg.N, self.cfg.warmup or 0)

    def reset(self) -> None:
        self.last: dict[SiteKey, Tensor] = {}

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        self.last[key] = features

    def forecast_terms(self, key: SiteKey, step: Step) -> Terms:
        return Terms((self.last[key],), (1.0,))
