"""Inputs of the Inf-DiT golden comparison, written with our code only.

`python -m tests.build_inf_dit_golden [path]` writes a seeded tiny random Inf-DiT (non-square image, 4 x 6 blocks)
under the ORIGINAL checkpoint's parameter names (our key map inverted), its CLIP tower under
`image_encoder.model.visual.*`, a low-res image and one evaluation's noisy input at sigma 2.5. The original code
(THUDM/Inf-DiT, SwissArmyTransformer, run once outside this repository: docs/models.md says how) loads those
weights, runs one evaluation and a 5-step Heun sampling (whose starting noise it draws and saves) and adds its
outputs (`original/*`) to the file, which is
`tests/golden/inf_dit_tiny.safetensors`; tests/test_inf_dit.py checks our model against them. Only numbers come
from the original: no code of it is in this repository.
"""

import sys
from pathlib import Path

import torch

from foca_bench.inf_dit.checkpoint import original_names
from foca_bench.inf_dit.model import ClipImageEmbedding, InfDiT, InfDiTArch, init_random

GOLDEN = Path(__file__).parent / "golden" / "inf_dit_tiny.safetensors"
ARCH = InfDiTArch(hidden_size=64, num_layers=2, num_heads=4, block_size=4, vector_dim=16, rope_grid=32,
                  clip={"embed_dim": 16, "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "head_width": 16,
                                                        "patch_size": 14}})
HR = (64, 96)  # 16 x 24 tokens: 4 x 6 blocks of 4 x 4 tokens
STEPS = 5  # Heun steps of the sampling comparison (9 evaluations)
SIGMA = 2.5  # the single-evaluation comparison's noise level
SEED = 20240520


def tiny_model() -> tuple[InfDiT, ClipImageEmbedding]:
    torch.manual_seed(SEED)
    model = InfDiT(ARCH)
    clip = ClipImageEmbedding(ARCH.clip["embed_dim"], ARCH.clip["vision_cfg"])
    init_random(model, SEED)
    with torch.no_grad():  # biases and gains away from their defaults too, so every weight matters
        for p in list(model.parameters()) + list(clip.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval(), clip.eval()


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    h, w = HR[0] // ARCH.sr_scale, HR[1] // ARCH.sr_scale
    coarse = torch.rand(1, 3, h // 4, w // 4, generator=g) * 2 - 1
    low_res = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").clamp(-1, 1)
    return {"inputs/low_res": low_res, "inputs/x": torch.randn(1, 3, *HR, generator=g) * SIGMA}


def build(path: Path = GOLDEN) -> Path:
    from safetensors.torch import save_file

    model, clip = tiny_model()
    state = {f"weights/{k}": v for k, v in original_names(model.state_dict(), ARCH.num_layers).items()}
    state.update({f"weights/image_encoder.model.visual.{k}": v for k, v in clip.visual.state_dict().items()})
    state.update(inputs())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else GOLDEN))
