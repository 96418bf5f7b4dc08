"""FLUX adapter (FLUX.1-dev): diffusers `FluxTransformer2DModel` with FluxPipeline's flow-matching sampling loop.

Cache sites: the MMDiT map of `adapters/mmdit.py` (double-block joint attention and feed-forwards, single-block
fused outputs, block residual stacks for TeaCache and Δ-DiT, the whole model). Double and single blocks return
`(encoder_hidden_states, hidden_states)`: the text stream first.

FLUX.1-dev is guidance-distilled: guidance is an embedded scalar, one forward per step, no CFG batch. Prompts are
T5/CLIP embeddings from the pipeline's text encoders (`model.weights=pretrained`), or seeded random embeddings of
the same shapes for `random` and `meta` weights (FLOPs and timing do not depend on their values).
"""

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from foca_bench.adapters import register_adapter
from foca_bench.adapters.base import not_a_multiple
from foca_bench.adapters.mmdit import MMDiTAdapter
from foca_bench.hooks import CacheEngine

VAE_SCALE = 8  # FLUX's autoencoder downsamples by 8, and latents are packed in 2x2 patches


@register_adapter("flux")
class FluxAdapter(MMDiTAdapter):
    transformer_class, pipeline_class = "FluxTransformer2DModel", "FluxPipeline"
    tuple_arch_keys = ("axes_dims_rope",)
    text_first = True  # FLUX's blocks return (text, image)
    example_path = "/data/FLUX.1-dev"

    @classmethod
    def refuse(cls, model_cfg: Any, cache: Any) -> Optional[str]:
        return not_a_multiple("model.resolution", model_cfg.resolution, VAE_SCALE * 2,
                              "FLUX (8x VAE, latents packed in 2x2 patches)")

    def _random_vae(self) -> nn.Module:
        """A small random AutoencoderKL with FLUX's latent interface (16 channels, 8x downsampling, its scaling and
        shift factors), so random-weight runs decode to images and image metrics run end to end."""
        from diffusers import AutoencoderKL

        torch.manual_seed(1)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
                            block_out_channels=(32, 32, 32, 32), norm_num_groups=32,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            scaling_factor=0.3611, shift_factor=0.1159)
        return vae.eval().requires_grad_(False).to(self.home, self.dtype)

    # -- sampling --------------------------------------------------------------------------------------------
    def _latent_side(self) -> int:
        return self.cfg.resolution // VAE_SCALE  # a multiple of 2 (`refuse`)

    def token_grid(self) -> tuple[int, int]:
        side = self._latent_side() // 2  # latents are packed in 2x2 patches
        return side, side

    def make_noise(self, seeds: list[int]) -> Tensor:
        from diffusers import FluxPipeline

        side, channels = self._latent_side(), self.transformer.config.in_channels // 4
        if self.device.type == "meta":
            return torch.empty((len(seeds), (side // 2) ** 2, channels * 4), device="meta", dtype=self.dtype)
        noise = [torch.randn((1, channels, side, side), generator=torch.Generator().manual_seed(int(s)))
                 for s in seeds]
        packed = FluxPipeline._pack_latents(torch.cat(noise), len(seeds), channels, side, side)
        return packed.to(self.device, self.dtype)  # (B, tokens, 64), identical on every device

    def _prompt_embeddings(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(prompt_embeds (B, text_tokens, joint_dim), pooled (B, pooled_dim)) of the prompts."""
        arch = self.transformer.config
        B, T = len(prompts), self.cfg.text_tokens
        if self.device.type == "meta":
            return (torch.empty(B, T, arch.joint_attention_dim, device="meta", dtype=self.dtype),
                    torch.empty(B, arch.pooled_projection_dim, device="meta", dtype=self.dtype))
        if self.pipeline is None:  # random weights: seeded random embeddings, one generator per prompt index
            embeds, pooled, _ = self.seeded_prompts(self.prompt_keys(prompts), arch.joint_attention_dim)
            return embeds, pooled
        embeds, pooled, _ = self.pipeline.encode_prompt(list(prompts), prompt_2=None, device=self.device,
                                                        max_sequence_length=T)
        return embeds, pooled

    @torch.inference_mode()
    def generate(self, engine: CacheEngine, noise: Tensor, steps: int, guidance_scale: float,
                 guided_channels: Optional[int] = None, progress: bool = False, lineage: str = "diffusers", *,
                 prompts: list[str]) -> Tensor:
        from diffusers import FluxPipeline
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        engine.reset()  # every generation starts from a clean cache; no CFG batch (guidance is embedded)
        B, tokens = noise.shape[0], noise.shape[1]
        embeds, pooled = self._prompt_embeddings(prompts)
        side = self._latent_side() // 2
        img_ids = FluxPipeline._prepare_latent_image_ids(B, side, side, self.device, self.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        sc = self.scheduler.config
        mu = calculate_shift(tokens, sc.base_image_seq_len, sc.max_image_seq_len, sc.base_shift, sc.max_shift)
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device="cpu")
        guidance = (torch.full((B,), guidance_scale, device=self.device, dtype=torch.float32)
                    if self.transformer.config.guidance_embeds else None)
        x = noise
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(tqdm(timesteps, desc="<sampling> steps", disable=not progress, leave=False)):
            t_in = t.expand(B).to(self.device, x.dtype) / 1000
            with engine.step(i, float(t), len(timesteps)):
                velocity = self.transformer(hidden_states=x, timestep=t_in, guidance=guidance,
                                            pooled_projections=pooled, encoder_hidden_states=embeds,
                                            txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            x = self.scheduler.step(velocity, t, x, return_dict=False)[0]
        return x

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        from diffusers import FluxPipeline

        vae = self.require_vae()
        unpacked = FluxPipeline._unpack_latents(latents, self.cfg.resolution, self.cfg.resolution, VAE_SCALE)
        return self.to_unit(vae.decode(unpacked / vae.config.scaling_factor + vae.config.shift_factor).sample)

    def provenance(self, sampler: Optional[Any] = None) -> dict:
        return {
            "pipeline": "diffusers FluxPipeline loop (foca_bench/adapters/flux.py)",
            "scheduler": type(self.scheduler).__name__,
            "scheduler_config": dict(self.scheduler.config),
            "guidance": "embedded (guidance-distilled), no CFG batch",
            "text_tokens": self.cfg.text_tokens,
        }
