"""Every model x every method, end to end: the paper's models on tiny random weights (`model.size=tiny`) and the
embedded toy_dit as shipped (trained; random pixel-space weights make every cache look bad). The runner's
generation loop (fresh engine state per batch, sampling, VAE decode) runs; the same seeds twice give identical
outputs; an interval method at N=1 equals `method=none` exactly; the cached output stays near the uncached one,
and the relative error is reported at the end of the test session. Adding a model YAML with a `tiny` block or a
method file extends this grid."""

import pytest
import torch

import methods
from foca_bench import REPO_DIR
from foca_bench.adapters import build_adapter
from foca_bench.config import validate
from foca_bench.generation import generate_examples
from tests.conftest import REPORTED, TINY_MODELS, make_cfg

STEPS = 8
MODELS = {**TINY_MODELS, "toy_dit": ()}
# knobs a model has no calibrated value for: tiny random models get neutral ones
UNCALIBRATED = {"teacache": ("cache.coefficients=[1.0,0.0]",),
                "diffusers_magcache": ("cache.mag_ratios=[1.0,0.99,0.98,0.97,0.96,0.95,0.94,0.93]",)}


@pytest.fixture(scope="module")
def adapters():
    built = {}

    def get(model, cfg):
        if model not in built:
            built[model] = build_adapter(cfg.model, "cpu")
        return built[model]

    return get


def _images(adapter, cfg, cache):
    return generate_examples(adapter, cache, cfg.sampler, 2)  # seeds 0 and 1, classes 0 and 1 or the example prompt


def _config(model, method):
    cfg = make_cfg(*MODELS[model], f"method={method}", f"sampler.steps={STEPS}")
    if not (REPO_DIR / "conf/model_method" / f"{model}_{method}.yaml").is_file():
        cfg = make_cfg(*MODELS[model], f"method={method}", f"sampler.steps={STEPS}", *UNCALIBRATED.get(method, ()))
    return cfg, validate(cfg)


@pytest.mark.parametrize("method", sorted(methods.METHODS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_runs_every_method_end_to_end(adapters, model, method):
    cfg, cache = _config(model, method)
    adapter = adapters(model, cfg)
    images = _images(adapter, cfg, cache)
    assert images.shape[:2] == (2, 3 if model != "toy_dit" else 1)
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, _images(adapter, cfg, cache))  # reset between generations: same seeds, same output
    reference = _images(adapter, *_config(model, "none"))
    if not methods.get(method).schedule_free:  # an interval method computing every step is the uncached model
        every = make_cfg(*MODELS[model], f"method={method}", f"sampler.steps={STEPS}", "cache.N=1")
        assert torch.equal(_images(adapter, every, validate(every)), reference), f"{model} x {method} at N=1"
    rel = ((images - reference).norm() / reference.norm()).item()
    REPORTED.setdefault("relative error of the decoded output against method=none, "
                        f"{STEPS} steps (test_model_zoo)", {})[f"{model} x {method}"] = f"{rel:.4f}"
    assert rel < 0.25, f"{model} x {method}: relative error {rel:.3f} against method=none"
