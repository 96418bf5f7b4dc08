"""Shared fixtures: Hydra composition (as the lightning-hydra-template's conftest does) and tiny models."""

import os

import pytest
import torch

import methods
from foca_bench.adapters import build_adapter
from foca_bench.config import compose, validate
from foca_bench.hooks import CacheEngine
from foca_bench.profiling import count_flops

# A random-weight DiT with toy_dit's interface (16x16, 10 classes) at two blocks: seconds on a CPU.
TINY = ("model.size=tiny",)
# The paper's models as the same diffusers classes at small width with random weights (each YAML's `tiny` block).
TINY_MODELS = {"toy_dit": TINY, "dit_xl_2": ("model=dit_xl_2", "model.size=tiny"),
               "flux": ("model=flux", "model.size=tiny"), "hunyuan_video": ("model=hunyuan_video", "model.size=tiny")}
TINY_FLUX = TINY_MODELS["flux"]
TINY_HUNYUAN = TINY_MODELS["hunyuan_video"]

torch.set_num_threads(min(2, os.cpu_count() or 1))

# figures tests measure and report (title -> {row: value}), printed after the session's results
REPORTED: dict[str, dict[str, str]] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    for title, rows in REPORTED.items():
        terminalreporter.section(title)
        width = max(map(len, rows))
        for row, value in rows.items():
            terminalreporter.write_line(f"{row:<{width}}  {value}")


def make_cfg(*overrides: str):
    return compose(*overrides)


def conditions(adapter, labels) -> dict:
    """`Adapter.generate`'s conditions for len(labels) samples: these class labels on a class-conditioned model, the
    adapter's example conditions (a prompt) on the others."""
    if adapter.condition == "class_labels":
        return {"class_labels": torch.as_tensor(labels)}
    return adapter.example_conditions(len(labels))


def write_router(path, logits: torch.Tensor) -> str:
    """An L2C router file in the official format (one logit vector per step), as `method=l2c` reads it."""
    torch.save({"routers": {f"{i}.prob": row.clone() for i, row in enumerate(logits)}}, path)
    return str(path)


@pytest.fixture
def cfg_factory():
    return make_cfg


@pytest.fixture(scope="module")
def adapter():
    """A tiny random-weight diffusers DiT (TINY) on the CPU."""
    cfg = make_cfg(*TINY)
    validate(cfg)
    return build_adapter(cfg.model, "cpu")


@pytest.fixture(scope="module")
def toy():
    """The shipped, trained toy_dit: smooth feature trajectories, unlike random weights."""
    cfg = make_cfg()
    validate(cfg)
    return build_adapter(cfg.model, "cpu")


def flops_of(adapter, cache: dict, steps: int, batch: int = 1) -> int:
    """FLOPs of one generation of `batch` samples over `steps` steps under `cache` (guidance 1.5)."""
    method = methods.build(cache)

    def go():
        with CacheEngine(method, adapter.sites()) as engine:
            adapter.generate(engine, adapter.make_noise(list(range(batch))), steps, 1.5,
                             **adapter.example_conditions(batch))

    return count_flops(go)


def step_flops(model: str) -> tuple[int, int]:
    """Counted FLOPs of one full and one skipped step of `model`'s real architecture (meta device, no weights): the
    full step alone, then a full and a FoCa-forecast step minus the full one."""
    cfg = make_cfg(f"model={model}", "profile=flops_only")
    validate(cfg)
    adapter = build_adapter(cfg.model, "cpu")
    full = flops_of(adapter, {"name": "none"}, 1)
    return full, flops_of(adapter, {"name": "foca", "N": 99, "warmup": 0}, 2) - full
