"""The cache-site map shared by the two-stream (MMDiT) models, FLUX (`adapters/flux.py`) and HunyuanVideo
(`adapters/hunyuan_video.py`): double-stream blocks with separate image and text weights, then single-stream
blocks over the concatenated tokens.

Sites, as TaylorSeer's FLUX and HunyuanVideo codes cache them:
- per double block: the joint attention output (one module call returns (image, text); cached as one tensor,
  text tokens first) and the image and text feed-forward outputs, all before gating and the residual add;
- per single block: its fused output (`proj_out` of the attention and MLP branches, before the gate);
- the residual stacks of block-skipping methods: every block alone (`blocks.<i>`, i counting double then single
  blocks; Δ-DiT) and all blocks together (`blocks`; TeaCache, whose signal is the first double block's modulated
  image input, as TeaCache4FLUX and TeaCache4HunyuanVideo compute it). A block's state is its two streams as one
  tensor, text tokens first, so a skipped block hands the next one both streams;
- the whole model (`model`; reuse);
- for delta methods (Chipmunk): the attention core of every block (a double block's through its `attn` site, a
  single block's through `single_blocks.<j>.attn`, role `attn_core`, which no other method hooks) and the image
  MLPs' parts (a double block's `ff`; a single block's `proj_mlp -> act_mlp ->` MLP columns of `proj_out`). The
  text MLPs (`ff_context`) expose none: Chipmunk's FLUX code keeps them dense (its 512 text tokens are cheap).

On a skipped step the modules that only feed a skipped site (the pre-attention and pre-MLP LayerNorms, a single
block's attention and MLP input projection) return cheap stand-ins instead of running.
"""

import sys
import zlib
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch
from torch import Tensor, nn

from foca_bench.adapters.base import Adapter, MissingWeightsError, feed_forward_parts
from foca_bench.hooks import FeedForwardParts, Site, first_token
from methods.base import TokenLayout


def argument(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    """A block's argument passed either by position (HunyuanVideo's loop) or by name (FLUX's)."""
    return args[position] if len(args) > position else kwargs[name]


def zeros_like_linear(linear: nn.Linear) -> Callable[..., Tensor]:
    """Stand-in for a linear that feeds only a skipped site: (B, 1, out_features) zeros."""

    def stand_in(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x.new_zeros(x.shape[0], 1, linear.out_features)

    return stand_in


class JointAttention:
    """Packs a double block's attention output (image, text) as one tensor, text tokens first, and back; a single
    tensor (FLUX's single-block attention) passes as it is."""

    def __init__(self) -> None:
        self.text_tokens: Optional[int] = None

    def unpack(self, out: Any) -> Tensor:
        if isinstance(out, Tensor):
            self.text_tokens = None
            return out
        image, text = out[0], out[1]
        self.text_tokens = text.shape[1]
        return torch.cat([text, image], dim=1)

    def pack(self, value: Tensor) -> Any:
        if self.text_tokens is None:
            return value
        return value[:, self.text_tokens:], value[:, : self.text_tokens]

    def stream(self, which: str, text_first: bool) -> Callable[[Tensor], Tensor]:
        """Selects the `image` or `text` part of a per-token vector over the attention's joint sequence, (B, S),
        whose order is the processor's: text first for FLUX, image first for HunyuanVideo."""

        def select(joint: Tensor) -> Tensor:
            T = self.text_tokens
            text, image = (joint[:, :T], joint[:, T:]) if text_first else (joint[:, -T:], joint[:, :-T])
            return image if which == "image" else text

        return select


class TwoStreams:
    """A block's state for a residual site: its (hidden_states, encoder_hidden_states) input and its output pair as
    one tensor, text tokens first.

    Args:
        text_first: the block returns `(encoder_hidden_states, hidden_states)` (FLUX), not the reverse
            (HunyuanVideo).
    """

    def __init__(self, text_first: bool) -> None:
        self.text_first = text_first
        self.text_tokens = 0

    def read(self, args: tuple, kwargs: dict) -> Tensor:
        image = argument(args, kwargs, 0, "hidden_states")
        text = argument(args, kwargs, 1, "encoder_hidden_states")
        self.text_tokens = text.shape[1]
        return torch.cat([text, image], dim=1)  # (B, text + image tokens, D)

    def unpack(self, out: tuple) -> Tensor:
        text, image = (out[0], out[1]) if self.text_first else (out[1], out[0])
        return torch.cat([text, image], dim=1)

    def pack(self, value: Tensor) -> tuple[Tensor, Tensor]:
        text, image = value[:, : self.text_tokens], value[:, self.text_tokens:]
        return (text, image) if self.text_first else (image, text)


# what a pipeline folder holds besides transformer/ (FLUX.1-dev's and HunyuanVideo's diffusers layouts)
PIPELINE_FILES = ("model_index.json", "scheduler/scheduler_config.json", "vae/config.json", "text_encoder/config.json",
                  "text_encoder_2/config.json", "tokenizer/tokenizer_config.json", "tokenizer_2/tokenizer_config.json")
QUERY_CHUNK = 1024  # queries per chunk of the probe's explicit attention map
EXAMPLE_PROMPT = "a photograph of an astronaut riding a horse"  # profiling and traces, where no benchmark gives one


def _attention_received(attn: nn.Module) -> Callable[[Callable[..., Any], tuple, dict], tuple[Any, Tensor]]:
    """ToCa's attention score s1 for a joint attention: runs the module with diffusers' `dispatch_attention_fn`
    replaced, in its processor's module, by an explicit-softmax attention (same FLOPs as the fused kernel), and
    returns, with the output, the attention each token of the joint sequence received: the head-mean softmax map
    summed over queries, (B, tokens), in the processor's token order (FLUX: text first; HunyuanVideo: image
    first). Masked keys (HunyuanVideo's prompt padding) receive nothing."""

    def explicit(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                 scale: Optional[float] = None, captured: list = None, **_: Any) -> Tensor:
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, heads, S, d)
        received = q.new_zeros(q.shape[0], k.shape[2], dtype=torch.float32)
        out = []
        # in chunks of queries, so the map never holds more than CHUNK x S per head (HunyuanVideo: S = 20656)
        for start in range(0, q.shape[2], QUERY_CHUNK):
            logits = q[:, :, start:start + QUERY_CHUNK] @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
            if attn_mask is not None:
                logits = (logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                          else logits + attn_mask)
            probs = logits.softmax(-1)  # (B, heads, chunk, S)
            received += probs.float().mean(1).sum(1)
            out.append(probs @ v)
        captured.append(received)  # (B, S)
        return torch.cat(out, dim=2).transpose(1, 2)  # (B, S, heads, d), as dispatch_attention_fn returns

    def probe(forward: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, Tensor]:
        captured: list[Tensor] = []
        with _dispatching(attn, lambda *a, **kw: explicit(*a, captured=captured, **kw)):
            out = forward(*args, **kwargs)
        return out, captured[0]

    return probe


@contextmanager
def _dispatching(attn: nn.Module, dispatch: Callable[..., Tensor]) -> Iterator[None]:
    """Replaces diffusers' `dispatch_attention_fn` in `attn`'s processor module while the context is open."""
    namespace = sys.modules[type(attn.processor).__module__]
    original = namespace.dispatch_attention_fn
    namespace.dispatch_attention_fn = dispatch
    try:
        yield
    finally:
        namespace.dispatch_attention_fn = original


def _attention_core(attn: nn.Module) -> Callable[[Callable[..., Any], tuple, dict, Callable[..., Tensor]], Any]:
    """Delta methods' view of a joint attention: runs it with its `dispatch_attention_fn` call answered by
    `core(q, k, v, mask)` on (B, heads, S, d) tensors (the processor's layout is (B, S, heads, d))."""

    def dispatch(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                 core: Callable[..., Tensor] = None, **kwargs: Any) -> Tensor:
        if kwargs.get("scale") is not None or kwargs.get("is_causal") or kwargs.get("dropout_p"):
            raise NotImplementedError("an attention core takes plain softmax(q k^T / sqrt(d) + mask) v attention")
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        return core(q, k, v, attn_mask).transpose(1, 2)

    def run(forward: Callable[..., Any], args: tuple, kwargs: dict, core: Callable[..., Tensor]) -> Any:
        with _dispatching(attn, lambda *a, **kw: dispatch(*a, core=core, **kw)):
            return forward(*args, **kwargs)

    return run


def _modulated_image_input(block: nn.Module) -> Callable[[tuple, dict], Tensor]:
    """TeaCache's indicator: the first double block's adaLN-modulated image input to its attention."""

    def signal(args: tuple, kwargs: dict) -> Tensor:
        hidden, temb = argument(args, kwargs, 0, "hidden_states"), argument(args, kwargs, 2, "temb")
        return block.norm1(hidden, emb=temb)[0]

    return signal


def mmdit_sites(transformer: nn.Module, text_first: bool,
                single_attention_stand_in: Callable[..., Any] = first_token, text_tokens: int = 0,
                grid: tuple[int, ...] = ()) -> list[Site]:
    """Every cache site of a FLUX-shaped transformer (`transformer_blocks`, `single_transformer_blocks`).

    Args:
        transformer: the diffusers transformer.
        text_first: its blocks return the text stream first, and its attention processors put text tokens first in
            the joint sequence (FLUX; HunyuanVideo puts them last in both).
        single_attention_stand_in: what a single block's attention returns when its fused output is skipped.
        text_tokens, grid: the prompt length and the image (or video) token grid, for the sites' `layout`.
    """
    sites = []
    double, single = transformer.transformer_blocks, transformer.single_transformer_blocks
    L = len(double) + len(single)
    joint_layout, image_layout = TokenLayout(text_tokens, text_first, grid), TokenLayout(grid=grid)
    for i, block in enumerate(double):
        joint = JointAttention()
        attn = f"blocks.{i}.attn"
        sites.append(Site(attn, "attn", block.attn, unpack=joint.unpack, pack=joint.pack, layer=(i, L),
                          feeders=((block.norm1.norm, first_token), (block.norm1_context.norm, first_token)),
                          attention_probe=_attention_received(block.attn),
                          attention_core=_attention_core(block.attn), layout=joint_layout))
        sites.append(Site(f"blocks.{i}.mlp", "mlp", block.ff, layer=(i, L), tokenwise=True, scored_by=attn,
                          score_tokens=joint.stream("image", text_first), feeders=((block.norm2, first_token),),
                          ffn=feed_forward_parts(block.ff), layout=image_layout))
        sites.append(Site(f"blocks.{i}.mlp_context", "mlp", block.ff_context, layer=(i, L), tokenwise=True,
                          scored_by=attn, score_tokens=joint.stream("text", text_first),
                          feeders=((block.norm2_context, first_token),)))
    for j, block in enumerate(single):
        i = len(double) + j
        mlp = FeedForwardParts(block.proj_mlp, block.act_mlp, block.proj_out, head=block.proj_out.in_features -
                               block.proj_mlp.out_features)
        sites.append(Site(f"single_blocks.{j}.fused", "fused", block.proj_out, layer=(i, L),
                          feeders=((block.norm.norm, first_token), (block.attn, single_attention_stand_in),
                                   (block.proj_mlp, zeros_like_linear(block.proj_mlp))), ffn=mlp, layout=joint_layout))
        joint = JointAttention()  # HunyuanVideo's single-block attention returns (image, text)
        sites.append(Site(f"single_blocks.{j}.attn", "attn_core", block.attn, unpack=joint.unpack, pack=joint.pack,
                          layer=(i, L), attention_core=_attention_core(block.attn), layout=joint_layout))
    blocks = [*double, *single]
    for i, block in enumerate(blocks):
        streams = TwoStreams(text_first)
        sites.append(Site(f"blocks.{i}", "block", block, residual=True, read=streams.read, unpack=streams.unpack,
                          pack=streams.pack, layer=(i, L)))
    streams = TwoStreams(text_first)
    sites.append(Site("blocks", "blocks", blocks[0], residual=True, span=tuple(blocks[1:]), read=streams.read,
                      unpack=streams.unpack, pack=streams.pack, signal=_modulated_image_input(double[0])))
    # called with return_dict=False, so the model returns a 1-tuple
    sites.append(Site("model", "model", transformer, unpack=lambda out: out[0], pack=lambda v: (v,)))
    return sites


class MMDiTAdapter(Adapter):
    """What the FLUX and HunyuanVideo adapters share: loading the transformer (pretrained, random or meta) and the
    pipeline's text encoders and VAE from one diffusers folder, the missing-weights message, and the site map.
    Subclasses name their classes and write their sampling loop, noise, prompt embeddings and random VAE.

    Class attributes:
        transformer_class, pipeline_class: the diffusers class names.
        tuple_arch_keys: `model.arch` keys the constructor wants as tuples.
        text_first: the blocks return the text stream first.
        single_attention_stand_in: a skipped single block's attention stand-in (`mmdit_sites`).
        example_path: the folder name in the missing-weights message's example.
    """

    condition = "prompts"
    transformer_class: ClassVar[str]
    pipeline_class: ClassVar[str]
    tuple_arch_keys: ClassVar[tuple[str, ...]] = ()
    text_first: ClassVar[bool]
    single_attention_stand_in: ClassVar[Callable[..., Any]] = staticmethod(first_token)
    example_path: ClassVar[str]

    def __init__(self, cfg: Any, device: str) -> None:
        super().__init__(cfg, device)
        self.transformer = self._load_transformer().eval().requires_grad_(False)  # first: fails fast without weights
        from diffusers import FlowMatchEulerDiscreteScheduler

        if self.transformer.dtype != self.dtype:  # also on the meta device, where a patch conv checks dtypes
            self.transformer.to(dtype=self.dtype)
        if self.device.type != "meta":
            self.transformer.to(self.home)
        self.scheduler = FlowMatchEulerDiscreteScheduler(**cfg.scheduler)
        self.pipeline = self._load_pipeline() if cfg.weights == "pretrained" else None
        self.vae = self.pipeline.vae if self.pipeline is not None else (
            self._random_vae() if cfg.weights == "random" else None)
        encoders = {} if self.pipeline is None else {"text_encoder": self.pipeline.text_encoder,
                                                     "text_encoder_2": self.pipeline.text_encoder_2}
        self.offload(**encoders, transformer=self.transformer, vae=self.vae)

    def _location(self) -> str:
        return self.weights_location(self.cfg)

    def _load_transformer(self) -> nn.Module:
        if self.cfg.weights == "pretrained" and not self.has_local_weights(self._location(), "transformer"):
            raise self._missing("transformer/config.json")
        import diffusers

        cls = getattr(diffusers, self.transformer_class)
        arch = {k: tuple(v) if k in self.tuple_arch_keys else v for k, v in self.cfg.arch.items()}
        if self.cfg.weights == "meta":
            with torch.device("meta"):
                return cls(**arch)
        if self.cfg.weights == "random":
            torch.manual_seed(0)
            return cls(**arch)
        return self.from_pretrained(cls, self._location(), "transformer", torch_dtype=self.dtype)

    def _load_pipeline(self) -> Any:
        """Text encoders, tokenizers and VAE of the model's diffusers pipeline, around our transformer."""
        import diffusers

        absent = [name for name in PIPELINE_FILES if self.local_file(self._location(), name) is None]
        if absent:
            raise self._missing(", ".join(absent))
        pipe = self.from_pretrained(getattr(diffusers, self.pipeline_class), self._location(),
                                    transformer=self.transformer, torch_dtype=self.dtype)
        return pipe.to(self.home)

    def example_conditions(self, n: int, start: int = 0) -> dict:
        return {"prompts": [EXAMPLE_PROMPT] * n}

    @staticmethod
    def prompt_keys(prompts: list[str]) -> list[int]:
        """Random weights' stand-in for a text encoder: each prompt's embedding is drawn from a generator seeded by
        its text (CRC-32), so the same prompt gets the same embedding in any batch and run."""
        return [zlib.crc32(p.encode("utf-8")) for p in prompts]

    def seeded_prompts(self, keys: list[int], text_dim: int) -> tuple[Tensor, Tensor, list[torch.Generator]]:
        """Random weights' stand-in prompts: (embeds (B, text_tokens, text_dim), pooled (B, pooled_dim)) on the
        model's device and dtype, drawn from one generator per prompt key (so a prompt's embedding does not depend
        on its batch), and the generators, for further per-prompt draws."""
        T, pooled_dim = self.cfg.text_tokens, self.transformer.config.pooled_projection_dim
        gens = [torch.Generator().manual_seed(10_000 + k) for k in keys]
        embeds = torch.stack([torch.randn(T, text_dim, generator=g) for g in gens])
        pooled = torch.stack([torch.randn(pooled_dim, generator=g) for g in gens])
        return embeds.to(self.device, self.dtype), pooled.to(self.device, self.dtype), gens

    def _random_vae(self) -> nn.Module:
        """A small random VAE with the model's latent interface, so random-weight runs decode."""
        raise NotImplementedError

    def _missing(self, part: str) -> MissingWeightsError:
        return MissingWeightsError(
            f"Weights of model '{self.cfg.name}' ({self.cfg.hub_id}) are not on this machine: no {part} under "
            f"'{self._location()}'. Download {self.cfg.hub_id} where you have network and set "
            "model.path=/path/to/copy (a diffusers folder holding transformer/, vae/, text_encoder/, "
            f"text_encoder_2/, tokenizer/, tokenizer_2/ and scheduler/), e.g. `python run.py model={self.cfg.name} "
            f"model.path={self.example_path}`. `profile=flops_only` needs no weights.")

    def token_grid(self) -> tuple[int, ...]:
        """The image (or video) token grid the transformer sees, (height, width) or (frames, height, width)."""
        raise NotImplementedError

    def sites(self) -> list[Site]:
        return mmdit_sites(self.transformer, self.text_first, type(self).single_attention_stand_in,
                           self.cfg.text_tokens, self.token_grid())
