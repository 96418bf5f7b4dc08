"""model.compile: the cache sites' modules run through torch.compile (backend aot_eager here: the same graph
capture as inductor without code generation), the caching logic stays eager, and nothing recompiles from step to
step or between generations; outputs equal the eager ones."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import methods
from foca_bench.adapters import build_adapter
from foca_bench.config import validate
from foca_bench.hooks import CacheEngine, compile_sites
from foca_bench.identity import identity
from tests.conftest import TINY_FLUX, make_cfg

STEPS = 8


def _generate(adapter, cache, seed):
    with CacheEngine(methods.build(cache), adapter.sites()) as engine:
        return adapter.generate(engine, adapter.make_noise([seed]), STEPS, 3.5, class_labels=torch.tensor([0]))


@pytest.mark.parametrize("cache", [{"name": "none"}, {"name": "foca", "N": 3, "warmup": 2},
                                   {"name": "teacache", "l": 0.3, "coefficients": [1.0, 0.0]}])
def test_compiled_sites_match_eager_and_never_recompile(cache):
    cfg = make_cfg(*TINY_FLUX)
    validate(cfg)
    eager = build_adapter(cfg.model, "cpu")
    compiled = build_adapter(cfg.model, "cpu")  # the same seeded weights
    torch._dynamo.reset()
    counters.clear()
    assert compile_sites(compiled.sites(), "aot_eager") > 0 and compile_sites(compiled.sites(), "aot_eager") == 0
    first = _generate(compiled, cache, 0)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompilation would raise
        second = _generate(compiled, cache, 1)
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(first, _generate(eager, cache, 0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, _generate(eager, cache, 1), rtol=1e-5, atol=1e-5)
    # the engine restores the compiled forwards when it detaches
    assert all(getattr(s.module.__dict__.get("forward"), "foca_compiled", False)
               for s in compiled.sites() if s.role in ("attn", "mlp", "fused"))


def test_eager_runs_keep_their_run_ids():
    cfg = make_cfg("method=foca")
    assert "compile" not in identity(cfg, validate(cfg))["model"]
    cfg = make_cfg("method=foca", "model.compile=inductor")
    assert identity(cfg, validate(cfg))["model"]["compile"] == "inductor"
