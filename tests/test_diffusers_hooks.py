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
from tests.conftest import TINY, conditions, make_cfg

STEPS = 12


def _generate(adapter, method, seed=0, label=1):
    with CacheEngine(method, adapter.sites()) as engine:
        return adapter.generate(engine, adapter.make_noise([seed]), STEPS, 3.0, **conditions(adapter, [label]))


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
        # external methods take DiT's per-step conditioning path (0a8affe): the reference computes it step by step too
        per_step = make_cfg("model.precompute_conditioning=false")
        validate(per_step)
        reference = _generate(build_adapter(per_step.model, "cpu"), methods.build({"name": "none"}))
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


# -- FasterCache (`method=diffusers_fastercache`) ------------------------------------------------------------------
# N=1 with uncond_N=1 equals method=none bit for bit on every model (tests/test_model_zoo.py, EVERY_STEP), DiT's
# swapped [uncond; cond] batch included.
def _fastercache_run(adapter, cfg, steps, **knobs):
    """Per step: the batch each hooked attention's `to_q` saw (None: the attention was not computed)."""
    method = methods.build({"name": "diffusers_fastercache", **knobs})
    names = ("transformer_blocks.0.attn1", "transformer_blocks.0.attn", "single_transformer_blocks.0.attn")
    attention = [m for name, m in adapter.transformer.named_modules() if name in names]
    seen: list[dict] = []
    handles = [adapter.transformer.register_forward_pre_hook(lambda *a: seen.append({}))]
    handles += [attn.to_q.register_forward_hook(lambda mod, args, out, k=k: seen[-1].__setitem__(k, args[0].shape[0]))
                for k, attn in enumerate(attention)]
    try:
        with CacheEngine(method, adapter.sites()) as engine:
            adapter.generate(engine, adapter.make_noise([0]), steps, cfg.sampler.guidance_scale,
                             **conditions(adapter, [1]))
    finally:
        for h in handles:
            h.remove()
    return [[step.get(k) for k in range(len(attention))] for step in seen], adapter.scheduler.timesteps.tolist()


def _fastercache_expected(timesteps, batched_cfg, N=2, uncond_N=5, attention=(-1, 681), uncond=(-1, 641)):
    """diffusers' FasterCache rules, worked per step i at timestep t: the unconditional half is skipped when
    i > 0, t is in `uncond` and i % uncond_N != 0; an attention wants to skip when t is in `attention` unless
    i > 0 and i % N == 0, and (with a CFG batch) can only skip when the unconditional half was skipped."""
    out = []
    for i, t in enumerate(timesteps):
        skip_uncond = batched_cfg and i > 0 and uncond[0] < t < uncond[1] and i % uncond_N != 0
        wants_skip = attention[0] < t < attention[1] and not (i > 0 and i % N == 0)
        skip = wants_skip and (skip_uncond or not batched_cfg)
        out.append(None if skip else (1 if skip_uncond or not batched_cfg else 2))
    return out


@pytest.mark.parametrize("model", ["toy_dit", "flux"])
def test_fastercache_decisions_follow_its_rules(model):
    from tests.conftest import TINY_MODELS

    cfg = make_cfg(*TINY_MODELS[model])
    validate(cfg)
    adapter = build_adapter(cfg.model, "cpu")
    batches, timesteps = _fastercache_run(adapter, cfg, 20)
    expected = _fastercache_expected(timesteps, batched_cfg=model == "toy_dit")
    assert all(b == [expected[i]] * len(b) for i, b in enumerate(batches)), (batches, expected)
    assert None in expected and (model == "flux" or 1 in expected)  # both parts of FasterCache were exercised


def test_fastercache_flops_are_full_steps_minus_the_skipped_attentions():
    """Tiny FLUX (guidance-distilled: the attention part only), one sample: every skipped call of a double block's
    joint attention saves 8 S D^2 + 4 S^2 D (q, k, v and output projections of both streams, QK^T and AV over the
    S joint tokens), of a single block's 6 S D^2 + 4 S^2 D (no output projection: `proj_out` does it)."""
    from foca_bench.profiling import count_flops
    from tests.conftest import TINY_FLUX

    cfg = make_cfg(*TINY_FLUX)
    validate(cfg)
    adapter = build_adapter(cfg.model, "cpu")
    arch = cfg.model.arch
    D = arch.num_attention_heads * arch.attention_head_dim
    S = (cfg.model.resolution // 16) ** 2 + cfg.model.text_tokens
    double, single = 8 * S * D * D + 4 * S * S * D, 6 * S * D * D + 4 * S * S * D
    steps = 20
    full = count_flops(lambda: _generate_one(adapter, methods.build({"name": "none"}), steps))
    flops = count_flops(lambda: _generate_one(adapter, methods.build({"name": "diffusers_fastercache"}), steps))
    skipped = sum(b is None for b in _fastercache_expected(adapter.scheduler.timesteps.tolist(), batched_cfg=False))
    assert skipped > 0
    assert flops == full - skipped * (arch.num_layers * double + arch.num_single_layers * single)


def _generate_one(adapter, method, steps):
    with CacheEngine(method, adapter.sites()) as engine:
        return adapter.generate(engine, adapter.make_noise([0]), steps, 3.5, **conditions(adapter, [1]))
