"""Builds a random-init CLIP in the file format VBench's `background_consistency` loads: a traced TorchScript
archive, as OpenAI's `ViT-B-32.pt` is, which `clip.load(<path>)` of openai-clip opens and rebuilds from its state
dict's shapes (in fp16, then float on a CPU). Small width, saved as `<cache>/clip_model/ViT-B-32.pt`. Run in the
VBench environment: `.envs/vbench/bin/python -m tests.build_vbench_weights <cache folder>`."""

import sys
from pathlib import Path

import torch
from clip.model import CLIP


def main(cache: Path) -> None:
    torch.manual_seed(0)
    # 224 px input in 32 px patches, as ViT-B/32; one residual block of width 64 (heads = width // 64 on load)
    model = CLIP(embed_dim=32, image_resolution=224, vision_layers=1, vision_width=64, vision_patch_size=32,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                 transformer_layers=1).eval()
    traced = torch.jit.trace(model, (torch.randn(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)))
    path = cache / "clip_model" / "ViT-B-32.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(path))
    print(path)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
