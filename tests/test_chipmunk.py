"""Chipmunk (methods/chipmunk.py) against an independent emulation of its official code, written with dense masks
where ours gathers: sandyresearch/chipmunk@64d197c5 src/chipmunk/modules/attn.py:86-190 (`_fast_attention`),
src/chipmunk/modules/mlp.py:30-120 (`SparseDiffMlp.forward`), src/chipmunk/util/layer_counter.py:27-33 (dense
steps), src/chipmunk/ops/patch.py:7-35 (`patchify`). N=1, and every key and column selected, equal the uncached
model; FLOPs of a tiny run against their closed form."""

import math

import pytest
import torch
import torch.nn.functional as F

import methods
from foca_bench.adapters import build_adapter
from foca_bench.config import validate
from foca_bench.hooks import CacheEngine, FeedForwardParts, _FeedForwardOps
from methods._sparse import column_count, token_groups
from methods.base import Step, TokenLayout, Tokens
from tests.conftest import TINY_MODELS, conditions, flops_of, make_cfg

T = 14


def chipmunk(**knobs):
    return methods.build({"name": "chipmunk", "N": 4, "first_dense": 0, **knobs})


# -- the official logic, emulated with dense masks ------------------------------------------------------------------
def official_attention(qs, ks, vs, N, top, multiple, group):
    """attn.py: dense at i < 2 or i % N == 0 (layer_counter.py:30-33); step 0 keeps the lse (l. 104-109), step 1
    sums exp(logits - lse_prev) over each group of `group` queries and keeps the top keys (l. 111-145), a dense step
    caches o - sparse (l. 158-170), a sparse step returns cache + sparse (l. 172-190); sparse = softmax over the
    group's keys only."""
    B, H, S, d = qs[0].shape
    G = S // group
    lse = mask = cache = None
    outs = []

    def sparse(q, k, v):
        logits = (q @ k.transpose(-1, -2)).double() * d ** -0.5
        rows = mask.repeat_interleave(group, dim=2)  # (B, H, S, S): each query sees its group's keys
        return logits.masked_fill(~rows, -math.inf).softmax(-1).to(v.dtype) @ v

    for i, (q, k, v) in enumerate(zip(qs, ks, vs)):
        logits = (q @ k.transpose(-1, -2)).double() * d ** -0.5
        if i < 2 or i % N == 0:
            o = logits.softmax(-1).to(v.dtype) @ v
            if i == 0:
                lse = logits.logsumexp(-1)
                outs.append(o)
                continue
            if i == 1:
                sums = (logits - lse[..., None]).exp().view(B, H, G, group, S).sum(3)
                n = multiple * round(top * S / multiple)
                mask = torch.zeros(B, H, G, S, dtype=torch.bool).scatter_(-1, sums.topk(n, -1).indices, True)
            cache = o - sparse(q, k, v)
            outs.append(o)
        else:
            outs.append(cache + sparse(q, k, v))
    return outs


def official_mlp(xs, up, down, N, top, block):
    """mlp.py: dense at i % N == 0 caching activations, output and block means of the pre-activations (l. 50-59);
    else columns re-picked when i < 10 or i is even (l. 61-67) by the block-mean change of fc1(mean x) (l. 69-89),
    the block-mean cache updated at them (copy_indices), activations recomputed there and the output moved by
    their change through fc2 (the csp_mlp kernels, l. 91-118). No random columns here (mlp_random_keys=0)."""
    act = out = means = mask = None
    outs = []
    for i, x in enumerate(xs):  # x (1, S, D)
        hidden = up(x)
        if i % N == 0:
            act = F.gelu(hidden, approximate="tanh")
            out = down(act)
            means = hidden.view(1, -1, block, hidden.shape[-1]).mean(2)
            outs.append(out)
            continue
        if mask is None or i < 10 or i % 2 == 0:
            fresh = up(x.view(1, -1, block, x.shape[-1]).mean(2))
            change = (fresh - means).abs()
            k = round(top * change.shape[-1])
            mask = torch.zeros_like(change, dtype=torch.bool).scatter_(-1, change.topk(k, -1).indices, True)
            means = torch.where(mask, fresh, means)
        rows = mask.repeat_interleave(block, dim=1)  # (1, S, F)
        new = F.gelu(hidden, approximate="tanh")
        out = out + ((new - act) * rows) @ down.weight.t()
        act = torch.where(rows, new, act)
        outs.append(out)
    return outs


def test_attention_matches_the_official_logic():
    torch.manual_seed(0)
    B, H, S, d, group = 2, 3, 24, 8, 8
    qs, ks, vs = ([torch.randn(B, H, S, d, dtype=torch.float64) for _ in range(T)] for _ in range(3))
    method = chipmunk(attn_top_keys=0.3, attn_multiple=2, query_group=group)
    tokens = Tokens("attn", 0, 1, batch=B, count=S)  # no layout: the sequence's own order
    ours = [method.attend(methods.SiteKey("a"), Step(i, 0.0, T), tokens, q, k, v) for i, (q, k, v) in
            enumerate(zip(qs, ks, vs))]
    for i, (mine, theirs) in enumerate(zip(ours, official_attention(qs, ks, vs, 4, 0.3, 2, group))):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9, msg=f"step {i}")
    assert method.attention[methods.SiteKey("a")].keys.shape == (B, H, S // group, 8)  # 2 * round(0.3 * 24 / 2)


def test_mlp_matches_the_official_logic():
    torch.manual_seed(1)
    S, D, hidden, block = 16, 6, 40, 4
    up, down = torch.nn.Linear(D, hidden).double(), torch.nn.Linear(hidden, D).double()
    ops = _FeedForwardOps(FeedForwardParts(up, lambda h: F.gelu(h, approximate="tanh"), down))
    xs = [torch.randn(1, S, D, dtype=torch.float64) for _ in range(T)]
    method = chipmunk(mlp_top_keys=0.25, mlp_random_keys=0.0, mlp_multiple=1, mlp_block=block)
    tokens = Tokens("mlp", 0, 1, batch=1, count=S)
    with torch.no_grad():
        ours = [method.feed_forward(methods.SiteKey("m"), Step(i, 0.0, T), tokens, x, ops) for i, x in enumerate(xs)]
        theirs = official_mlp(xs, up, down, 4, 0.25, block)
    for i, (mine, ref) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-9, msg=f"step {i}")


def test_token_order_is_chipmunks_patchify():
    """patch.py: 8x8 tiles in row-major order, 4x4 sub-tiles in each, row-major tokens in each; text first."""
    h = w = 16
    key = {}
    for r in range(h):
        for c in range(w):  # (tile, sub-tile, token) position of raster token r * w + c
            key[r * w + c] = ((r // 8) * (w // 8) + c // 8, ((r % 8) // 4) * 2 + (c % 8) // 4, (r % 4) * 4 + c % 4)
    image = sorted(key, key=key.get)
    groups = token_groups(TokenLayout(text=5, text_first=True, grid=(h, w)), 5 + h * w, 7, (8, 4), "cpu")
    order = groups.reshape(-1)[:5 + h * w].tolist()
    assert order == list(range(5)) + [5 + i for i in image]
    assert groups.reshape(-1)[5 + h * w:].tolist() == [order[-1]] * (-(5 + h * w) % 7)  # the last group padded
    last = token_groups(TokenLayout(text=5, text_first=False, grid=(h, w)), 5 + h * w, 1, (8, 4), "cpu")
    assert last.reshape(-1).tolist() == image + list(range(h * w, h * w + 5))
    assert token_groups(TokenLayout(grid=(4, 4)), 16, 4, (8, 4), "cpu").reshape(-1).tolist() == list(range(16))


def test_column_count_is_the_kernels_expected_count():
    """FLUX's MLP (12288 columns): top 30% (3686) + 5% of the rest (430) = 4116, rounded up to 4352 = 17 x 256."""
    assert column_count(12288, 0.3, 0.05, 256) == (3686, 4352)
    assert column_count(128, 0.3, 0.05, 256) == (38, 128)  # capped at every column


def _generate(adapter, cache, steps=8):
    method = methods.build(cache)
    with CacheEngine(method, adapter.sites()) as engine:
        return adapter.generate(engine, adapter.make_noise([0, 1]), steps, 3.0, **conditions(adapter, [1, 2]))


@pytest.mark.parametrize("model", ["dit_xl_2", "flux", "hunyuan_video"])
def test_every_key_and_column_is_the_uncached_model(model):
    """With every key and column selected, cache + sparse delta is the dense result: the engine hands Chipmunk the
    right q, k, v (HunyuanVideo's masked joint attention too), MLP inputs and weights (FLUX's fused single blocks)."""
    cfg = make_cfg(*TINY_MODELS[model])
    validate(cfg)
    adapter = build_adapter(cfg.model, "cpu")
    reference = _generate(adapter, {"name": "none"})
    everything = dict(name="chipmunk", N=3, first_dense=0, attn_top_keys=1.0, attn_multiple=1, mlp_top_keys=1.0)
    torch.testing.assert_close(_generate(adapter, everything), reference, rtol=1e-4, atol=1e-4)
    sparse = _generate(adapter, {**everything, "attn_top_keys": 0.5, "mlp_top_keys": 0.3, "mlp_multiple": 1})
    assert not torch.allclose(sparse, reference, rtol=1e-4, atol=1e-4)  # a real delta at the sparse steps


def test_flops_of_a_tiny_run_match_the_closed_form(adapter):
    """Tiny DiT (2 blocks, width 32, 64 tokens, CFG batch 2), 8 steps, N=4: dense attention at steps 0, 1, 4 and
    dense MLPs at 0, 4; the rest sparse. Per block, with B = 2, S = 64, D = 32, F = 128, heads x d = 32:
    - attention core: dense 4 B S^2 D; sparse 4 B G g n D for G = 8 groups of g = 8 queries and n keys;
      steps 1 and 4 also take the sparse part out of the cache;
    - MLP: dense 4 B S D F; sparse 2 B S k D twice (up and down on k columns) + 2 B (S / m) D F (up of the block
      means, re-picked at every sparse step before step 10).
    Projections (q, k, v, out) and everything outside the blocks are the uncached model's at every step."""
    B, S, D, Fh, L, steps, g, m = 2, 64, 32, 128, 2, 8, 8, 4
    knobs = dict(name="chipmunk", N=4, first_dense=0, attn_top_keys=0.25, attn_multiple=1, query_group=g,
                 mlp_top_keys=0.25, mlp_random_keys=0.0, mlp_multiple=8, mlp_block=m)
    n, k = round(0.25 * S), column_count(Fh, 0.25, 0.0, 8)[1]  # 16 keys, 32 columns
    dense_attn, sparse_attn = 4 * B * S * S * D, 4 * B * (S // g) * g * n * D
    dense_mlp, sparse_mlp = 4 * B * S * D * Fh, 2 * 2 * B * S * k * D + 2 * B * (S // m) * D * Fh
    both = dense_attn + sparse_attn  # a dense step from step 1 on also takes the sparse part out of the cache
    attn = [dense_attn, both, sparse_attn, sparse_attn, both, sparse_attn, sparse_attn, sparse_attn]
    mlp = [dense_mlp if i % 4 == 0 else sparse_mlp for i in range(steps)]
    none = flops_of(adapter, {"name": "none"}, steps, batch=1)
    expected = none - L * steps * (dense_attn + dense_mlp) + L * (sum(attn) + sum(mlp))
    assert flops_of(adapter, knobs, steps, batch=1) == expected
