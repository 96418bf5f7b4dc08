"""Model adapters: the only code that knows diffusers internals. One registry key per `conf/model/*.yaml`."""

import importlib
import pkgutil
from typing import Callable

from foca_bench.adapters.base import Adapter

ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(*names: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Registers an adapter class under one or more model names (the `conf/model/<name>.yaml` stems)."""

    def decorate(cls: type[Adapter]) -> type[Adapter]:
        for name in names:
            if name in ADAPTERS:
                raise ValueError(f"Adapter {name!r} registered twice.")
            ADAPTERS[name] = cls
        return cls

    return decorate


def build_adapter(model_cfg, device: str) -> Adapter:
    from foca_bench.config import sized

    model_cfg = sized(model_cfg)
    if model_cfg.name not in ADAPTERS:
        raise KeyError(f"No adapter for model {model_cfg.name!r}; registered: {', '.join(sorted(ADAPTERS))}.")
    return ADAPTERS[model_cfg.name](model_cfg, device)


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
