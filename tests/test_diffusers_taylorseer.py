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
    """Our TaylorSeer on diffusers' schedule (to compare whole generations)."""

    d = 2

    def is_full(self, index: int) -> bool:
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

    method = _DiffusersSchedule(TaylorSeerConfig(N=N, O=order, warmup=_DiffusersSchedule.d, time="step"))
    with CacheEngine(method, ours_adapter.sites()) as engine:
        ours = ours_adapter.generate(engine, labels, noise, steps, 3.0)
        assert engine.full_steps == sum(diffusers_full(i, 2, N) for i in range(steps)) < steps

    apply_taylorseer_cache(theirs_adapter.transformer, TaylorSeerCacheConfig(
        cache_interval=N, disable_cache_before_step=2, max_order=order, taylor_factors_dtype=torch.float32,
        cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"]))
    # DiTTransformer2DModel has no `CacheMixin.cache_context`; this is what that context manager does
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(theirs_adapter.transformer, CacheContext("cond_uncond"))  # batched CFG: one context
    with CacheEngine(methods.build({"name": "none"}), theirs_adapter.sites()) as engine:
        theirs = theirs_adapter.generate(engine, labels, noise, steps, 3.0)

    with CacheEngine(methods.build({"name": "none"}), ours_adapter.sites()) as engine:
        uncached = ours_adapter.generate(engine, labels, noise, steps, 3.0)
    assert (ours - uncached).abs().max() > 1e-4  # the caches really forecast
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
