"""Metric networks with random weights, saved in their real on-disk formats and loaded by the real loaders.

Nothing here is downloaded: each builder instantiates the metric package's own model class at random init and saves
it where and how the package's loader expects it, so the benchmark code runs end to end offline.
"""

from pathlib import Path
from unittest import mock

import torch


def save_random_inception(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's Inception-v3 (its `.pth` state dict format)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)
    # the constructor loads weights at its end: skip that step only (random init stays)
    with mock.patch.object(fe.torch, "load", return_value={}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict"):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                             feature_extractor_weights_path="unused")
    _variance_preserving(net)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def _variance_preserving(net: torch.nn.Module) -> None:
    """He-normal convolutions and linears: PyTorch's default init shrinks activations by ~1/sqrt(3) per layer, so a
    deep random network (Inception's ~45 layers) would map every image to the same features."""
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
