"""SmoothCache (methods/smoothcache.py, foca_bench/calibrate_smoothcache.py) against an independent emulation of the
official code (Roblox/SmoothCache@edeb4ed): the schedule scan (SmoothCache/calibration/calibration_helper.py:289-347,
`_scan_nrows_sublists`), the calibration's errors and their per-type average (:166-201 `create_wrapped_forward`,
:203-260 `generate_schedule`, :24-40 `rel_l1_loss`); the skipped layers of a run and the values they reuse; FLOPs
of a tiny run against their closed form."""

import random

import pytest
import torch

import methods
from foca_bench.calibrate_smoothcache import measure
from foca_bench.hooks import CacheEngine
from methods.smoothcache import smoothcache_schedule
from tests.conftest import conditions, flops_of

STEPS = 8


def official_scan(rows, threshold, length):
    """calibration_helper.py:289-347, rewritten: rows in priority order, the highest lookahead first."""
    schedule = [None] * length
    i = 0
    while i < length:
        used = False
        for row_idx in reversed(range(len(rows))):
            if i >= len(rows[row_idx]):
                continue
            if rows[row_idx][i] <= threshold:
                schedule[i] = 1
                for s in range(1, row_idx + 2):
                    if i + s < length:
                        schedule[i + s] = 0
                i += row_idx + 2
                used = True
                break
        if not used:
            schedule[i] = 1
            i += 1
    schedule[0] = schedule[-1] = 1
    return [1 if s is None else s for s in schedule]


def test_schedule_hand_derived():
    rows = ((0.1, 0.3, 0.1, 0.1), (0.2, 0.5, 0.1), (0.9, 0.9))
    # i=0: lookahead 3 errs 0.9, lookahead 2 errs 0.2 <= 0.25: compute 0, reuse at 1 and 2; i=3: only lookahead 1
    # reaches it (0.1): compute 3, reuse at 4, which the last-step rule computes anyway
    assert smoothcache_schedule(rows, 0.25, 5) == (True, False, False, True, True)
    assert smoothcache_schedule(rows, 0.0, 5) == (True,) * 5


@pytest.mark.parametrize("seed", range(20))
def test_schedule_matches_the_official_scan(seed):
    rng = random.Random(seed)
    length, lookahead = rng.randint(3, 60), rng.randint(1, 4)
    rows = tuple(tuple(rng.uniform(0.0, 0.5) for _ in range(length - j)) for j in range(1, lookahead + 1))
    for alpha in (0.05, 0.15, 0.22, 0.4):
        assert smoothcache_schedule(rows, alpha, length) == tuple(map(bool, official_scan(rows, alpha, length)))


def test_calibration_matches_the_official_helper(adapter):
    """The calibration's errors from one batch equal the official helper's, recomputed from a traced run: for every
    site the error between its output j + 1 steps ago and now (||prev - cur||_1 / ||cur||_1), averaged per type."""
    errors, _, steps = measure(["model.size=tiny", f"sampler.steps={STEPS}"], samples=2, lookahead=3)
    labels = torch.arange(2) % 10
    with CacheEngine(methods.build({"name": "none"}), adapter.sites(), trace=True) as engine:
        adapter.generate(engine, adapter.make_noise([0, 1]), STEPS, 1.5, **conditions(adapter, labels))
        trace = engine.trace_tensors()
    for kind in ("attn", "mlp"):
        sites = [v for k, v in trace.items() if k.split("/")[0].endswith(f".{kind}")]
        for j in range(3):  # previous_layer_outputs[j] is the output j + 1 calls ago
            per_site = [[float((out[i].float() - out[i + j + 1].float()).norm(p=1) / out[i + j + 1].float().norm(p=1))
                         for i in range(STEPS - j - 1)] for out in sites]
            expected = [sum(col) / len(col) for col in zip(*per_site)]
            assert errors[kind][j] == pytest.approx(expected, rel=1e-5), (kind, j)


def _errors(attn_rows, mlp_rows):
    return {"attn": [list(r) for r in attn_rows], "mlp": [list(r) for r in mlp_rows]}


# attn reuses for two steps where it can (lookahead 2), mlp for one at even steps only
ATTN = ((0.5,) * 7, (0.1,) * 6)
MLP = (tuple(0.1 if i % 2 == 0 else 0.9 for i in range(7)), (0.9,) * 6)


def test_a_run_skips_the_calibrated_layers_and_reuses_their_last_output(adapter):
    calls = {}
    hooks = []
    for i, block in enumerate(adapter.transformer.transformer_blocks):
        for kind, module in (("attn", block.attn1.to_q), ("mlp", block.ff.net[0])):  # run only if computed
            hooks.append(module.register_forward_hook(
                lambda *a, key=(kind, i): calls.setdefault(key, []).append(engine.total_steps - 1)))
    method = methods.build({"name": "smoothcache", "alpha": 0.2, "errors": _errors(ATTN, MLP)})
    try:
        with CacheEngine(method, adapter.sites(), trace=True) as engine:
            adapter.generate(engine, adapter.make_noise([0, 1]), STEPS, 1.5, **conditions(adapter, [1, 2]))
            trace = engine.trace_tensors()
    finally:
        for h in hooks:
            h.remove()
    attn, mlp = smoothcache_schedule(ATTN, 0.2, STEPS), smoothcache_schedule(MLP, 0.2, STEPS)
    assert attn == (True, False, False, True, False, False, True, True)
    assert mlp == (True, False, True, False, True, False, True, True)
    for (kind, _), steps in calls.items():
        schedule = attn if kind == "attn" else mlp
        assert steps == [i for i in range(STEPS) if schedule[i]], kind
    values = trace["blocks.1.mlp/default"]
    for i in range(STEPS):
        last = max(j for j in range(i + 1) if mlp[j])
        assert torch.equal(values[i], values[last])


def test_flops_of_a_tiny_run_match_the_closed_form(adapter):
    """Tiny DiT (2 blocks, width 32, 64 tokens, CFG batch 2): a skipped attention saves its projections and core,
    8 B S D^2 + 4 B S^2 D, a skipped MLP 4 B S D F; everything else runs at every step."""
    B, S, D, Fh, L = 2, 64, 32, 128, 2
    attn_flops, mlp_flops = 8 * B * S * D * D + 4 * B * S * S * D, 4 * B * S * D * Fh
    skipped_attn = STEPS - sum(smoothcache_schedule(ATTN, 0.2, STEPS))
    skipped_mlp = STEPS - sum(smoothcache_schedule(MLP, 0.2, STEPS))
    expected = flops_of(adapter, {"name": "none"}, STEPS) - L * (skipped_attn * attn_flops + skipped_mlp * mlp_flops)
    cache = {"name": "smoothcache", "alpha": 0.2, "errors": _errors(ATTN, MLP)}
    assert flops_of(adapter, cache, STEPS) == expected


def test_calibration_for_another_step_count_says_how_to_recalibrate():
    method = methods.build({"name": "smoothcache", "errors": _errors(ATTN, MLP)})
    with pytest.raises(ValueError, match="calibrated for 8 steps but this run has 50.*sampler.steps=50"):
        method.plan(methods.Step(0, 0.0, 50))
    with pytest.raises(ValueError, match="one list per lookahead"):
        methods.build({"name": "smoothcache", "errors": {"attn": [[0.1, 0.2], [0.1, 0.2]]}})
