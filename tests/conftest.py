"""Shared fixtures: Hydra composition (as the lightning-hydra-template's conftest does) and tiny models."""

import os

import pytest
import torch

from foca_bench.config import compose
# A random-weight DiT with toy_dit's interface (16x16, 10 classes) at one block: seconds on a CPU.
TINY = ("model.weights=random", "model.arch.num_layers=2", "model.arch.num_attention_heads=2",
        "model.arch.attention_head_dim=16")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_cfg(*overrides: str):
    return compose(*overrides)


@pytest.fixture
def cfg_factory():
    return make_cfg
