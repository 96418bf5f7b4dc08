"""PSNR and SSIM of super-resolved images against ground truth (torchmetrics), as Inf-DiT's Table 4 reports them.

Both on RGB in [0, 1] over the whole image (no border crop, no Y channel: Deviation from the common SR protocol
of Y-channel PSNR, which the paper does not state; `channel` would make it an option), averaged over images.
"""

from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from evaluation import metric
from evaluation.uncertainty import summary


@torch.no_grad()
def psnr_ssim(pairs: Iterable[tuple[np.ndarray, np.ndarray]], total: int) -> dict:
    """Args:
        pairs: (output, ground truth) as (H, W, C) uint8, the same shape.

    Returns:
        psnr (dB, mean over images; an exact image counts as 100 dB), ssim (mean).
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    psnrs, ssims = [], []
    for out, gt in tqdm(pairs, total=total, desc="<psnr/ssim> scoring", unit="image"):
        if out.shape != gt.shape:
            raise ValueError(f"output {out.shape} and ground truth {gt.shape} differ in shape.")
        x, y = (torch.from_numpy(a).permute(2, 0, 1)[None].double() / 255 for a in (out, gt))
        psnrs.append(100.0 if torch.equal(x, y) else float(peak_signal_noise_ratio(x, y, data_range=1.0)))
        ssims.append(float(structural_similarity_index_measure(x, y, data_range=1.0)))
    return {"psnr": metric(np.mean(psnrs), higher_is_better=True, **summary(psnrs)),
            "ssim": metric(np.mean(ssims), higher_is_better=True, **summary(ssims))}
