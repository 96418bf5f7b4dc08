"""The original DiT repository's sampler (arXiv:2212.09748), `sampler.lineage=dit`: respaced DDIM with eta = 0.

The code behind the FoCa paper's DiT-XL/2 rows (TaylorSeer-DiT, ToCa-DiT) is built on facebookresearch/DiT and
samples with `create_diffusion(str(steps))` + `ddim_sample_loop`. That differs from diffusers' `DDIMScheduler`
(`sampler.lineage=diffusers`) in three ways, each reproduced here from the original's semantics:
- timesteps: `space_timesteps(1000, "50")` takes round(k * 999 / 49), k = 0..49, by accumulating the fractional
  stride (999, 979, 958, ..., 20, 0: gaps of 20 and 21), where diffusers' leading spacing takes 980, 960, ..., 0;
- the respaced process: betas are rebuilt so that its alphas_cumprod are the base ones at the kept timesteps, and
  the step goes to the next kept timestep (1.0 after the last), where diffusers' DDIM steps back a fixed
  1000 // steps; the base schedule is float64 numpy (`np.linspace` betas), diffusers' float32 torch;
- the update: x0 = sqrt(1/a) x - sqrt(1/a - 1) eps (clamped to [-1, 1] if `clip`), eps re-derived from x0, then
  x0 sqrt(a_prev) + sqrt(1 - a_prev) eps, each coefficient cast from float64 to float32 and square roots of a,
  a_prev taken in float32, in the original's order of operations, so the numbers match it bit for bit.
Classifier-free guidance on the first three channels (`forward_with_cfg`) is the adapter's (`DiTAdapter`).
"""

from typing import Any

import numpy as np
import torch
from torch import Tensor


def respaced_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """DiT's `space_timesteps(num_train_timesteps, str(steps))` (one section), in sampling order (descending)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"sampler.steps={steps}: DiT's respacing takes 1..{num_train_timesteps} of the "
                         f"{num_train_timesteps} training timesteps.")
    stride = (num_train_timesteps - 1) / (steps - 1) if steps > 1 else 1
    taken, position = [], 0.0
    for _ in range(steps):  # accumulated, not k * stride: the two round differently for some step counts
        taken.append(round(position))
        position += stride
    return sorted(set(taken), reverse=True)


class RespacedDDIM:
    """DiT's respaced diffusion process and its deterministic DDIM step (eta = 0).

    Args:
        scheduler: the model's scheduler config (`num_train_timesteps`, `beta_schedule: linear`, `beta_start`,
            `beta_end`, `clip_sample`).
        steps: number of sampling steps.
    """

    def __init__(self, scheduler: Any, steps: int) -> None:
        if scheduler.get("beta_schedule", "linear") != "linear":
            raise ValueError(f"sampler.lineage=dit: DiT's sampler takes a linear beta schedule, not model.scheduler."
                             f"beta_schedule={scheduler.beta_schedule!r}; use sampler.lineage=diffusers.")
        num = int(scheduler.get("num_train_timesteps", 1000))
        betas = np.linspace(scheduler.get("beta_start", 0.0001), scheduler.get("beta_end", 0.02), num, dtype=np.float64)
        base = np.cumprod(1.0 - betas)
        kept = respaced_timesteps(num, steps)
        ascending = sorted(kept)
        new_betas, last = [], 1.0
        for i in ascending:  # SpacedDiffusion: the kept timesteps' alphas_cumprod, as betas of a shorter process
            new_betas.append(1 - base[i] / last)
            last = base[i]
        alphas_cumprod = np.cumprod(1.0 - np.array(new_betas))
        self.clip = bool(scheduler.get("clip_sample", False))
        self.timesteps = torch.tensor(kept, dtype=torch.int64)  # (T,) in sampling order
        # per sampling step i (respaced index T-1-i), float64 -> float32 as DiT's _extract_into_tensor casts them
        order = list(range(len(kept)))[::-1]
        f32 = lambda arr: torch.from_numpy(np.asarray(arr)[order]).float()
        self.sqrt_recip = f32(np.sqrt(1.0 / alphas_cumprod))
        self.sqrt_recipm1 = f32(np.sqrt(1.0 / alphas_cumprod - 1))
        self.alpha_prev = f32(np.append(1.0, alphas_cumprod[:-1]))

    def step(self, eps: Tensor, i: int, x: Tensor) -> Tensor:
        """x at sampling step i -> x at step i+1, given the model's (guided) epsilon."""
        a, b, a_prev = (v[i].to(x.device) for v in (self.sqrt_recip, self.sqrt_recipm1, self.alpha_prev))
        x0 = a * x - b * eps
        if self.clip:
            x0 = x0.clamp(-1, 1)
        eps = (a * x - x0) / b  # DiT re-derives eps from x0
        return x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev) * eps  # sigma = 0 at eta = 0
