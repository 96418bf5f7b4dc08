"""Caching methods, one per file, registered by name; plus `replay` for offline forecast-error analysis.

`@register("foca")` puts the class in `METHODS` and its config dataclass in Hydra's ConfigStore (group
`schema/method`), so `conf/method/foca.yaml` starts from that schema and every knob is addressed as `cache.*`.
Adding a method is `methods/foo.py` plus `conf/method/foo.yaml`; this package imports every module in it.
"""

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from methods._numerics import token_index
from methods.base import (DELTA, FORECAST, FULL, PARTIAL, CacheConfig, CacheMethod, FeedForward, Plan, SiteInfo,
                          SiteKey, Step, TokenLayout, Tokens, resolve)

METHODS: dict[str, type[CacheMethod]] = {}


def register(name: str) -> Callable[[type[CacheMethod]], type[CacheMethod]]:
    """Registers a method class under `name` and its config dataclass as a Hydra schema."""

    def decorate(cls: type[CacheMethod]) -> type[CacheMethod]:
        if name in METHODS:
            raise ValueError(f"Method {name!r} registered twice ({METHODS[name].__module__}, {cls.__module__}).")
        cls.name = name
        METHODS[name] = cls
        try:
            from hydra.core.config_store import ConfigStore

            ConfigStore.instance().store(group="schema/method", name=name, node=cls.config_class)
        except ImportError:  # replay works without Hydra
            pass
        return cls

    return decorate


def build(cfg: Any) -> CacheMethod:
    """Instantiates a method from its config (a config dataclass, a DictConfig or a dict with `name`)."""
    if not dataclasses.is_dataclass(cfg):
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        cfg = dict(cfg)
        cls = get(cfg["name"])
        cfg = cls.config_class(**cfg)
    return get(cfg.name)(cfg)


def get(name: str) -> type[CacheMethod]:
    if name not in METHODS:
        raise KeyError(f"Unknown caching method {name!r}; registered: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def replay(name: str, values: Tensor, times: Tensor, full: Tensor, *, role: str = "mlp",
           layer: tuple[int, int] = (0, 1), **config: Any) -> Tensor:
    """Replays a method over one site's recorded trajectory.

    Drives the same `update`/`forecast` code as live generation (through `methods.base.resolve`), with the
    schedule given by `full` instead of the method's own plan.

    Args:
        name: registered method name, e.g. "foca".
        values: the site's true trajectory, (T, ...).
        times: the scheduler's time value at each step, (T,). Used when the method's `time` is `sigma`,
            which replay selects unless `time` is given.
        full: which steps are computed, (T,) bool. For a token-wise method (ToCa, DuCa) the other steps are
            partial: `values` is (T, B, tokens, ...), and the tokens the method selects take their true values.
        role, layer: what the method knows of the site (`CacheMethod.bind`): its role and (block index, number of
            blocks), e.g. for ToCa's ratio and per-block force steps.
        **config: fields of the method's config (e.g. `slope="full"`, `O=2`).

    Returns:
        (T, ...) values the method would use at each step; equal to `values` where `full`.
    """
    if len(values) != len(times) or len(values) != len(full):
        raise ValueError(f"values, times and full must have the same length, got {len(values)}, "
                         f"{len(times)}, {len(full)}.")
    if not bool(full[0]):
        raise ValueError("full[0] must be True: the first step of a trajectory is always computed.")
    cls = get(name)
    config.setdefault("time", "sigma")
    method = cls(cls.config_class(name=name, **config))
    method.bind({"replay": SiteInfo(role, layer)})
    method.reset()
    key = SiteKey("replay")
    T = len(values)

    def partial(v: Tensor) -> Optional[tuple[Tokens, Callable[[Tensor], Tensor]]]:
        if not method.tokenwise:
            return None
        tokens = Tokens(role, *layer, batch=v.shape[0], count=v.shape[1])
        return tokens, lambda idx: v.gather(1, token_index(idx, v.shape))

    out = [
        resolve(method, key, Step(i, float(times[i]), T), bool(full[i]), lambda v=values[i]: v,
                None if bool(full[i]) else partial(values[i])).clone()
        for i in range(T)  # clone: a forecast is only valid until the next step
    ]
    return torch.stack(out)


for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "DELTA", "FULL", "FORECAST", "PARTIAL", "CacheConfig", "CacheMethod", "FeedForward", "Plan",
           "SiteInfo", "SiteKey", "Step", "TokenLayout", "Tokens", "build", "get", "register", "replay", "resolve"]
