"""Fidelity of a cached run to the full-compute run with the same seeds: PSNR, SSIM (torchmetrics), relative L2."""

import torch
from torch import Tensor

from evaluation import metric
from evaluation.uncertainty import summary


@torch.no_grad()
def fidelity(images: Tensor, reference: Tensor) -> dict:
    """Args:
        images, reference: (N, C, H, W) in [0, 1], sample i of both from the same seed.

    Returns:
        psnr (dB, None when identical), ssim, rel_l2 (mean over samples of ||x - ref|| / ||ref||).
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape.")
    images, reference = images.double(), reference.double()
    exact = torch.equal(images, reference)
    psnr = None if exact else peak_signal_noise_ratio(images, reference, data_range=1.0)
    ssim = structural_similarity_index_measure(images, reference, data_range=1.0)
    diff = (images - reference).flatten(1).norm(dim=1)
    rel_l2 = diff / reference.flatten(1).norm(dim=1).clamp_min(1e-12)  # (N,)
    # per-sample values that recompute each metric (PSNR over the set = 10 log10(1 / mean per-sample MSE))
    mse = (images - reference).flatten(1).pow(2).mean(1)
    ssims = structural_similarity_index_measure(images, reference, data_range=1.0, reduction="none")
    return {
        "psnr": metric(psnr, higher_is_better=True, **({} if exact else summary(mse.numpy(), "psnr"))),
        "ssim": metric(ssim, higher_is_better=True, **summary(ssims.numpy())),
        "rel_l2": metric(rel_l2.mean(), higher_is_better=False, **summary(rel_l2.numpy())),
    }
