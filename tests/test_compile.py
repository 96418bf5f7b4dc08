"""model.compile: every step of a fusable method (FORA, TaylorSeer, FoCa, and any method registered later with
`fusable = True`) and of `none` runs as one compiled graph of the whole model (foca_bench/fused.py); the other
methods keep the eager engine with their sites' modules compiled regionally. Backend aot_eager here (inductor's
graph capture without code generation, seconds); the inductor path is the slow test at the end. Checked: outputs
equal eager to float tolerance, exactly one full-step and one skipped-step graph, and none compiled again in a
second generation (`error_on_recompile`)."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import methods
from foca_bench.adapters import build_adapter
from foca_bench.config import validate
from foca_bench.fused import SITE_ROLES, CompiledEngine, build_engine
from foca_bench.hooks import CacheEngine
from foca_bench.identity import identity
from methods._numerics import combine
from methods.base import SiteKey, Step
from tests.conftest import TINY, TINY_FLUX, TINY_HUNYUAN, conditions, make_cfg

STEPS = 8
FUSABLE = sorted(name for name, cls in methods.METHODS.items() if cls.fusable and set(cls.roles) <= set(SITE_ROLES))
# each fusable method at settings whose schedule has several windows in STEPS steps
SETTINGS = {"foca": [{"N": 3, "warmup": 1}, {"N": 3, "warmup": 0, "slope": "full", "time": "sigma"}],
            "taylorseer": [{"N": 3, "O": 2, "warmup": 1}], "fora": [{"N": 3, "warmup": 1}]}
CASES = [{"name": name, **knobs} for name in FUSABLE for knobs in SETTINGS.get(name, [{"N": 3, "warmup": 1}])]


def _adapter(*overrides):
    cfg = make_cfg(*overrides)
    validate(cfg)
    return build_adapter(cfg.model, "cpu"), cfg.model.guidance_scale


@pytest.fixture(scope="module")
def tiny_dit():
    return _adapter(*TINY)


def _generate(adapter, guidance, cache, seed, backend):
    labels = torch.tensor([0, 1]) % max(adapter.cfg.num_classes, 1)
    with build_engine(methods.build(cache), adapter.sites(), backend) as engine:
        out = adapter.generate(engine, adapter.make_noise([seed, seed + 1]), STEPS, guidance,
                               **conditions(adapter, labels))
    return out, engine


def _check_compiled_steps(adapter, guidance, cache, backend="aot_eager", tol=1e-5):
    torch._dynamo.reset()
    counters.clear()
    first, engine = _generate(adapter, guidance, cache, 0, backend)
    assert isinstance(engine, CompiledEngine)
    full = engine.full_steps
    assert engine.graph_steps == {"full": full, "skipped": STEPS - full} and 0 < full < STEPS
    assert counters["stats"]["unique_graphs"] == 2  # one full-step graph, one skipped-step graph
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompilation would raise
        second, _ = _generate(adapter, guidance, cache, 2, backend)
    assert counters["stats"]["unique_graphs"] == 2
    for out, seed in ((first, 0), (second, 2)):
        torch.testing.assert_close(out, _generate(adapter, guidance, cache, seed, None)[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("cache", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_every_fusable_method_runs_compiled_steps_equal_to_eager_and_never_recompiles(tiny_dit, cache):
    _check_compiled_steps(*tiny_dit, cache)


def test_compiled_steps_on_flux():
    _check_compiled_steps(*_adapter(*TINY_FLUX), {"name": "foca", "N": 3, "warmup": 1})


@pytest.mark.slow
def test_compiled_steps_on_hunyuan_video():
    """HunyuanVideo's tiny model as FLUX's above (a minute on 2 cores)."""
    _check_compiled_steps(*_adapter(*TINY_HUNYUAN), {"name": "foca", "N": 3, "warmup": 1})


def test_cuda_graph_mode_reads_held_tensors_from_static_slots_filled_once_per_window(tiny_dit, monkeypatch):
    """The `reduce-overhead` path's bookkeeping, on a CPU (aot_eager, so no CUDA graph): the forecast's tensors
    are copied into static slots once per run of skipped steps, not at every step, and the result is eager's."""
    adapter, guidance = tiny_dit
    cache = {"name": "foca", "N": 4, "warmup": 1}  # full at 0, 1, 5; skipped 2-4 and 6-7: two windows
    copies = []
    foreach_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: copies.append(len(dst)) or foreach_copy(dst, src))
    torch._dynamo.reset()
    engine = CompiledEngine(methods.build(cache), adapter.sites(), "aot_eager")
    engine.mode = "reduce-overhead"  # what `model.compile_mode=reduce-overhead` sets with inductor
    with engine:
        out = adapter.generate(engine, adapter.make_noise([0, 1]), STEPS, guidance, **conditions(adapter, [0, 1]))
    sites = len(engine.sites)
    assert copies == [3 * sites, 3 * sites]  # F_b, P, D_full of every site, at the first skipped step of each window
    torch.testing.assert_close(out, _generate(adapter, guidance, cache, 0, None)[0], rtol=1e-5, atol=1e-5)


def test_none_runs_one_graph_and_other_methods_keep_the_eager_engine_with_compiled_sites(tiny_dit):
    adapter, guidance = tiny_dit
    torch._dynamo.reset()
    counters.clear()
    out, engine = _generate(adapter, guidance, {"name": "none"}, 0, "aot_eager")
    assert engine.graph_steps == {"full": STEPS, "skipped": 0} and counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(out, _generate(adapter, guidance, {"name": "none"}, 0, None)[0], rtol=1e-5, atol=1e-5)
    teacache = {"name": "teacache", "l": 0.3, "coefficients": [1.0, 0.0]}
    out, engine = _generate(adapter, guidance, teacache, 0, "aot_eager")
    assert type(engine) is CacheEngine
    torch.testing.assert_close(out, _generate(adapter, guidance, teacache, 0, None)[0], rtol=1e-5, atol=1e-5)
    # the eager engine restores the compiled site forwards when it detaches
    assert all(getattr(s.module.__dict__.get("forward"), "foca_compiled", False)
               for s in adapter.sites() if s.role in ("attn", "mlp", "fused"))
    assert "forward" not in adapter.transformer.__dict__  # the compiled engine's model wrapper is gone


@pytest.mark.parametrize("name", FUSABLE)
def test_forecast_terms_have_a_fixed_arity_distinct_tensors_and_equal_forecast(name):
    """The contract the compiled skipped step relies on, on random features: the same number of tensors at every
    call and no tensor twice (aliased inputs would compile another graph); their combination is what `forecast`
    gives a twin instance (a method that keeps its own `forecast` must agree with its terms)."""
    cases = [c for c in CASES if c["name"] == name]
    cases += [{"name": "foca", "N": 4, "warmup": 2, "corrector": "none"}, {"name": "foca", "N": 4, "slope": "local"},
              {"name": "foca", "N": 4, "reading": "cachedit"}, {"name": "foca", "N": 4, "reading": "lab"}
              ] if name == "foca" else []
    for cache in cases:
        a, b = methods.build(cache), methods.build(cache)  # b forecasts eagerly, a states terms
        key, g, arities = SiteKey("s"), torch.Generator().manual_seed(0), set()
        for i in range(12):
            step = Step(i, 1.0 - i / 12)
            if a.is_full(i, 12):
                x = torch.randn(3, 5, generator=g, dtype=torch.float64)
                a.update(key, step, a.keep(key, x))
                b.update(key, step, b.keep(key, x))
                continue
            terms = a.forecast_terms(key, step)
            arities.add(len(terms.tensors))
            assert len({id(t) for t in terms.tensors}) == len(terms.tensors)
            torch.testing.assert_close(combine(*terms), b.forecast(key, step), rtol=1e-12, atol=1e-12)
        assert len(arities) == 1, (cache, arities)


def test_eager_runs_keep_their_run_ids():
    cfg = make_cfg("method=foca")
    assert "compile" not in identity(cfg, validate(cfg))["model"]
    cfg = make_cfg("method=foca", "model.compile=inductor", "model.compile_mode=reduce-overhead")
    assert identity(cfg, validate(cfg))["model"]["compile_mode"] == "reduce-overhead"
    with pytest.raises(ValueError, match="needs model.compile=inductor"):
        validate(make_cfg("method=foca", "model.compile=aot_eager", "model.compile_mode=reduce-overhead"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["foca", "taylorseer"])
def test_inductor_compiled_steps_on_the_trained_toy(name):
    """Inductor's C++ code generation (a minute or more on 2 cores): the trained toy_dit at batch 2, compiled steps
    equal eager to float tolerance and a second generation compiles nothing."""
    _check_compiled_steps(*_adapter(), {"name": name, "N": 4, "warmup": 1}, backend="inductor", tol=1e-4)
