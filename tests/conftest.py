"""Shared fixtures: Hydra composition (as the lightning-hydra-template's conftest does) and tiny models."""

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

import foca_bench.config  # noqa: F401  (schemas)
from foca_bench import REPO_DIR

CONF_DIR = str(REPO_DIR / "conf")
# A random-weight DiT with toy_dit's interface (16x16, 10 classes) at one block: seconds on a CPU.
TINY = ("model.weights=random", "model.arch.num_layers=2", "model.arch.num_attention_heads=2",
        "model.arch.attention_head_dim=16")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def cfg_factory():
    return make_cfg
