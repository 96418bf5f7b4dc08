"""Our TaylorSeer against diffusers' own implementation (`diffusers.hooks.taylorseer_cache`), an independent
implementation of the same official update.

The numerics agree to float tolerance; the schedules differ by one step, pinned exactly here: diffusers
computes steps i < d and i = d + 1 + kN (`disable_cache_before_step=d`, `cache_interval=N`) and forecasts step d
itself, while ours computes i < w and i = w + kN. With w = d + 1 the two agree except at step d.
"""

import copy

import pytest
import torch
from diffusers.hooks.taylorseer_cache import TaylorSeerCacheConfig, TaylorSeerState, apply_taylorseer_cache
from omegaconf import OmegaConf

import methods
from foca_bench.adapters import build_adapter
from foca_bench.config import validate
from foca_bench.hooks import CacheEngine
from methods.taylorseer import TaylorSeer, TaylorSeerConfig
from tests.conftest import TINY, make_cfg

T = 20


def diffusers_full(i: int, d: int, N: int) -> bool:
    """diffusers' `TaylorSeerCacheHook._measure_should_compute` (no cooldown)."""
    return i < d or (i - d - 1) % N == 0


@pytest.mark.parametrize("d,N", [(1, 3), (3, 5), (2, 4)])
def test_schedules_differ_exactly_at_diffusers_first_cached_step(d, N):
    ours = methods.build({"name": "taylorseer", "N": N, "O": 1, "warmup": d + 1})
    differ = [i for i in range(T) if ours.is_full(i) != diffusers_full(i, d, N)]
    assert differ == [d]  # diffusers forecasts step d from the d full steps before it; we compute it


@pytest.mark.parametrize("order", [0, 1, 2, 3])
@pytest.mark.parametrize("d,N", [(1, 3), (3, 5)])
def test_replay_equals_diffusers_state_on_the_same_schedule(order, d, N):
    g = torch.Generator().manual_seed(order)
    t = torch.arange(T, dtype=torch.float64)
    values = torch.sin(0.3 * t)[:, None] * torch.randn(1, 6, generator=g, dtype=torch.float64) + 0.01 * t[:, None] ** 2
    full = torch.tensor([diffusers_full(i, d, N) for i in range(T)])

    state = TaylorSeerState(taylor_factors_dtype=torch.float64, max_order=order)
    theirs = []
    for i in range(T):
        state.current_step = i
        if full[i]:
            state.update((values[i],))
            theirs.append(values[i])
        else:
            theirs.append(state.predict()[0])
    ours = methods.replay("taylorseer", values, t, full, N=N, O=order, time="step")
    torch.testing.assert_close(ours, torch.stack(theirs), rtol=1e-12, atol=1e-12)


class _DiffusersSchedule(TaylorSeer):
    """Our TaylorSeer on diffusers' schedule (to compare whole generations). diffusers' `TaylorSeerState.update`
    forms difference factors from its second update on, which is our `first_enhance=1` (our default, the official
    code's start, forms them only at full steps i > first_enhance - 2 = warmup - 1)."""

    d = 2

    def is_full(self, index: int, total=None) -> bool:
        return diffusers_full(index, self.d, self.cfg.N)


@pytest.mark.parametrize("order,N", [(1, 3), (2, 4)])
def test_whole_generation_equals_diffusers_taylorseer_cache_on_a_tiny_dit(order, N):
    """Same tiny random DiT, same seeds: our engine on `attn`/`mlp` sites vs diffusers' hooks on `attn1`/`ff`."""
    cfg = make_cfg(*TINY)
    validate(cfg)
    ours_adapter = build_adapter(cfg.model, "cpu")
    theirs_adapter = copy.deepcopy(ours_adapter)
    labels, noise = torch.tensor([1, 7]), ours_adapter.make_noise([0, 1])
    steps = 12

    method = _DiffusersSchedule(TaylorSeerConfig(N=N, O=order, warmup=_DiffusersSchedule.d, time="step", first_enhance=1))
    with CacheEngine(method, ours_adapter.sites()) as engine:
        ours = ours_adapter.generate(engine, noise, steps, 3.0, class_labels=labels)
        assert engine.full_steps == sum(diffusers_full(i, 2, N) for i in range(steps)) < steps

    apply_taylorseer_cache(theirs_adapter.transformer, TaylorSeerCacheConfig(
        cache_interval=N, disable_cache_before_step=2, max_order=order, taylor_factors_dtype=torch.float32,
        cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"]))
    # DiTTransformer2DModel has no `CacheMixin.cache_context`; this is what that context manager does
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(theirs_adapter.transformer, CacheContext("cond_uncond"))  # batched CFG: one context
    with CacheEngine(methods.build({"name": "none"}), theirs_adapter.sites()) as engine:
        theirs = theirs_adapter.generate(engine, noise, steps, 3.0, class_labels=labels)

    with CacheEngine(methods.build({"name": "none"}), ours_adapter.sites()) as engine:
        uncached = ours_adapter.generate(engine, noise, steps, 3.0, class_labels=labels)
    assert (ours - uncached).abs().max() > 1e-4  # the caches really forecast
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# -- the same through `method=diffusers_*` (foca_bench.external) -----------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    cfg = make_cfg(*TINY)
    validate(cfg)
    return build_adapter(cfg.model, "cpu")


def _per_step(adapter):
    """The same model computing DiT's conditioning step by step, the path external methods take (0a8affe): our
    methods and `none` on it are what the diffusers hooks are compared with."""
    twin = copy.copy(adapter)
    twin.cfg = OmegaConf.merge(adapter.cfg, {"precompute_conditioning": False})
    return twin


def _generate(adapter, method, steps=12):
    with CacheEngine(method, adapter.sites()) as engine:
        return adapter.generate(engine, adapter.make_noise([0, 1]), steps, 3.0, class_labels=torch.tensor([1, 7]))


def test_method_diffusers_taylorseer_equals_ours_on_its_schedule_and_resets_between_generations(tiny):
    external = methods.build({"name": "diffusers_taylorseer", "N": 3, "O": 1, "warmup": 2})
    first, second = _generate(tiny, external), _generate(tiny, external)
    assert torch.equal(first, second)  # diffusers' state is reset at every generation
    ours = _generate(_per_step(tiny), _DiffusersSchedule(TaylorSeerConfig(N=3, O=1, warmup=2, time="step",
                                                                         first_enhance=1)))
    torch.testing.assert_close(first, ours, rtol=1e-5, atol=1e-5)
    assert all("forward" not in m.__dict__ for m in tiny.transformer.modules())  # hooks removed on exit


def test_method_diffusers_fbcache_skips_the_tail_blocks_above_its_threshold():
    cfg = make_cfg()  # the trained toy: smooth trajectories
    validate(cfg)
    adapter = build_adapter(cfg.model, "cpu")
    runs = []
    hook = adapter.transformer.transformer_blocks[-1].ff.register_forward_hook(lambda *a: runs.append(1))
    try:
        reference = _generate(_per_step(adapter), methods.build({"name": "none"}), steps=20)
        exact = _generate(adapter, methods.build({"name": "diffusers_fbcache", "threshold": 0.0}), steps=20)
        assert torch.equal(exact, reference) and len(runs) == 40
        runs.clear()
        cached = _generate(adapter, methods.build({"name": "diffusers_fbcache", "threshold": 0.3}), steps=20)
    finally:
        hook.remove()
    assert len(runs) < 20  # the last block ran on fewer steps
    assert 0 < ((cached - reference).norm() / reference.norm()).item() < 0.5
