"""The FLUX adapter on a tiny random diffusers FluxTransformer2DModel: sites, exactness, skipping, errors; and the
real FLUX.1-dev architecture's FLOPs on the meta device against the paper's Table 1."""

import pytest
import torch
from torch import nn

import methods
from foca_bench.adapters import build_adapter
from foca_bench.adapters.base import MissingWeightsError
from foca_bench.config import validate
from foca_bench.hooks import CacheEngine
from tests.conftest import TINY_FLUX, make_cfg, step_flops

STEPS = 10
ENGINE_METHODS = ["fora", "taylorseer", "foca", "reuse", "toca", "duca"]


@pytest.fixture(scope="module")
def flux():
    cfg = make_cfg(*TINY_FLUX)
    validate(cfg)
    return build_adapter(cfg.model, "cpu")


def generate(adapter, cache, labels=(0, 1), seeds=(0, 1)):
    cache = {"warmup": 2, "score": "random", **cache} if cache["name"] in ("toca", "duca") else {"warmup": 2, **cache}
    with CacheEngine(methods.build(cache), adapter.sites()) as engine:
        out = adapter.generate(engine, torch.tensor(labels), adapter.make_noise(list(seeds)), STEPS, 3.5)
    return out, engine


@pytest.mark.parametrize("name", ENGINE_METHODS)
def test_n1_equals_none_exactly_and_caching_stays_close(flux, name):
    reference, _ = generate(flux, {"name": "none"})
    out, engine = generate(flux, {"name": name, "N": 1})
    assert engine.full_steps == STEPS and torch.equal(out, reference)
    cached, engine = generate(flux, {"name": name, "N": 3})
    assert engine.full_steps == 2 + 3  # warmup 2, then steps 2, 5, 8
    rel = ((cached - reference).norm() / reference.norm()).item()
    assert 0 < rel < 0.1, rel


def test_same_seed_twice_is_identical(flux):
    assert torch.equal(generate(flux, {"name": "foca", "N": 3})[0], generate(flux, {"name": "foca", "N": 3})[0])


def test_skipped_steps_run_no_attention_and_no_mlp(flux):
    """Counted on the modules' inner layers, or on calls with more than one token: a wrapped site or feeder is
    still *called* at a skipped step (forward hooks fire), but returns its forecast or a (B, 1, ...) stand-in."""
    double, single = flux.transformer.transformer_blocks[0], flux.transformer.single_transformer_blocks[-1]
    calls = {k: 0 for k in ("attn", "ff", "ff_context", "single_attn", "single_mlp", "single_out")}

    def count(key):
        def hook(module, args, out):
            calls[key] += int(args[0].shape[1] > 1)
        return hook

    hooks = [double.attn.to_q.register_forward_hook(count("attn")), double.ff.net[0].register_forward_hook(count("ff")),
             double.ff_context.net[0].register_forward_hook(count("ff_context")),
             single.attn.to_q.register_forward_hook(count("single_attn")),
             single.proj_mlp.register_forward_hook(count("single_mlp")),
             single.proj_out.register_forward_hook(count("single_out"))]
    try:
        _, engine = generate(flux, {"name": "foca", "N": 3})
    finally:
        for h in hooks:
            h.remove()
    assert calls == {k: engine.full_steps for k in calls} and engine.full_steps == 5


def test_partial_steps_run_only_the_token_wise_mlps(flux):
    """ToCa's partial steps recompute some tokens of the double blocks' MLPs; a single block's fused output is
    reused whole there, so its attention and MLP input projection do not run (their FLOPs would be wasted)."""
    double, single = flux.transformer.transformer_blocks[0], flux.transformer.single_transformer_blocks[0]
    calls = {"ff": 0, "single_attn": 0, "single_mlp": 0}

    def count(key):
        def hook(module, args, out):
            calls[key] += int(args[0].shape[1] > 1)
        return hook

    hooks = [double.ff.net[0].register_forward_hook(count("ff")),
             single.attn.to_q.register_forward_hook(count("single_attn")),
             single.proj_mlp.register_forward_hook(count("single_mlp"))]
    try:
        _, engine = generate(flux, {"name": "toca", "N": 3, "force_schedule": "interval", "fresh_ratio": 0.5})
    finally:
        for h in hooks:
            h.remove()
    partial = STEPS - engine.full_steps
    assert engine.full_steps == 5 and calls["single_attn"] == calls["single_mlp"] == 5
    assert calls["ff"] == 5 + partial  # the MLP runs on a share of its tokens at every partial step


def test_joint_attention_site_packs_text_first_and_back(flux):
    site = next(s for s in flux.sites() if s.name == "blocks.0.attn")
    image, text = torch.randn(2, 16, 32), torch.randn(2, 8, 32)
    packed = site.unpack((image, text))
    assert torch.equal(packed[:, :8], text) and torch.equal(packed[:, 8:], image)
    back = site.pack(packed)
    assert torch.equal(back[0], image) and torch.equal(back[1], text)


def _reaches_output(adapter, module: nn.Module) -> bool:
    """Whether perturbing `module`'s output changes the model's output (one full forward)."""
    def run():
        with CacheEngine(methods.build({"name": "none"}), adapter.sites()) as engine:
            return adapter.generate(engine, torch.tensor([0]), adapter.make_noise([0]), 1, 3.5)

    reference = run()
    hook = module.register_forward_hook(
        lambda m, a, out: tuple(o + 1.0 for o in out) if isinstance(out, tuple) else out + 1.0)
    try:
        perturbed = run()
    finally:
        hook.remove()
    return not torch.equal(reference, perturbed)


def test_every_cache_site_is_on_the_path_to_the_output_and_a_dead_one_is_caught(flux):
    for site in flux.sites():
        assert _reaches_output(flux, site.module), site.name
    # a deliberately wrong site: a module that runs inside a block but whose output nothing uses
    dead = nn.Linear(32, 32)
    block = flux.transformer.transformer_blocks[0]
    hook = block.ff.register_forward_hook(lambda m, a, out: (dead(out), None)[1])
    try:
        assert not _reaches_output(flux, dead)
    finally:
        hook.remove()


@pytest.mark.parametrize("name,role", [("teacache", "blocks"), ("delta_dit", "block")])
def test_a_method_whose_sites_an_adapter_lacks_fails_clearly(flux, name, role):
    cache = {"name": name, "coefficients": [1.0, 0.0]} if name == "teacache" else {"name": name}
    with pytest.raises(ValueError, match="offers none"):
        CacheEngine(methods.build(cache), [s for s in flux.sites() if s.role != role])


def test_block_residual_sites_hand_both_streams_on(flux):
    """A skipped block must return the two streams in the block's own order (text first for FLUX): reading a
    block's input and packing it back gives the block's call arguments in output order."""
    site = next(s for s in flux.sites() if s.name == "blocks.0")
    image, text = torch.randn(2, 16, 32), torch.randn(2, 8, 32)
    state = site.read((), {"hidden_states": image, "encoder_hidden_states": text})
    out_text, out_image = site.pack(state)
    assert torch.equal(out_text, text) and torch.equal(out_image, image)
    assert torch.equal(site.unpack((text, image)), state)


def test_missing_weights_name_the_hub_id_and_the_key():
    cfg = make_cfg("model=flux", "model.path=/nonexistent/FLUX.1-dev")
    validate(cfg)
    with pytest.raises(MissingWeightsError) as err:
        build_adapter(cfg.model, "cpu")
    message = str(err.value)
    assert "black-forest-labs/FLUX.1-dev" in message and "model.path=" in message and "transformer/" in message


@pytest.fixture(scope="module")
def flux_steps():
    """Counted FLOPs of one full and one skipped FLUX.1-dev step at 1024x1024 (meta device, no weights)."""
    return step_flops("flux")


# the paper's Table 1 FLOPs (T) and the full-step counts its rows imply with warmup 2 over 50 steps
TABLE1 = [("FLUX.1[dev] 50 steps", 50, 0, 3719.50), ("60% steps", 30, 0, 2231.70), ("34% steps", 17, 0, 1264.63),
          ("22% steps", 11, 0, 818.29), ("TaylorSeer N=4", 14, 36, 1042.27), ("FoCa N=5", 12, 38, 893.54),
          ("FoCa N=7", 9, 41, 670.44), ("FoCa N=8", 8, 42, 596.07)]


@pytest.mark.parametrize("row,full_steps,skipped_steps,paper", TABLE1)
def test_flux_flops_match_table_1(flux_steps, row, full_steps, skipped_steps, paper):
    full, skipped = flux_steps
    assert skipped < 0.002 * full  # a skipped step runs only modulation, embeddings and the final layer
    ours = (full_steps * full + skipped_steps * skipped) / 1e12
    assert ours == pytest.approx(paper, rel=5e-3), f"{row}: {ours:.2f} T vs paper {paper} T"


@pytest.mark.parametrize("name,N,full_steps", [("foca", 5, 12), ("foca", 7, 9), ("foca", 8, 8), ("taylorseer", 4, 14)])
def test_flux_default_warmup_gives_table_1s_full_step_counts(name, N, full_steps):
    from foca_bench.config import schedule_full_steps

    cfg = make_cfg("model=flux", f"method={name}", f"cache.N={N}")
    cache = validate(cfg)
    assert schedule_full_steps(cache, 50) == full_steps
