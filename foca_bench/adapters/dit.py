"""DiT adapter (arXiv:2212.09748): diffusers `DiTTransformer2DModel` with class-conditional DDIM + CFG.

Serves `toy_dit` (the embedded digits model) and `dit_xl_2` (the paper's Table 3 model). Cache sites, as
TaylorSeer's DiT code caches them: per `BasicTransformerBlock`, the self-attention output (`attn1`) and the
feed-forward output (`ff`), both before adaLN-Zero gating and the residual add; plus the whole model output
(`model`) for methods that reuse it; for delta methods (Chipmunk), the attention core of `attn1` and the GELU
MLP's parts. The sampling loop runs the caching engine's step context around the
transformer call, in one of two lineages (`sampler.lineage`):
- `diffusers`: `DiTPipeline.__call__`: `DDIMScheduler` (leading spacing 980, 960, ..., 0), guidance on every channel;
- `dit`: the original DiT repository's (facebookresearch/DiT), which the code behind the paper's DiT-XL/2 rows
  builds on: respaced DDIM (999, 979, ..., 20, 0; `dit_sampler.py`) and `forward_with_cfg`'s guidance on the
  first three latent channels (the fourth follows the conditional branch).
`sampler.guided_channels` overrides the lineage's number of guided channels.
"""

import contextlib
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from foca_bench import ASSETS_DIR
from foca_bench.adapters import register_adapter
from foca_bench.adapters.base import Adapter, MissingWeightsError, feed_forward_parts, not_a_multiple
from foca_bench.adapters.dit_sampler import RespacedDDIM
from foca_bench.hooks import CacheEngine, Site, first_token, hidden_states
from methods.base import TokenLayout

BUNDLED = {"toy_dit": ASSETS_DIR / "toy_dit"}
MODULATION_BYTES = 256 << 20  # the most a generation's precomputed adaLN modulation tables hold at a time
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


class _Functional:
    """`torch.nn.functional` with `scaled_dot_product_attention` routed to an attention core."""

    def __init__(self, core: Callable[..., Tensor]) -> None:
        self._core = core

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.nn.functional, name)

    def scaled_dot_product_attention(self, query: Tensor, key: Tensor, value: Tensor,
                                     attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                     is_causal: bool = False, **kwargs: Any) -> Tensor:
        if dropout_p or is_causal or kwargs.get("scale") is not None:
            raise NotImplementedError("an attention core takes plain softmax(q k^T / sqrt(d) + mask) v attention")
        return self._core(query, key, value, attn_mask)  # (B, heads, S, d)


def _attention_core(attn: nn.Module) -> Callable[[Callable[..., Any], tuple, dict, Callable[..., Tensor]], Any]:
    """Delta methods' view of a DiT attention: runs it with the `scaled_dot_product_attention` call of its processor
    (diffusers' `AttnProcessor2_0`) answered by `core(q, k, v, mask)`."""

    def run(forward: Callable[..., Any], args: tuple, kwargs: dict, core: Callable[..., Tensor]) -> Any:
        namespace = sys.modules[type(attn.processor).__module__]
        original = namespace.F
        namespace.F = _Functional(core)
        try:
            return forward(*args, **kwargs)
        finally:
            namespace.F = original

    return run


@register_adapter("toy_dit", "dit_xl_2")
class DiTAdapter(Adapter):
    lineages = ("diffusers", "dit")
    DIT_GUIDED_CHANNELS = 3  # forward_with_cfg: `eps, rest = model_out[:, :3], model_out[:, 3:]`

    def __init__(self, cfg: Any, device: str) -> None:
        super().__init__(cfg, device)
        self.transformer = self._load_transformer().eval().requires_grad_(False)  # first: fails fast without weights
        from diffusers import DDIMScheduler

        if self.device.type != "meta":
            self.transformer.to(self.home)
        if self.dtype != self.transformer.dtype:
            self.transformer.to(dtype=self.dtype)
        self.scheduler = DDIMScheduler(**cfg.scheduler)
        self.vae = self._load_vae() if cfg.vae else None
        self.offload(transformer=self.transformer, vae=self.vae)
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
        location = self.weights_location(self.cfg)
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
            return vae.to(self.home, self.dtype).eval().requires_grad_(False)
        location = self.weights_location(self.cfg)
        if not self.has_local_weights(location, "vae"):
            raise self._missing(location, "vae")
        vae = self.from_pretrained(AutoencoderKL, location, "vae")
        return vae.to(self.home, self.dtype).eval().requires_grad_(False)

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
        side = self.transformer.config.sample_size // self.transformer.config.patch_size
        layout = TokenLayout(grid=(side, side))
        for i, block in enumerate(self.transformer.transformer_blocks):
            # The pre-attention LayerNorm (inside adaLN-Zero's norm1) feeds only attn1, and norm3 only ff, as
            # long as the block has no positional embedding, cross-attention or GLIGEN fuser.
            dedicated = block.norm_type == "ada_norm_zero" and block.pos_embed is None and block.attn2 is None
            sites.append(Site(f"blocks.{i}.attn", "attn", block.attn1, layer=(i, L),
                              feeders=((block.norm1.norm, first_token),) if dedicated else (),
                              attention_probe=_attention_received(block.attn1),
                              attention_core=_attention_core(block.attn1), layout=layout))
            sites.append(Site(f"blocks.{i}.mlp", "mlp", block.ff, layer=(i, L), tokenwise=True,
                              scored_by=f"blocks.{i}.attn",
                              feeders=((block.norm3, first_token),) if dedicated else (),
                              ffn=feed_forward_parts(block.ff), layout=layout))
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
    def generate(self, engine: CacheEngine, noise: Tensor, steps: int, guidance_scale: float,
                 guided_channels: Optional[int] = None, progress: bool = False, lineage: str = "diffusers", *,
                 class_labels: Tensor) -> Tensor:
        cfg = guidance_scale > 1.0
        engine.reset(batched_cfg=cfg)  # every generation starts from a clean cache
        if guided_channels is None:
            guided_channels = self.DIT_GUIDED_CHANNELS if lineage == "dit" else self.latent_channels
        if lineage == "dit":
            ddim = RespacedDDIM(self.cfg.scheduler, steps)
            timesteps = ddim.timesteps
            denoise = lambda eps, i, t, x: ddim.step(eps, i, x)
        elif lineage == "diffusers":
            self.scheduler.set_timesteps(steps)
            timesteps = self.scheduler.timesteps
            denoise = lambda eps, i, t, x: self.scheduler.step(eps, t, x).prev_sample
        else:
            raise ValueError(f"sampler.lineage={lineage!r}: choose from {self.lineages}.")
        labels = class_labels.to(self.device)  # (B,)
        uncond_first = cfg and engine.method.uncond_first  # FasterCache's hooks read the batch as [uncond; cond]
        if cfg:
            null = torch.full_like(labels, self.null_class)
            labels = torch.cat([null, labels] if uncond_first else [labels, null])  # (2B,)
        x = noise
        t_all = timesteps.to(self.device)[:, None].expand(len(timesteps), labels.shape[0])  # (T, 2B)
        # methods that skip whole blocks or the whole model (reuse, TeaCache, Delta-DiT; the other projects' hooks:
        # cache-dit's DBCache, diffusers' FBCache/MagCache) leave some conditioning unused: they keep the per-step
        # path, so no FLOPs are spent on embeddings and modulations nobody reads
        per_step = engine.method.external or any(site.role in ("model", "blocks", "block") for site in engine.sites)
        with self._conditioning(t_all, labels, precompute=not per_step) as conditioning:
            for i, t in enumerate(tqdm(timesteps, desc="<sampling> steps", disable=not progress, leave=False)):
                model_in = torch.cat([x, x]) if cfg else x  # (2B, C, H, W) with CFG (DDIM's input scaling is 1)
                t_in = t_all[i]
                with conditioning(i, t_in), engine.step(i, float(t), len(timesteps)):
                    out = self.transformer(model_in, timestep=t_in, class_labels=labels, return_dict=False)[0]
                x = denoise(self._guided_eps(out, cfg, guidance_scale, guided_channels, uncond_first), i, t, x)
        return x

    def _guided_eps(self, out: Tensor, cfg: bool, guidance_scale: float, guided_channels: int,
                    uncond_first: bool = False) -> Tensor:
        """The conditional half's epsilon, its first `guided_channels` channels guided (B, C, H, W); the batch is
        [cond; uncond], or [uncond; cond] with `uncond_first` (FasterCache's hooks)."""
        eps = out[:, :self.latent_channels] if self.learned_sigma else out  # drop the learned variance
        if not cfg:
            return eps
        cond, uncond = eps.chunk(2)[::-1] if uncond_first else eps.chunk(2)
        k = guided_channels
        guided = uncond[:, :k] + guidance_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)  # unguided channels follow the cond branch

    @contextmanager
    def _conditioning(self, timesteps: Tensor, labels: Tensor,
                      precompute: bool = True) -> Iterator[Callable[[int, Tensor], Any]]:
        """Each step's adaLN conditioning, computed once per block and step, or in batches over the steps.

        DiT evaluates `CombinedTimestepLabelEmbeddings` (sinusoid, 2-layer MLP, label lookup) in every block and
        again (block 0's) for the final layer, and each block's adaLN-Zero modulation linear (D -> 6D) on it, at
        every step, although all of it depends only on (t, class). While step i runs, each block's embedding and
        modulation answer calls made with that step's own timestep and label tensors (any other call, a probe or
        another batch, computes as usual):
        - `model.precompute_conditioning=true` (and `precompute`): the embeddings from a table evaluated once over
          all (step, sample) rows before sampling, and each block's modulation from tables evaluated over chunks
          of steps (as many as `MODULATION_BYTES` hold; all 50 at DiT-XL/2's batch 2), so a block's D x 6D weights
          (32 MB in DiT-XL/2) are read once per chunk instead of once per step. A skipped step cannot avoid its
          conditioning, and per step it is most of what a fused skipped step reads; batched, it nearly vanishes.
          Equal up to float32 rounding, not bit for bit: the batched matrix products round
          differently from per-step ones (~1e-7 relative per embedding; docs/methods.md has the effect on samples).
        - otherwise: computed at its first call in the step and reused by the final layer's repeat call.
        Both count the same FLOPs: one embedding and modulation per block and step. The adapter passes
        `precompute=False` when a method may skip whole blocks or the whole model (`reuse`, `teacache`,
        `delta_dit`), whose skipped blocks need no conditioning.

        Yields:
            `conditioning(i, t_in)`: a context manager that opens step i, whose calls carry `t_in` and `labels`.
        """
        norms = [block.norm1 for block in self.transformer.transformer_blocks if block.norm_type == "ada_norm_zero"]
        embs = list(dict.fromkeys(norm.emb for norm in norms))
        if not embs:
            yield lambda i, t_in: contextlib.nullcontext()
            return
        tables: dict[nn.Module, Tensor] = {}
        T, n = timesteps.shape
        if precompute and self.cfg.precompute_conditioning:
            with torch.inference_mode():
                tables = {emb: emb(timesteps.reshape(-1), labels.repeat(T), hidden_dtype=self.dtype).view(T, n, -1)
                          for emb in embs}  # (T, 2B, D) each
        per_step = sum(n * norm.linear.out_features * self.dtype.itemsize for norm in norms)
        chunk = max(1, MODULATION_BYTES // max(per_step, 1))  # steps per modulation table
        modulation: dict[nn.Module, Tensor] = {}  # per norm: (chunk, 2B, 6D) for steps from modulation_start
        current: dict[str, Any] = {"t": None, "start": None}
        this_step: dict[nn.Module, Tensor] = {}  # per embedding and per norm: this step's row

        def answer(emb: nn.Module) -> Callable[..., Tensor]:
            compute = type(emb).forward.__get__(emb)

            def forward(timestep: Tensor, class_labels: Tensor, hidden_dtype: Optional[torch.dtype] = None) -> Tensor:
                if timestep is not current["t"] or class_labels is not labels:
                    return compute(timestep, class_labels, hidden_dtype=hidden_dtype)
                if emb not in this_step:
                    this_step[emb] = compute(timestep, class_labels, hidden_dtype=hidden_dtype)
                return this_step[emb]

            return forward

        def modulate(norm: nn.Module) -> Callable[..., tuple]:
            compute = type(norm).forward.__get__(norm)

            def forward(x: Tensor, timestep: Optional[Tensor] = None, class_labels: Optional[Tensor] = None,
                        hidden_dtype: Optional[torch.dtype] = None, emb: Optional[Tensor] = None) -> tuple:
                if norm not in this_step or timestep is not current["t"] or class_labels is not labels:
                    return compute(x, timestep, class_labels, hidden_dtype=hidden_dtype, emb=emb)
                # AdaLayerNormZero.forward from its modulation on (diffusers/models/normalization.py)
                shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = this_step[norm].chunk(6, dim=1)
                x = norm.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
                return x, gate_msa, shift_mlp, scale_mlp, gate_mlp

            return forward

        @contextmanager
        def conditioning(i: int, t_in: Tensor) -> Iterator[None]:
            current.update(t=t_in)
            this_step.clear()
            if tables:
                start = i - i % chunk
                if current["start"] != start:  # the next chunk of steps' modulations, weights read once
                    current["start"] = start
                    modulation.update({norm: norm.linear(norm.silu(tables[norm.emb][start:start + chunk]))
                                       for norm in norms})  # (chunk, 2B, 6D) each
                # the step's rows, picked here, not in `forward`: a compiled step reads them as tensors, not by index
                this_step.update({emb: table[i] for emb, table in tables.items()})
                this_step.update({norm: table[i - start] for norm, table in modulation.items()})
            try:
                yield
            finally:
                current.update(t=None)
                this_step.clear()

        for emb in embs:
            emb.forward = answer(emb)
        for norm in norms:
            norm.forward = modulate(norm)
        try:
            yield conditioning
        finally:
            for module in (*embs, *norms):
                del module.forward  # the class's forward is visible again

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        if not self.cfg.vae:
            return self.to_unit(latents)  # pixel space
        vae = self.require_vae()
        return self.to_unit(vae.decode(latents / vae.config.scaling_factor).sample)

    def provenance(self, sampler: Optional[Any] = None) -> dict:
        lineage = sampler.lineage if sampler is not None else "diffusers"
        guided = sampler.guided_channels if sampler is not None else None
        common = {"lineage": lineage, "learned_sigma": self.learned_sigma,
                  "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
        if lineage == "dit":
            return {"pipeline": "the DiT repository's sampler (facebookresearch/DiT: create_diffusion(str(steps)), "
                                "ddim_sample_loop, forward_with_cfg), as foca_bench/adapters/dit_sampler.py",
                    "scheduler": "respaced DDIM, eta=0 (timesteps round(k (1000-1)/(steps-1)), float64 schedule)",
                    "guided_channels": self.DIT_GUIDED_CHANNELS if guided is None else guided,
                    "scheduler_config": dict(self.cfg.scheduler), **common}
        return {"pipeline": "diffusers DiTPipeline loop (foca_bench/adapters/dit.py)",
                "scheduler": type(self.scheduler).__name__, "scheduler_config": dict(self.scheduler.config),
                "guided_channels": self.latent_channels if guided is None else guided, **common}
