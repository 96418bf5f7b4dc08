"""Shared numerics of the forecasting methods: divided differences, Taylor weights, BDF2 and Heun combinations,
and the eager evaluation of a forecast's linear combination (`combine`).

TaylorSeer (arXiv:2503.06923) and FoCa (arXiv:2508.16211) both build on these; each function is a closed form
that the tests check on polynomials and exponentials.
"""

import math
from typing import Optional, Sequence

import torch
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


def taylor_weights(count: int, distance: float) -> tuple[float, ...]:
    """The truncated Taylor sum's weights on `count` factors: distance**k / k!, k = 0..count-1."""
    return tuple(distance**k / math.factorial(k) for k in range(count))


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


def foca_weights(h: float, dt: float, slope: str, corrector: str) -> tuple[float, float]:
    """FoCa's forecast as F_i + k1 (F_i - F_{i-1}) + k2 D_full, the fused form of `bdf2_predict`+`heun_correct`.

    The predictor is F^ = F_i + B (F_i - F_{i-1}) + C s with B = w^2/(1+2w), C = h(1+w)/(1+2w) (A - B = 1).
    With the local slope s = (F_i - F_{i-1})/dt, B + C/dt = w: the BDF2 predictor collapses to linear
    extrapolation through the last two points. Heun then gives F_i + (F^ - F_i)/2 + h/2 D_full.

    Returns:
        (k1, k2).
    """
    w = h / dt
    b, c = w * w / (1.0 + 2.0 * w), h * (1.0 + w) / (1.0 + 2.0 * w)
    k1, k2 = (w, 0.0) if slope == "local" else (b, c)
    if corrector == "heun":
        k1, k2 = k1 / 2.0, k2 / 2.0 + h / 2.0
    return k1, k2


def cachedit_gain(elapsed: int, horizon: int = 3) -> float:
    """cache-dit's FoCa step factor g(e) in F_b + g(e) (D + d): the trapezoid's e/2 up to `horizon` steps after the
    last full step; beyond, its blend (h/e) (F_b + h/2 (D + d)) + (1 - h/e) F_b, i.e. g(e) = h^2 / (2e)."""
    return elapsed / 2.0 if elapsed <= horizon else horizon / elapsed * (horizon / 2.0)


def combine(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_j weights[j] * tensors[j], eagerly, in as few kernels as the weights allow (zero weights skipped).

    A lone unit weight returns its tensor itself; a leading unit weight starts with `add(alpha=)`; an affine pair
    (w0 + w1 = 1, as every extrapolation through two points is) with `lerp`, so FoCa's steady state costs the two
    kernels of its fused predictor-corrector. The engine's compiled skipped step evaluates the same sum in-graph.
    """
    terms = [(t, float(w)) for t, w in zip(tensors, weights, strict=True) if w != 0.0]
    if not terms:
        return torch.zeros_like(tensors[0])
    (t0, w0), rest = terms[0], terms[1:]
    if w0 == 1.0:
        if not rest:
            return t0
        (t1, w1), rest = rest[0], rest[1:]
        out = torch.add(t0, t1, alpha=w1)
    elif rest and abs(w0 + rest[0][1] - 1.0) <= 1e-12:
        (t1, w1), rest = rest[0], rest[1:]
        out = torch.lerp(t0, t1, w1)  # (1 - w1) t0 + w1 t1
    else:
        out = torch.mul(t0, w0)
    for t, w in rest:
        out.add_(t, alpha=w)
    return out


def token_index(indices: Tensor, shape: torch.Size) -> Tensor:
    """(B, k) token indices expanded over the feature dims of a (B, tokens, ...) tensor of `shape`, for
    `gather`/`scatter_` along dim 1 (token-wise methods' partial steps)."""
    return indices.view(*indices.shape, *([1] * (len(shape) - 2))).expand(*indices.shape, *shape[2:])


def extrapolation_weights(times: Sequence[float], t: float) -> list[float]:
    """Lagrange weights w_j, in the order of `times`, with p(t) = sum_j w_j F_j for the polynomial p through the points
    (times[j], F_j): exact for polynomials of degree < len(times). One step past a uniform grid they are the binomial
    weights (-1)^(j+1) C(k, j) of the j-th newest point (2, -1 for k = 2; 3, -3, 1 for k = 3)."""
    k = len(times)
    return [float(math.prod((t - times[m]) / (times[j] - times[m]) for m in range(k) if m != j)) for j in range(k)]
