"""The two-stream (MMDiT) site map on both models that use it, FLUX and HunyuanVideo, as tiny random diffusers
transformers: exactness at N=1, closeness when cached, skipping (counted on the inner layers), partial steps, and
that every site lies on the path to the output while a deliberately dead one is caught."""

from contextlib import contextmanager

import pytest
import torch
from torch import nn

import methods
from foca_bench.adapters import build_adapter
from foca_bench.config import validate
from foca_bench.hooks import CacheEngine
from tests.conftest import TINY_MODELS, make_cfg

STEPS = 10
ENGINE_METHODS = ["fora", "taylorseer", "foca", "reuse", "toca", "duca"]


@pytest.fixture(scope="module", params=["flux", "hunyuan_video"])
def mmdit(request):
    cfg = make_cfg(*TINY_MODELS[request.param])
    validate(cfg)
    return build_adapter(cfg.model, "cpu")


def generate(adapter, cache, prompts=("a red car", "a green dog"), seeds=(0, 1), steps=STEPS):
    if cache["name"] in ("toca", "duca"):  # the official FLUX and HunyuanVideo schedule (conf/model_method/)
        cache = {"score": "random", "force_schedule": "interval", **cache}
    cache = {"warmup": 2, **cache}
    with CacheEngine(methods.build(cache), adapter.sites()) as engine:
        out = adapter.generate(engine, adapter.make_noise(list(seeds)), steps, adapter.cfg.guidance_scale,
                               prompts=list(prompts))
    return out, engine


@contextmanager
def calls_with_tokens(modules: dict[str, nn.Module]):
    """Counts each module's calls on more than one token: a wrapped site or feeder is still *called* at a skipped
    step (forward hooks fire), but on its forecast or a (B, 1, ...) stand-in."""
    calls = {k: 0 for k in modules}

    def count(key):
        def hook(module, args, out):
            calls[key] += int(args[0].shape[1] > 1)
        return hook

    hooks = [m.register_forward_hook(count(k)) for k, m in modules.items()]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def _inner_layers(adapter) -> dict[str, nn.Module]:
    double, single = adapter.transformer.transformer_blocks[0], adapter.transformer.single_transformer_blocks[-1]
    return {"attn": double.attn.to_q, "ff": double.ff.net[0], "ff_context": double.ff_context.net[0],
            "single_attn": single.attn.to_q, "single_mlp": single.proj_mlp, "single_out": single.proj_out}


@pytest.mark.parametrize("name", ENGINE_METHODS)
def test_n1_equals_none_exactly_and_caching_stays_close(mmdit, name):
    reference, _ = generate(mmdit, {"name": "none"})
    out, engine = generate(mmdit, {"name": name, "N": 1})
    assert engine.full_steps == STEPS and torch.equal(out, reference)
    cached, engine = generate(mmdit, {"name": name, "N": 3})
    assert engine.full_steps == 2 + 3  # warmup 2, then steps 2, 5, 8
    rel = ((cached - reference).norm() / reference.norm()).item()
    assert 0 < rel < 0.1, rel


def test_same_seed_twice_is_identical(mmdit):
    assert torch.equal(generate(mmdit, {"name": "foca", "N": 3})[0], generate(mmdit, {"name": "foca", "N": 3})[0])


def test_skipped_steps_run_no_attention_and_no_mlp(mmdit):
    """Neither branch of either block kind runs at a skipped step (HunyuanVideo's single-block attention stand-in
    is an (image, text) pair, FLUX's one tensor)."""
    with calls_with_tokens(_inner_layers(mmdit)) as calls:
        _, engine = generate(mmdit, {"name": "foca", "N": 3})
    assert calls == {k: engine.full_steps for k in calls} and engine.full_steps == 5


def test_partial_steps_run_only_the_token_wise_mlps(mmdit):
    """ToCa's partial steps recompute some tokens of the double blocks' MLPs; a single block's fused output is
    reused whole there, so its attention and MLP input projection do not run (their FLOPs would be wasted)."""
    layers = _inner_layers(mmdit)
    with calls_with_tokens({k: layers[k] for k in ("ff", "single_attn", "single_mlp")}) as calls:
        _, engine = generate(mmdit, {"name": "toca", "N": 3, "force_schedule": "interval", "fresh_ratio": 0.5})
    partial = STEPS - engine.full_steps
    assert engine.full_steps == 5 and calls["single_attn"] == calls["single_mlp"] == 5
    assert calls["ff"] == 5 + partial  # the MLP runs on a share of its tokens at every partial step


def _reaches_output(adapter, module: nn.Module) -> bool:
    """Whether perturbing `module`'s output changes the model's output (one full step)."""
    reference = generate(adapter, {"name": "none"}, prompts=("a red car",), seeds=(0,), steps=1)[0]
    hook = module.register_forward_hook(
        lambda m, a, out: tuple(o + 1.0 for o in out) if isinstance(out, tuple) else out + 1.0)
    try:
        perturbed = generate(adapter, {"name": "none"}, prompts=("a red car",), seeds=(0,), steps=1)[0]
    finally:
        hook.remove()
    return not torch.equal(reference, perturbed)


def test_every_cache_site_is_on_the_path_to_the_output_and_a_dead_one_is_caught(mmdit):
    for site in mmdit.sites():
        assert _reaches_output(mmdit, site.module), site.name
    # a deliberately wrong site: a module that runs inside a block but whose output nothing uses
    dead = nn.Linear(32, 32)
    hook = mmdit.transformer.transformer_blocks[0].ff.register_forward_hook(lambda m, a, out: (dead(out), None)[1])
    try:
        assert not _reaches_output(mmdit, dead)
    finally:
        hook.remove()
