"""cache-dit's own DBCache and its TaylorSeer/FoCa calibrators (`method=dbcache`, `cachedit_taylorseer`,
`cachedit_foca`; methods/cachedit.py, foca_bench/external.py), run by the real `cache-dit` package on our models.

Checked: threshold 0 equals full compute bit for bit on DiT, FLUX (both block stacks) and HunyuanVideo; generations
repeat exactly within an engine and across enable/disable cycles, which leave the model as it was (also under
cache-dit's pre-1.5.3 guard, emulated, that made a second `enable_cache` fail); cache-dit's cached steps equal an
independent emulation of DBCache's rule (vipshop/cache-dit@f86744af, src/cache_dit/caching/cache_contexts/
cache_manager.py `can_cache`/`similarity`, cache_context.py `mark_step_begin`) on the residuals it saw; the
calibrators' forecasts equal their formulas (calibrators/taylorseer.py, calibrators/foca.py) on the residuals they
were given; FLOPs of a tiny run equal full steps plus cached steps without the skipped blocks (closed form).
"""

from collections import defaultdict

import pytest
import torch

import methods
from foca_bench.adapters import build_adapter
from foca_bench.config import validate
from foca_bench.hooks import CacheEngine
from foca_bench.profiling import count_flops
from tests.conftest import TINY_MODELS, conditions, make_cfg
from tests.test_flops import analytic_site_flops

STEPS = 8
CACHE_DIT = ("dbcache", "cachedit_taylorseer", "cachedit_foca")


@pytest.fixture(scope="module")
def adapters():
    built = {}

    def get(model):
        if model not in built:
            cfg = make_cfg(*(TINY_MODELS[model] if model != "toy" else ()))
            validate(cfg)
            built[model] = (cfg, build_adapter(cfg.model, "cpu"))
        return built[model]

    return get


def generate(adapter, cfg, method, steps=STEPS, seeds=(0, 1)):
    """Images of one generation, and cache-dit's cached steps per block stack (None for our own methods)."""
    with CacheEngine(method, adapter.sites()) as engine:
        out = adapter.generate(engine, adapter.make_noise(list(seeds)), steps,
                               cfg.sampler.guidance_scale, **conditions(adapter, [1, 2][: len(seeds)]))
        cached = engine.external.cached_steps() if engine.external is not None else None
    return out, cached


def cachedit(name, steps=STEPS, **knobs):
    return methods.build({"name": name, "Fn": 1, "Bn": 0, "steps": steps, **knobs})


@pytest.mark.parametrize("model", ["toy_dit", pytest.param("flux", marks=pytest.mark.slow),
                                   pytest.param("hunyuan_video", marks=pytest.mark.slow)])
def test_threshold_zero_equals_full_compute_exactly(adapters, model):
    """(slow on FLUX and HunyuanVideo: both block stacks, cache-dit's FLUX layout and HunyuanVideo's two stacks)"""
    cfg, adapter = adapters(model)
    tree = [(name, id(m)) for name, m in adapter.transformer.named_modules()]
    if adapter.condition == "class_labels":  # external methods take DiT's per-step conditioning path (0a8affe)
        per_step = make_cfg(*TINY_MODELS[model], "model.precompute_conditioning=false")
        validate(per_step)
        reference, _ = generate(build_adapter(per_step.model, "cpu"), per_step, methods.build({"name": "none"}))
    else:
        reference, _ = generate(adapter, cfg, methods.build({"name": "none"}))
    for name in CACHE_DIT:
        out, cached = generate(adapter, cfg, cachedit(name, threshold=0.0, max_warmup_steps=0))
        assert torch.equal(out, reference), (model, name)
        assert cached and all(steps == [] for steps in cached.values())
        # one block stack (DiT; FLUX's double and single blocks as one) or two (HunyuanVideo)
        assert len(cached) == (2 if model == "hunyuan_video" else 1)
    assert all("forward" not in m.__dict__ for m in adapter.transformer.modules())
    # the same modules in the same order: cache-dit's mock.patch of FLUX's `single_transformer_blocks` re-inserts
    # it last, after which diffusers' FBCache took a double-stream block for its tail (tests/test_model_zoo.py)
    assert [(name, id(m)) for name, m in adapter.transformer.named_modules()] == tree


def test_two_generations_and_two_enable_disable_cycles_give_the_same_output(adapters, monkeypatch):
    cfg, adapter = adapters("toy")
    before = {m: set(m.__dict__) for m in adapter.transformer.modules()}
    reference, _ = generate(adapter, cfg, methods.build({"name": "none"}))
    method = cachedit("dbcache", threshold=0.2, max_warmup_steps=2)
    with CacheEngine(method, adapter.sites()) as engine:  # two generations in one engine: reset between them
        outs = [adapter.generate(engine, adapter.make_noise([0, 1]), STEPS, 1.5, **conditions(adapter, [1, 2]))
                for _ in range(2)]
        cached = engine.external.cached_steps()
    assert torch.equal(outs[0], outs[1]) and 0 < len(next(iter(cached.values()))) < STEPS - 2
    assert not torch.equal(outs[0], reference)
    # cache-dit before 1.5.3 returned early from `create_context` whenever the placeholder pipeline's class said
    # `_is_cached` (left there by the first enable), and `collect_unified_blocks` then failed: emulate that guard
    from cache_dit.caching.cache_contexts.context_manager import ContextManager

    monkeypatch.setattr(ContextManager, "_supported_managers", (object,))
    for _ in range(2):  # second and third enable/disable cycles in this process
        out, again = generate(adapter, cfg, method)
        assert torch.equal(out, outs[0]) and again == cached
    assert torch.equal(generate(adapter, cfg, methods.build({"name": "none"}))[0], reference)
    assert {m: set(m.__dict__) for m in adapter.transformer.modules()} == before  # nothing left behind

    import copy

    import cache_dit  # without the workaround the emulated guard fails as the old versions did (on a copy: the
    transformer = copy.deepcopy(adapter.transformer)  # failed enable leaves it half patched)
    cache_dit.enable_cache(transformer, cache_config=cache_dit.DBCacheConfig(Fn_compute_blocks=1))
    cache_dit.disable_cache(transformer)
    with pytest.raises(AssertionError):
        cache_dit.enable_cache(transformer, cache_config=cache_dit.DBCacheConfig(Fn_compute_blocks=1))


def _expected_cached_steps(residuals, threshold, warmup, max_cached=-1, max_continuous=-1):
    """DBCache's decision, emulated from its rule: after the warm-up, a step caches when the relative L1 change of
    the Fn residual against the one stored at the last computed step is below the threshold, within the limits."""
    cached, stored, continuous = [], None, 0
    for i, residual in enumerate(residuals):
        if cached and cached[-1] != i - 1:
            continuous = 0  # a computed step breaks the run
        ok = (i >= warmup and stored is not None and (max_cached < 0 or len(cached) < max_cached)
              and (max_continuous < 0 or continuous < max_continuous))
        if ok and ((stored - residual).abs().mean() / stored.abs().mean()).item() < threshold:
            cached.append(i)
            continuous += 1
        else:
            stored = residual
    return cached


@pytest.mark.parametrize("knobs", [
    dict(threshold=0.15, max_warmup_steps=2),
    pytest.param(dict(threshold=0.5, max_warmup_steps=1, max_continuous_cached_steps=2), marks=pytest.mark.slow),
    pytest.param(dict(threshold=0.5, max_warmup_steps=3, max_cached_steps=4), marks=pytest.mark.slow)])
def test_cached_steps_follow_dbcaches_rule_on_the_residuals_it_saw(adapters, knobs):
    """On the trained toy (smooth trajectories), the Fn block's residual recorded at every step of the cached run
    itself; cache-dit's cached steps equal the emulation's (slow: the step limits' settings)."""
    cfg, adapter = adapters("toy")
    residuals = []
    block = adapter.transformer.transformer_blocks[0]
    hook = block.register_forward_hook(lambda mod, args, out: residuals.append((out - args[0]).float()))
    try:
        _, cached = generate(adapter, cfg, cachedit("dbcache", steps=20, **knobs), steps=20)
    finally:
        hook.remove()
    (steps,) = cached.values()
    expected = _expected_cached_steps(residuals, knobs["threshold"], knobs["max_warmup_steps"],
                                      knobs.get("max_cached_steps", -1), knobs.get("max_continuous_cached_steps", -1))
    assert steps == expected and len(steps) >= 3, (steps, expected)


def _recorded_calibrator(monkeypatch, cls):
    """Records what a calibrator class is given (`update`) and what it forecasts (`approximate`), per stream."""
    calls = defaultdict(list)
    update, approximate = cls.update, cls.approximate

    def record_update(self, Y, name="default"):
        calls[name].append(("full", Y.clone()))
        return update(self, Y, name=name)

    def record_approximate(self, name="default"):
        out = approximate(self, name=name)
        calls[name].append(("forecast", out.clone()))
        return out

    monkeypatch.setattr(cls, "update", record_update)
    monkeypatch.setattr(cls, "approximate", record_approximate)
    return calls


def test_taylorseer_calibrator_forecasts_the_first_order_taylor_sum(adapters, monkeypatch):
    """cache-dit's TaylorSeer (order 1): a cached step s forecasts R_b + (R_b - R_a) / (b - a) * (s - b) from the
    last two computed steps a < b, once its state holds a difference (from its fourth step on: its step counter
    starts at -1 with the state, which is created by the first computed step)."""
    from cache_dit.caching.cache_contexts.calibrators.taylorseer import TaylorSeerCalibrator

    cfg, adapter = adapters("toy")
    calls = _recorded_calibrator(monkeypatch, TaylorSeerCalibrator)
    _, cached = generate(adapter, cfg, cachedit("cachedit_taylorseer", steps=20, threshold=0.3, max_warmup_steps=3),
                         steps=20)
    (stream,) = calls.values()
    (cached_steps,) = cached.values()
    computed = [i for i in range(20) if i not in cached_steps]
    assert [kind for kind, _ in stream] == ["forecast" if i in cached_steps else "full" for i in range(20)]
    checked = 0
    for i, (kind, value) in enumerate(stream):
        if kind != "forecast":
            continue
        a, b = [j for j in computed if j < i][-2:]
        Ra, Rb = stream[a][1], stream[b][1]
        expected = Rb + (Rb - Ra) / (b - a) * (i - b) if b - 1 > 1 else Rb
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked >= 3


def test_foca_calibrator_forecasts_by_its_heun_rule(adapters, monkeypatch):
    """cache-dit's FoCa: with F_b, F_a the last two computed values and F_k, F_km1 the last two values it used
    (computed or forecast), a cached step e steps after b forecasts F_b + e/2 (F_b - F_a + F_k - F_km1) for e <= 3,
    and beyond that the horizon-3 forecast blended toward F_b with weight 3/e."""
    from cache_dit.caching.cache_contexts.calibrators.foca import FoCaCalibrator

    cfg, adapter = adapters("toy")
    calls = _recorded_calibrator(monkeypatch, FoCaCalibrator)
    generate(adapter, cfg, cachedit("cachedit_foca", steps=20, threshold=0.5, max_warmup_steps=3), steps=20)
    (stream,) = calls.values()
    checked = 0
    for i, (kind, value) in enumerate(stream):
        full = [j for j in range(i) if stream[j][0] == "full"]
        if kind != "forecast" or len(full) < 2:
            continue
        a, b = full[-2:]
        Fa, Fb, Fk, Fkm1 = stream[a][1], stream[b][1], stream[i - 1][1], stream[i - 2][1]
        e = i - b
        heun = Fb + (min(e, 3) / 2) * (Fb - Fa + Fk - Fkm1)
        expected = heun if e <= 3 else (3 / e) * heun + (1 - 3 / e) * Fb
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked >= 3 and any(i - [j for j in range(i) if stream[j][0] == "full"][-1] > 3
                                for i, (kind, _) in enumerate(stream) if kind == "forecast")


@pytest.mark.parametrize("name", ["dbcache", *(pytest.param(n, marks=pytest.mark.slow) for n in CACHE_DIT[1:])])
def test_flops_are_full_steps_plus_cached_steps_without_the_skipped_blocks(adapters, name):
    """Tiny DiT (2 blocks, CFG batch 2), Fn=1, Bn=0: a cached step does not run block 1, whose FLOPs are its
    attention and MLP, its adaLN-Zero modulation (a D -> 6D linear per sample) and its own conditioning embedding
    (DiT's per-block CombinedTimestepLabelEmbeddings: 256-channel sinusoid -> D -> D; external methods take the
    per-step conditioning path, so a skipped block's embedding is not computed). Slow for the calibrators (their
    forecasts count no FLOPs: the same closed form)."""
    cfg, adapter = adapters("toy_dit")
    arch = dict(cfg.model.arch)
    D, batch = arch["num_attention_heads"] * arch["attention_head_dim"], 2
    block = analytic_site_flops({**arch, "num_layers": 1}, batch) + batch * 2 * D * 6 * D + batch * (2 * 256 * D + 2 * D * D)
    full_step = count_flops(lambda: generate(adapter, cfg, methods.build({"name": "none"}), steps=1, seeds=(0,)))
    result = {}

    def run():
        result["cached"] = generate(adapter, cfg, cachedit(name, threshold=0.5, max_warmup_steps=2), seeds=(0,))[1]

    flops = count_flops(run)
    (cached,) = result["cached"].values()
    assert 0 < len(cached) < STEPS
    assert flops == STEPS * full_step - len(cached) * block
