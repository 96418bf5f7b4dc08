"""DiT adapter (arXiv:2212.09748): diffusers `DiTTransformer2DModel` with class-conditional DDIM + CFG.

Serves `toy_dit` (the embedded digits model) and `dit_xl_2` (the paper's Table 3 model). Cache sites, as
TaylorSeer's DiT code caches them: per `BasicTransformerBlock`, the self-attention output (`attn1`) and the
feed-forward output (`ff`), both before adaLN-Zero gating and the residual add; plus the whole model output
(`model`) for methods that reuse it. The sampling loop is diffusers' `DiTPipeline.__call__` with the caching
engine's step context around the transformer call and DiT's optional 3-channel guidance.
"""

import contextlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from foca_bench import ASSETS_DIR
from foca_bench.adapters import register_adapter
from foca_bench.adapters.base import Adapter, MissingWeightsError
from foca_bench.hooks import CacheEngine, Site, first_token, hidden_states

BUNDLED = {"toy_dit": ASSETS_DIR / "toy_dit"}


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
    @classmethod
    def weights_location(cls, cfg: Any) -> str:
        if not cfg.path and cfg.name in BUNDLED:
            return str(BUNDLED[cfg.name])
        return super().weights_location(cfg)

    def _load_transformer(self) -> torch.nn.Module:
        location = self.weights_location(self.cfg)
        if self.cfg.weights == "pretrained" and not self.has_local_weights(location, "transformer"):
            raise self._missing(location, "transformer")
        from diffusers import DiTTransformer2DModel

        if self.cfg.weights == "meta":
            with torch.device("meta"):
                return DiTTransformer2DModel(**self.cfg.arch)
        if self.cfg.weights == "random":
            torch.manual_seed(0)
            return DiTTransformer2DModel(**self.cfg.arch)
        try:
            return DiTTransformer2DModel.from_pretrained(location, subfolder="transformer", local_files_only=True)
        except (OSError, ValueError) as err:
            raise self._missing(location, "transformer") from err

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
        location = self.weights_location(self.cfg)
        try:
            vae = AutoencoderKL.from_pretrained(location, subfolder="vae", local_files_only=True)
        except (OSError, ValueError) as err:
            raise self._missing(location, "vae") from err
        return vae.to(self.device, self.dtype).eval().requires_grad_(False)

    def _missing(self, location: str, part: str) -> MissingWeightsError:
        if self.cfg.name in BUNDLED and not self.cfg.path:
            return MissingWeightsError(
                f"The bundled {self.cfg.name} checkpoint is missing ({location}/{part}). Run `make toy-model` "
                "to train it (see README), or set model.path to a copy.")
        return MissingWeightsError(
            f"Weights of model '{self.cfg.name}' ({self.cfg.hub_id}) are not on this machine: no {part}/ under "
            f"'{location}'. Download {self.cfg.hub_id} where you have network and set model.path=/path/to/copy "
            "(a diffusers folder holding transformer/, vae/ and scheduler/), e.g. "
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
        side = self.transformer.config.sample_size
        shape = (1, self.latent_channels, side, side)
        if self.device.type == "meta":
            return torch.empty((len(seeds), *shape[1:]), device="meta", dtype=self.dtype)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.cat(noise).to(self.device, self.dtype)  # (B, C, H, W), identical on every device

    @torch.inference_mode()
    def generate(self, engine: CacheEngine, noise: Tensor, steps: int, guidance_scale: float,
                 guided_channels: Optional[int] = None, progress: bool = False, *, class_labels: Tensor) -> Tensor:
        cfg = guidance_scale > 1.0
        engine.reset(batched_cfg=cfg)  # every generation starts from a clean cache
        self.scheduler.set_timesteps(steps)
        labels = class_labels.to(self.device)  # (B,)
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
