"""The embedded toy data set: scikit-learn's bundled 8x8 handwritten digits, upsampled.

scikit-learn ships the 1,797 digits inside its wheel, so the toy model and its feature network can be trained
and evaluated on a machine with no network.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

NUM_CLASSES = 10


def load_digits_images(size: int = 16) -> tuple[Tensor, Tensor]:
    """Loads the digits as images in [0, 1].

    Args:
        size: side length after bilinear upsampling from 8x8.

    Returns:
        images (N, 1, size, size) float32 in [0, 1] and labels (N,) int64.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target).long()
    return images.clamp(0.0, 1.0), labels


def split(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed train/test split of n indices."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(n * test_fraction)
    return perm[n_test:], perm[:n_test]
