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


# -- the rest of Table 1, with the settings of their row files (conf/row/table1_flux/; docs/models.md) ----------
MLP_TOKEN = 16 * 3072 ** 2  # FLOPs of one token through a FLUX.1-dev feed-forward (3072 -> 12288 -> 3072)
DOUBLE, LAYERS = 19, 57
# rows within 0.5% of the paper's FLOPs, and the rows whose gap docs/models.md explains (pinned: ours, paper)
REPRODUCED = {"fora_n4": 967.91, "fora_n7": 670.14, "delta_dit_n2": 2480.01, "delta_dit_n3": 1686.76}
GAPS = {"fora_n3": (1265.29, 1320.07), "toca_n6": (955.13, 924.30), "toca_n8": (816.93, 784.54),
        "toca_n12": (678.72, 644.70), "duca_n5": (993.82, 978.76), "duca_n7": (775.34, 760.14),
        "duca_n10": (621.27, 606.91)}


def _row_method(row):
    cfg = make_cfg("experiment=table1_flux", f"+row/table1_flux={row}", "profile=flops_only")
    return methods.build(validate(cfg))


def _partial_step(method, i, T, skipped):
    """A ToCa partial step on FLUX.1-dev: the skipped step plus the recomputed tokens of the 19 double blocks' image
    (4096 tokens) and text (512) MLPs; the single blocks' fused outputs are reused whole."""
    from methods.base import Step, Tokens

    tokens = 0
    for j in range(DOUBLE):
        for count in (4096, 512):
            tokens += min(int(method.fresh_ratio(Step(i, 0.0, T), Tokens("mlp", j, LAYERS, 1, count)) * count), count)
    return skipped + MLP_TOKEN * tokens


def compose_row(row, costs, T=50):
    """The row's FLOPs (T) from per-step costs over its schedule: full steps, and per cached step its kind."""
    method = _row_method(row)
    full, skipped, delta, none_run = costs["full"], costs["skipped"], costs.get("delta_38"), costs.get("all_skipped")
    total, last = 0, 0
    for i in range(T):
        if method.is_full(i, T):
            total, last = total + full, i
            continue
        kind = method.cfg.pattern[(i - last - 1) % len(method.cfg.pattern)] if hasattr(method.cfg, "pattern") else ""
        if method.name == "delta_dit":
            total += delta if kind == "D" else none_run
        elif method.name in ("toca", "duca") and kind != "A":
            total += _partial_step(method, i, T, skipped)
        else:
            total += skipped
    return total / 1e12


@pytest.mark.parametrize("row", ["fora_n3", "fora_n4", "fora_n7"])
def test_flux_fora_rows(flux_steps, row):
    full, skipped = flux_steps
    ours = compose_row(row, {"full": full, "skipped": skipped})
    if row in REPRODUCED:
        assert ours == pytest.approx(REPRODUCED[row], rel=5e-3)
    else:  # 17.74 full steps' worth: no whole-step schedule; FORA's own gives 17
        assert ours == pytest.approx(GAPS[row][0], abs=0.01)


@pytest.fixture(scope="module")
def flux_more_steps(flux_steps):
    """Counted FLOPs of a Δ-DiT step skipping the 38 single blocks and of one skipping all 57, and a ToCa partial
    step (meta device), checking the partial step's closed form."""
    cfg = make_cfg("model=flux", "profile=flops_only")
    validate(cfg)
    adapter = build_adapter(cfg.model, "cpu")
    full, skipped = flux_steps
    from tests.conftest import flops_of

    costs = {"full": full, "skipped": skipped}
    for blocks, key in ((38, "delta_38"), (57, "all_skipped")):
        cache = {"name": "delta_dit", "N": 99, "warmup": 0, "blocks": blocks, "boundary": 99}
        costs[key] = flops_of(adapter, cache, 2) - full
    toca = {"name": "toca", "N": 99, "warmup": 0, "fresh_ratio": 0.1, "force_schedule": "interval"}
    costs["toca_partial"] = flops_of(adapter, toca, 2) - full
    costs["toca_closed_form"] = _partial_step(methods.build(toca), 1, 2, skipped)
    return costs


@pytest.mark.slow
@pytest.mark.parametrize("row", ["delta_dit_n2", "delta_dit_n3", "toca_n6", "toca_n8", "toca_n12", "duca_n5",
                                 "duca_n7", "duca_n10"])
def test_flux_delta_dit_toca_duca_rows(flux_more_steps, row):
    """Per-step counts (three more meta-device FLUX.1-dev counts, ~1 min) composed over each row's schedule."""
    assert flux_more_steps["toca_partial"] == flux_more_steps["toca_closed_form"]
    ours = compose_row(row, flux_more_steps)
    if row in REPRODUCED:
        assert ours == pytest.approx(REPRODUCED[row], rel=5e-3)
    else:
        assert ours == pytest.approx(GAPS[row][0], abs=0.01)
