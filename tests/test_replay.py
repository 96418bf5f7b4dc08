"""`methods.replay` against closed forms and an independent scalar re-derivation, for every method.

Trajectories are polynomial or exponential in t, on uniform and non-uniform time grids. Expected values are
written from the methods' defining equations with plain Python floats, not with `methods._numerics`.
"""

import math

import pytest
import torch

import methods
from methods import replay

T = 16
GRIDS = {
    "uniform": [float(i) for i in range(T)],
    # non-uniform, decreasing like a scheduler's timesteps/sigmas
    "nonuniform": [1.0 - (i / T) ** 1.5 for i in range(T)],
}
TRAJECTORIES = {
    "linear": lambda t: 2.0 - 3.0 * t,
    "quadratic": lambda t: 1.0 + 0.5 * t - 2.0 * t * t,
    "exponential": lambda t: math.exp(-1.3 * t),
}


def schedule(N: int, warmup: int) -> list[bool]:
    return [i < warmup or (i - warmup) % N == 0 for i in range(T)]


def as_tensors(f, grid, full):
    values = torch.tensor([[f(t), 2 * f(t)] for t in grid], dtype=torch.float64)  # (T, 2): a 2-element "feature"
    return values, torch.tensor(grid, dtype=torch.float64), torch.tensor(full)


def last_full(full, i):
    return max(j for j in range(i + 1) if full[j])


# -- independent expectations -----------------------------------------------------------------------------------
def expected_reuse(f, grid, full):
    return [f(grid[last_full(full, i)]) for i in range(T)]


def expected_taylorseer(f, grid, full, order):
    """Official TaylorSeer: factors by divided differences between consecutive full steps, Taylor sum."""
    out, fulls = [], []
    for i, t in enumerate(grid):
        if full[i]:
            fulls.append(i)
            out.append(f(t))
            continue
        # factors at the last full step, rebuilt from scratch over the full-step history
        factors_hist = []
        for n, j in enumerate(fulls):
            new = [f(grid[j])]
            if n > 0:
                dt = grid[j] - grid[fulls[n - 1]]
                prev = factors_hist[-1]
                for k in range(min(order, len(prev))):
                    new.append((new[k] - prev[k]) / dt)
            factors_hist.append(new)
        d = t - grid[fulls[-1]]
        out.append(sum(c * d**k / math.factorial(k) for k, c in enumerate(factors_hist[-1])))
    return out


def expected_foca(f, grid, full, slope="local", corrector="heun"):
    """FoCa as the issue specifies it, re-derived in scalars."""
    out = []
    pts = []  # trajectory points (t, F)
    fulls = []  # full steps (t, F)
    for i, t in enumerate(grid):
        if full[i]:
            v = f(t)
            fulls.append((t, v))
        elif len(pts) < 2:
            v = pts[-1][1]
        else:
            (t0, f0), (t1, f1) = pts[-2], pts[-1]
            h, dt = t - t1, t1 - t0
            w = h / dt
            d_full = (fulls[-1][1] - fulls[-2][1]) / (fulls[-1][0] - fulls[-2][0]) if len(fulls) >= 2 else 0.0
            s = (f1 - f0) / dt if slope == "local" else d_full
            pred = (1 + w) ** 2 / (1 + 2 * w) * f1 - w**2 / (1 + 2 * w) * f0 + h * (1 + w) / (1 + 2 * w) * s
            v = f1 + h / 2 * (d_full + (pred - f1) / h) if corrector == "heun" else pred
        pts.append((t, v))
        out.append(v)
    return out


def check(actual, expected, tol=1e-9):
    torch.testing.assert_close(actual[:, 0], torch.tensor(expected, dtype=torch.float64), rtol=tol, atol=tol)
    torch.testing.assert_close(actual[:, 1], 2 * torch.tensor(expected, dtype=torch.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("traj", TRAJECTORIES)
@pytest.mark.parametrize("N,warmup", [(3, 1), (5, 1), (4, 2)])
class TestClosedForms:
    def test_reuse_and_fora_return_last_full_value(self, grid, traj, N, warmup):
        full = schedule(N, warmup)
        values, times, mask = as_tensors(TRAJECTORIES[traj], GRIDS[grid], full)
        for name in ("reuse", "fora"):
            check(replay(name, values, times, mask, N=N), expected_reuse(TRAJECTORIES[traj], GRIDS[grid], full))

    @pytest.mark.parametrize("order", [0, 1, 2, 3])
    def test_taylorseer(self, grid, traj, N, warmup, order):
        full = schedule(N, warmup)
        f, g = TRAJECTORIES[traj], GRIDS[grid]
        values, times, mask = as_tensors(f, g, full)
        check(replay("taylorseer", values, times, mask, N=N, O=order), expected_taylorseer(f, g, full, order))

    @pytest.mark.parametrize("slope", ["local", "full"])
    @pytest.mark.parametrize("corrector", ["heun", "none"])
    def test_foca(self, grid, traj, N, warmup, slope, corrector):
        full = schedule(N, warmup)
        f, g = TRAJECTORIES[traj], GRIDS[grid]
        values, times, mask = as_tensors(f, g, full)
        out = replay("foca", values, times, mask, N=N, slope=slope, corrector=corrector)
        check(out, expected_foca(f, g, full, slope, corrector))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("slope", ["local", "full"])
@pytest.mark.parametrize("corrector", ["heun", "none"])
def test_foca_exact_on_linear_once_two_exact_points_exist(grid, slope, corrector):
    """BDF2 (any w) and Heun are exact on linear trajectories when started from two exact points (warmup >= 2)."""
    f = TRAJECTORIES["linear"]
    full = schedule(4, 2)
    values, times, mask = as_tensors(f, GRIDS[grid], full)
    torch.testing.assert_close(replay("foca", values, times, mask, slope=slope, corrector=corrector), values)


@pytest.mark.parametrize("grid", GRIDS)
def test_taylorseer_order_k_exact_on_degree_k_polynomials_uniform_full_steps(grid):
    """Order 1 is exact on lines once two full steps exist (closed form: F_b + slope * d)."""
    f = TRAJECTORIES["linear"]
    full = schedule(3, 1)
    values, times, mask = as_tensors(f, GRIDS[grid], full)
    out = replay("taylorseer", values, times, mask, O=1)
    second_full = [i for i in range(T) if full[i]][1]
    torch.testing.assert_close(out[second_full:], values[second_full:])


def test_taylorseer_quadratic_closed_form():
    """O=2 on F = t^2 with full steps N apart: F_b + (F'(t_b) - F'' N / 2) d + F'' d^2 / 2.

    Holds once the last three full steps are N apart (with warmup=1 the first two are only 1 apart).
    """
    N = 4
    full = schedule(N, 1)
    grid = GRIDS["uniform"]
    values, times, mask = as_tensors(lambda t: t * t, grid, full)
    out = replay("taylorseer", values, times, mask, O=2)
    fulls = [i for i in range(T) if full[i]]
    assert fulls[1:4] == [1, 1 + N, 1 + 2 * N]
    for i in range(fulls[3] + 1, T):
        b = last_full(full, i)
        d = i - b
        expected = b * b + (2 * b - 2 * N / 2) * d + 2 * d * d / 2
        assert out[i, 0].item() == pytest.approx(expected, abs=1e-9)


def test_foca_first_forecast_closed_form_on_exponential():
    """The first Heun-corrected BDF2 forecast after two exact points, written out in closed form (w = 1)."""
    lam = -0.7
    full = [True, True, False]
    grid = [0.0, 1.0, 2.0]
    values = torch.tensor([[math.exp(lam * t)] for t in grid], dtype=torch.float64)
    out = replay("foca", values, torch.tensor(grid), torch.tensor(full))
    e0, e1 = math.exp(0.0), math.exp(lam)
    d = e1 - e0  # D_full = local slope, h = 1
    bdf2 = 4 / 3 * e1 - 1 / 3 * e0 + 2 / 3 * d
    assert out[2, 0].item() == pytest.approx(e1 + 0.5 * (d + (bdf2 - e1)), rel=1e-12)


def test_bdf2_predictor_reduces_to_eq7_for_unit_ratio():
    from methods._numerics import bdf2_predict

    a, b, s, h = torch.tensor(1.7), torch.tensor(-0.4), torch.tensor(0.9), 0.3
    torch.testing.assert_close(bdf2_predict(a, b, s, h, 1.0), 4 / 3 * a - 1 / 3 * b + 2 * h / 3 * s)


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_method_is_exact_when_every_step_is_full(name):
    values, times, mask = as_tensors(TRAJECTORIES["exponential"], GRIDS["nonuniform"], [True] * T)
    assert torch.equal(replay(name, values, times, mask, N=1), values)


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_replay_validates_inputs(name):
    values, times, mask = as_tensors(TRAJECTORIES["linear"], GRIDS["uniform"], [True] * T)
    with pytest.raises(ValueError, match="same length"):
        replay(name, values, times[:-1], mask)
    with pytest.raises(ValueError, match="full\\[0\\]"):
        replay(name, values, times, torch.tensor([False] + [True] * (T - 1)))


def test_none_refuses_to_forecast():
    values, times, _ = as_tensors(TRAJECTORIES["linear"], GRIDS["uniform"], [True] * T)
    with pytest.raises(RuntimeError, match="never forecasts"):
        replay("none", values, times, torch.tensor(schedule(3, 1)))


def test_time_axis_step_ignores_times():
    """cache.time=step uses t_i = i whatever the scheduler times are."""
    f = TRAJECTORIES["quadratic"]
    full = schedule(3, 1)
    values, times, mask = as_tensors(f, GRIDS["nonuniform"], full)
    step_axis = replay("foca", values, times, mask, time="step")
    uniform = replay("foca", values, torch.arange(T, dtype=torch.float64), mask, time="sigma")
    assert torch.equal(step_axis, uniform)


@pytest.mark.parametrize("slope", ["local", "full"])
@pytest.mark.parametrize("corrector", ["heun", "none"])
@pytest.mark.parametrize("h,dt", [(1.0, 1.0), (-20.0, -20.0), (0.3, 0.7), (-0.05, -0.11)])
def test_fused_foca_equals_bdf2_then_heun(slope, corrector, h, dt):
    """The weights FoCa combines its points with equal the documented predictor/corrector composition."""
    from methods._numerics import bdf2_predict, combine, foca_weights, heun_correct

    g = torch.Generator().manual_seed(0)
    cur, prev, d_full = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    s = (cur - prev) / dt if slope == "local" else d_full
    expected = bdf2_predict(cur, prev, s, h, h / dt)
    if corrector == "heun":
        expected = heun_correct(cur, expected, d_full, h)
    k1, k2 = foca_weights(h, dt, slope, corrector)
    torch.testing.assert_close(combine((cur, prev, d_full), (1 + k1, -k1, k2)), expected, rtol=1e-12, atol=1e-12)


def test_local_slope_bdf2_is_linear_extrapolation():
    from methods._numerics import bdf2_predict

    cur, prev, h, dt = torch.tensor(2.0), torch.tensor(1.5), 0.4, 0.25
    assert bdf2_predict(cur, prev, (cur - prev) / dt, h, h / dt).item() == pytest.approx(2.0 + 0.5 * h / dt)


def test_foca_skipped_steps_write_no_tensor_and_combine_three_anchors():
    """A skipped step's forecast is a combination of F_b, the point before it and D_full, all left untouched (no
    forecast is written, so the engine can fuse it); the values stay those of the recursive closed form."""
    from methods._numerics import combine
    from methods.base import SiteKey, Step

    method = methods.build({"name": "foca", "N": 6, "warmup": 2, "slope": "local"})
    key = SiteKey("s")
    f = TRAJECTORIES["quadratic"]
    computed, outs = {}, []
    for i in range(10):  # full at 0, 1, 2 then skipped 3..7, full at 8, skipped 9
        if method.is_full(i):
            computed[i] = torch.full((4,), f(float(i)), dtype=torch.float64)
            method.update(key, Step(i, float(i)), computed[i])
            outs.append(computed[i])
            continue
        terms = method.forecast_terms(key, Step(i, float(i)))
        assert len(terms.tensors) == 3 and terms.tensors[0] is computed[max(computed)]  # F_b
        if i < 8:  # P: F_1, the point before b = 2
            assert terms.tensors[1] is computed[1]
        else:  # P: the forecast of step 7, materialized once by the full step at 8
            assert all(terms.tensors[1] is not v for v in computed.values())
        outs.append(combine(*terms))
    for i, v in computed.items():
        assert torch.equal(v, torch.full((4,), f(float(i)), dtype=torch.float64)), i  # features never modified
    full = [i < 3 or i == 8 for i in range(10)]
    expected = expected_foca(f, [float(i) for i in range(10)], full, "local", "heun")
    for value, e in zip(outs, expected):
        assert value[0].item() == pytest.approx(e, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("slope", ["local", "full"])
def test_foca_start_up_reuse_happens_with_warmup_0_not_1(slope):
    """`warmup=1` computes steps 0 and 1, so FoCa is exact on a line from the start; `warmup=0` skips step 1, whose
    reuse of F_0 stays in the trajectory (docs/methods.md): errors 3, 6 in the first window, then -3, -4.5 (local
    slope) or -1, -7/6 (`slope=full`) in the second."""
    f = TRAJECTORIES["linear"]
    grid = GRIDS["uniform"]
    exact = as_tensors(f, grid, schedule(3, 1))
    torch.testing.assert_close(replay("foca", *exact, slope=slope), exact[0], rtol=0, atol=1e-12)
    values, times, mask = as_tensors(f, grid, schedule(3, 0))
    error = (replay("foca", values, times, mask, slope=slope) - values)[:6, 0].tolist()
    second = [-3.0, -4.5] if slope == "local" else [-1.0, -7 / 6]
    assert error == pytest.approx([0.0, 3.0, 6.0, 0.0, *second], abs=1e-12)
