"""TeaCache: decisions against hand-derived sequences, exactness at threshold 0, monotone full-step counts,
separate accumulators per branch, skipped steps that run no block, calibration."""

import numpy as np
import pytest
import torch

import methods
from foca_bench.adapters import build_adapter
from foca_bench.calibrate_teacache import fit_polynomial, main as calibrate
from foca_bench.config import validate
from foca_bench.hooks import CacheEngine
from methods.base import SiteKey, Step
from tests.conftest import make_cfg

IDENTITY = [1.0, 0.0]  # p(x) = x: accumulate the raw relative L1 change


def decisions(changes, l, coefficients=IDENTITY, total=None):
    """Drives `decide` with signals whose relative L1 change at step i is changes[i-1]."""
    method = methods.build({"name": "teacache", "l": l, "coefficients": coefficients})
    key, signal, out = SiteKey("blocks"), torch.ones(4), []
    total = total or len(changes) + 1
    for i in range(total):
        if i > 0:
            signal = signal * (1.0 + changes[i - 1])  # mean|s_i - s_{i-1}| / mean|s_{i-1}| = changes[i-1]
        full = method.decide(key, Step(i, float(i), total), signal)
        if full:
            method.update(key, Step(i, float(i), total), torch.full((2,), float(i)))
        out.append(full)
    return out


def test_decisions_follow_the_accumulated_change():
    # 0.1 per step against l=0.25: computed at 0, then whenever the sum since the last computed step reaches 0.25
    assert decisions([0.1] * 7, 0.25) == [True, False, False, True, False, False, True, True]  # last step forced
    assert decisions([0.3, 0.01, 0.01, 0.5, 0.0], 0.25) == [True, True, False, False, True, True]
    assert decisions([0.1] * 7, 0.0) == [True] * 8


def test_negative_rescaled_changes_are_clipped():
    below_zero = [1.0, -0.5]  # p(0.1) = -0.4
    assert decisions([0.1] * 5, 0.0, below_zero) == [True] * 6  # threshold 0 stays exact
    assert decisions([0.1] * 5, 0.01, below_zero) == [True, False, False, False, False, True]


def test_each_branch_keeps_its_own_accumulator():
    method = methods.build({"name": "teacache", "l": 0.25, "coefficients": IDENTITY})
    cond, uncond = SiteKey("blocks", "cond"), SiteKey("blocks", "uncond")
    s_cond, s_uncond, seen = torch.ones(3), torch.ones(3), {cond: [], uncond: []}
    for i in range(5):
        s_cond, s_uncond = s_cond * 1.2, s_uncond * 1.05  # changes 0.2 and 0.05 per step
        for key, signal in ((cond, s_cond), (uncond, s_uncond)):
            full = method.decide(key, Step(i, float(i), 10), signal)
            if full:
                method.update(key, Step(i, float(i), 10), signal)
            seen[key].append(full)
    assert seen[cond] == [True, False, True, False, True]
    assert seen[uncond] == [True, False, False, False, False]


def test_replay_reuses_the_last_computed_residual():
    values = torch.arange(6, dtype=torch.float64)[:, None] * torch.ones(1, 3)
    full = torch.tensor([True, False, False, True, False, True])
    out = methods.replay("teacache", values, torch.arange(6.0), full, l=0.0, coefficients=IDENTITY)
    assert out[:, 0].tolist() == [0.0, 0.0, 0.0, 3.0, 3.0, 5.0]


@pytest.fixture(scope="module")
def toy():
    cfg = make_cfg("method=teacache")
    validate(cfg)
    return build_adapter(cfg.model, "cpu"), list(cfg.cache.coefficients)


def test_full_steps_fall_monotonically_with_the_threshold_and_skipped_steps_run_no_block(toy):
    adapter, coefficients = toy
    blocks = adapter.transformer.transformer_blocks
    labels, noise = torch.tensor([2, 5]), adapter.make_noise([0, 1])
    counts = []
    for l in (0.0, 0.02, 0.05, 0.1, 0.3):
        calls = {"first": 0, "last": 0}
        hooks = [blocks[0].attn1.register_forward_hook(lambda *a: calls.__setitem__("first", calls["first"] + 1)),
                 blocks[-1].ff.register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))]
        method = methods.build({"name": "teacache", "l": l, "coefficients": coefficients})
        try:
            with CacheEngine(method, adapter.sites(), trace=True) as engine:
                adapter.generate(engine, noise, 50, 1.5, class_labels=labels)
        finally:
            for h in hooks:
                h.remove()
        assert calls["first"] == calls["last"] == engine.full_steps
        assert engine.trace_tensors()["full"].tolist() == method.decisions[SiteKey("blocks")]
        counts.append(engine.full_steps)
    assert counts[0] == 50 and counts[-1] < 10
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts


def test_bad_settings_fail_before_weights_load():
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        validate(make_cfg("method=teacache", "cache.l=-0.1"))
    with pytest.raises(ValueError, match="calibrate_teacache model="):
        validate(make_cfg("model=dit_xl_2", "method=teacache", "model.weights=random"))
    with pytest.raises(ValueError, match="meta device"):
        validate(make_cfg("method=teacache", "profile=flops_only"))


def test_polynomial_fit_recovers_a_known_polynomial():
    x = np.linspace(0.01, 0.3, 40)
    truth = [3.0, -1.0, 0.5, 0.02]
    coefficients, r2 = fit_polynomial(x, np.polyval(truth, x), 3)
    np.testing.assert_allclose(coefficients, truth, rtol=1e-8, atol=1e-10)
    assert r2 == pytest.approx(1.0)


def test_calibration_on_the_toy_model_explains_the_output_change(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes results/calibration/ under the working directory
    result = calibrate(["model=toy_dit", "+calibrate.samples=2", "+calibrate.degree=2"])
    assert result["points"] == 2 * 49 and len(result["coefficients"]) == 3
    assert result["r2"] > 0.8
    assert (tmp_path / "results/calibration/teacache_toy_dit.json").is_file()


def _rank_decisions(rank: int, world: int, init: str, changes: list, out: str) -> None:
    """One rank: its shard of every signal (rank 0 changes fast, rank 1 slowly), decided with all-reduce."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        method = methods.build({"name": "teacache", "l": 0.25, "coefficients": IDENTITY})
        key, shard, seen = SiteKey("blocks"), torch.ones(4), []
        for i in range(len(changes) + 1):
            if i > 0:
                shard = shard * (1.0 + changes[i - 1][rank])
            full = method.decide(key, Step(i, float(i), len(changes) + 1), shard)
            if full:
                method.update(key, Step(i, float(i)), shard)
            seen.append(full)
        with open(out, "w") as f:
            json.dump(seen, f)
    finally:
        dist.destroy_process_group()


def test_split_model_ranks_decide_alike_from_the_all_reduced_change(tmp_path):
    """Two CPU processes (gloo), each holding half the tokens with different per-shard changes: both make the
    decisions a single process makes on the whole (concatenated) tensor."""
    import json

    import torch.multiprocessing as mp

    changes = [(0.3, 0.1)] * 6  # whole tensor: 0.2 per step
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [mp.get_context("spawn").Process(target=_rank_decisions,
                                               args=(r, 2, init, changes, str(tmp_path / f"rank{r}.json")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    method = methods.build({"name": "teacache", "l": 0.25, "coefficients": IDENTITY})
    shards, whole = [torch.ones(4), torch.ones(4)], []
    for i in range(len(changes) + 1):
        if i > 0:
            shards = [shards[r] * (1.0 + changes[i - 1][r]) for r in range(2)]
        full = method.decide(SiteKey("blocks"), Step(i, float(i), len(changes) + 1), torch.cat(shards))
        if full:
            method.update(SiteKey("blocks"), Step(i, float(i)), torch.cat(shards))
        whole.append(full)
    assert ranks[0] == ranks[1] == whole
    assert decisions([0.3] * 6, 0.25) != whole  # rank 0 deciding alone would differ
