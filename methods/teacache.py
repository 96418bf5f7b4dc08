"""TeaCache (arXiv:2411.19108): reuse of the whole block stack's residual, decided per step from the change of
the first block's modulated input.

At every step the adapter hands the method the first block's modulated input x_i (adaLN-modulated hidden states
before attention; a few small ops). With the relative L1 change r_i = mean|x_i - x_{i-1}| / mean|x_{i-1}|, the
method accumulates the polynomially rescaled estimate of the output change, A += max(0, p(r_i)), with p from
`cache.coefficients` (highest degree first, as `numpy.polyval`; per model: `conf/model_method/<model>_teacache.yaml`,
or fitted by `python -m foca_bench.calibrate_teacache model=...`). While A < `cache.l` the step reuses the residual
of the last computed step (output = input + residual, all blocks skipped); otherwise every block runs, the
residual is refreshed and A restarts at 0. The first step and the last step are always computed. Each site and
branch keeps its own accumulator, so separate cond/uncond passes decide separately, as TeaCache does. Under
`torch.distributed` the change is all-reduced, so every rank of a split model decides alike.

Deviation from the official code, on purpose: a negative rescaled change (a polynomial can dip below zero near
r = 0) is clipped to 0, so `cache.l=0` computes every step exactly and a larger `l` never computes more often on
the same sequence of changes.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
from torch import Tensor

from methods import register
from methods.base import CacheConfig, CacheMethod, SiteKey, Step


@dataclass
class TeaCacheConfig(CacheConfig):
    """Attributes:
    l: threshold on the accumulated rescaled relative L1 change (0: every step computed).
    coefficients: rescaling polynomial, highest degree first; empty takes the model's
        (`conf/model_method/<model>_teacache.yaml`).
    """

    name: str = "teacache"
    l: float = 0.4
    coefficients: List[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l < 0:
            raise ValueError(f"cache.l={self.l}: the TeaCache threshold must be >= 0 (0 computes every step; the "
                             "paper uses 0.4-1.2).")


@dataclass
class _State:
    previous_signal: Optional[Tensor] = None
    accumulated: float = 0.0
    residual: Optional[Tensor] = None


def relative_l1(new: Tensor, old: Tensor) -> float:
    """mean|new - old| / mean|old|, as TeaCache measures change.

    When the model is split across processes (`torch.distributed` initialised, each rank holding a shard of
    the tokens), the sums are all-reduced first, so every rank sees the change of the whole tensor and makes
    the same decision."""
    stats = torch.stack([(new - old).abs().sum(), old.abs().sum()]).double()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)  # SUM over ranks
    return float(stats[0] / stats[1].clamp_min(1e-12))


@register("teacache")
class TeaCache(CacheMethod):
    config_class = TeaCacheConfig
    roles = ("blocks",)
    schedule_free = True  # decisions come from the signal, not from N/warmup
    adaptive = True
    model_specific = ("coefficients",)
    how_to_set = "fit them with `python -m foca_bench.calibrate_teacache model=<model>`"

    def reset(self) -> None:
        self.state: dict[SiteKey, _State] = {}
        self.decisions: dict[SiteKey, list[bool]] = {}

    def rescale(self, change: float) -> float:
        """p(change), clipped at 0 (see the module docstring)."""
        if not self.cfg.coefficients:
            raise ValueError(f"TeaCache needs rescaling coefficients (cache.coefficients=[...]); {self.how_to_set}.")
        return max(0.0, float(np.polyval(self.cfg.coefficients, change)))

    def decide(self, key: SiteKey, step: Step, signal: Tensor) -> bool:
        s = self.state.setdefault(key, _State())
        last = step.total is not None and step.index == step.total - 1
        if step.index == 0 or last or s.previous_signal is None or s.residual is None:
            full = True
        else:
            s.accumulated += self.rescale(relative_l1(signal, s.previous_signal))
            full = s.accumulated >= self.cfg.l
        if full:
            s.accumulated = 0.0
        s.previous_signal = signal
        self.decisions.setdefault(key, []).append(full)
        return full

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        self.state.setdefault(key, _State()).residual = features

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        return self.state[key].residual
