"""`method=diffusers_magcache`: diffusers' MagCache hooks on our models, and our calibration of its magnitude
ratios against diffusers' own calibration mode."""

import ast

import pytest
import torch
from diffusers.hooks import MagCacheConfig, apply_mag_cache

import methods
from foca_bench.adapters import build_adapter
from foca_bench.calibrate_magcache import magnitude_ratios
from foca_bench.config import validate
from foca_bench.hooks import CacheEngine
from tests.conftest import TINY, make_cfg

STEPS = 12


def _generate(adapter, method, seed=0, label=1):
    with CacheEngine(method, adapter.sites()) as engine:
        return adapter.generate(engine, adapter.make_noise([seed]), STEPS, 3.0, class_labels=torch.tensor([label]))


def test_our_calibration_equals_diffusers_calibration_mode(capsys):
    """diffusers prints the ratios it measured when a calibration run ends; ours are computed from plain hooks."""
    cfg = make_cfg(*TINY)
    validate(cfg)
    adapter = build_adapter(cfg.model, "cpu")
    ours = magnitude_ratios(adapter, STEPS, 3.0, seeds=[0])
    apply_mag_cache(adapter.transformer, MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    capsys.readouterr()
    _generate(adapter, methods.build({"name": "none"}), seed=0, label=0)  # what magnitude_ratios ran
    printed = capsys.readouterr().out
    theirs = ast.literal_eval(printed.split("mag_ratios=...):")[1].strip().splitlines()[0])
    assert len(ours) == len(theirs) == STEPS and ours[0] == theirs[0] == 1.0
    assert ours == pytest.approx(theirs, rel=1e-5)


@pytest.fixture(scope="module")
def toy():
    cfg = make_cfg()  # the trained toy: its shipped ratios
    validate(cfg)
    return cfg, build_adapter(cfg.model, "cpu")


def test_magcache_skips_the_block_stack_within_its_threshold_and_not_in_the_retention_steps(toy):
    cfg, adapter = toy
    ratios = list(make_cfg("method=diffusers_magcache").cache.mag_ratios)  # conf/model_method/toy_dit_...
    runs = []
    hook = adapter.transformer.transformer_blocks[-1].ff.register_forward_hook(lambda *a: runs.append(1))
    try:
        reference = _generate(adapter, methods.build({"name": "none"}))
        never = {"name": "diffusers_magcache", "mag_ratios": ratios, "steps": STEPS, "max_skip_steps": 0}
        assert torch.equal(_generate(adapter, methods.build(never)), reference)
        runs.clear()
        cached = _generate(adapter, methods.build({**never, "max_skip_steps": 3, "threshold": 0.5,
                                                   "retention_ratio": 0.25}))
    finally:
        hook.remove()
    assert 3 <= len(runs) < STEPS  # the first int(0.25 * 12 + 0.5) = 3 steps always run
    assert 0 < ((cached - reference).norm() / reference.norm()).item() < 0.5
    assert all("forward" not in m.__dict__ for m in adapter.transformer.modules())  # hooks removed on exit
