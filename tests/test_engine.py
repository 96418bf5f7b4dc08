"""The caching engine on tiny random-weight diffusers DiTs: skipping, exactness, reset, hooks, replay parity."""

import tempfile
from pathlib import Path

import pytest
import torch

import methods
from foca_bench.adapters import build_adapter
from foca_bench.config import validate
from foca_bench.hooks import CacheEngine
from methods import replay
from tests.conftest import TINY, write_router

STEPS = 10


def generate(adapter, name, labels=(1, 7), seeds=(0, 1), trace=False, **cache):
    method = methods.build({"name": name, "warmup": 1, **cache})
    with CacheEngine(method, adapter.sites(), trace=trace) as engine:
        out = adapter.generate(engine, adapter.make_noise(list(seeds)), STEPS, 3.0, class_labels=torch.tensor(labels))
        return out, engine


# the setting that computes every step: N=1 for interval methods, threshold 0 for TeaCache, L2C, alpha 0 for SmoothCache
EXACT = {"teacache": {"l": 0.0, "coefficients": [1.0, 0.0]}, "diffusers_fbcache": {"threshold": 0.0},
         "diffusers_magcache": {"max_skip_steps": 0, "mag_ratios": [1.0] * STEPS, "steps": STEPS},
         "smoothcache": {"alpha": 0.0, "errors": {"attn": [[0.0] * (STEPS - 1)], "mlp": [[0.0] * (STEPS - 1)]}},
         "l2c": {"threshold": 0.0, "router_path": write_router(Path(tempfile.mkdtemp()) / "router.pt",
                                                                 torch.full((STEPS, 4), -5.0))},
         "diffusers_fastercache": {"N": 1, "uncond_N": 1},  # FasterCache also skips the uncond half every uncond_N-th
         # cache-dit: threshold 0 caches nothing; its default 8 always-computed leading blocks exceed the tiny DiT's 2
         **{name: {"threshold": 0.0, "Fn": 1} for name in ("dbcache", "cachedit_taylorseer", "cachedit_foca")}}


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_n1_equals_none_exactly(per_step_adapter, name):
    """Per-step conditioning on both sides: methods that skip whole blocks (reuse, teacache, delta_dit) take that
    path anyway, and the precomputed table rounds differently (test_precomputed_conditioning_...)."""
    adapter = per_step_adapter
    reference, _ = generate(adapter, "none")
    out, engine = generate(adapter, name, **EXACT.get(name, {"N": 1}))
    assert engine.full_steps == STEPS
    if set(methods.get(name).roles) & {"model", "blocks", "block"}:  # per-step conditioning: its own rounding
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(out, reference)


@pytest.mark.parametrize("name", ["fora", "taylorseer", "foca"])
def test_skipped_steps_do_not_run_attention_or_mlp(adapter, name):
    calls = {"attn": 0, "mlp": 0}
    block = adapter.transformer.transformer_blocks[0]
    hooks = [block.attn1.to_q.register_forward_hook(lambda *a: calls.__setitem__("attn", calls["attn"] + 1)),
             block.ff.net[0].register_forward_hook(lambda *a: calls.__setitem__("mlp", calls["mlp"] + 1))]
    try:
        _, engine = generate(adapter, name, N=3)
    finally:
        for h in hooks:
            h.remove()
    expected_full = sum(1 for i in range(STEPS) if i < 1 or (i - 1) % 3 == 0)  # 1 + ceil(9 / 3) = 4
    assert engine.full_steps == expected_full == 4
    assert calls == {"attn": expected_full, "mlp": expected_full}


def test_reuse_skips_the_whole_transformer(adapter):
    calls = []
    hook = adapter.transformer.pos_embed.register_forward_hook(lambda *a: calls.append(1))
    try:
        _, engine = generate(adapter, "reuse", N=5)
    finally:
        hook.remove()
    assert len(calls) == engine.full_steps == 1 + 2  # steps 0, 1, 6


@pytest.mark.parametrize("name", ["fora", "taylorseer", "foca", "reuse"])
def test_cached_output_differs_but_stays_close_on_the_trained_toy(toy, name):
    labels, noise = torch.tensor([3, 8]), toy.make_noise([0, 1])

    def sample(cache):
        with CacheEngine(methods.build({**cache, "warmup": 1}), toy.sites()) as engine:
            return toy.generate(engine, noise, 50, 1.5, class_labels=labels)

    reference = sample({"name": "none"})
    rel = ((sample({"name": name, "N": 3}) - reference).norm() / reference.norm()).item()
    assert 0.0 < rel < 0.1


def test_same_seed_twice_is_identical_and_reset_survives_an_exception(adapter):
    first, _ = generate(adapter, "foca", N=4)
    second, _ = generate(adapter, "foca", N=4)
    assert torch.equal(first, second)
    method = methods.build({"name": "foca", "N": 4, "warmup": 1})
    with CacheEngine(method, adapter.sites()) as engine:
        with pytest.raises(RuntimeError):
            with engine.step(0, 999.0):
                adapter.transformer.transformer_blocks[0].attn1(torch.randn(2, 64, 32))
                raise RuntimeError("interrupted mid-generation")
        assert method.state  # stale state left behind by the interrupted call ...
        again = adapter.generate(engine, adapter.make_noise([0, 1]), STEPS, 3.0, class_labels=torch.tensor([1, 7]))
    assert torch.equal(again, first)  # ... is cleared by the reset at the start of the next generation


def test_hooks_are_removed_on_exit(adapter):
    _, engine = generate(adapter, "foca", N=3)
    for site in engine.sites:
        assert "forward" not in site.module.__dict__


def test_a_second_engine_on_the_same_model_is_refused_and_leaves_nothing_behind(adapter):
    with CacheEngine(methods.build({"name": "fora", "N": 2}), adapter.sites()):
        other = CacheEngine(methods.build({"name": "foca", "N": 2}), adapter.sites())
        with pytest.raises(RuntimeError, match="already hooked"):
            other.__enter__()
        assert other._installed == []
    assert all("forward" not in s.module.__dict__ for s in adapter.sites())


def test_batch_composition_does_not_change_a_sample(adapter):
    pair, _ = generate(adapter, "foca", labels=(1, 7), seeds=(0, 1), N=3)
    alone, _ = generate(adapter, "foca", labels=(7,), seeds=(1,), N=3)
    torch.testing.assert_close(alone[0], pair[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cache", [dict(name="foca", N=3), dict(name="foca", N=4, slope="local", time="sigma"),
                                   dict(name="foca", N=5, corrector="none"), dict(name="foca", N=5, reading="cachedit"),
                                   dict(name="foca", N=4, reading="lab"), dict(name="taylorseer", N=3, O=2),
                                   dict(name="fora", N=3)])
def test_replay_reproduces_live_generation_exactly(adapter, cache):
    """A site's live values (computed at full steps, forecast otherwise) are exactly what replay returns."""
    name = cache.pop("name")
    _, engine = generate(adapter, name, trace=True, **cache)
    trace = engine.trace_tensors()
    sites = [k for k in trace if "/" in k]
    assert len(sites) == 2 * len(adapter.transformer.transformer_blocks)
    for site in sites:
        values = trace[site]  # (T, 2B, S, D)
        assert values.shape[0] == STEPS
        out = replay(name, values, trace["times"], trace["full"], warmup=1, **{"time": "step", **cache})
        assert torch.equal(out, values), site


def test_named_cfg_contexts_keep_separate_caches(adapter):
    """Separate cond/uncond passes get separate state (later models run CFG as two passes)."""
    method = methods.build({"name": "fora", "N": 2, "warmup": 0, "anchor": "first"})  # step 1 skipped
    attn = adapter.transformer.transformer_blocks[0].attn1
    x_cond, x_uncond = torch.randn(1, 64, 32), torch.randn(1, 64, 32)
    with CacheEngine(method, adapter.sites()) as engine:
        engine.reset()
        with engine.step(0, 1.0):
            with engine.context("cond"):
                a = attn(x_cond)
            with engine.context("uncond"):
                b = attn(x_uncond)
        with engine.step(1, 0.5):
            with engine.context("cond"):
                assert torch.equal(attn(torch.zeros_like(x_cond)), a)
            with engine.context("uncond"):
                assert torch.equal(attn(torch.zeros_like(x_uncond)), b)


@pytest.mark.parametrize("cache", [dict(name="foca", N=3), dict(name="taylorseer", N=4), dict(name="fora", N=2)])
def test_feeder_elision_is_bit_identical(adapter, cache):
    """Skipping the LayerNorm+modulation that only feeds a skipped site changes nothing."""
    outs = []
    for elide in (True, False):
        with CacheEngine(methods.build({**cache, "warmup": 1}), adapter.sites(), elide_feeders=elide) as engine:
            outs.append(adapter.generate(engine, adapter.make_noise([0, 1]), STEPS, 3.0,
                                         class_labels=torch.tensor([1, 7])))
    assert torch.equal(outs[0], outs[1])


def test_feeder_stand_in_is_used_on_forecast_steps(adapter):
    """norm3 yields all tokens at full steps and the (B, 1, D) stand-in at forecast steps."""
    calls = []
    block = adapter.transformer.transformer_blocks[0]
    hook = block.norm3.register_forward_hook(lambda module, args, out: calls.append(out.shape[1]))
    try:
        _, engine = generate(adapter, "foca", N=3)
    finally:
        hook.remove()
    tokens = (16 // 2) ** 2
    assert calls.count(tokens) == engine.full_steps and calls.count(1) == STEPS - engine.full_steps


def _block_runs(adapter, cache: dict):
    """The steps at which each of the tiny DiT's two blocks ran its attention, and the engine, for one generation."""
    blocks = adapter.transformer.transformer_blocks
    runs = {0: [], 1: []}
    step = {"i": -1}
    hooks = [blocks[j].attn1.register_forward_hook(lambda *a, j=j: runs[j].append(step["i"])) for j in (0, 1)]
    method = methods.build(cache)
    original = method.plan
    method.plan = lambda s: (step.__setitem__("i", s.index), original(s))[1]
    try:
        with CacheEngine(method, adapter.sites()) as engine:
            adapter.generate(engine, adapter.make_noise([0, 1]), STEPS, 3.0, class_labels=torch.tensor([1, 7]))
    finally:
        for h in hooks:
            h.remove()
    return runs, engine


def test_delta_dit_skips_the_rear_blocks_early_and_the_front_blocks_late(adapter):
    """Tiny model, 2 blocks, one cached per range: steps 0 and 3 full (N=3), boundary at step 5 of 10."""
    runs, engine = _block_runs(adapter, {"name": "delta_dit", "N": 3, "warmup": 0, "boundary": 5})
    full = [0, 3, 6, 9]
    assert runs[0] == sorted(set(full) | {1, 2, 4})  # front block runs before the boundary
    assert runs[1] == sorted(set(full) | {5, 7, 8})  # rear block runs from the boundary on
    assert engine.full_steps == len(full)


def test_delta_dit_pattern_dr_alternates_a_delta_step_and_a_step_that_runs_no_block(adapter):
    """`cache.pattern=DR` (the FLUX code behind the paper's Table 1 Δ-DiT N=3): after each full step a Δ-Cache step
    (the rear block cached, the front one runs), then a step at which no block runs, repeated."""
    runs, engine = _block_runs(adapter, {"name": "delta_dit", "N": 4, "warmup": 0, "boundary": 99, "pattern": "DR"})
    full = [0, 4, 8]  # cached steps after each: D, R, D
    assert runs[0] == sorted(set(full) | {1, 3, 5, 7, 9})
    assert runs[1] == full


def test_delta_dit_adds_the_stored_residual_to_the_fresh_input(adapter):
    """A cached block returns its current input plus (output - input) of the last full step, not its old output."""
    calls = []
    hook = adapter.transformer.transformer_blocks[0].register_forward_hook(
        lambda module, args, out: calls.append((args[0].clone(), out.clone())))
    method = methods.build({"name": "delta_dit", "N": 99, "warmup": 0, "blocks": 1, "boundary": 0})
    try:
        with CacheEngine(method, adapter.sites()) as engine:
            adapter.generate(engine, adapter.make_noise([0, 1]), 3, 3.0, class_labels=torch.tensor([1, 7]))
    finally:
        hook.remove()
    (in0, out0), (in1, out1), (in2, out2) = calls  # step 0 full; steps 1, 2 cache block 0 (the front range)
    assert not torch.equal(in1, in0)
    torch.testing.assert_close(out1, in1 + (out0 - in0), rtol=0, atol=1e-6)
    torch.testing.assert_close(out2, in2 + (out0 - in0), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def per_step_adapter():
    from tests.conftest import make_cfg

    cfg = make_cfg(*TINY, "model.precompute_conditioning=false")
    validate(cfg)
    return build_adapter(cfg.model, "cpu")


@pytest.mark.parametrize("cache", [dict(name="none"), dict(name="foca", N=3), dict(name="teacache", l=0.1)])
def test_precomputed_conditioning_equals_the_per_step_path(adapter, per_step_adapter, cache):
    """Batched embeddings and modulations per generation give the per-step path's samples, to the rounding of
    the batched matrix products (~1e-7 relative per step, grown to ~1e-5 over a cached trajectory)."""
    assert adapter.cfg.precompute_conditioning and not per_step_adapter.cfg.precompute_conditioning
    extra = {"coefficients": [1.0, 0.0]} if cache["name"] == "teacache" else {}
    outs = [generate(a, **cache, **extra)[0] for a in (adapter, per_step_adapter)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_precomputed_conditioning_runs_each_embedding_once_and_is_removed(adapter, per_step_adapter, monkeypatch):
    from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings

    calls = []
    original = CombinedTimestepLabelEmbeddings.forward
    monkeypatch.setattr(CombinedTimestepLabelEmbeddings, "forward",
                        lambda self, t, labels, hidden_dtype=None: calls.append(t.shape[0]) or original(
                            self, t, labels, hidden_dtype=hidden_dtype))
    layers = adapter.transformer.config.num_layers
    generate(adapter, "foca", N=3)
    assert calls == [STEPS * 4] * layers  # one (steps x CFG batch) call per block; final layer reuses block 0's
    calls.clear()
    generate(per_step_adapter, "foca", N=3)
    assert calls == [4] * (STEPS * layers)  # per step: every block once, the final layer reusing block 0's
    emb = adapter.transformer.transformer_blocks[0].norm1.emb
    assert "forward" not in emb.__dict__  # the class's forward again after generation
    calls.clear()
    emb(torch.tensor([3, 3]), torch.tensor([1, 2]))  # a call outside generation computes
    assert calls == [2]


@pytest.mark.parametrize("cache,tensors_per_site", [
    (dict(name="fora", N=3), 1),          # the last full value
    (dict(name="taylorseer", N=3, O=2), 3),  # factors of order 0..2
    (dict(name="foca", N=3), 3),          # F_b, the point before it, D_full
    (dict(name="foca", N=3, reading="cachedit"), 3),  # the same three, D undivided
    (dict(name="abcache", N=3, k=3), 3),  # the last k values
    (dict(name="none"), 0),
])
def test_cache_bytes_peak_counts_the_tensors_each_method_keeps_per_site(adapter, cache, tensors_per_site):
    """Tiny DiT, CFG batch 4, 64 tokens of width 32, float32: 32 KiB per cached tensor; 2 blocks x (attn, mlp)."""
    method = methods.build({"warmup": 1, **cache})
    with CacheEngine(method, adapter.sites(), measure_cache=True) as engine:
        adapter.generate(engine, adapter.make_noise([0, 1]), STEPS, 3.0, class_labels=torch.tensor([1, 7]))
    per_tensor, sites = 4 * 64 * 32 * 4, 2 * 2
    assert engine.cache_bytes_peak == tensors_per_site * sites * per_tensor


@pytest.mark.parametrize("name", ["foca", "taylorseer", "fora", "teacache", "toca"])
def test_cache_dtype_stores_features_at_that_precision_and_gives_them_back_in_the_models(adapter, name):
    """cache.dtype=float16 on a float32 model: the cached features take half the bytes (TeaCache's signal and
    ToCa's token bookkeeping are not features and stay as they are), outputs stay float32, close to a float32
    cache."""
    knobs = {"coefficients": [1.0, 0.0], "l": 0.3} if name == "teacache" else {}
    cache = {"name": name, "N": 3, "warmup": 1, **knobs}

    def run(dtype):
        method = methods.build({**cache, "dtype": dtype})
        with CacheEngine(method, adapter.sites(), measure_cache=True) as engine:
            out = adapter.generate(engine, adapter.make_noise([0, 1]), STEPS, 3.0, class_labels=torch.tensor([1, 7]))
        return out, engine.cache_bytes_peak

    full, full_bytes = run(None)
    half, half_bytes = run("float16")
    assert half.dtype == full.dtype == torch.float32
    features, other = 2 * (full_bytes - half_bytes), 2 * half_bytes - full_bytes  # full = F + X, half = F / 2 + X
    assert features > 0 and (other == 0 if name in ("foca", "taylorseer", "fora") else 0 <= other <= features)
    assert not torch.equal(half, full) and ((half - full).norm() / full.norm()) < 1e-2


def test_a_null_cache_dtype_leaves_run_ids_unchanged(cfg_factory):
    from foca_bench.identity import identity

    cfg = cfg_factory("method=foca")
    assert "dtype" not in identity(cfg, validate(cfg))["cache"]
    cfg = cfg_factory("method=foca", "cache.dtype=bfloat16")
    assert identity(cfg, validate(cfg))["cache"]["dtype"] == "bfloat16"
