"""AB-Cache (arXiv:2504.10540) through `methods.replay`, against closed forms written with `math.comb`, not with
`methods._numerics`: exact on polynomials of degree < k on a uniform grid (and, with `cache.time=sigma`, on any
grid), the binomial recursion on an exponential, and the order dropping while the history is short."""

import math

import pytest
import torch

from methods import replay

T = 14


def full_steps(N: int, warmup: int) -> torch.Tensor:
    return torch.tensor([i < warmup or (i - warmup) % N == 0 for i in range(T)])


def values_of(f, grid) -> torch.Tensor:
    return torch.tensor([[f(t), -3 * f(t)] for t in grid], dtype=torch.float64)  # (T, 2)


def expected_binomial(f, full: torch.Tensor, k: int) -> list[float]:
    """The paper's recursion on the step grid: a skipped step is sum_j (-1)^(j+1) C(m, j) F_{n+1-j} over the last
    m = min(k, points so far) trajectory values, computed or forecast."""
    out: list[float] = []
    for i in range(T):
        if bool(full[i]):
            out.append(f(float(i)))
        else:
            m = min(k, len(out))
            out.append(sum((-1) ** (j + 1) * math.comb(m, j) * out[-j] for j in range(1, m + 1)))
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("N", [2, 3, 5])
def test_exact_on_polynomials_of_degree_below_k_on_a_uniform_grid(k, N):
    coeffs = [0.7, -1.3, 0.4, -0.05][:k]  # degree k - 1
    f = lambda t: sum(c * t**d for d, c in enumerate(coeffs))  # noqa: E731
    grid = [float(i) for i in range(T)]
    values = values_of(f, grid)
    out = replay("abcache", values, torch.tensor(grid), full_steps(N, warmup=k), N=N, k=k, time="step")
    torch.testing.assert_close(out, values, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("k", [2, 3])
def test_exact_on_any_grid_with_sigma_time(k):
    """cache.time=sigma: Lagrange weights at the scheduler's times, exact on polynomials of degree < k in sigma."""
    grid = [1.0 - (i / T) ** 1.5 for i in range(T)]
    f = (lambda s: 2.0 - 5.0 * s) if k == 2 else (lambda s: 1.0 + s - 4.0 * s * s)
    values = values_of(f, grid)
    out = replay("abcache", values, torch.tensor(grid, dtype=torch.float64), full_steps(4, warmup=k), k=k)
    torch.testing.assert_close(out, values, rtol=1e-9, atol=1e-9)


def test_degree_k_is_not_exact_closed_form():
    """k=2 on F = t^2 from two exact points: 2 (t-1)^2 - (t-2)^2 = t^2 - 2, then the recursion carries the error:
    the forecasts at t and t+1 are t^2 - 2 and (t+1)^2 - 6 (second differences of -2 per step compound)."""
    grid = [float(i) for i in range(T)]
    full = full_steps(5, warmup=2)  # full at 0, 1, 2, 7, 12
    out = replay("abcache", values_of(lambda t: t * t, grid), torch.tensor(grid), full, N=5, k=2, time="step")
    assert out[3, 0].item() == pytest.approx(9 - 2) and out[4, 0].item() == pytest.approx(16 - 6)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("N,warmup", [(3, 1), (4, 0), (5, 2)])
def test_binomial_recursion_on_an_exponential(k, N, warmup):
    f = lambda t: math.exp(-0.4 * t)  # noqa: E731
    grid = [float(i) for i in range(T)]
    full = full_steps(N, warmup)
    full[0] = True
    out = replay("abcache", values_of(f, grid), torch.tensor(grid), full, N=N, k=k, time="step")
    expected = torch.tensor(expected_binomial(f, full, k), dtype=torch.float64)
    torch.testing.assert_close(out[:, 0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, 1], -3 * expected, rtol=1e-12, atol=1e-12)


def test_order_is_checked():
    from methods.abcache import ABCacheConfig

    with pytest.raises(ValueError, match="cache.k=0"):
        ABCacheConfig(k=0)
