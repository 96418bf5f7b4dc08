"""Shared numerics of the forecasting methods: divided differences, Taylor sums, BDF2 and Heun combinations.

TaylorSeer (arXiv:2503.06923) and FoCa (arXiv:2508.16211) both build on these; each function is a closed form
that the tests check on polynomials and exponentials.
"""

import math
from typing import Optional, Sequence

from torch import Tensor


def divided_difference(new: Tensor, old: Tensor, dt: float) -> Tensor:
    """(new - old) / dt."""
    return (new - old) / dt


def taylor_factors(feature: Tensor, previous: Sequence[Optional[Tensor]], dt: float, order: int) -> list[Tensor]:
    """TaylorSeer's factor update at a full step, as its official code computes it.

    Factor 0 is the feature; factor k+1 is (new factor k - previous factor k) / dt, where dt is the time between
    the last two full steps. Orders whose previous factor does not exist yet are not formed.

    Args:
        feature: the freshly computed feature.
        previous: the factors from the previous full step (empty at the first one).
        dt: time between this full step and the previous one.
        order: the maximum order O.

    Returns:
        The new factors, of length min(order, len(previous)) + 1.
    """
    factors = [feature]
    for k in range(min(order, len(previous))):
        if previous[k] is None:
            break
        factors.append(divided_difference(factors[k], previous[k], dt))
    return factors


def taylor_eval(factors: Sequence[Tensor], distance: float) -> Tensor:
    """Truncated Taylor sum: sum_k factors[k] / k! * distance**k."""
    out = factors[0]
    for k in range(1, len(factors)):
        out = out + factors[k] * (distance**k / math.factorial(k))
    return out


def bdf2_predict(current: Tensor, previous: Tensor, slope: Tensor, h: float, w: float) -> Tensor:
    """Explicit variable-step BDF2 predictor.

    F^ = (1+w)^2/(1+2w) F_i - w^2/(1+2w) F_{i-1} + h (1+w)/(1+2w) s, with w = h / (t_i - t_{i-1}).
    For w = 1 this is the paper's eq. 7: 4/3 F_i - 1/3 F_{i-1} + 2h/3 s. Exact on linear trajectories.
    """
    denom = 1.0 + 2.0 * w
    return current * ((1.0 + w) ** 2 / denom) - previous * (w**2 / denom) + slope * (h * (1.0 + w) / denom)


def heun_correct(current: Tensor, predicted: Tensor, anchor_slope: Tensor, h: float) -> Tensor:
    """Heun (trapezoidal) corrector, eq. 8: F_i + h/2 (D_full + (F^ - F_i) / h)."""
    return current + anchor_slope * (h / 2.0) + (predicted - current) * 0.5
