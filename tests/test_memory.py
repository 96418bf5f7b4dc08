"""The memory plan (foca_bench/memory.py) against what runs hold, and `model.offload=model` (issue 17).

The feature cache's closed form is sites x tensors x size x dtype: FoCa holds three tensors per (site, branch)
(its anchors F_b, P, D). A tiny FLUX run's measured `cache_bytes_peak` gives the tensors per site; the plan of the
real FLUX.1-dev at 1024x1024 in bf16 must be that count times its own sites' sizes.
"""

import logging
import math

import pytest
import torch

from foca_bench.adapters import build_adapter
from foca_bench.config import compose, validate
from foca_bench.memory import MemoryPlanError, _meta_adapter, plan_run, site_shapes
from foca_bench.generation import generate_examples

TINY = ["model=flux", "model.size=tiny", "method=foca", "cache.N=3", "sampler.steps=8", "profile.latency=false",
        "benchmark.batch_size=2", "device=cpu"]


def _cfg(*overrides):
    cfg = compose(*overrides)
    return cfg, validate(cfg)


def _generate(adapter, cache, cfg, measure_cache=False):
    """Two samples (seeds 0 and 1) on the adapter's example conditions, and the engine's stats."""
    stats: dict = {}
    return generate_examples(adapter, cache, cfg.sampler, 2, stats=stats, measure_cache=measure_cache), stats


def _site_elements(cfg, cache, batch):
    """Sum over the method's (site, branch) values of their element counts, from a meta forward."""
    adapter = _meta_adapter(cfg.model)
    shapes = site_shapes(adapter.sites(), cache, lambda e: adapter.generate(
        e, adapter.make_noise(list(range(batch))), 1, cfg.sampler.guidance_scale, None,
        **adapter.example_conditions(batch)))
    return sum(math.prod(shape) for shape, _ in shapes.values.values())


def test_plan_equals_a_tiny_flux_run_and_the_closed_form():
    cfg, cache = _cfg(*TINY, "cache.dtype=bfloat16")
    plan = plan_run(cfg, cache, "cpu", samples=2)
    adapter = build_adapter(cfg.model, "cpu")
    _, stats = _generate(adapter, cache, cfg, measure_cache=True)
    assert plan.cache == stats["cache_bytes_peak"] > 0
    assert stats["cache_bytes_peak"] == 3 * _site_elements(cfg, cache, 2) * 2  # FoCa: 3 tensors x bf16
    assert plan.weights == sum(p.numel() for p in adapter.transformer.parameters()) * 4  # float32, random weights


def test_a_plan_that_does_not_fit_names_what_would():
    cfg, cache = _cfg(*TINY)  # float32 cache
    plan = plan_run(cfg, cache, "cpu", samples=2)
    cfg.model.memory_budget_gb = (plan.device_bytes() - plan.cache // 4) / 1e9  # a bf16 cache fits, float32 not
    with pytest.raises(MemoryPlanError, match=r"(?s)memory plan.*Nothing was loaded.*These fit:.*cache\.dtype=bfloat16"):
        plan_run(cfg, cache, "cpu", samples=2)


def test_model_offload_keeps_the_samples_and_hooks_accelerate():
    images = {}
    for offload in ("none", "model"):
        cfg, cache = _cfg(*TINY, f"model.offload={offload}", "sampler.steps=4")
        adapter = build_adapter(cfg.model, "cpu")
        assert (getattr(adapter.transformer, "_hf_hook", None) is not None) == (offload == "model")
        images[offload], _ = _generate(adapter, cache, cfg)
    assert torch.equal(images["none"], images["model"])


@pytest.mark.slow
def test_flux_1024_bf16_foca_plan_scales_the_tiny_run(caplog):
    """The real FLUX.1-dev architecture at 1024x1024, bf16, FoCa, on an H200's 141 GB (a meta forward, ~20 s): the
    plan's cache equals the tiny run's measured tensors per site times FLUX's site sizes: 57 sites of 4608 tokens
    (19 double blocks' joint attention, 38 single blocks) and 19 x (4096 + 512) MLP tokens, width 3072: 6.455 GB."""
    cfg, cache = _cfg(*TINY, "cache.dtype=bfloat16")
    adapter = build_adapter(cfg.model, "cpu")
    _, stats = _generate(adapter, cache, cfg, measure_cache=True)
    per_site = stats["cache_bytes_peak"] / (_site_elements(cfg, cache, 2) * 2)
    assert per_site == 3
    full, foca = _cfg("model=flux", "method=foca", "cache.N=5", "cache.dtype=bfloat16", "profile.latency=false",
                      "benchmark.batch_size=1", "device=cpu", "model.weights=random", "model.memory_budget_gb=141")
    with caplog.at_level(logging.INFO, logger="foca_bench"):
        plan = plan_run(full, foca, "cpu", samples=1)
    assert plan.cache == per_site * 76 * 4608 * 3072 * 2 == 6_455_033_856
    assert plan.weights == 11_901_408_320 * 2  # FLUX.1-dev's transformer, bf16
    assert "<flux> memory plan for method=foca" in caplog.text and "feature cache 6.46 GB" in caplog.text
