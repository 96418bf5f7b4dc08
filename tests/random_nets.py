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


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def colour_images(n_per: int, size: int = 32, seed: int = 0):
    """(N, size, size, 3) uint8 noisy solid-colour images and their prompts `a photo of something <colour>`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images, prompts = [], []
    for name, rgb in COLOURS.items():
        for _ in range(n_per):
            images.append(np.clip(np.array(rgb) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8))
            prompts.append(f"a photo of something {name}")
    return np.stack(images), prompts


def save_tiny_clip(folder: Path, steps: int = 40, seed: int = 0) -> tuple[str, Path, Path]:
    """A tiny open_clip architecture (its JSON config, registered by name) fitted for a few contrastive steps to
    match noisy colour images with their colour words, saved as an open_clip state-dict checkpoint.

    Returns:
        (model name, config path, checkpoint path).
    """
    import json

    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    name = "tiny-clip-test"
    config = folder / f"{name}.json"
    config.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}))
    open_clip.add_model_config(str(config))
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    from PIL import Image

    images, prompts = colour_images(8, seed=seed)
    pixels = torch.stack([preprocess(Image.fromarray(x)) for x in images])
    text = tokenizer(prompts)
    labels = torch.tensor([list(COLOURS).index(p.split()[-1]) for p in prompts])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        a = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        b = torch.nn.functional.normalize(model.encode_text(text), dim=-1)
        logits = model.logit_scale.exp() * a @ b.T
        same = (labels[:, None] == labels[None, :]).float()  # several images share a prompt
        loss = -(torch.log_softmax(logits, 1) * same / same.sum(1, keepdim=True)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    checkpoint = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), checkpoint)
    return name, config, checkpoint
