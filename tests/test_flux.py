"""The FLUX adapter on a tiny random diffusers FluxTransformer2DModel: its stream order and errors; and the real
FLUX.1-dev architecture's FLOPs on the meta device against the paper's Table 1 (the site map's shared checks are
in tests/test_mmdit.py)."""

import pytest
import torch

import methods
from foca_bench.adapters import build_adapter
from foca_bench.adapters.base import MissingWeightsError
from foca_bench.config import validate
from foca_bench.hooks import CacheEngine
from tests.conftest import TINY_FLUX, make_cfg, step_flops



@pytest.fixture(scope="module")
def flux():
    cfg = make_cfg(*TINY_FLUX)
    validate(cfg)
    return build_adapter(cfg.model, "cpu")


def test_joint_attention_site_packs_text_first_and_back(flux):
    site = next(s for s in flux.sites() if s.name == "blocks.0.attn")
    image, text = torch.randn(2, 16, 32), torch.randn(2, 8, 32)
    packed = site.unpack((image, text))
    assert torch.equal(packed[:, :8], text) and torch.equal(packed[:, 8:], image)
    back = site.pack(packed)
    assert torch.equal(back[0], image) and torch.equal(back[1], text)


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


# the paper's Table 1 FLOPs (T) and the full-step counts its rows imply with warmup 2 over 50 steps (FORA: its
# official FLUX schedule, i = 0 (mod N) with no warm-up; the paper's N=3 figure fits no whole number of full steps
# and its N=7 one 9 full steps, where that schedule computes 8)
TABLE1 = [("FLUX.1[dev] 50 steps", 50, 0, 3719.50), ("60% steps", 30, 0, 2231.70), ("34% steps", 17, 0, 1264.63),
          ("22% steps", 11, 0, 818.29), ("TaylorSeer N=4", 14, 36, 1042.27), ("FoCa N=5", 12, 38, 893.54),
          ("FoCa N=7", 9, 41, 670.44), ("FoCa N=8", 8, 42, 596.07), ("FORA N=4", 13, 37, 967.91)]


@pytest.mark.parametrize("row,full_steps,skipped_steps,paper", TABLE1)
def test_flux_flops_match_table_1(flux_steps, row, full_steps, skipped_steps, paper):
    full, skipped = flux_steps
    assert skipped < 0.002 * full  # a skipped step runs only modulation, embeddings and the final layer
    ours = (full_steps * full + skipped_steps * skipped) / 1e12
    assert ours == pytest.approx(paper, rel=5e-3), f"{row}: {ours:.2f} T vs paper {paper} T"


@pytest.mark.parametrize("name,N,full_steps", [("foca", 5, 12), ("foca", 7, 9), ("foca", 8, 8), ("taylorseer", 4, 14),
                                                ("fora", 3, 17), ("fora", 4, 13), ("fora", 7, 8)])
def test_flux_default_warmup_gives_table_1s_full_step_counts(name, N, full_steps):
    from foca_bench.config import schedule_full_steps

    cfg = make_cfg("model=flux", f"method={name}", f"cache.N={N}")
    cache = validate(cfg)
    assert schedule_full_steps(cache, 50) == full_steps
