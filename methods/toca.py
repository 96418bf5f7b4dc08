"""ToCa, token-wise feature caching (Zou et al., ICLR 2025, arXiv:2410.05317), as its official code runs it.

A force step computes every site and caches it per token. A partial step recomputes, per token-wise site (an
MLP), only a share of its tokens and takes the others from the cache (`select` + `update_tokens`); attention is
reused whole (partial attention needs every token's keys and values; the official code disables it).
- score per sample over tokens (`score_evaluate`): s1 `score=attention`, the attention each token received at its
  block's last force step (head-mean softmax map summed over queries, L2-normalised over tokens), or
  `score=random`, uniform draws shared by the cond and uncond halves of a batched CFG forward (no attention map,
  so flash attention stays usable); + s3 `soft_fresh_weight` x (partial steps since the token was recomputed) / N;
  + s4 on a square token grid, the top token of each 2x2 patch gains `spatial_bonus` x its score.
- how many: int(r x tokens) with r clamped to [0, 1] in float32, r = fresh_ratio x factors (`ratio_schedule`):
  `ddim50` (DiT's DDIM-50 recipe `ToCa-ddim50`: step 3 - 4s/T, layer 0.8 -> 1.2 over depth, module 0 for
  attention and 2.5 for the MLP), `ddpm250` (DDPM-250's `ToCa-ddpm250`: step 1.4 - 0.8s/T, layer 1.8 -> 0.2),
  `mmdit` (FLUX's and HunyuanVideo's `ToCa`: layer 1.5 - l/27, stream 0.4 for a double block, 1.6 for a single
  one), `constant` (r = fresh_ratio); s = T-1-i counts steps down, as the official DiT sampler does. The staleness
  of every token grows at a partial step even when r x tokens rounds to 0.
- force steps (`force_schedule`): `toca`, the official DiT rule, decided block by block as `cal_type` is: step 0,
  then each step whose countdown s is a multiple of the interval set at the last force step, round(N / (1.4 -
  0.8 s/T)) in float32, or 2 for s in [0.2T, 0.4T); the first block decides with the interval it finds, the
  others after the first block's force step has reset it, so at some steps only the first block is forced;
  `interval`: the shared schedule (warmup, N), which is the official FLUX and HunyuanVideo code's counter.
Null knobs take the model's official value (`conf/model_method/<model>_toca.yaml`), else DiT's (`OFFICIAL`).
docs/methods.md lists the sources and what still differs.
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from methods import register
from methods._numerics import token_index
from methods.base import FORECAST, FULL, PARTIAL, CacheConfig, CacheMethod, Plan, SiteKey, Step, Tokens

# (step weight, layer weight) of the recipes (DiT-ToCa/cache_functions/fresh_ratio_scheduler.py)
RECIPES = {"ddim50": (2.0, -0.2), "ddpm250": (0.4, 0.8)}
MODULE_FACTOR = {"attn": 1 - (1 - 0.6) * 2.5, "mlp": 1 + 0.6 * 2.5}  # 0.0 and 2.5
STREAM_FACTOR = {"double": 1 - 0.6, "single": 1 + 0.6}  # mmdit recipe: single-stream blocks are `fused` sites


@dataclass
class ToCaConfig(CacheConfig):
    """Attributes (null: the model's official value, `conf/model_method/<model>_toca.yaml`, else DiT's, `OFFICIAL`):
    N: ToCa's `fresh_threshold`: the force-step interval (DiT's DDIM-50 command uses 3).
    fresh_ratio: base share of tokens recomputed at a partial step, in (0, 1].
    score: `attention` (s1) or `random`.
    ratio_schedule: `ddim50`, `ddpm250`, `mmdit` or `constant`.
    force_schedule: `toca` (DiT's step-dependent interval, per block) or `interval` (warmup, N).
    soft_fresh_weight: weight of the staleness score s3 (lambda_3).
    spatial_bonus: s4's bonus for the top token of each 2x2 patch (0 turns s4 off).
    seed: seed of the `random` score's generator (reset at every generation).
    """

    OFFICIAL: ClassVar[dict] = {"fresh_ratio": 0.07, "score": "attention", "ratio_schedule": "ddim50",
                                "force_schedule": "toca", "soft_fresh_weight": 0.25, "spatial_bonus": 0.6}
    CHOICES: ClassVar[dict] = {"score": ("attention", "random"), "ratio_schedule": ("ddim50", "ddpm250", "mmdit",
                                                                                    "constant"),
                               "force_schedule": ("toca", "interval")}
    name: str = "toca"
    N: int = 3
    fresh_ratio: Optional[float] = None
    score: Optional[str] = None
    ratio_schedule: Optional[str] = None
    force_schedule: Optional[str] = None
    soft_fresh_weight: Optional[float] = None
    spatial_bonus: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for knob, value in self.OFFICIAL.items():
            if getattr(self, knob) is None:
                setattr(self, knob, value)
        if not 0.0 < self.fresh_ratio <= 1.0:
            raise ValueError(f"cache.fresh_ratio={self.fresh_ratio}: the share of tokens recomputed at a partial step "
                             "must be in (0, 1] (ToCa's default is 0.07; 1 recomputes every token).")
        for knob, allowed in self.CHOICES.items():
            if getattr(self, knob) not in allowed:
                raise ValueError(f"cache.{knob}={getattr(self, knob)!r}: choose one of {', '.join(allowed)}.")
        for knob in ("soft_fresh_weight", "spatial_bonus"):
            if getattr(self, knob) < 0:
                raise ValueError(f"cache.{knob}={getattr(self, knob)} must be >= 0.")


def force_interval(N: int, s: int, T: int) -> int:
    """The interval the official DiT `force_scheduler` sets at a force step with countdown index s."""
    if int(T * 0.2) <= s < int(T * 0.4):  # "in these 20% steps, the model is extremely sensitive for cache"
        return 2
    return int(torch.round(N / torch.tensor(1 + 0.4 - 2 * 0.4 * s / T)))  # float32, as the official code


@lru_cache(maxsize=None)
def step_kinds(N: int, T: int, schedule: str, pattern: str, warmup: int) -> tuple[tuple[str, str], ...]:
    """Per step in sampling order, the kind of the first block and of the others: `F` force, `C` conservative
    (ToCa's partial step), `A` aggressive (DuCa: the block stack's output reused). `pattern` orders the cached
    steps: `countdown` (C when the steps left to the next force step are odd, the official DuCa-DiT rule), or a
    string of C/A repeated after each force step (ToCa: `C`)."""
    kinds, interval, last = [], N, 0
    for i in range(T):
        s = T - 1 - i  # the official DiT code counts steps down
        step = []
        for block in (0, 1):
            if schedule == "toca":
                full, left = N == 1 or i == 0 or s % interval == 0, s % interval
            else:
                full = i < warmup or (i - warmup) % N == 0
                left = N - (i - warmup) % N
            kind = "F" if full else "C" if pattern == "C" else ("CA"[left % 2 == 0] if pattern == "countdown"
                                                               else pattern[(i - last - 1) % len(pattern)])
            if kind == "F" and block == 0 and schedule == "toca":
                interval = force_interval(N, s, T)  # `force_init` at the first block resets it
            step.append(kind)
        last = i if step[0] == "F" else last
        kinds.append(tuple(step))
    return tuple(kinds)


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
    pattern = "C"  # every cached step is a partial one

    def reset(self) -> None:
        self.cache: dict[SiteKey, _SiteCache] = {}
        self.generator = torch.Generator().manual_seed(self.cfg.seed)

    def kinds(self, step: Step) -> tuple[str, str]:
        """(first block, other blocks) kind of this step (`step_kinds`)."""
        if step.total is None and self.cfg.force_schedule == "toca":
            raise ValueError("ToCa's force schedule depends on the number of steps: pass `total`.")
        T = step.total or step.index + 1
        return step_kinds(self.cfg.N, T, self.cfg.force_schedule, self.pattern, self.cfg.warmup or 0)[step.index]

    def kind(self, key: SiteKey, step: Step) -> str:
        info = self.site_info.get(key.site)
        return self.kinds(step)[0 if info is None or info.layer[0] == 0 else 1]

    def is_full(self, index: int, total: Optional[int] = None) -> bool:
        return self.kinds(Step(index, 0.0, total)) == ("F", "F")

    def plan(self, step: Step) -> Plan:
        kinds = self.kinds(step)
        return FULL if kinds == ("F", "F") else PARTIAL if "C" in kinds else FORECAST

    def computes(self, key: SiteKey, step: Step, plan: Plan) -> bool:
        return plan.full or self.kind(key, step) == "F"

    def wants_attention(self, step: Step) -> bool:
        return self.cfg.score == "attention" and self.cfg.N > 1

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        age = torch.zeros(features.shape[:2], dtype=torch.int32, device=features.device)
        self.cache[key] = _SiteCache(features, age)

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        return self.cache[key].value

    def fresh_ratio(self, step: Step, tokens: Tokens) -> float:
        """r of the site at this step (`ratio_schedule`), before the clamp to [0, 1]."""
        recipe = self.cfg.ratio_schedule
        if recipe == "constant":
            return self.cfg.fresh_ratio
        if recipe == "mmdit":  # FLUX/HunyuanVideo: no step factor; layer over a hard-coded 27 whatever the depth
            stream = STREAM_FACTOR["single" if tokens.role == "fused" else "double"]
            return self.cfg.fresh_ratio * (1 + 0.5 - 2 * 0.5 * tokens.layer / 27) * stream
        step_weight, layer_weight = RECIPES[recipe]
        T = step.total or step.index + 1
        s = T - 1 - step.index
        step_factor = 1 + step_weight - 2 * step_weight * s / T
        layer_factor = 1 + layer_weight - 2 * layer_weight * tokens.layer / max(tokens.layers - 1, 1)
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
        if key not in self.cache:
            return None
        ratio = torch.clamp(torch.tensor(self.fresh_ratio(step, tokens)), 0.0, 1.0)  # float32, as the official code
        k = int(ratio * tokens.count)
        age = self.cache[key].age
        if k == 0:  # no token recomputed, every one a step staler
            age += 1
            return None
        indices = torch.topk(self.scores(key, tokens), k, dim=1).indices  # (B, k)
        age += 1
        age.scatter_(1, indices, 0)
        return indices

    def update_tokens(self, key: SiteKey, step: Step, indices: Tensor, features: Tensor) -> Tensor:
        c = self.cache[key]
        if not c.owned:
            c.value, c.owned = c.value.clone(), True
        c.value.scatter_(1, token_index(indices, features.shape), features.to(c.value.dtype))
        return c.value
