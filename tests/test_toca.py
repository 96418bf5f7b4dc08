"""ToCa and DuCa: the force schedule, scores and token selection against hand-derived values; partial steps on a
tiny random diffusers DiT against an independent reference; the attention probe against a closed form; FLOPs."""

import pytest
import torch
import torch.nn.functional as F

import methods
from foca_bench.adapters import build_adapter
from foca_bench.config import validate
from foca_bench.hooks import CacheEngine
from methods.base import PARTIAL, SiteKey, Step, Tokens
from methods.fora import FORA, FORAConfig
from methods.toca import spatial_bonus, step_kinds
from tests.conftest import TINY, flops_of, make_cfg

STEPS = 10


def test_force_schedule_matches_the_official_rule_worked_by_hand():
    """T=50, N=3: s = 49 - i; after each force step the interval is round(3 / (1.4 - 0.8 s / 50)), or 2 for
    s in [10, 20): 5 at s=49, so the first block is forced at s=45 (i=4), which sets 4, and 45 % 4 != 0 leaves the
    other blocks partial; s=44 is then a force step for every block; s=32 (i=17) sets 3 (32 % 3 != 0: first block
    only); from s=18 the interval is 2. (Before issue 13 the [0.2T, 0.4T) rule and the per-block decision were
    missing: 19 force steps instead of these 20 first-block and 18 all-block ones.)"""
    kinds = step_kinds(3, 50, "toca", "C", 0)
    assert [i for i, k in enumerate(kinds) if k[0] == "F"] == [0, 4, 5, 9, 13, 17, 19, 22, 25, 28, 31, 33, 35, 37, 39,
                                                               41, 43, 45, 47, 49]
    assert [i for i, k in enumerate(kinds) if k[1] == "F"] == [0, 5, 9, 13, 19, 22, 25, 28, 31, 33, 35, 37, 39, 41, 43,
                                                               45, 47, 49]
    assert all(k == ("F", "F") for k in step_kinds(1, 50, "toca", "C", 0))  # N=1 computes every step


def test_spatial_bonus_raises_the_top_token_of_each_2x2_patch():
    score = torch.arange(16.0).view(1, 16)  # 4x4 grid, row-major: patch tops are 5, 7, 13, 15
    out = spatial_bonus(score, 0.6)
    expected = score.clone()
    expected[0, [5, 7, 13, 15]] *= 1.6
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    odd = torch.rand(2, 12)  # not a square grid: unchanged
    assert torch.equal(spatial_bonus(odd, 0.6), odd)


def toca(**cfg):
    return methods.build({"name": "toca", "force_schedule": "interval", "N": 4, "warmup": 1, **cfg})


def tokens(B=4, N=16, role="mlp", layer=0, layers=1, attention=None, paired=False):
    return Tokens(role, layer, layers, batch=B, count=N, attention=attention, paired=paired)


def test_fresh_ratio_follows_tocas_layer_step_and_module_factors():
    m = toca(fresh_ratio=0.1, ratio_schedule="ddpm250")
    step = Step(index=0, t=0.0, total=50)  # countdown s = 49: step factor 1.4 - 0.8 * 49 / 50 = 0.616
    assert m.fresh_ratio(step, tokens(layer=0, layers=28)) == pytest.approx(0.1 * 1.8 * 0.616 * 2.5)
    assert m.fresh_ratio(Step(49, 0.0, 50), tokens(layer=27, layers=28)) == pytest.approx(0.1 * 0.2 * 1.4 * 2.5)
    assert m.fresh_ratio(step, tokens(role="attn")) == 0.0  # attention is reused whole at partial steps
    assert toca(fresh_ratio=0.1, ratio_schedule="constant").fresh_ratio(step, tokens(role="attn")) == 0.1
    ddim = toca(fresh_ratio=0.1)  # the default recipe, DDIM-50's: step 3 - 4 s / 50, layer 0.8 -> 1.2
    assert ddim.fresh_ratio(step, tokens(layer=0, layers=28)) == pytest.approx(0.1 * 0.8 * -0.92 * 2.5)
    assert ddim.fresh_ratio(Step(49, 0.0, 50), tokens(layer=27, layers=28)) == pytest.approx(0.1 * 1.2 * 3.0 * 2.5)
    mmdit = toca(fresh_ratio=0.1, ratio_schedule="mmdit")  # FLUX/HunyuanVideo: layer 1.5 - l / 27, double stream 0.4
    assert mmdit.fresh_ratio(step, tokens(layer=9, layers=57)) == pytest.approx(0.1 * (1.5 - 9 / 27) * 0.4)
    assert mmdit.fresh_ratio(step, tokens(role="fused", layer=27, layers=57)) == pytest.approx(0.1 * 0.5 * 1.6)


def test_a_partial_step_that_recomputes_no_token_still_ages_every_token():
    """DDIM-50's recipe is negative early (clamped to 0 tokens): the official code still counts the step in s3."""
    m = toca(fresh_ratio=0.1, score="random")
    key = SiteKey("blocks.0.mlp")
    m.update(key, Step(0, 0.0, 50), torch.randn(2, 16, 3))
    assert m.select(key, Step(1, 0.0, 50), tokens(B=2, layers=28)) is None
    assert (m.cache[key].age == 1).all()


def test_selection_staleness_and_scatter():
    """Random scores + a dominant staleness term refresh tokens round-robin; the cache holds exactly the
    recomputed rows where selected and the full step's rows elsewhere, without touching the full step's tensor."""
    m = toca(fresh_ratio=0.25, ratio_schedule="constant", score="random", soft_fresh_weight=1e6, spatial_bonus=0.0)
    key = SiteKey("blocks.0.mlp")
    full = torch.randn(4, 16, 3)
    given = full.clone()
    m.update(key, Step(0, 0.0, 8), given)
    kept = full.clone()
    refreshed = torch.zeros(4, 16, dtype=torch.int)
    chosen = {}
    for i in range(1, 5):
        idx = chosen[i] = m.select(key, Step(i, 0.0, 8), tokens())
        assert idx.shape == (4, 4) and all(len(set(row.tolist())) == 4 for row in idx)
        refreshed.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.int))
        fresh = torch.randn(4, 4, 3)
        value = m.update_tokens(key, Step(i, 0.0, 8), idx, fresh)
        expected = kept.clone()
        for b in range(4):
            expected[b, idx[b]] = fresh[b]
        assert torch.equal(value, expected)
        kept = expected
    assert torch.equal(refreshed, torch.ones_like(refreshed))  # every token once in four partial steps
    for i, idx in chosen.items():  # age: partial steps since the token was recomputed
        assert (m.cache[key].age.gather(1, idx) == 4 - i).all()
    assert torch.equal(given, full)  # the full step's own tensor was copied before the first scatter


def test_random_scores_are_shared_by_the_cfg_halves():
    m = toca(fresh_ratio=0.25, ratio_schedule="constant", score="random")
    key = SiteKey("blocks.0.mlp")
    m.update(key, Step(0, 0.0, 8), torch.randn(4, 16, 3))
    idx = m.select(key, Step(1, 0.0, 8), tokens(paired=True))
    assert torch.equal(idx[:2], idx[2:])


def test_attention_score_picks_the_most_attended_tokens():
    m = toca(fresh_ratio=0.25, ratio_schedule="constant", score="attention", spatial_bonus=0.0)
    key = SiteKey("blocks.0.mlp")
    m.update(key, Step(0, 0.0, 8), torch.randn(2, 16, 3))
    received = torch.rand(2, 16)
    idx = m.select(key, Step(1, 0.0, 8), tokens(B=2, attention=received))
    assert torch.equal(idx.sort(dim=1).values, received.topk(4, dim=1).indices.sort(dim=1).values)


# -- on a tiny random diffusers DiT -------------------------------------------------------------------------------

def generate(adapter, method, labels=(1, 7), seeds=(0, 1), engine_class=CacheEngine, **engine_kwargs):
    method = methods.build({"warmup": 1, **method}) if isinstance(method, dict) else method
    with engine_class(method, adapter.sites(), **engine_kwargs) as engine:
        out = adapter.generate(engine, adapter.make_noise(list(seeds)), STEPS, 3.0, class_labels=torch.tensor(labels))
    return out, engine


class _ReuseAttentionComputeMLP(FORA):
    """Independent reference for ToCa at fresh_ratio=1: attention reused whole, every MLP token computed (run with
    feeder elision off: the MLP's LayerNorm must run although the plan forecasts)."""

    def computes(self, key, step, plan):
        return plan.full or key.site.endswith(".mlp")


def test_full_fresh_ratio_equals_reusing_attention_and_computing_the_mlp(adapter):
    out, _ = generate(adapter, {"name": "toca", "N": 3, "fresh_ratio": 1.0, "ratio_schedule": "constant",
                                "force_schedule": "interval", "score": "random"})
    reference, _ = generate(adapter, _ReuseAttentionComputeMLP(FORAConfig(name="fora", N=3, warmup=1, anchor="first")),
                            elide_feeders=False)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


def count_calls(adapter, method):
    """([(step, tokens) of every MLP call], number of attention calls) of block 0 over a generation."""
    block = adapter.transformer.transformer_blocks[0]
    mlp, attn, current = [], [], []

    class StepEngine(CacheEngine):
        def step(self, index, t, total=None):
            current.append(index)
            return super().step(index, t, total)

    hooks = [block.ff.net[0].register_forward_hook(lambda mod, args, out: mlp.append((current[-1], args[0].shape[1]))),
             block.attn1.to_q.register_forward_hook(lambda *a: attn.append(1))]
    try:
        _, engine = generate(adapter, method, engine_class=StepEngine)
    finally:
        for h in hooks:
            h.remove()
    return mlp, len(attn), engine


def test_partial_steps_run_the_mlp_on_the_selected_tokens_only(adapter):
    tokens_per_sample = (16 // 2) ** 2
    mlp, attn, engine = count_calls(adapter, {"name": "toca", "N": 3, "fresh_ratio": 0.25, "ratio_schedule": "constant",
                                              "force_schedule": "interval", "score": "random"})
    assert engine.full_steps == attn == 4  # steps 0, 1, 4, 7; int(0.25 * 64) = 16 tokens at the others
    assert mlp == [(i, tokens_per_sample if i in (0, 1, 4, 7) else 16) for i in range(STEPS)]


def test_duca_alternates_conservative_and_aggressive_steps(adapter):
    """Full at 0, 1, 4, 7; with pattern CA the cached steps 2, 3 / 5, 6 / 8, 9 follow C, A: the MLP runs partially
    at 2, 5, 8 and no block runs at 3, 6, 9. The official DiT order (countdown: C when the steps left to the next
    force step are odd) is A, C here (2 steps left, then 1), like pattern AC."""
    duca = {"name": "duca", "N": 3, "fresh_ratio": 0.25, "ratio_schedule": "constant", "force_schedule": "interval"}
    mlp, attn, engine = count_calls(adapter, {**duca, "pattern": "CA"})
    assert attn == 4 and mlp == [(0, 64), (1, 64), (2, 16), (4, 64), (5, 16), (7, 64), (8, 16)]
    for pattern in ("AC", "countdown"):
        mlp, _, _ = count_calls(adapter, {**duca, "pattern": pattern})
        assert mlp == [(0, 64), (1, 64), (3, 16), (4, 64), (6, 16), (7, 64), (9, 16)]


def test_attention_probe_matches_sdpa_and_a_closed_form(adapter):
    """The probe's output equals the fused attention; what it reports is softmax(q k^T / sqrt(d)) averaged over
    heads and summed over queries, so each sample's scores sum to the number of queries."""
    attn_site = next(s for s in adapter.sites() if s.name == "blocks.0.attn")
    attn = attn_site.module
    x = torch.randn(2, 64, attn.to_q.in_features)
    with torch.inference_mode():
        out, received = attn_site.attention_probe(attn.forward, (x,), {})
        torch.testing.assert_close(out, attn(x), rtol=1e-5, atol=1e-5)
        heads = attn.heads
        split = lambda t: t.view(2, 64, heads, -1).transpose(1, 2)  # noqa: E731
        q, k = split(attn.to_q(x)), split(attn.to_k(x))
        probs = F.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (B, H, N, N)
    torch.testing.assert_close(received, probs.mean(1).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(received.sum(1), torch.full((2,), 64.0), rtol=1e-5, atol=1e-4)
    assert "get_attention_scores" not in attn.__dict__  # restored


def test_recomputed_tokens_bring_the_trained_toy_closer_to_full_compute(toy):
    """Same schedule (N=3 interval): FORA recomputes nothing between full steps, ToCa some MLP tokens, more of them
    with a higher fresh ratio; DuCa's aggressive steps put it between ToCa and FORA."""
    labels, noise = torch.tensor([3, 8, 1, 5]), toy.make_noise([0, 1, 2, 3])

    def error(cache):
        with CacheEngine(methods.build({"warmup": 1, "N": 3, **cache}), toy.sites()) as engine:
            out = toy.generate(engine, noise, 50, 1.5, class_labels=labels)
        return ((out - reference).norm() / reference.norm()).item()

    with CacheEngine(methods.build({"name": "none"}), toy.sites()) as engine:
        reference = toy.generate(engine, noise, 50, 1.5, class_labels=labels)
    interval = {"force_schedule": "interval", "score": "attention"}
    fora, duca = error({"name": "fora"}), error({"name": "duca", **interval})
    toca, toca_more = error({"name": "toca", **interval}), error({"name": "toca", **interval, "fresh_ratio": 0.3})
    assert 0.0 < toca_more < toca < duca < fora < 0.1


def test_toca_flops_are_fora_plus_the_partial_mlp_tokens():
    """Closed form: each partial step adds, per block, the MLP on k tokens of the CFG batch of 2:
    2 linears (D -> 4D -> D) = 16 D^2 FLOPs per token."""
    cfg = make_cfg(*TINY, "model.weights=meta")
    validate(cfg)
    meta = build_adapter(cfg.model, "meta")
    D, L, tokens_per_sample = 32, 2, 64

    k = int(0.25 * tokens_per_sample)
    toca_flops = flops_of(meta, {"name": "toca", "N": 3, "warmup": 1, "fresh_ratio": 0.25, "ratio_schedule": "constant",
                                 "force_schedule": "interval", "score": "random"}, STEPS)
    fora_flops = flops_of(meta, {"name": "fora", "N": 3, "warmup": 1}, STEPS)
    partial_steps = STEPS - 4
    assert toca_flops - fora_flops == partial_steps * L * 2 * k * 16 * D * D


def test_toca_plan_marks_partial_steps():
    m = methods.build({"name": "toca", "N": 3})
    plans = [m.plan(Step(i, 0.0, 50)) for i in range(50)]
    assert [i for i, p in enumerate(plans) if p.full] == [i for i, k in enumerate(step_kinds(3, 50, "toca", "C", 0))
                                                          if k == ("F", "F")]
    assert all(p == PARTIAL for p in plans if not p.full)  # steps forcing only the first block are partial too


def test_replay_recomputes_the_selected_tokens_from_the_trajectory():
    """values[i] = i at every token. fresh_ratio=1: partial steps take every token's true value (exact). One
    token per partial step with a dominant staleness term: round robin, so after four partial steps the four
    tokens hold 1, 2, 3, 4 in some order, and each step's value is the previous one with one token made i."""
    T, full = 6, torch.tensor([True, False, False, False, False, True])
    values = torch.arange(T, dtype=torch.float64).view(T, 1, 1, 1).expand(T, 1, 4, 2).clone()
    times = torch.arange(T, dtype=torch.float64)
    every = methods.replay("toca", values, times, full, fresh_ratio=1.0, ratio_schedule="constant", N=4,
                           score="random")  # replay has no attention maps
    assert torch.equal(every, values)
    one = methods.replay("toca", values, times, full, fresh_ratio=0.25, ratio_schedule="constant", N=4,
                         soft_fresh_weight=1e6, spatial_bonus=0.0, score="random")
    assert sorted(one[4, 0, :, 0].tolist()) == [1.0, 2.0, 3.0, 4.0]
    for i in range(1, 5):
        changed = (one[i] != one[i - 1]).any(-1)[0]
        assert changed.sum() == 1 and (one[i, 0, changed] == i).all()
    assert torch.equal(one[5], values[5])
    # DuCa on its own schedule (interval, warmup 1, N=4: full at 0, 1, 5): C, A, C; a replayed site is reused whole
    # at an aggressive step (live, the whole block stack's output is)
    duca = methods.replay("duca", values, times, torch.tensor([True, True, False, False, False, True]),
                          fresh_ratio=1.0, ratio_schedule="constant", N=4, warmup=1, force_schedule="interval",
                          pattern="CA", score="random")
    assert torch.equal(duca[2], values[2]) and torch.equal(duca[3], values[2])  # C then A (reused)
    assert torch.equal(duca[4], values[4])


def test_attention_scores_cost_no_extra_flops():
    """The explicit-softmax attention that records the map counts the same FLOPs as the fused kernel."""
    cfg = make_cfg(*TINY, "model.weights=meta")
    validate(cfg)
    meta = build_adapter(cfg.model, "meta")

    toca = {"name": "toca", "N": 3, "warmup": 1, "force_schedule": "interval"}
    assert flops_of(meta, {**toca, "score": "attention"}, STEPS) == flops_of(meta, {**toca, "score": "random"}, STEPS)
