"""CLIP score (Hessel et al., arXiv:2104.08718) with open-clip-torch: 100 * max(cos(image, prompt), 0), averaged.

The scale is torchmetrics' `CLIPScore` (100 x cosine, no 2.5 weight), the scale of the paper's Table 1 column.
Weights load through `open_clip.create_model_and_transforms(name, pretrained=<local file>)`: OpenAI's `ViT-L-14.pt`
or an open_clip checkpoint; a custom architecture registers its JSON config first (`config_path`).
"""

from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from evaluation import metric


def load_clip(name: str, checkpoint: Path, device: str = "cpu", config_path: Optional[Path] = None):
    """(model, preprocess, tokenizer) through open_clip's own loader, from a local checkpoint only."""
    import open_clip

    if config_path is not None:
        open_clip.add_model_config(str(config_path))
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(checkpoint), device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def clip_scores(images: Iterable[np.ndarray], prompts: list[str], model, preprocess, tokenizer, device: str = "cpu",
                batch_size: int = 32) -> np.ndarray:
    """Per-sample 100 * max(cos, 0) of (H, W, C) uint8 images against their prompts."""
    images = list(images)
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="<clip_score> scoring", unit="batch"):
        chunk = images[start : start + batch_size]
        pixels = torch.stack([preprocess(Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).convert("RGB"))
                              for x in chunk]).to(device)
        text = tokenizer(prompts[start : start + batch_size]).to(device)
        a = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)
        b = torch.nn.functional.normalize(model.encode_text(text).float(), dim=-1)
        out.append((100 * (a * b).sum(-1)).clamp_min(0).cpu())
    return torch.cat(out).numpy()


def clip_score(scores: np.ndarray) -> dict:
    return {"clip_score": metric(float(np.mean(scores)), higher_is_better=True)}
