"""Learning-to-Cache (L2C; Ma et al., NeurIPS 2024, arXiv:2406.01733): a learned, input-invariant router per step
that says which attention and MLP sites compute and which reuse their output from the previous step.

As the official DiT code runs it (horseee/learning-to-cache, DiT/models/dynamic_models.py, `load_ranking` and
`forward`): with the respaced index i = T - 1 - k of sampling step k (counting down to 0 at the last step), a
step with odd i computes every site; a step with even i computes site c only if sigmoid(router_i[c]) > `threshold`
(the STE's forward) and otherwise reuses the site's output from the previous step, which a site that has none
yet computes. The sites are numbered in the order the model calls them (DiT: attention then MLP of each block,
2 x depth, the official order), and a branch (CFG context) shares its router with the others.

The router file is the official checkpoint format, `{"routers": {"<i>.prob": (C,) tensor for i in 0..T-1}, ...}`:
the official DiT routers (DiT/ckpt/DDIM50_router.pt, DDIM20_router.pt) load as they are, and
`python -m foca_bench.train_l2c` writes one for any DiT model. A record names the file and its sha256.
"""

import argparse
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from methods import register
from methods.base import FORECAST, FULL, CacheConfig, CacheMethod, Plan, SiteKey, Step

HOW_TO_TRAIN = ("train one with `python -m foca_bench.train_l2c model=<model> sampler.steps=<T>` or point "
                "cache.router_path at a router file")


@dataclass
class L2CConfig(CacheConfig):
    """Attributes:
    router_path: the router file (official format); a relative path is looked up from the working directory, then
        from the repository root. Null takes the model's (`conf/model_method/<model>_l2c.yaml`).
    threshold: a site computes at a routed step when sigmoid(router) > threshold (official DiT-XL/2 256: 0.1);
        0 computes every site.
    """

    name: str = "l2c"
    router_path: Optional[str] = None
    threshold: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"cache.threshold={self.threshold}: L2C's router threshold must be in [0, 1) (the "
                             "official DiT-XL/2 routers use 0.1; 0 computes every site).")
        if self.router_path:
            load_router(self.router_path)  # a missing or corrupt file fails here, before any weights load


def locate(path: str) -> Path:
    """`path` as given, or under the repository root when it is relative and absent from the working directory."""
    file = Path(path).expanduser()
    if not file.is_absolute() and not file.exists():
        under_repo = Path(__file__).resolve().parents[1] / file
        if under_repo.exists():
            return under_repo
    return file


@dataclass(frozen=True)
class Router:
    """A loaded router: `probs[i]` (C,) the logits of respaced step i; `file` and its `sha256`."""

    probs: tuple[Tensor, ...]
    file: Path
    sha256: str


def load_router(path: str) -> Router:
    """Reads a router file in the official format; a missing or malformed file raises ValueError naming it."""
    file = locate(path)
    if not file.is_file():
        raise ValueError(f"cache.router_path={path}: no such file ({file}); {HOW_TO_TRAIN}.")
    stat = file.stat()
    return _load(file.resolve(), stat.st_mtime_ns, stat.st_size, path)


@lru_cache(maxsize=8)
def _load(file: Path, mtime: int, size: int, path: str) -> Router:
    try:  # the official checkpoints also hold the optimizer state and argparse's Namespace of training arguments
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cache.router_path={path}: {file} is not a readable router file "
                         f"({type(err).__name__}: {str(err).splitlines()[0]}); {HOW_TO_TRAIN}.") from err
    routers = checkpoint.get("routers") if isinstance(checkpoint, dict) else None
    if not isinstance(routers, dict) or not routers:
        raise ValueError(f"cache.router_path={path}: {file} has no `routers` key holding {{'<i>.prob': tensor}} "
                         f"(the official format); {HOW_TO_TRAIN}.")
    probs = []
    for i in range(len(routers)):
        prob = routers.get(f"{i}.prob")
        if not isinstance(prob, Tensor) or prob.ndim != 1 or (probs and prob.shape != probs[0].shape):
            raise ValueError(f"cache.router_path={path}: key routers[{i}.prob] of {file} is missing or not a vector "
                             f"of one logit per site like routers[0.prob]; {HOW_TO_TRAIN}.")
        probs.append(prob.detach().float())
    return Router(tuple(probs), file, hashlib.sha256(file.read_bytes()).hexdigest())


@register("l2c")
class L2C(CacheMethod):
    config_class = L2CConfig
    schedule_free = True  # the router decides, not N/warmup
    model_specific = ("router_path",)
    how_to_set = HOW_TO_TRAIN

    def __init__(self, cfg: L2CConfig) -> None:
        super().__init__(cfg)
        self.router = load_router(cfg.router_path) if cfg.router_path else None

    def reset(self) -> None:
        self.cache: dict[SiteKey, Tensor] = {}
        self.order: dict[str, int] = {}  # site name -> router column, in the order the model computes them

    def active(self, step: Step) -> Optional[Tensor]:
        """(C,) bool: the sites that compute at a routed step; None at a full step (odd respaced index)."""
        if self.router is None:
            raise ValueError(f"method=l2c needs a router (cache.router_path); {HOW_TO_TRAIN}.")
        probs, total = self.router.probs, step.total
        if total != len(probs):
            raise ValueError(f"cache.router_path={self.cfg.router_path}: the router has {len(probs)} steps but "
                             f"sampler.steps={total}; {HOW_TO_TRAIN.replace('<T>', str(total))}.")
        i = total - 1 - step.index
        return None if i % 2 == 1 else torch.sigmoid(probs[i]) > self.cfg.threshold

    def plan(self, step: Step) -> Plan:
        active = self.active(step)
        return FULL if active is None or bool(active.all()) else FORECAST

    def computes(self, key: SiteKey, step: Step, plan: Plan) -> bool:
        if plan.full or key not in self.cache:
            return True
        active = self.active(step)
        if len(active) != len(self.order):
            raise ValueError(f"cache.router_path={self.cfg.router_path}: key routers[*.prob] has {len(active)} "
                             f"entries but this model has {len(self.order)} attention/MLP sites; {HOW_TO_TRAIN}.")
        return bool(active[self.order[key.site]])

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        self.order.setdefault(key.site, len(self.order))
        self.cache[key] = features

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        return self.cache[key]

    def provenance(self) -> dict:
        if self.router is None:
            return {}
        return {"router_path": str(self.router.file), "router_sha256": self.router.sha256}
