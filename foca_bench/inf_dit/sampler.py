"""Inf-DiT's sampler: EDM preconditioning and the deterministic Heun sampler (Karras et al., arXiv:2206.00364), as
THUDM/Inf-DiT's `dit/precond.py` (`EDMPrecond`), `dit/sampling/discretizers.py` (`EDMDiscretization`) and
`dit/sampling/samplers.py` (`ConcatSRHeunEDMSampler`, no churn, `IdentityGuider`: no guidance) run it.

`steps` Heun steps over sigma_max .. sigma_min (rho 7) and a final 0 take 2 * steps - 1 model evaluations: two per
step, except the last, whose target sigma is 0 (an Euler step). Sampling starts from the upsampled low-res image
plus sigma_max noise (`--init_noise`). Consecutive evaluations 2i+1 and 2i+2 share sigma_{i+1} (the corrector of
step i and the predictor of step i+1), so the caching step axis is the evaluation index.
"""

from typing import Callable

import torch
from torch import Tensor

SIGMA_DATA = 0.5


def edm_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 40.0, rho: float = 7.0) -> Tensor:
    """(steps + 1,) float32: Karras et al.'s schedule from sigma_max to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)])


def evaluations(steps: int) -> int:
    """Model evaluations of a Heun run of `steps` steps."""
    return 2 * steps - 1


def precondition(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's (c_skip, c_out, c_in, c_noise) for sigma (any shape), sigma_data 0.5."""
    var = sigma**2 + SIGMA_DATA**2
    return SIGMA_DATA**2 / var, sigma * SIGMA_DATA / var**0.5, 1 / var**0.5, 0.25 * sigma.log()


def heun(denoise: Callable[[Tensor, Tensor, int], Tensor], x: Tensor, sigmas: Tensor) -> Tensor:
    """Deterministic Heun sampling.

    Args:
        denoise: (x, sigma (B,), evaluation index) -> the denoised image D(x; sigma).
        x: (B, C, H, W) the starting point at sigmas[0].
        sigmas: (steps + 1,) on the CPU in x's dtype (as the original casts them), ending with 0.

    Returns:
        The sample at sigma 0.
    """
    ones = x.new_ones(x.shape[0])
    evaluation = 0
    for i in range(len(sigmas) - 1):
        sigma, target = ones * sigmas[i], ones * sigmas[i + 1]
        d = (x - denoise(x, sigma, evaluation)) / sigma.view(-1, 1, 1, 1)
        evaluation += 1
        dt = (target - sigma).view(-1, 1, 1, 1)
        euler = x + dt * d
        if float(sigmas[i + 1]) * len(x) < 1e-14:  # the original's sum(next_sigma) < 1e-14: sigma 0, Euler
            x = euler
            continue
        d_new = (euler - denoise(euler, target, evaluation)) / target.view(-1, 1, 1, 1)
        evaluation += 1
        x = x + (d + d_new) / 2.0 * dt
    return x


def denoiser(network: Callable[[Tensor, Tensor], Tensor], low_res_up: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """D(x; sigma) = c_skip x + c_out F(c_in [x, upsampled low-res]; c_noise), as `precond_forward` computes it (the
    upsampled low-res channels are scaled by c_in too)."""

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        c_skip, c_out, c_in, c_noise = (c.to(x.dtype) for c in precondition(sigma.view(-1, 1, 1, 1)))
        images = torch.cat([x, low_res_up], dim=1)
        return network(images * c_in, c_noise.reshape(-1)) * c_out + images[:, : x.shape[1]] * c_skip

    return denoise
