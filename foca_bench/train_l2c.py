"""Learns an L2C router: `python -m foca_bench.train_l2c model=<name> sampler.steps=<T> [+train.<knob>=...]`.

As the paper (arXiv:2406.01733) and its official DiT code do (horseee/learning-to-cache, DiT/train_router.py and
`router_training_losses` in DiT/diffusion/gaussian_diffusion.py), with the model frozen and only the router learnt:
- every iteration draws a batch x_0 and one t in [0, T/2); its respaced step s = 2t + 1 (odd: a full step at
  sampling) noises x_0 to x_s, and a full DDIM step without gradient takes it to x_{s-1}, recording every
  attention and MLP output (the cache);
- at s - 1 (even: a routed step) the model runs twice: in full (the target, no gradient), and with every site's
  output interpolated as beta * fresh + (1 - beta) * cached, beta = sigmoid(router_{s-1}), one logit per site;
- loss = mean((target - interpolated)^2) + lambda * sum(beta); AdamW without weight decay on the logits, which are
  clamped to [-5, 5] after every update and start from a seeded standard normal draw.
Classes drop to the CFG null class with probability 0.1, as the official script's `label_for_dropout` does. At
sampling, `method=l2c` computes a site at a routed step when beta > `cache.threshold` (officially 0.1).

Data: `+train.data_path=<folder>` of class subfolders (ImageNet's train split for DiT-XL/2: center crop, random
flip, VAE-encoded latents, as the official script), or for a pixel-space model (toy_dit) its bundled digits.
Knobs (defaults: the official DiT-XL/2 NFE-50 run, 50k iterations of batch 64, lambda 1e-6, lr 1e-3):
`+train.iterations +train.batch +train.lr +train.l1 +train.seed +train.data_path +train.out`. The router is written
in the official format to `train.out` (default `results/l2c/<model>_<T>steps.pt`), with a JSON summary beside it.
Class-conditional DiT models only, as the official code (toy_dit, dit_xl_2).
"""

import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from foca_bench.adapters import build_adapter
from foca_bench.adapters.dit import DiTAdapter
from foca_bench.config import compose, split_knobs, validate
from foca_bench.hooks import Site
from methods.l2c import L2C

LABEL_DROPOUT = 0.1  # DiT's class dropout, which the official router training keeps


class Interpolation:
    """Forward hooks on the attention and MLP sites: `record` keeps each site's output (the cache), `interpolate`
    returns beta * fresh + (1 - beta) * cached, `off` leaves outputs alone. Sites are numbered in call order, the
    order in which `method=l2c` numbers them."""

    def __init__(self, sites: list[Site]) -> None:
        self.mode = "off"
        self.beta: Tensor = torch.empty(0)
        self.cached: dict[str, Tensor] = {}
        self.index: dict[str, int] = {}
        self.handles = [site.module.register_forward_hook(self._hook(site)) for site in sites]

    def _hook(self, site: Site) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: object) -> object:
            value = site.unpack(output)
            if self.mode == "record":
                self.index.setdefault(site.name, len(self.index))
                self.cached[site.name] = value.detach()
            elif self.mode == "interpolate":
                beta = self.beta[self.index[site.name]]
                return site.pack(beta * value + (1 - beta) * self.cached[site.name])
            return None

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def bundled_digits(size: int, batch: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless random batches of the toy data (scikit-learn's digits in [-1, 1]) and their labels."""
    from foca_bench.toy_data import load_digits_images

    images, labels = load_digits_images(size)
    images = images * 2.0 - 1.0
    while True:
        idx = torch.randint(0, len(images), (batch,), generator=generator)
        yield images[idx], labels[idx]


def image_folder(path: str, adapter: DiTAdapter, size: int, batch: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled batches of a class-folder image set as VAE latents, preprocessed as DiT's training (ADM's
    center crop, random horizontal flip, [-1, 1])."""
    from PIL import Image
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    def center_crop(image: Image.Image) -> Image.Image:
        while min(image.size) >= 2 * size:
            image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
        scale = size / min(image.size)
        image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
        left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
        return image.crop((left, top, left + size, top + size))

    dataset = ImageFolder(path, transform=transforms.Compose([
        transforms.Lambda(center_crop), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3)]))
    vae = adapter.require_vae()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    while True:
        for x, y in loader:
            with torch.no_grad():
                latents = vae.encode(x.to(adapter.device, adapter.dtype)).latent_dist.sample()
            yield latents * vae.config.scaling_factor, y


def train(overrides: list[str], knobs: dict) -> dict:
    cfg = compose(*overrides)
    validate(cfg)
    adapter = build_adapter(cfg.model, "cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(adapter, DiTAdapter):
        raise SystemExit(f"train_l2c trains routers for class-conditional DiT models (toy_dit, dit_xl_2), as the "
                         f"official code; model={cfg.model.name} is not one.")
    torch.manual_seed(knobs["seed"])
    generator = torch.Generator().manual_seed(knobs["seed"])
    model, scheduler, T = adapter.transformer, adapter.scheduler, cfg.sampler.steps
    if T < 2:
        raise SystemExit(f"sampler.steps={T}: L2C routes the even steps after odd ones; use at least 2 steps.")
    scheduler.set_timesteps(T)
    timesteps = scheduler.timesteps  # sampling order; respaced step s is sampling step T - 1 - s
    side = model.config.sample_size * (8 if cfg.model.vae else 1)
    data = (image_folder(knobs["data_path"], adapter, side, knobs["batch"], knobs["seed"]) if knobs["data_path"]
            else bundled_digits(side, knobs["batch"], generator) if not cfg.model.vae else None)
    if data is None:
        raise SystemExit(f"model={cfg.model.name} generates latents: set +train.data_path=<image folder> (ImageNet's "
                         "train split for DiT-XL/2).")
    sites = [s for s in adapter.sites() if s.role in L2C.roles and not s.residual]
    hooks = Interpolation(sites)
    logits = torch.randn(T, len(sites), generator=generator).to(adapter.device).requires_grad_(True)
    opt = torch.optim.AdamW([logits], lr=knobs["lr"], weight_decay=0.0)

    def denoise(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return model(x, timestep=t.expand(len(x)).to(adapter.device), class_labels=y, return_dict=False)[0]

    started, running, history = time.perf_counter(), None, []
    try:
        for it in tqdm(range(knobs["iterations"]), desc=f"<l2c: {cfg.model.name}, {T} steps> iterations"):
            x0, y = next(data)
            x0, y = x0.to(adapter.device, adapter.dtype), y.to(adapter.device)
            y = torch.where(torch.rand(len(y), generator=generator).to(y.device) < LABEL_DROPOUT,
                            torch.full_like(y, adapter.null_class), y)
            s = 2 * int(torch.randint(0, T // 2, (1,), generator=generator)) + 1
            k = T - 1 - s
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            with torch.no_grad():
                hooks.mode = "record"
                x_s = scheduler.add_noise(x0, noise, timesteps[k:k + 1])
                out = denoise(x_s, timesteps[k], y)
                eps = out[:, :adapter.latent_channels] if adapter.learned_sigma else out
                x_next = scheduler.step(eps, timesteps[k], x_s).prev_sample
                hooks.mode = "off"
                target = denoise(x_next, timesteps[k + 1], y)
            beta = torch.sigmoid(logits[s - 1])
            hooks.mode, hooks.beta = "interpolate", beta
            pred = denoise(x_next, timesteps[k + 1], y)
            hooks.mode = "off"
            mse = F.mse_loss(pred.float(), target.float())
            loss = mse + knobs["l1"] * beta.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                logits.clamp_(-5, 5)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if it % 100 == 0:
                history.append({"iteration": it, "loss": loss.item(), "mse": mse.item(), "step": s - 1})
    finally:
        hooks.remove()
    order = sorted(hooks.index, key=hooks.index.get)
    if len(order) != len(sites):
        raise RuntimeError(f"recorded {len(order)} of {len(sites)} attention/MLP sites")
    routed = {i: int((torch.sigmoid(logits[i]) > 0.1).sum()) for i in range(0, T, 2)}
    return {"model": cfg.model.name, "steps": T, "overrides": overrides, "knobs": knobs, "sites": order,
            "logits": logits.detach().cpu(), "final_loss_ema": running, "history": history,
            "active_at_threshold_0.1": routed, "train_seconds": round(time.perf_counter() - started, 1),
            "torch": str(torch.__version__), "threads": torch.get_num_threads()}


def main(argv: list[str]) -> dict:
    knobs = {"iterations": 50_000, "batch": 64, "lr": 1e-3, "l1": 1e-6, "seed": 0, "data_path": "", "out": ""}
    overrides = split_knobs(argv, "train", knobs)
    result = train(overrides, knobs)
    out = Path(knobs["out"] or f"results/l2c/{result['model']}_{result['steps']}steps.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    logits = result.pop("logits")
    torch.save({"routers": {f"{i}.prob": logits[i].clone() for i in range(len(logits))},
                "args": {k: v for k, v in result.items() if k != "history"}}, out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    active = result["active_at_threshold_0.1"]
    print(f"<l2c> router for {result['model']} at {result['steps']} steps in {result['train_seconds']} s, loss "
          f"{result['final_loss_ema']:.5f}: {sum(active.values())}/{len(active) * len(result['sites'])} sites "
          f"compute at the routed steps (threshold 0.1) -> {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
