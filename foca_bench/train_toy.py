"""Trains the embedded toy models on scikit-learn's digits: `python -m foca_bench.train_toy` (`make toy-model`).

Two seeded trainings, both CPU-only:
- the digit classifier that serves as the toy benchmark's feature network (seconds);
- `toy_dit`: a class-conditional diffusers `DiTTransformer2DModel`, DDPM-trained (linear betas, epsilon
  prediction, 10% label dropout to the null class for CFG) exactly as DiT-XL/2 was, at toy size.

Outputs land in `foca_bench/assets/` in diffusers' folder layout (`transformer/`, `scheduler/`), which the
`toy_dit` adapter loads with `from_pretrained`.
"""

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from foca_bench import ASSETS_DIR, REPO_DIR
from foca_bench.digit_classifier import CLASSIFIER_DIR, DigitClassifier, save_classifier
from foca_bench.toy_data import load_digits_images, split

TOY_DIT_DIR = ASSETS_DIR / "toy_dit"


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shifts each image by up to `max_shift` pixels (zero padding): cheap augmentation for the classifier."""
    b, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def train_classifier(out_dir: Path = CLASSIFIER_DIR, epochs: int = 30, seed: int = 0) -> float:
    """Trains the feature network; returns its held-out accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_digits_images(16)
    train_idx, test_idx = split(len(images), seed=seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in tqdm(range(epochs), desc="<digit_classifier> epochs"):
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for batch in perm.split(64):
            loss = F.cross_entropy(model(_random_shift(images[batch], gen)), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    save_classifier(model, out_dir, {"test_accuracy": accuracy, "epochs": epochs, "seed": seed,
                                     "torch": torch.__version__})
    print(f"<digit_classifier> held-out accuracy {accuracy:.4f} -> {out_dir}")
    return accuracy


def train_toy_dit(out_dir: Path = TOY_DIT_DIR, steps: int = 4000, batch_size: int = 64, lr: float = 1e-3,
                  ema_decay: float = 0.999, label_dropout: float = 0.1, seed: int = 0) -> dict:
    """DDPM training of the toy DiT; saves the EMA weights."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    model_cfg = OmegaConf.to_container(OmegaConf.load(REPO_DIR / "conf/model/toy_dit.yaml"), resolve=False)
    model = DiTTransformer2DModel(**model_cfg["arch"])
    scheduler = DDPMScheduler(**model_cfg["scheduler"])
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    images, labels = load_digits_images(model_cfg["arch"]["sample_size"])
    x0_all = images * 2.0 - 1.0  # (N, 1, 16, 16) in [-1, 1]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    lr_at = lambda s: lr * min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    # Deviation from diffusers' train mode: each DiT block has its own LabelEmbedding that drops labels
    # independently, so the all-null input CFG uses at sampling would be seen with probability 0.1**L. We drop
    # once per sample for every block, as the original DiT's single class embedder does.
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.eval()
    null_class = model_cfg["arch"]["num_embeds_ada_norm"]
    start, running = time.perf_counter(), None
    bar = tqdm(range(steps), desc="<toy_dit> DDPM steps")
    for step in bar:
        idx = torch.randint(0, len(x0_all), (batch_size,))
        x0, y = x0_all[idx], labels[idx]
        y = torch.where(torch.rand(batch_size) < label_dropout, torch.full_like(y, null_class), y)  # CFG null
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        pred = model(scheduler.add_noise(x0, noise, t), timestep=t, class_labels=y, return_dict=False)[0]
        loss = F.mse_loss(pred, noise)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay, "seed": seed,
            "label_dropout": label_dropout,
            "final_loss_ema": running, "train_seconds": round(time.perf_counter() - start, 1),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    ema.save_pretrained(out_dir / "transformer", safe_serialization=True)
    scheduler.save_pretrained(out_dir / "scheduler")
    (out_dir / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"<toy_dit> trained in {info['train_seconds']} s, loss {running:.4f} -> {out_dir}")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=["all", "classifier", "dit"], default="all")
    parser.add_argument("--steps", type=int, default=4000, help="DDPM training steps of the toy DiT")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.what in ("all", "classifier"):
        train_classifier(seed=args.seed)
    if args.what in ("all", "dit"):
        train_toy_dit(steps=args.steps, seed=args.seed)


if __name__ == "__main__":
    main()
