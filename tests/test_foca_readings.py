"""FoCa's readings (`cache.reading`) against closed forms and independent emulations of their source code.

- `cachedit`: cache-dit's `FoCaCalibrator`, vipshop/cache-dit@f86744a (= the installed cache-dit 1.5.3),
  src/cache_dit/caching/cache_contexts/calibrators/foca.py: `FoCaState.update` (lines 152-168) and
  `FoCaState.approximate` (lines 170-205), emulated below in scalars; and, when cache-dit is installed, its own
  calibrator object driven step by step on the same random trajectories.
- `lab`: yiming-l21/CFGCache@bf339cb (the FoCa authors' lab's HiCache-derived code),
  models/qwen_image/taylor_utils/__init__.py: `derivative_approximation_foca` (lines 97-111: the full-step values,
  newest first) and `taylor_formula_foca` (lines 114-136: F_pred = (4 F_n - F_{n-1}) / 3, out 0.5 (F_n + F_pred)).
`ours` is pinned in tests/test_replay.py. Expected values are plain Python floats, not `methods._numerics`.
"""

import dataclasses

import pytest
import torch

import methods
from foca_bench.config import validate
from foca_bench.identity import identity
from methods import replay
from methods.foca import FoCaConfig
from tests.test_replay import GRIDS, TRAJECTORIES, as_tensors, check, schedule

T = 16


def expected_cachedit(f, full):
    """cache-dit's FoCaState in scalars: a step counter, a window (F_k, F_km1) moved by every full value and every
    forecast, the two last full values, and the fallback that reuses F_full without moving the window."""
    out, F_k, F_km1, F_full, F_full_prev, last_full = [], None, None, None, None, None
    for i in range(T):
        if full[i]:
            F_full_prev, F_full, last_full = F_full, f(float(i)), i
            F_km1, F_k = F_k, F_full
            out.append(F_full)
        elif F_km1 is None or F_full_prev is None:
            out.append(F_full)
        else:
            elapsed = float(i - last_full)
            deriv = (F_full - F_full_prev) + (F_k - F_km1)
            if elapsed <= 3.0:
                pred = F_full + elapsed / 2.0 * deriv
            else:
                w = 3.0 / elapsed
                pred = w * (F_full + 1.5 * deriv) + (1.0 - w) * F_full
            F_km1, F_k = F_k, pred
            out.append(pred)
    return out


def expected_lab(f, full, corrector="heun"):
    """The lab's code in scalars: full values newest first; fewer than two: the newest; else BDF2 then Heun."""
    out, feats = [], []
    for i in range(T):
        if full[i]:
            feats.insert(0, f(float(i)))
            out.append(feats[0])
        elif len(feats) < 2:
            out.append(feats[0])
        else:
            pred = (4.0 * feats[0] - feats[1]) / 3.0
            out.append(0.5 * (feats[0] + pred) if corrector == "heun" else pred)
    return out


@pytest.mark.parametrize("traj", TRAJECTORIES)
@pytest.mark.parametrize("N,warmup", [(3, 1), (5, 1), (4, 2), (7, 2), (6, 0)])
def test_cachedit_reading_equals_cachedit_code_semantics(traj, N, warmup):
    full = schedule(N, warmup)
    values, times, mask = as_tensors(TRAJECTORIES[traj], GRIDS["uniform"], full)
    check(replay("foca", values, times, mask, N=N, reading="cachedit", time="step"),
          expected_cachedit(TRAJECTORIES[traj], full))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("traj", TRAJECTORIES)
@pytest.mark.parametrize("N,warmup", [(3, 1), (5, 1), (4, 2), (6, 0)])
@pytest.mark.parametrize("corrector", ["heun", "none"])
def test_lab_reading_equals_lab_code_semantics_on_any_time_axis(grid, traj, N, warmup, corrector):
    """The lab's formula has no spacing in it: the same values whatever the grid or `cache.time`."""
    full = schedule(N, warmup)
    f = TRAJECTORIES[traj]
    expected = expected_lab(f, full, corrector)
    for time in ("step", "sigma"):
        values = torch.tensor([[f(float(i)), 2 * f(float(i))] for i in range(T)], dtype=torch.float64)
        out = replay("foca", values, torch.tensor(GRIDS[grid]), torch.tensor(full), N=N, reading="lab",
                     corrector=corrector, time=time)
        check(out, expected)


@pytest.mark.parametrize("reading", ["ours", "cachedit", "lab"])
@pytest.mark.parametrize("N,warmup", [(3, 1), (7, 2), (5, 0)])
def test_every_reading_is_exact_on_constant_trajectories(reading, N, warmup):
    values, times, mask = as_tensors(lambda t: 3.25, GRIDS["uniform"], schedule(N, warmup))
    assert torch.equal(replay("foca", values, times, mask, N=N, reading=reading, time="step"), values)


def test_lab_on_a_line_is_the_last_full_value_plus_a_sixth_of_the_last_full_difference():
    """F = 2 - 3t, full steps N apart: every skipped step of a window gets F_b - 3N/6, wherever it is."""
    N = 4
    full = schedule(N, 2)  # 0, 1, 2, 6, 10, 14
    values, times, mask = as_tensors(TRAJECTORIES["linear"], GRIDS["uniform"], full)
    out = replay("foca", values, times, mask, N=N, reading="lab", time="step")[:, 0].tolist()
    assert out[3:6] == pytest.approx([(2 - 3 * 2) + (-3 * 1) / 6] * 3, abs=1e-12)  # spacing of 1 and 2: 1 step
    for b in (6, 10):
        assert out[b + 1: b + N] == pytest.approx([(2 - 3 * b) - 3 * N / 6] * (N - 1), abs=1e-12)


def test_cachedit_on_a_line_with_two_consecutive_full_steps():
    """y = t with full steps 0, 1 (cache-dit's own unit test): exact for 3 steps, then damped towards F_b:
    e = 4: 1 + 9/8 (1 + 1) = 3.25; e = 5: 1 + 9/10 (1 + (3.25 - 4)) = 1.225; e = 6: 1 + 3/4 (1 + (1.225 - 3.25))."""
    full = [i < 2 for i in range(8)]
    values = torch.arange(8, dtype=torch.float64)[:, None]
    out = replay("foca", values, values[:, 0], torch.tensor(full), N=99, reading="cachedit", time="step")[:, 0]
    assert out.tolist() == pytest.approx([0, 1, 2, 3, 4, 3.25, 1.225, 1 + 0.75 * (1 - 2.025)], abs=1e-12)


def test_cachedit_on_a_line_with_full_steps_three_apart_overshoots():
    """y = t, full at 0, 1, 4, 7, 10: D = F_b - F_a is 3 steps' change but enters as one step's, and d starts from
    the previous window's last forecast. Worked by hand: step 5: 4 + (3 + (4 - 3))/2 = 6; step 6: 4 + (3 + 2) = 9;
    step 8: 7 + (3 + (7 - 9))/2 = 7.5; step 9: 7 + (3 + 0.5) = 10.5; step 11: 11.25; step 12: 14.25."""
    full = schedule(3, 1)[:13]
    values = torch.arange(13, dtype=torch.float64)[:, None]
    out = replay("foca", values, values[:, 0], torch.tensor(full), N=3, reading="cachedit", time="step")[:, 0]
    assert out.tolist() == pytest.approx([0, 1, 2, 3, 4, 6, 9, 7, 7.5, 10.5, 10, 11.25, 14.25], abs=1e-12)


def _random_features(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, 3, 5, generator=g, dtype=torch.float64).cumsum(0)  # a random walk per element


def test_readings_on_a_random_trajectory_by_hand():
    """Full steps 0, 1, 2, 9 (warmup=2, N=7); every skipped value written out in F_1, F_2 from the formulas."""
    F = _random_features(11)
    full = torch.tensor([i < 3 or i == 9 for i in range(11)])
    times = torch.arange(11, dtype=torch.float64)
    lab = replay("foca", F, times, full, N=7, warmup=2, reading="lab", time="step")
    for i in range(3, 9):
        torch.testing.assert_close(lab[i], (7 * F[2] - F[1]) / 6, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lab[10], (7 * F[9] - F[2]) / 6, rtol=1e-12, atol=1e-12)
    cd = replay("foca", F, times, full, N=7, warmup=2, reading="cachedit", time="step")
    step = F[2] - F[1]  # D and the first local difference
    # e = 1, 2, 3: F_2 + e/2 (D + d) with d = step each time (the forecasts continue the line); then damped
    for i, k in zip(range(3, 9), (1, 2, 3, 2.25, 0.225, 0.75 * (1 - 2.025))):
        torch.testing.assert_close(cd[i], F[2] + k * step, rtol=1e-12, atol=1e-12)
    # after the full step 9: D = F_9 - F_2 (7 steps, undivided), d = F_9 - (forecast at 8)
    torch.testing.assert_close(cd[10], F[9] + 0.5 * ((F[9] - F[2]) + (F[9] - cd[8])), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("N,warmup", [(3, 1), (5, 1), (7, 2), (6, 0), (4, 3)])
def test_cachedit_reading_equals_cachedits_own_calibrator(N, warmup):
    """Replay against cache-dit's FoCaCalibrator object itself (mark_step_begin, then update at full steps and
    approximate at the others, as cache-dit's cache manager calls it), on a random trajectory."""
    calibrators = pytest.importorskip("cache_dit.caching.cache_contexts.calibrators")
    F = _random_features(30, seed=N)
    full = torch.tensor([i < warmup or (i - warmup) % N == 0 for i in range(30)])
    ours = replay("foca", F, torch.arange(30, dtype=torch.float64), full, N=N, reading="cachedit", time="step")
    calibrator, theirs = calibrators.FoCaCalibrator(), []
    for i in range(30):
        calibrator.mark_step_begin()
        if full[i]:
            calibrator.update(F[i].clone())
            theirs.append(F[i])
        else:
            theirs.append(calibrator.approximate().clone())
    torch.testing.assert_close(ours, torch.stack(theirs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("overrides,message", [
    ({"reading": "hicache"}, "choose `ours`, `cachedit`"),
    ({"reading": "lab", "slope": "local"}, "knob of cache.reading=ours"),
    ({"reading": "cachedit", "corrector": "none"}, "no BDF2-only mode"),
    ({"reading": "cachedit", "time": "sigma"}, "counts steps"),
])
def test_reading_config_errors_say_how_to_fix_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        FoCaConfig(**overrides)


def test_reading_ours_keeps_the_run_ids_of_records_from_before_the_knob(cfg_factory):
    cfg = cfg_factory("method=foca", "cache.reading=ours")
    assert "reading" not in identity(cfg, validate(cfg))["cache"]
    for reading in ("cachedit", "lab"):
        cfg = cfg_factory("method=foca", f"cache.reading={reading}")
        assert identity(cfg, validate(cfg))["cache"]["reading"] == reading


def test_the_default_reading_is_a_known_one():
    default = {f.name: f.default for f in dataclasses.fields(FoCaConfig)}["reading"]
    assert default in ("ours", "cachedit", "lab") and methods.build({"name": "foca"}).cfg.reading == default


def test_table_labels_name_the_reading_unless_it_is_the_default():
    from foca_bench.names import label

    default = methods.build({"name": "foca"}).cfg.reading

    def record(**cache):
        return {"method": "foca", "config": {"cache": {"name": "foca", "N": 5, "warmup": 1, "slope": "full",
                                                       "corrector": "heun", "time": "step", **cache},
                                             "sampler": {"steps": 50}, "model": {"name": "toy_dit", "warmup": 1}}}

    for reading in ("cachedit", "lab"):
        expected = "FoCa (N=5)" if reading == default else f"FoCa (N=5, reading={reading})"
        assert label(record(reading=reading)) == expected
    # a record from before the knob, or one with reading=ours (left out of its identity)
    assert label(record()) == ("FoCa (N=5)" if default == "ours" else "FoCa (N=5, reading=ours)")


@pytest.mark.parametrize("slope", ["full", "local"])
def test_ours_is_exact_on_a_line_from_warmup_1_but_not_from_warmup_0(slope):
    """warmup=1 computes steps 0 and 1: two exact points. warmup=0 computes only step 0 before its first window,
    whose reuse points then carry into the next window (docs/methods.md)."""
    for warmup, exact in ((1, True), (0, False)):
        full = schedule(4, warmup)
        values, times, mask = as_tensors(TRAJECTORIES["linear"], GRIDS["uniform"], full)
        out = replay("foca", values, times, mask, N=4, warmup=warmup, slope=slope, time="step")
        assert torch.allclose(out, values, atol=1e-12) == exact
