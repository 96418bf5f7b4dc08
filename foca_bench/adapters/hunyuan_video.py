"""HunyuanVideo adapter (Kong et al., arXiv:2412.03603): diffusers `HunyuanVideoTransformer3DModel` with
HunyuanVideoPipeline's flow-matching sampling loop, for the paper's Table 2 (text-to-video, VBench).

Cache sites: the MMDiT map of `adapters/mmdit.py`, as for FLUX (double-block joint attention and feed-forwards,
single-block fused outputs, block residual stacks for TeaCache and Δ-DiT, the whole model). Unlike FLUX,
HunyuanVideo's blocks return `(hidden_states, encoder_hidden_states)`: the image stream first; and a single
block's attention returns an (image, text) pair, so its skipped-step stand-in is a pair too.

HunyuanVideo is guidance-distilled (embedded guidance 6.0, scaled by 1000 as the pipeline does). With
`model.true_cfg_scale > 1` every step also runs an unconditional pass on `model.negative_prompt`, in its own cache
context (`uncond`; the conditional pass is `cond`), so a caching method keeps separate histories for the two.
Prompts are LLaVA-Llama-3 + CLIP embeddings from the pipeline's text encoders (`model.weights=pretrained`), or
seeded random embeddings of the same shapes, with a seeded prompt length behind the attention mask, for `random`
and `meta` weights.
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

SPATIAL, TEMPORAL = 8, 4  # HunyuanVideo's causal 3D VAE: 8x8 spatial, 4x temporal compression


def _no_joint_attention(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """Stand-in for a single block's attention when its fused output is skipped: a (B, 1, D) image part and an
    empty text part, which concatenate with the (B, 1, mlp) stand-in of the MLP branch."""
    text = kwargs["encoder_hidden_states"]  # (B, <=1, D): the text slice of the first-token stand-in
    return text.new_zeros(text.shape[0], 1, text.shape[2]), text[:, :0]


@register_adapter("hunyuan_video")
class HunyuanVideoAdapter(MMDiTAdapter):
    transformer_class, pipeline_class = "HunyuanVideoTransformer3DModel", "HunyuanVideoPipeline"
    tuple_arch_keys = ("rope_axes_dim",)
    text_first = False  # HunyuanVideo's blocks return (image, text)
    single_attention_stand_in = staticmethod(_no_joint_attention)  # its single-block attention returns a pair
    example_path = "/data/HunyuanVideo"

    @classmethod
    def refuse(cls, model_cfg: Any, cache: Any) -> Optional[str]:
        patch, patch_t = model_cfg.arch.patch_size, model_cfg.arch.patch_size_t
        why = f"HunyuanVideo ({SPATIAL}x VAE, patch {patch})"
        wrong = (not_a_multiple("model.resolution", model_cfg.resolution, SPATIAL * patch, why)
                 or not_a_multiple("model.width", model_cfg.width, SPATIAL * patch, why))
        step, frames = TEMPORAL * patch_t, model_cfg.frames
        if wrong or (frames >= 1 and (frames - 1) % step == 0):
            return wrong
        below = max((frames - 1) // step * step + 1, 1)
        nearest = f"are {below} or {below + step}" if below < frames else f"is {below}"
        return (f"model.frames={frames}: HunyuanVideo's causal VAE keeps the first frame and compresses each {step} "
                f"after it into one latent frame, so it takes 1 + {step}k frames; the nearest {nearest}.")

    def _load_pipeline(self) -> Any:
        pipe = super()._load_pipeline()
        pipe.vae.enable_tiling()  # as HunyuanVideo's own sampler does: full-size decode needs tens of GB otherwise
        return pipe

    def _random_vae(self) -> nn.Module:
        """A small random AutoencoderKLHunyuanVideo with the real latent interface (16 channels, 8x spatial and 4x
        causal temporal compression, its scaling factor), so random-weight runs decode to videos."""
        from diffusers import AutoencoderKLHunyuanVideo

        torch.manual_seed(1)
        vae = AutoencoderKLHunyuanVideo(latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                        norm_num_groups=4, spatial_compression_ratio=SPATIAL,
                                        temporal_compression_ratio=TEMPORAL)
        return vae.eval().requires_grad_(False).to(self.home, self.dtype)

    # -- sampling --------------------------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(channels, latent frames, latent height, latent width) of one video."""
        return (self.transformer.config.in_channels, (self.cfg.frames - 1) // TEMPORAL + 1,
                self.cfg.resolution // SPATIAL, self.cfg.width // SPATIAL)

    def token_grid(self) -> tuple[int, int, int]:
        _, frames, height, width = self.latent_shape()
        arch = self.transformer.config
        return frames // arch.patch_size_t, height // arch.patch_size, width // arch.patch_size

    def make_noise(self, seeds: list[int]) -> Tensor:
        shape = self.latent_shape()
        if self.device.type == "meta":
            return torch.empty((len(seeds), *shape), device="meta", dtype=torch.float32)
        noise = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.cat(noise).to(self.device)  # (B, C, F, H, W) float32, as the pipeline keeps its latents

    def _random_prompt(self, keys: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Seeded random (embeds (B, T, text_dim), mask (B, T), pooled (B, pooled_dim)), one generator per prompt
        index; each prompt gets a seeded length in [T/2, T], so the attention mask is exercised."""
        T = self.cfg.text_tokens
        embeds, pooled, gens = self.seeded_prompts(keys, self.transformer.config.text_embed_dim)
        lengths = [int(torch.randint(max(T // 2, 1), T + 1, (1,), generator=g)) for g in gens]
        mask = torch.stack([torch.arange(T) < n for n in lengths]).to(self.device, self.dtype)
        return embeds, mask, pooled

    def _prompt_embeddings(self, prompts: list[str], negative: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(prompt_embeds, attention mask, pooled) of the prompts, or of as many negative prompts."""
        arch, B, T = self.transformer.config, len(prompts), self.cfg.text_tokens
        if self.device.type == "meta":
            return (torch.empty(B, T, arch.text_embed_dim, device="meta", dtype=self.dtype),
                    torch.ones(B, T, device="meta", dtype=self.dtype),
                    torch.empty(B, arch.pooled_projection_dim, device="meta", dtype=self.dtype))
        if self.pipeline is None:
            return self._random_prompt([-1] * B if negative else self.prompt_keys(prompts))
        texts = [self.cfg.negative_prompt] * B if negative else list(prompts)
        embeds, pooled, mask = self.pipeline.encode_prompt(texts, device=self.device, max_sequence_length=T)
        return embeds.to(self.dtype), mask.to(self.dtype), pooled.to(self.dtype)

    @torch.inference_mode()
    def generate(self, engine: CacheEngine, noise: Tensor, steps: int, guidance_scale: float,
                 guided_channels: Optional[int] = None, progress: bool = False, lineage: str = "diffusers", *,
                 prompts: list[str]) -> Tensor:
        engine.reset()  # every generation starts from a clean cache
        B = noise.shape[0]
        cond = self._prompt_embeddings(prompts)
        true_cfg = float(self.cfg.true_cfg_scale)
        uncond = self._prompt_embeddings(prompts, negative=True) if true_cfg > 1 else None
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device="cpu")
        guidance = (torch.full((B,), guidance_scale, device=self.device, dtype=self.dtype) * 1000.0
                    if self.transformer.config.guidance_embeds else None)
        x = noise
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(tqdm(timesteps, desc="<sampling> steps", disable=not progress, leave=False)):
            t_in = t.expand(B).to(self.device, x.dtype)

            def velocity(prompt: tuple[Tensor, Tensor, Tensor]) -> Tensor:
                embeds, mask, pooled = prompt
                return self.transformer(hidden_states=x.to(self.dtype), timestep=t_in, encoder_hidden_states=embeds,
                                        encoder_attention_mask=mask, pooled_projections=pooled, guidance=guidance,
                                        return_dict=False)[0]

            with engine.step(i, float(t), len(timesteps)):
                with engine.context("cond"):
                    v = velocity(cond)
                if uncond is not None:
                    with engine.context("uncond"):
                        v_uncond = velocity(uncond)
                    v = v_uncond + true_cfg * (v - v_uncond)
            x = self.scheduler.step(v, t, x, return_dict=False)[0]
        return x

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, C, F', H', W') -> videos (B, 3, frames, H, W) in [0, 1]."""
        vae = self.require_vae()
        return self.to_unit(vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0])

    def provenance(self, sampler: Optional[Any] = None) -> dict:
        return {
            "pipeline": "diffusers HunyuanVideoPipeline loop (foca_bench/adapters/hunyuan_video.py)",
            "scheduler": type(self.scheduler).__name__,
            "scheduler_config": dict(self.scheduler.config),
            "guidance": ("embedded (guidance-distilled, x1000)"
                         + (f" + true CFG {self.cfg.true_cfg_scale} in separate cond/uncond passes"
                            if self.cfg.true_cfg_scale > 1 else ", no CFG pass")),
            "video": {"height": self.cfg.resolution, "width": self.cfg.width, "frames": self.cfg.frames},
            "text_tokens": self.cfg.text_tokens,
        }
