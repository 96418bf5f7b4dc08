"""ToCa, token-wise feature caching (Zou et al., ICLR 2025, arXiv:2410.05317), as its official DiT code runs it.

A full ("force") step computes every site and caches it per token. A partial step recomputes, per token-wise
site, only a share of its tokens and takes the others from the cache (`select` + `update_tokens`):
- score, per sample over tokens (`score_evaluate` in the official code):
  s1 `score=attention`: the attention each token received at its block's last full step (head-mean softmax map
     summed over queries, L2-normalised over tokens); or `score=random`: uniform draws, shared by the cond and
     uncond halves of a batched CFG forward, which needs no attention map, so flash attention stays usable;
  + s3 staleness: `soft_fresh_weight` x (partial steps since the token was last recomputed) / N;
  + s4 spatial spread: on a square token grid, the top token of each 2x2 patch gains `spatial_bonus` x its score.
- how many: int(r x tokens), r = fresh_ratio x layer x step x module factor (`ratio_schedule=toca`): layer 1.8 ->
  0.2 over depth, step 0.6 -> 1.4 over sampling, module 0 for attention and 2.5 for the MLP, so attention is
  reused whole at partial steps (the official DiT code's final version) and its share goes to the MLP.
  `ratio_schedule=constant`: r = fresh_ratio at every token-wise site.
- force steps (`force_schedule=toca`): the first step, then each step whose countdown index s = T-1-i is a
  multiple of round(N / (1.4 - 0.8 s/T)), re-evaluated at every force step (longer intervals early, shorter
  late); `force_schedule=interval`: the shared schedule (warmup, N). N=1 computes every step under both.
Only sites the adapter marks token-wise (an MLP: each token's output depends on that token alone) are recomputed
per token; other sites are reused whole at partial steps (partial attention needs every token's keys and values;
the official DiT code disables it). docs/methods.md lists where this differs from the official code.
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from methods import register
from methods._numerics import token_index
from methods.base import FULL, PARTIAL, CacheConfig, CacheMethod, Plan, SiteKey, Step, Tokens

# ToCa's schedule constants (official code: fresh_ratio_scheduler.py, force_scheduler.py)
STEP_WEIGHT, LAYER_WEIGHT = 0.4, 0.8
MODULE_FACTOR = {"attn": 1 - (1 - 0.6) * 2.5, "mlp": 1 + 0.6 * 2.5}  # 0.0 and 2.5


@dataclass
class ToCaConfig(CacheConfig):
    """Attributes:
    N: ToCa's `fresh_threshold`: the force-step interval.
    fresh_ratio: base share of tokens recomputed at a partial step, in (0, 1].
    score: `attention` (s1) or `random`.
    ratio_schedule: `toca` (layer, step and module factors) or `constant`.
    force_schedule: `toca` (step-dependent interval) or `interval` (warmup, N).
    soft_fresh_weight: weight of the staleness score s3 (lambda_3).
    spatial_bonus: s4's bonus for the top token of each 2x2 patch (0 turns s4 off).
    seed: seed of the `random` score's generator (reset at every generation).
    """

    name: str = "toca"
    N: int = 4
    fresh_ratio: float = 0.07
    score: str = "attention"
    ratio_schedule: str = "toca"
    force_schedule: str = "toca"
    soft_fresh_weight: float = 0.25
    spatial_bonus: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.fresh_ratio <= 1.0:
            raise ValueError(f"cache.fresh_ratio={self.fresh_ratio}: the share of tokens recomputed at a partial step "
                             "must be in (0, 1] (ToCa's default is 0.07; 1 recomputes every token).")
        choices = {"score": ("attention", "random"), "ratio_schedule": ("toca", "constant"),
                   "force_schedule": ("toca", "interval")}
        for knob, allowed in choices.items():
            if getattr(self, knob) not in allowed:
                raise ValueError(f"cache.{knob}={getattr(self, knob)!r}: choose one of {', '.join(allowed)}.")
        for knob in ("soft_fresh_weight", "spatial_bonus"):
            if getattr(self, knob) < 0:
                raise ValueError(f"cache.{knob}={getattr(self, knob)} must be >= 0.")


@lru_cache(maxsize=None)
def toca_force_steps(N: int, T: int) -> tuple[bool, ...]:
    """ToCa's force schedule over T steps in sampling order (official `global_force_fresh`/`force_scheduler`)."""
    full, threshold = [], 1
    for i in range(T):
        s = T - 1 - i  # the official DiT code counts steps down
        is_full = N == 1 or i == 0 or s % threshold == 0
        if is_full:
            threshold = max(1, round(N / (1 + STEP_WEIGHT - 2 * STEP_WEIGHT * s / T)))
        full.append(is_full)
    return tuple(full)


def spatial_bonus(score: Tensor, bonus: float, grid: int = 2) -> Tensor:
    """s4: raise the top token of each grid x grid patch of a square token map by `bonus` x its score."""
    B, N = score.shape
    side = int(round(N ** 0.5))
    if bonus == 0 or side * side != N or side % grid:
        return score
    patches = score.view(B, side // grid, grid, side // grid, grid).permute(0, 1, 3, 2, 4).reshape(B, -1, grid * grid)
    top, where = patches.max(dim=-1, keepdim=True)
    patches = patches + torch.zeros_like(patches).scatter_(-1, where, top * bonus)
    return patches.view(B, side // grid, side // grid, grid, grid).permute(0, 1, 3, 2, 4).reshape(B, N)


@dataclass
class _SiteCache:
    value: Tensor  # (B, tokens, ...) every token's latest value
    age: Tensor  # (B, tokens) partial steps since each token was last recomputed
    owned: bool = False  # `value` is our copy (the full step's tensor is the model's until we copy it)


@register("toca")
class ToCa(CacheMethod):
    config_class = ToCaConfig
    tokenwise = True

    def reset(self) -> None:
        self.cache: dict[SiteKey, _SiteCache] = {}
        self.generator = torch.Generator().manual_seed(self.cfg.seed)

    def is_full(self, index: int, total: Optional[int] = None) -> bool:
        if self.cfg.force_schedule == "interval":
            return super().is_full(index, total)
        if total is None:
            raise ValueError("ToCa's force schedule depends on the number of steps: pass `total`.")
        return toca_force_steps(self.cfg.N, total)[index]

    def plan(self, step: Step) -> Plan:
        return FULL if self.is_full(step.index, step.total) else PARTIAL

    def wants_attention(self, step: Step) -> bool:
        return self.cfg.score == "attention" and self.cfg.N > 1

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        age = torch.zeros(features.shape[:2], dtype=torch.int32, device=features.device)
        self.cache[key] = _SiteCache(features, age)

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        return self.cache[key].value

    def fresh_ratio(self, step: Step, tokens: Tokens) -> float:
        """r of the site at this step (`ratio_schedule`)."""
        if self.cfg.ratio_schedule == "constant":
            return self.cfg.fresh_ratio
        T = step.total or step.index + 1
        s = T - 1 - step.index
        step_factor = 1 + STEP_WEIGHT - 2 * STEP_WEIGHT * s / T
        layer_factor = 1 + LAYER_WEIGHT - 2 * LAYER_WEIGHT * tokens.layer / max(tokens.layers - 1, 1)
        return self.cfg.fresh_ratio * layer_factor * step_factor * MODULE_FACTOR.get(tokens.role, 1.0)

    def scores(self, key: SiteKey, tokens: Tokens) -> Tensor:
        """s1 (+ s3 + s4) per sample and token, (B, tokens)."""
        B, N = tokens.batch, tokens.count
        if self.cfg.score == "attention":
            if tokens.attention is None:
                raise ValueError(f"cache.score=attention needs the attention map of {key.site}'s block, which this "
                                 "model's adapter does not provide: use cache.score=random.")
            score = F.normalize(tokens.attention.float(), p=2, dim=1)
        else:
            pairs = tokens.paired and B % 2 == 0
            draw = torch.rand(B // 2 if pairs else B, N, generator=self.generator)
            score = (torch.cat([draw, draw]) if pairs else draw).to(self.cache[key].age.device)
        score = score + self.cfg.soft_fresh_weight * self.cache[key].age.float() / self.cfg.N
        return spatial_bonus(score, self.cfg.spatial_bonus)

    def select(self, key: SiteKey, step: Step, tokens: Tokens) -> Optional[Tensor]:
        k = min(int(self.fresh_ratio(step, tokens) * tokens.count), tokens.count)
        if k <= 0 or key not in self.cache:
            return None
        indices = torch.topk(self.scores(key, tokens), k, dim=1).indices  # (B, k)
        age = self.cache[key].age
        age += 1
        age.scatter_(1, indices, 0)
        return indices

    def update_tokens(self, key: SiteKey, step: Step, indices: Tensor, features: Tensor) -> Tensor:
        c = self.cache[key]
        if not c.owned:
            c.value, c.owned = c.value.clone(), True
        c.value.scatter_(1, token_index(indices, features.shape), features.to(c.value.dtype))
        return c.value
