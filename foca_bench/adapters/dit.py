"""DiT adapter (arXiv:2212.09748): diffusers `DiTTransformer2DModel` with class-conditional DDIM + CFG.

Serves `toy_dit` (the embedded digits model) and `dit_xl_2` (the paper's Table 3 model). Cache sites, as
TaylorSeer's DiT code caches them: per `BasicTransformerBlock`, the self-attention output (`attn1`) and the
feed-forward output (`ff`), both before adaLN-Zero gating and the residual add; plus the whole model output
(`model`) for methods that reuse it. The sampling loop is diffusers' `DiTPipeline.__call__` with the caching
engine's step context around the transformer call and DiT's optional 3-channel guidance.
"""

import contextlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from foca_bench import ASSETS_DIR
from foca_bench.adapters import register_adapter
from foca_bench.adapters.base import Adapter, MissingWeightsError, not_a_multiple
from foca_bench.hooks import CacheEngine, Site, first_token, hidden_states

BUNDLED = {"toy_dit": ASSETS_DIR / "toy_dit"}
VAE_SCALE = 8  # the SD VAE DiT-XL/2 decodes with downsamples by 8


def _modulated_input(block: nn.Module):
    """TeaCache's indicator for a DiT block: adaLN-Zero's modulated input to its attention, (B, tokens, D)."""

    def signal(args: tuple, kwargs: dict) -> Tensor:
        hidden = hidden_states(args, kwargs)
        return block.norm1(hidden, kwargs.get("timestep"), kwargs.get("class_labels"), hidden_dtype=hidden.dtype)[0]

    return signal


def _attention_received(attn: nn.Module):
    """ToCa's attention score s1 for a block: runs the attention through diffusers' explicit-softmax
    `AttnProcessor` (same FLOPs as the fused kernel) and returns, with its output, the attention each token
    received: the head-mean softmax map summed over queries, (B, tokens)."""

    def probe(forward: Any, args: tuple, kwargs: dict) -> tuple[Any, Tensor]:
        from diffusers.models.attention_processor import AttnProcessor

        captured = []

        def get_attention_scores(query: Tensor, key: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
            probs = type(attn).get_attention_scores(attn, query, key, attention_mask)  # (B * heads, N, N)
            captured.append(probs)
            return probs

        processor = attn.processor
        attn.processor, attn.get_attention_scores = AttnProcessor(), get_attention_scores
        try:
            out = forward(*args, **kwargs)
        finally:
            attn.processor = processor
            del attn.get_attention_scores
        B = hidden_states(args, kwargs).shape[0]
        probs = captured[0]
        return out, probs.view(B, -1, *probs.shape[1:]).mean(1).sum(1)

    return probe


@register_adapter("toy_dit", "dit_xl_2")
class DiTAdapter(Adapter):
    def __init__(self, cfg: Any, device: str) -> None:
        super().__init__(cfg, device)
        self.transformer = self._load_transformer().eval().requires_grad_(False)  # first: fails fast without weights
        from diffusers import DDIMScheduler

        if self.device.type != "meta":
            self.transformer.to(self.device)
        if self.dtype != self.transformer.dtype:
            self.transformer.to(dtype=self.dtype)
        self.scheduler = DDIMScheduler(**cfg.scheduler)
        self.vae = self._load_vae() if cfg.vae else None
        arch = self.transformer.config
        self.latent_channels = arch.in_channels
        self.learned_sigma = arch.out_channels // 2 == arch.in_channels and arch.out_channels != arch.in_channels
        self.null_class = cfg.num_classes  # diffusers' LabelEmbedding appends the CFG null class last

    # -- loading ---------------------------------------------------------------------------------------------
    def _weights_location(self) -> str:
        if self.cfg.path:
            return str(self.cfg.path)
        if self.cfg.name in BUNDLED:
            return str(BUNDLED[self.cfg.name])
        return str(self.cfg.hub_id)

    @classmethod
    def refuse(cls, model_cfg: Any, cache: Any) -> Optional[str]:
        scale, patch = (VAE_SCALE if model_cfg.vae else 1), model_cfg.arch.patch_size
        why = f"{model_cfg.name} ({f'{VAE_SCALE}x VAE' if model_cfg.vae else 'pixel space'}, patch {patch})"
        wrong = not_a_multiple("model.resolution", model_cfg.resolution, scale * patch, why)
        if wrong:
            return wrong
        if model_cfg.arch.sample_size * scale != model_cfg.resolution:
            return (f"model.arch.sample_size={model_cfg.arch.sample_size} is the latent side of "
                    f"{model_cfg.arch.sample_size * scale} px, but model.resolution={model_cfg.resolution}: set "
                    "model.resolution alone (the latent side follows it).")
        return None

    def _load_transformer(self) -> torch.nn.Module:
        location = self._weights_location()
        config = self.local_file(location, "transformer/config.json")
        if self.cfg.weights == "pretrained" and config is None:
            raise self._missing(location, "transformer")
        from diffusers import DiTTransformer2DModel

        if self.cfg.weights == "meta":
            with torch.device("meta"):
                return DiTTransformer2DModel(**self.cfg.arch)
        if self.cfg.weights == "random":
            torch.manual_seed(0)
            return DiTTransformer2DModel(**self.cfg.arch)
        self._check_sample_size(config)
        return self.from_pretrained(DiTTransformer2DModel, location, "transformer")

    def _check_sample_size(self, config: Path) -> None:
        """A checkpoint is trained at one resolution: refuses another one before loading it (a config.json that
        does not parse is left to diffusers' loader, which names it)."""
        try:
            side = json.loads(config.read_text()).get("sample_size")
        except (OSError, ValueError):
            return
        scale = VAE_SCALE if self.cfg.vae else 1
        if side is not None and side * scale != self.cfg.resolution:
            raise ValueError(f"model.resolution={self.cfg.resolution}, but the checkpoint {config} has sample_size "
                             f"{side}: a {side * scale} px model. Set model.resolution={side * scale}, or point "
                             f"model.path at the weights for {self.cfg.resolution} px (e.g. facebook/DiT-XL-2-512 "
                             "for 512).")

    def _load_vae(self) -> Optional[torch.nn.Module]:
        from diffusers import AutoencoderKL

        if self.cfg.weights == "meta":
            return None  # FLOP counting stops at latents
        if self.cfg.weights == "random":
            # a small random AutoencoderKL with sd-vae-ft-ema's latent interface (4 channels, 8x, its scaling
            # factor), so random-weight runs decode to images
            torch.manual_seed(1)
            vae = AutoencoderKL(latent_channels=4, layers_per_block=1, block_out_channels=(32, 32, 32, 32),
                                norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
            return vae.to(self.device, self.dtype).eval().requires_grad_(False)
        location = self._weights_location()
        if not self.has_local_weights(location, "vae"):
            raise self._missing(location, "vae")
        vae = self.from_pretrained(AutoencoderKL, location, "vae")
        return vae.to(self.device, self.dtype).eval().requires_grad_(False)

    def _missing(self, location: str, part: str) -> MissingWeightsError:
        if self.cfg.name in BUNDLED and not self.cfg.path:
            return MissingWeightsError(
                f"The bundled {self.cfg.name} checkpoint is missing ({location}/{part}). Run `make toy-model` "
                "to train it (see README), or set model.path to a copy.")
        where = f"Download {self.cfg.hub_id} where you have network and set" if self.cfg.hub_id else "Set"
        return MissingWeightsError(
            f"Weights of model '{self.cfg.name}'{f' ({self.cfg.hub_id})' if self.cfg.hub_id else ''} are not on this "
            f"machine: no {part}/config.json under '{location}'. {where} model.path=/path/to/copy (a diffusers "
            "folder holding transformer/, vae/ and scheduler/), e.g. "
            f"`python run.py model={self.cfg.name} model.path=/data/DiT-XL-2-256`. "
            "`profile=flops_only` needs no weights.")

    # -- cache sites -----------------------------------------------------------------------------------------
    def sites(self) -> list[Site]:
        sites = []
        L = len(self.transformer.transformer_blocks)
        for i, block in enumerate(self.transformer.transformer_blocks):
            # The pre-attention LayerNorm (inside adaLN-Zero's norm1) feeds only attn1, and norm3 only ff, as
            # long as the block has no positional embedding, cross-attention or GLIGEN fuser.
            dedicated = block.norm_type == "ada_norm_zero" and block.pos_embed is None and block.attn2 is None
            sites.append(Site(f"blocks.{i}.attn", "attn", block.attn1, layer=(i, L),
                              feeders=((block.norm1.norm, first_token),) if dedicated else (),
                              attention_probe=_attention_received(block.attn1)))
            sites.append(Site(f"blocks.{i}.mlp", "mlp", block.ff, layer=(i, L), tokenwise=True,
                              scored_by=f"blocks.{i}.attn",
                              feeders=((block.norm3, first_token),) if dedicated else ()))
        # the residual stack of all blocks (TeaCache, ...): signal = the first block's modulated input
        blocks = list(self.transformer.transformer_blocks)
        # each block as a one-block residual site (Delta-DiT's front/back ranges)
        sites += [Site(f"blocks.{i}", "block", block, residual=True) for i, block in enumerate(blocks)]
        sites.append(Site("blocks", "blocks", blocks[0], residual=True, span=tuple(blocks[1:]),
                          signal=_modulated_input(blocks[0])))
        # called with return_dict=False below, so the model returns a 1-tuple
        sites.append(Site("model", "model", self.transformer, unpack=lambda out: out[0], pack=lambda v: (v,)))
        return sites

    # -- sampling --------------------------------------------------------------------------------------------
    def make_noise(self, seeds: list[int]) -> Tensor:
        side = self.transformer.config.sample_size  # = model.resolution / the VAE's 8 (`refuse`, `_check_sample_size`)
        shape = (1, self.latent_channels, side, side)
        if self.device.type == "meta":
            return torch.empty((len(seeds), *shape[1:]), device="meta", dtype=self.dtype)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.cat(noise).to(self.device, self.dtype)  # (B, C, H, W), identical on every device

    @torch.inference_mode()
    def generate(self, engine: CacheEngine, labels: Tensor, noise: Tensor, steps: int, guidance_scale: float,
                 guided_channels: Optional[int] = None, progress: bool = False) -> Tensor:
        cfg = guidance_scale > 1.0
        engine.reset(batched_cfg=cfg)  # every generation starts from a clean cache
        self.scheduler.set_timesteps(steps)
        labels = labels.to(self.device)
        if cfg:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])  # (2B,)
        x = noise
        timesteps = self.scheduler.timesteps
        t_all = timesteps.to(self.device)[:, None].expand(len(timesteps), labels.shape[0])  # (T, 2B)
        # methods that skip whole blocks or the whole model (reuse, TeaCache, Delta-DiT) leave some conditioning
        # unused: they keep the per-step path, so no FLOPs are spent on embeddings nobody reads
        per_step = any(site.role in ("model", "blocks", "block") for site in engine.sites)
        with self._conditioning(t_all, labels, precompute=not per_step) as conditioning:
            for i, t in enumerate(tqdm(timesteps, desc="<sampling> steps", disable=not progress, leave=False)):
                model_in = torch.cat([x, x]) if cfg else x  # (2B, C, H, W) with CFG
                model_in = self.scheduler.scale_model_input(model_in, t)
                t_in = t_all[i]
                with conditioning(i, t_in), engine.step(i, float(t), len(timesteps)):
                    out = self.transformer(model_in, timestep=t_in, class_labels=labels, return_dict=False)[0]
                x = self._guided_step(out, t, x, cfg, guidance_scale, guided_channels)
        return x

    def _guided_step(self, out: Tensor, t: Tensor, x: Tensor, cfg: bool, guidance_scale: float,
                     guided_channels: Optional[int]) -> Tensor:
        c = self.latent_channels
        eps = out[:, :c] if self.learned_sigma else out  # drop the learned variance
        if cfg:
            cond, uncond = eps.chunk(2)
            k = c if guided_channels is None else guided_channels
            guided = uncond[:, :k] + guidance_scale * (cond[:, :k] - uncond[:, :k])
            eps = torch.cat([guided, cond[:, k:]], dim=1)  # unguided channels follow the cond branch
        return self.scheduler.step(eps, t, x).prev_sample

    @contextmanager
    def _conditioning(self, timesteps: Tensor, labels: Tensor,
                      precompute: bool = True) -> Iterator[Callable[[int, Tensor], Any]]:
        """Each step's adaLN conditioning embeddings, computed once per block and step, or once per generation.

        DiT evaluates `CombinedTimestepLabelEmbeddings` (sinusoid, 2-layer MLP, label lookup) in every block and
        again (block 0's) for the final layer, at every step, although it depends only on (t, class). While step
        i runs, each block's embedding module answers calls made with that step's own timestep and label tensors
        (any other call, a probe or another batch, computes as usual):
        - `model.precompute_conditioning=true` (and `precompute`): from a table evaluated once over all (step,
          sample) rows before sampling. A skipped step cannot avoid its conditioning, and on a small model its
          per-op cost is a large share of a skipped step; batched, it nearly vanishes. Bit-identical on the
          tested CPU/float32 path (tests/test_engine.py compares both paths).
        - otherwise: computed at its first call in the step and reused by the final layer's repeat call.
        Both count the same FLOPs: one embedding per block and step. The adapter passes `precompute=False` when
        a method may skip whole blocks or the whole model (`reuse`, `teacache`, `delta_dit`), whose skipped blocks
        need no conditioning.

        Yields:
            `conditioning(i, t_in)`: a context manager that opens step i, whose calls carry `t_in` and `labels`.
        """
        embs = list(dict.fromkeys(block.norm1.emb for block in self.transformer.transformer_blocks
                                  if block.norm_type == "ada_norm_zero"))
        if not embs:
            yield lambda i, t_in: contextlib.nullcontext()
            return
        tables: dict[nn.Module, Tensor] = {}
        if precompute and self.cfg.precompute_conditioning:
            T, n = timesteps.shape
            with torch.inference_mode():
                tables = {emb: emb(timesteps.reshape(-1), labels.repeat(T), hidden_dtype=self.dtype).view(T, n, -1)
                          for emb in embs}  # (T, 2B, D) each
        current: dict[str, Any] = {"i": None, "t": None}
        this_step: dict[nn.Module, Tensor] = {}

        def answer(emb: nn.Module) -> Callable[..., Tensor]:
            compute = type(emb).forward.__get__(emb)

            def forward(timestep: Tensor, class_labels: Tensor, hidden_dtype: Optional[torch.dtype] = None) -> Tensor:
                if timestep is not current["t"] or class_labels is not labels:
                    return compute(timestep, class_labels, hidden_dtype=hidden_dtype)
                if emb in tables:
                    return tables[emb][current["i"]]
                if emb not in this_step:
                    this_step[emb] = compute(timestep, class_labels, hidden_dtype=hidden_dtype)
                return this_step[emb]

            return forward

        @contextmanager
        def conditioning(i: int, t_in: Tensor) -> Iterator[None]:
            current.update(i=i, t=t_in)
            this_step.clear()
            try:
                yield
            finally:
                current.update(i=None, t=None)
                this_step.clear()

        for emb in embs:
            emb.forward = answer(emb)
        try:
            yield conditioning
        finally:
            for emb in embs:
                del emb.forward  # the class's forward is visible again

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        if not self.cfg.vae:
            return self.to_unit(latents)  # pixel space
        vae = self.require_vae()
        return self.to_unit(vae.decode(latents / vae.config.scaling_factor).sample)

    def provenance(self) -> dict:
        return {
            "pipeline": "diffusers DiTPipeline loop (foca_bench/adapters/dit.py)",
            "scheduler": type(self.scheduler).__name__,
            "scheduler_config": dict(self.scheduler.config),
            "learned_sigma": self.learned_sigma,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
