"""Inf-DiT adapter (arXiv:2405.04312): our implementation (`foca_bench/inf_dit`) and its EDM Heun sampler, for
generative super-resolution (`benchmark=div8k`, the paper's Table 4).

Cache sites, per block: the UniBA self-attention output (`attn`) and the MLP output (`mlp`, token-wise), both
before the residual add (Inf-DiT has no gates), with the LayerNorm in front of each as its feeder; block 0's
low-res cross-attention is no site, so it is computed at every evaluation. Also each block's residual (`block`),
the stack's (`blocks`; signal: block 0's modulated attention input) and the network output (`model`).

The step axis is the model evaluation: 20 Heun steps are 39 evaluations (`sampler.steps` counts Heun steps), each
its own engine step with the evaluation index as `Step.index` and its sigma as `Step.t`. Two consecutive
evaluations share a sigma, so `cache.time=sigma` is refused (a divided difference over them divides by zero).

`model.mode=whole` denoises the whole image at each evaluation. `model.mode=strips` is the block-by-block mode:
strips of `model.strip` full-width block rows, top to bottom, each denoised through all evaluations before the next,
with the keys and values of the block row above each strip kept from the strip before (`StripMemory`): the same
image (tested), a feature cache of one strip, and the memories of one block row per (evaluation, layer).
`model.mode=auto` (default) runs the whole image if the memory plan (`foca_bench/inf_dit/memory.py`, said before
generating) fits, else the widest strips that do; a configuration nothing fits is refused with the settings that do.
Deviation from the official code: its memory-efficient loops (`inference_type` `ar`, `ar2`) go block by block inside
each evaluation. `ar` stacks the neighbours in another order and without the edge copies the whole-image pass uses
(max |difference| to `full` 3.7e-2 on our tiny golden instance), and `ar2` fails with the released model's low-res
cross-attention (`cross_attention_forward() missing ... 'lr_imgs'`) and, with `block_batch > 1`, never refreshes the
last group column's top memory (`j == block_w - 1` compares a group index with a block count). `full`, the mode the
authors' script runs, is what ours equals.
"""

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf
from torch import Tensor
from tqdm import tqdm

from foca_bench.adapters import register_adapter
from foca_bench.adapters.base import Adapter, MissingWeightsError
from foca_bench.hooks import CacheEngine, Site, first_token
from foca_bench.inf_dit import memory as memory_plan
from foca_bench.inf_dit.checkpoint import CHECKPOINT_FILE, CLIP_WHERE, WHERE, checkpoint_file, load_original
from foca_bench.inf_dit.model import (ClipImageEmbedding, InfDiT, InfDiTArch, Strip, StripMemory, init_random,
                                      modulate, rope_table)
from foca_bench.inf_dit.sampler import denoiser, edm_sigmas, evaluations, heun

log = logging.getLogger("foca_bench")
NARROWER = {"float32": "bfloat16"}  # a cache dtype that halves a model dtype's


def _modulated_input(block: torch.nn.Module) -> Callable[[tuple, dict], Tensor]:
    """TeaCache's indicator: block 0's adaLN-modulated attention input, (B, tokens, D)."""

    def signal(args: tuple, kwargs: dict) -> Tensor:
        x, call = args[0], args[1]
        shift, scale = block.modulations(call)[:2]
        return modulate(block.norm1(x), shift, scale)

    return signal


@register_adapter("inf_dit")
class InfDiTAdapter(Adapter):
    condition = "low_res"  # (B, 3, h, w) in [0, 1]: benchmark=div8k's inputs
    offloads = (False, True)  # `model.offload`: the feature cache and strip memories in host memory (its own plan)

    def __init__(self, cfg: Any, device: str) -> None:
        super().__init__(cfg, device)
        self.arch = InfDiTArch(**OmegaConf.to_container(cfg.arch, resolve=True))
        if cfg.resolution % self.arch.block_pixels:
            raise ValueError(f"model.resolution={cfg.resolution} must be a multiple of Inf-DiT's block, "
                             f"{self.arch.block_pixels} px (block_size x patch_size).")
        self.blocks_per_side = cfg.resolution // self.arch.block_pixels
        self.clip_source = "none"
        self.model, self.clip = self._build()
        self.memory_peak_bytes = 0  # strip mode's key/value memories at their peak, last generation
        self.memory_plan: Optional[memory_plan.Estimate] = None  # the last generation's
        self._plans: dict[str, memory_plan.Estimate] = {}

    @classmethod
    def refuse(cls, model_cfg: Any, cache: Any) -> Optional[str]:
        import methods

        method = methods.get(cache.name)
        if model_cfg.get("mode") not in ("auto", "whole", "strips"):
            return f"model.mode={model_cfg.get('mode')}: choose auto, whole or strips."
        if method.external:
            return (f"method={cache.name} applies diffusers' hooks to a diffusers model; Inf-DiT is foca-bench's own "
                    "implementation: use the foca-bench methods (fora, taylorseer, foca, abcache, ...).")
        if cache.name == "l2c":
            return ("method=l2c: L2C's routers are learnt on DiT models (python -m foca_bench.train_l2c, like the "
                    "official code, trains DiT only); on Inf-DiT use an interval method (foca, taylorseer, abcache, ...).")
        if getattr(cache, "time", "step") == "sigma":
            return ("cache.time=sigma: Inf-DiT's Heun sampler evaluates the model twice at each intermediate sigma "
                    "(step i's corrector and step i+1's predictor), so differences over sigma would divide by zero. "
                    "Keep cache.time=step: the step axis is the model evaluation.")
        if model_cfg.get("mode") == "strips" and (method.adaptive or method.tokenwise or method.decides_from_features):
            return (f"model.mode=strips with method={cache.name}: each strip would decide its full steps or select "
                    "tokens by itself, so a strip could miss the keys of the row above it; use model.mode=whole (or "
                    "auto).")
        if model_cfg.get("offload") and method.tokenwise:
            return f"model.offload=true with the token-wise method={cache.name} is not supported; use offload=false."
        return None

    @staticmethod
    def engine_steps(steps: int) -> int:
        return evaluations(steps)

    # -- loading ---------------------------------------------------------------------------------------------
    def _build(self) -> tuple[InfDiT, ClipImageEmbedding]:
        cfg, clip_arch = self.cfg, self.arch.clip
        if cfg.weights == "pretrained":  # first: fail in seconds without the file
            path = checkpoint_file(str(cfg.path)) if cfg.path else None
            if path is None or not path.is_file():
                where = "model.path is not set" if path is None else f"no {path} (model.path={cfg.path})"
                raise MissingWeightsError(
                    f"Inf-DiT weights are not on this machine: {where}. Download {WHERE} and set "
                    f"model.path=/path/to/{CHECKPOINT_FILE} (or its folder); the CLIP tower comes from that file or "
                    f"from model.clip_path ({CLIP_WHERE}). `profile=flops_only` needs no weights; model.size=tiny "
                    "runs random weights.")
            clip_path = cfg.get("clip_path")
            if clip_path and not Path(clip_path).expanduser().is_file():
                raise MissingWeightsError(f"model.clip_path={clip_path} does not exist: set it to {CLIP_WHERE}, or "
                                          "to null when the Inf-DiT checkpoint carries its CLIP tower.")
        torch.manual_seed(0)  # random weights: the CLIP tower's construction-time init is the seeded one
        with torch.device("meta" if cfg.weights in ("meta", "pretrained") else "cpu"):
            model = InfDiT(self.arch)
            clip = ClipImageEmbedding(clip_arch["embed_dim"], clip_arch["vision_cfg"])
        if cfg.weights == "pretrained":  # built without memory, then filled from the checkpoint
            for module in (model, clip):
                module.to_empty(device="cpu")
            self.clip_source = load_original(str(cfg.path), model, clip, cfg.get("clip_path"))
        elif cfg.weights == "random":
            init_random(model, seed=0)
            self.clip_source = "random"
        if cfg.weights != "meta":
            model.rope_cos, model.rope_sin = rope_table(self.arch.rope_grid, self.arch.head_dim)
        for module in (model, clip):
            module.eval().requires_grad_(False).to(dtype=self.dtype)
            if cfg.weights != "meta":
                module.to(self.device)
        return model, clip

    # -- cache sites -----------------------------------------------------------------------------------------
    def sites(self) -> list[Site]:
        blocks = list(self.model.blocks)
        L = len(blocks)
        sites = []
        for i, block in enumerate(blocks):
            sites.append(Site(f"blocks.{i}.attn", "attn", block.attn, layer=(i, L),
                              feeders=((block.norm1, first_token),)))
            sites.append(Site(f"blocks.{i}.mlp", "mlp", block.mlp, layer=(i, L), tokenwise=True,
                              feeders=((block.mlp_norm(), first_token),)))
        sites += [Site(f"blocks.{i}", "block", block, residual=True) for i, block in enumerate(blocks)]
        sites.append(Site("blocks", "blocks", blocks[0], residual=True, span=tuple(blocks[1:]),
                          signal=_modulated_input(blocks[0])))
        sites.append(Site("model", "model", self.model))
        return sites

    # -- sampling --------------------------------------------------------------------------------------------
    def make_noise(self, seeds: list[int]) -> Tensor:
        shape = (3, self.cfg.resolution, self.cfg.resolution)
        if self.device.type == "meta":
            return torch.empty((len(seeds), *shape), device="meta", dtype=self.dtype)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device, self.dtype)  # (B, 3, H, W), identical on every device

    def example_conditions(self, n: int, start: int = 0) -> dict:
        """Profiling's and traces' inputs, where no benchmark gives them: a seeded smooth random image per index
        (FLOPs and latency do not depend on the content)."""
        side = self.cfg.resolution // self.arch.sr_scale
        if self.device.type == "meta":
            return {"low_res": torch.empty(n, 3, side, side, device="meta", dtype=self.dtype)}
        images = []
        for k in range(start, start + n):
            coarse = torch.rand(1, 3, max(side // 8, 1), max(side // 8, 1), generator=torch.Generator().manual_seed(k))
            images.append(torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")[0])
        return {"low_res": torch.stack(images)}

    def low_res_images(self, low_res: Tensor) -> Tensor:
        """The low-res inputs (B, 3, h, w) in [0, 1] -> [-1, 1] on the model's device, their size checked."""
        side = self.cfg.resolution // self.arch.sr_scale
        if tuple(low_res.shape[1:]) != (3, side, side):
            raise ValueError(f"The low-res input is {low_res.shape[-1]}x{low_res.shape[-2]}; model.resolution="
                             f"{self.cfg.resolution} takes {side}x{side} (set model.resolution to the benchmark's "
                             "hr_size).")
        if low_res.device.type == "meta" or self.device.type == "meta":
            return torch.empty(len(low_res), 3, side, side, device="meta", dtype=self.dtype)
        return (low_res.float() * 2 - 1).to(self.device, self.dtype)

    @torch.inference_mode()
    def generate(self, engine: CacheEngine, noise: Tensor, steps: int, guidance_scale: float,
                 guided_channels: Optional[int] = None, progress: bool = False, lineage: str = "diffusers", *,
                 low_res: Tensor) -> Tensor:
        # one loop, Inf-DiT's own (EDM Heun); `lineage` is the default name every adapter answers to
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        engine.reset()
        engine.method.storage_device = torch.device("cpu") if self.cfg.offload else None
        B, total, n = noise.shape[0], evaluations(steps), self.blocks_per_side
        if self.device.type != "meta":
            self._check_memory(engine, B, total)
        lr = self.low_res_images(low_res)
        side = self.cfg.resolution
        lr_up = TF.resize(lr, [side, side], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(-1, 1)
        vector = self.clip(lr)  # (B, vector_dim), once per generation as the original
        windows = self.model.lr_windows(lr, n, n)
        sigmas = edm_sigmas(steps, **self.cfg.scheduler).to(self.dtype)
        times = [float(s) for i in range(steps) for s in (sigmas[i], sigmas[i + 1])[: 1 + (i < steps - 1)]]
        x = lr_up + noise * sigmas[0]
        setting = self.memory_plan.setting if self.device.type != "meta" else self.cfg  # FLOPs: as configured
        height = setting.strip if setting.mode == "strips" else n
        strips = [Strip(r, min(height, n - r), n, n) for r in range(0, n, height)]
        memory = StripMemory(offload=self.cfg.offload) if len(strips) > 1 else None
        bar = tqdm(total=total * len(strips), desc="<inf_dit> evaluations", disable=not progress, leave=False)
        px = self.arch.block_pixels
        out = torch.empty_like(x)
        for strip in strips:
            if memory is not None:
                engine.reset()  # the cache holds one strip: each strip is its own pass over the evaluations
            rows = (slice(None), slice(None), slice(strip.row * px, (strip.row + strip.rows) * px))
            strip_windows = windows[:, strip.row:strip.row + strip.rows]

            def denoise(x_s: Tensor, sigma: Tensor, e: int) -> Tensor:
                def network(images: Tensor, c_noise: Tensor) -> Tensor:
                    with engine.step(e, times[e], total):
                        return self.model(images, c_noise, vector, strip_windows, strip, memory, e)  # noqa: B023

                bar.update()
                return denoiser(network, lr_up[rows])(x_s, sigma)  # noqa: B023

            out[rows] = heun(denoise, x[rows], sigmas)
            if memory is not None:
                memory.strip_done()
        bar.close()
        self.memory_peak_bytes = memory.peak_bytes if memory is not None else 0
        return out

    def _check_memory(self, engine: CacheEngine, batch: int, total: int) -> None:
        """Says what the feature cache (and strip mode's memories) will take, once per method configuration and
        batch, and picks the mode for `model.mode=auto`; refuses with the settings that fit when the configured one
        does not (`memory.plan`)."""
        cache = engine.method.cfg
        key = repr((cache, batch, total))
        if key in self._plans:
            self.memory_plan = self._plans[key]
            return
        arch, dtype = self.arch, str(self.dtype).removeprefix("torch.")
        widths = dict.fromkeys(("attn", "mlp", "block", "blocks"), arch.hidden_size)
        widths["model"] = arch.patch_size**2 * arch.out_channels
        weights = sum(p.nbytes for m in (self.model, self.clip) for p in m.parameters())
        gen = memory_plan.Generation(cache, tuple(engine.sites), widths, (self.blocks_per_side,) * 2,
                                     arch.block_size**2, arch.hidden_size, arch.num_layers, batch, total, self.dtype,
                                     weights)
        setting = memory_plan.Setting(self.cfg.mode, self.cfg.strip, bool(self.cfg.offload), cache.dtype)
        narrower = NARROWER.get(dtype) if cache.dtype in (None, dtype) else None
        strips_allowed = self.refuse(OmegaConf.merge(self.cfg, {"mode": "strips"}), cache) is None
        plan = memory_plan.plan(setting, gen, self.device, self.cfg.memory_budget_gb, narrower, strips_allowed)
        log.info(f"<inf_dit> memory plan for method={cache.name}, batch {batch}: {memory_plan.describe(plan)}")
        self._plans[key] = self.memory_plan = plan

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        return self.to_unit(latents)  # pixel space

    def provenance(self, sampler: Optional[Any] = None) -> dict:
        return {"pipeline": "Inf-DiT, ours (foca_bench/inf_dit): EDM preconditioning + Heun, no guidance",
                "sampler": dict(self.cfg.scheduler), "mode": self.cfg.mode, "strip": self.cfg.strip,
                "clip": self.clip_source, "step_axis": "model evaluations (2 per Heun step, 1 for the last)"}
