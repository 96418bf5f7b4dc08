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
from tests.conftest import REPORTED, TINY_MODELS, make_cfg, write_router

STEPS = 8
MODELS = {**TINY_MODELS, "toy_dit": ()}
# knobs a model has no calibrated value for: tiny random models get neutral ones; cache-dit's default of 8 always
# computed leading blocks exceeds the small models' stacks (2 or 4 blocks)
UNCALIBRATED = {"teacache": ("cache.coefficients=[1.0,0.0]",),
                "diffusers_magcache": ("cache.mag_ratios=[1.0,0.99,0.98,0.97,0.96,0.95,0.94,0.93]",),
                **{name: ("cache.Fn=1", "cache.max_warmup_steps=2") for name in ("dbcache", "cachedit_taylorseer",
                                                                                  "cachedit_foca")}}
# what computes every step besides N=1 (FasterCache also skips the unconditional half every uncond_N-th step)
EVERY_STEP = {"diffusers_fastercache": ("cache.uncond_N=1",)}


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


# calibrations and routers are made for one step count (the shipped ones for 50 steps): these tests bring their own
# (SmoothCache: attention reuses two steps where it can; L2C: a router written for the adapter's sites, `_router`)
def _rows(value: str, *lengths: int) -> str:
    return "[" + ",".join("[" + ",".join([value] * n) + "]" for n in lengths) + "]"


PER_STEPS = {"smoothcache": ("cache.alpha=0.2", f"++cache.errors.attn={_rows('0.1', STEPS - 1, STEPS - 2)}",
                             f"++cache.errors.mlp={_rows('0.5', STEPS - 1, STEPS - 2)}")}  # mlp: computes every step


def _config(model, method, *extra):
    cfg = make_cfg(*MODELS[model], f"method={method}", f"sampler.steps={STEPS}", *PER_STEPS.get(method, ()), *extra)
    calibrated = (REPO_DIR / "conf/model_method" / f"{model}_{method}.yaml").is_file()
    if not calibrated and method not in PER_STEPS and not extra:
        cfg = make_cfg(*MODELS[model], f"method={method}", f"sampler.steps={STEPS}", *UNCALIBRATED.get(method, ()))
    return cfg, validate(cfg)


def _router(adapter, folder):
    """An L2C router for the adapter's attention, MLP and fused sites: every other site computes at routed steps."""
    count = sum(1 for site in adapter.sites() if site.role in methods.get("l2c").roles and not site.residual)
    logits = torch.tensor([5.0, -5.0]).repeat(count)[:count].expand(STEPS, count)
    return f"cache.router_path={write_router(folder / 'router.pt', logits)}"




@pytest.mark.parametrize("method", sorted(methods.METHODS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_runs_every_method_end_to_end(adapters, model, method, tmp_path):
    cfg, cache = _config(model, "none")
    adapter = adapters(model, cfg)
    cfg, cache = _config(model, method, *([_router(adapter, tmp_path)] if method == "l2c" else []))
    images = _images(adapter, cfg, cache)
    assert images.shape[:2] == (2, 3 if model != "toy_dit" else 1)
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, _images(adapter, cfg, cache))  # reset between generations: same seeds, same output
    reference = _images(adapter, *_config(model, "none"))
    if not methods.get(method).schedule_free:  # an interval method computing every step is the uncached model
        # bit for bit on one conditioning path: methods that skip whole blocks (reuse, Delta-DiT, DuCa) take the
        # per-step one, whose embeddings round differently from the precomputed table (test_engine bounds that)
        precompute, adapter.cfg.precompute_conditioning = adapter.cfg.precompute_conditioning, False
        try:
            every = make_cfg(*MODELS[model], f"method={method}", f"sampler.steps={STEPS}", "cache.N=1",
                             *EVERY_STEP.get(method, ()))
            per_step_reference = _images(adapter, *_config(model, "none"))
            assert torch.equal(_images(adapter, every, validate(every)), per_step_reference), f"{model} x {method} at N=1"
        finally:
            adapter.cfg.precompute_conditioning = precompute
    rel = ((images - reference).norm() / reference.norm()).item()
    REPORTED.setdefault("relative error of the decoded output against method=none, "
                        f"{STEPS} steps (test_model_zoo)", {})[f"{model} x {method}"] = f"{rel:.4f}"
    assert rel < 0.25, f"{model} x {method}: relative error {rel:.3f} against method=none"
