"""Adaptive FoCa (methods/foca_adaptive.py): tol=0 computes every step, decisions on replayed trajectories equal
an independent emulation (tensors through `bdf2_predict`/`heun_correct`, not the Gram matrices), split ranks
decide alike, and a generation on the tiny DiT counts the full steps it decided."""

import json

import pytest
import torch

import methods
from foca_bench.hooks import CacheEngine
from methods._numerics import bdf2_predict, heun_correct
from methods.base import SiteKey, Step
from tests.conftest import conditions


def drive(values, **cfg):
    """Runs the method's own plan over a trajectory (T, ...) of one site; returns its decisions and values."""
    method = methods.build({"name": "foca_adaptive", **cfg})
    key, out = SiteKey("site"), []
    for i, v in enumerate(values):
        step = Step(i, float(i), len(values))
        if method.plan(step).full:
            method.update(key, step, v)
            out.append(v)
        else:
            out.append(method.forecast(key, step).clone())
    return method.decisions, torch.stack(out)


def emulate(values, tol, N, warmup=1, min_interval=1):
    """The rule written out on tensors: BDF2 prediction and Heun correction of the last two trajectory points with
    the divided difference of the last two full steps (h = w = 1), e = ||corrected - predicted|| / ||corrected||
    accumulated, full when A + e >= tol or N steps since the last full step; full until two full steps exist."""
    full_at, traj, acc, out = [], [], 0.0, []
    for i, v in enumerate(values):
        if i < warmup or len(full_at) < 2:
            full = True
        else:
            a, b = full_at[-2], full_at[-1]
            slope = (traj[b] - traj[a]) / (b - a)
            predicted = bdf2_predict(traj[i - 1], traj[i - 2], slope, 1.0, 1.0)
            corrected = heun_correct(traj[i - 1], predicted, slope, 1.0)
            e = float((corrected - predicted).norm() / corrected.norm())
            elapsed = i - b
            full = elapsed >= N or (elapsed >= min_interval and acc + e >= tol)
            if not full:
                acc += e
                traj.append(corrected)
        if full:
            acc = 0.0
            full_at.append(i)
            traj.append(v)
        out.append(full)
    return out, torch.stack(traj)


def test_tol_zero_computes_every_step():
    values = torch.randn(12, 6).cumsum(0)
    decided, out = drive(values, tol=0.0, N=5)
    assert decided == [True] * 12
    assert torch.equal(out, values)


def test_linear_features_have_no_gap_so_only_the_maximum_interval_forces_full_steps():
    # F_i = A + i B: BDF2 and Heun agree exactly, e = 0 at every step: full at 0 (warm-up), 1 (no estimate yet),
    # then every N = 4 steps
    values = torch.randn(6) + torch.arange(14.0)[:, None] * torch.randn(6)
    decided, out = drive(values, tol=1e-3, N=4)
    assert [i for i, f in enumerate(decided) if f] == [0, 1, 5, 9, 13]
    torch.testing.assert_close(out, values)  # and every forecast is exact


@pytest.mark.parametrize("tol,N,min_interval", [(0.02, 6, 1), (0.005, 8, 1), (0.05, 5, 2)])
def test_decisions_on_a_replayed_trajectory_equal_the_emulation(tol, N, min_interval):
    torch.manual_seed(0)
    i = torch.arange(30.0)[:, None]  # a curved trajectory with noise: gaps of every size
    values = 1.0 + torch.randn(64) + i * torch.randn(64) * 0.05 + (i / 10) ** 2 * torch.randn(64) * 0.2
    values = values + 0.01 * torch.randn(30, 64)
    decided, out = drive(values, tol=tol, N=N, min_interval=min_interval)
    expected, traj = emulate(values, tol, N, min_interval=min_interval)
    assert decided == expected
    assert 3 < sum(decided) < 30  # the rule both skips and computes on this trajectory
    torch.testing.assert_close(out, traj, rtol=1e-5, atol=1e-5)


def test_larger_tolerance_never_computes_more():
    torch.manual_seed(1)
    values = torch.randn(40, 32).cumsum(0) * 0.1 + 3.0
    counts = [sum(drive(values, tol=tol, N=10)[0]) for tol in (0.0, 0.001, 0.01, 0.1, 1.0)]
    assert counts == sorted(counts, reverse=True) and counts[0] == 40 and counts[-1] < 10


def test_config_checks_name_the_fix():
    with pytest.raises(ValueError, match="cache.tol"):
        methods.build({"name": "foca_adaptive", "tol": -1.0})
    with pytest.raises(ValueError, match="min_interval"):
        methods.build({"name": "foca_adaptive", "min_interval": 11, "N": 10})
    with pytest.raises(ValueError, match="cachedit"):
        methods.build({"name": "foca_adaptive", "reading": "cachedit"})


def _rank_decisions(rank: int, world: int, init: str, values: torch.Tensor, out: str) -> None:
    """One rank: its half of every feature (the halves differ), the method's plan with all-reduced Grams."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        shard = values.chunk(world, dim=1)[rank]
        decided, _ = drive(shard, tol=0.01, N=8)
        with open(out, "w") as f:
            json.dump(decided, f)
    finally:
        dist.destroy_process_group()


def test_split_model_ranks_decide_alike_from_the_all_reduced_gram(tmp_path):
    """Two CPU processes (gloo), each holding half the features: both decide as one process on the whole tensor,
    and differently from a rank deciding from its own half."""
    import torch.multiprocessing as mp

    torch.manual_seed(2)
    i = torch.arange(30.0)[:, None]
    smooth = 1.0 + i * 0.05 + torch.zeros(1, 32)
    wild = 1.0 + torch.randn(30, 32).cumsum(0) * 0.05
    values = torch.cat([smooth, wild], dim=1)  # (T, 64): rank 0 holds a smooth half, rank 1 a rough one
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [mp.get_context("spawn").Process(target=_rank_decisions,
                                               args=(r, 2, init, values, str(tmp_path / f"rank{r}.json")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    whole, _ = drive(values, tol=0.01, N=8)
    assert ranks[0] == ranks[1] == whole
    assert drive(smooth, tol=0.01, N=8)[0] != whole  # rank 0 deciding alone would differ


def test_a_generation_on_the_tiny_dit_counts_the_steps_it_decided(adapter):
    method = methods.build({"name": "foca_adaptive", "tol": 0.02, "warmup": 1})
    with CacheEngine(method, adapter.sites()) as engine:
        engine.reset()
        adapter.generate(engine, adapter.make_noise([0, 1]), 20, 3.0, **conditions(adapter, [3, 5]))
    assert engine.full_steps == sum(method.decisions) and len(method.decisions) == 20
    assert 2 < engine.full_steps < 20


def test_calibration_maps_tol_to_full_steps(tmp_path, monkeypatch):
    from foca_bench.calibrate_foca_adaptive import main as calibrate

    monkeypatch.chdir(tmp_path)  # it writes results/calibration/ under the working directory
    result = calibrate(["model.size=tiny", "sampler.steps=12", "+calibrate.samples=2", "+calibrate.tols=0,0.05,1"])
    counts = [r["full_steps"] for r in result["rows"]]
    assert counts[0] == 12 and counts == sorted(counts, reverse=True) and counts[-1] < 12
    assert (tmp_path / "results/calibration/foca_adaptive_toy_dit.json").is_file()
