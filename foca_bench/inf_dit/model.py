"""The Inf-DiT transformer (arXiv:2405.04312), written from THUDM/Inf-DiT's `dit/model.py` and `dit/embeddings.py`.

Pixel space, patch 4: the input is the noisy image and the bicubic-upsampled low-res image (6 channels), the output
3 channels. 28 pre-LayerNorm blocks of width 1280 with 16 heads, adaLN without gates (shift and scale for the
attention and the MLP input, from the time embedding plus the CLIP image embedding of the low-res input).

Self-attention is UniBA (unidirectional block attention): the token grid is cut into 32x32-token blocks, and each
block's queries attend to the keys and values of four blocks, in this order: itself, its top-left, left and top
neighbours (at the image's top and left edges the missing neighbours are replicated from the nearest block, as the
original's `get_cat_layer_left_top` does), each group of keys plus a learned per-layer, per-neighbour embedding.
Queries and keys are layer-normalised per head (with the query's LayerNorm for both, as the original does: its key
LayerNorm is never used) and rotated by a 2-D RoPE on the global token position (row on the first half of each
head, column on the second, interleaved pairs). Block 0 also cross-attends, per block, to a 3x3-block window of
low-res tokens (a 2x2-patch projection of the low-res image) before its MLP.

A forward covers a `Strip` of block rows: the whole image, or (strip mode) a band of full-width block rows whose top
neighbours, the block row above it, come from `StripMemory`: the keys and values that row produced at the same
evaluation. Since a block only sees blocks above and to its left, strips taken top to bottom, each through every
evaluation, give the whole image's result.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class InfDiTArch:
    """The architecture (`model.arch`); defaults are the released model's (`generate_sr_big_cli.sh`).

    Attributes:
        hidden_size, num_layers, num_heads, patch_size, in_channels, out_channels: as named.
        block_size: tokens per side of a UniBA block (the original's `image_block_size` 128 px / patch 4).
        sr_scale: upsampling factor of the low-res input.
        lr_patch_size: patch of the low-res projection for the cross-attention.
        vector_dim: width of the CLIP image embedding (`vector_dim`).
        time_channels: sinusoidal channels of the time embedding.
        rope_grid: positions per axis of the RoPE table; token positions are taken modulo it (the original's
            `8 * image_size // patch_size` with image_size 512).
        clip: OpenCLIP vision tower config (`CLIPVisionCfg` fields) and `embed_dim`.
    """

    hidden_size: int = 1280
    num_layers: int = 28
    num_heads: int = 16
    patch_size: int = 4
    in_channels: int = 6
    out_channels: int = 3
    block_size: int = 32
    sr_scale: int = 4
    lr_patch_size: int = 2
    vector_dim: int = 768
    time_channels: int = 192
    rope_grid: int = 1024
    clip: dict = field(default_factory=lambda: {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24,
                                                                                 "width": 1024, "head_width": 64,
                                                                                 "patch_size": 14}})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def block_pixels(self) -> int:
        return self.block_size * self.patch_size

    @property
    def lr_block_size(self) -> int:
        """Low-res tokens per block side (16 for the released model)."""
        return self.block_size * self.patch_size // self.sr_scale // self.lr_patch_size


@dataclass(frozen=True)
class Strip:
    """Block rows row .. row + rows - 1 (all `cols` blocks of each) of an image `image_rows` blocks high."""

    row: int
    rows: int
    cols: int
    image_rows: int


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def to_blocks(x: Tensor, strip: Strip, block: int) -> Tensor:
    """(B, h*w, ...) row-major tokens -> (B, rows, cols, block*block, ...) blocks, each row-major inside."""
    B, rest = x.shape[0], x.shape[2:]
    x = x.reshape(B, strip.rows, block, strip.cols, block, *rest).transpose(2, 3)
    return x.reshape(B, strip.rows, strip.cols, block * block, *rest)


def from_blocks(x: Tensor, strip: Strip, block: int) -> Tensor:
    """Inverse of `to_blocks`: (B, rows, cols, block*block, ...) -> (B, h*w, ...)."""
    B, rest = x.shape[0], x.shape[4:]
    x = x.reshape(B, strip.rows, strip.cols, block, block, *rest).transpose(2, 3)
    return x.reshape(B, strip.rows * block * strip.cols * block, *rest)


def rope_table(grid: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """cos, sin (grid, grid, head_dim) of the 2-D RoPE, as the original's `RotaryPositionEmbedding(pix2struct=True)`
    builds them: frequencies 10000^(-2i/(head_dim/2)), each repeated for an interleaved pair, the row's angles on the
    first half of the head and the column's on the second."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(grid) / grid * grid  # the original's (ft_seq_len / pt_seq_len) rescale, kept for its rounding
    angles = torch.outer(t, freqs).repeat_interleave(2, dim=-1)  # (grid, dim)
    angles = torch.cat([angles[:, None, :].expand(grid, grid, dim), angles[None, :, :].expand(grid, grid, dim)], -1)
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin with interleaved pairs (x_2i, x_2i+1) -> (-x_2i+1, x_2i); x (B, T, H, d), cos and
    sin (T, d)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos[:, None] + rotated * sin[:, None]


class StripMemory:
    """Strip mode's key/value memories: per (evaluation, layer), the bottom block row of the strip above, kept until
    the strip below reads it (then freed), so at most about one block row per (evaluation, layer) is held. `offload`
    keeps them in host memory, moved to the device when read."""

    def __init__(self, offload: bool = False) -> None:
        self.offload = offload
        self.above: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.below: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.bytes = self.peak_bytes = 0

    def exchange(self, key: tuple[int, int], strip: Strip, k: Tensor, v: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """Keeps this strip's bottom block row of k, v (B, rows, cols, L, H, d) for the strip below, and returns
        (and forgets) the row above at (evaluation, layer) `key`, (B, cols, L, H, d) each; None at the image's top."""
        top = None
        if strip.row > 0:
            if key not in self.above:
                raise RuntimeError(f"Strip mode: no keys/values of the row above at evaluation {key[0]}, layer "
                                   f"{key[1]}: every strip must compute the same layers at the same evaluations (an "
                                   "interval method's schedule); use model.mode=whole for this method.")
            top = self.above.pop(key)
            self.bytes -= sum(t.nbytes for t in top)
            top = tuple(t.to(k.device) for t in top)
        if strip.row + strip.rows < strip.image_rows:
            kept = tuple(t[:, -1].to("cpu", copy=True) if self.offload else t[:, -1].clone() for t in (k, v))
            self.below[key] = kept
            self.bytes += sum(t.nbytes for t in kept)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return top

    def strip_done(self) -> None:
        self.above, self.below = self.below, {}


@dataclass
class Call:
    """What every block of one forward reads: the silu'd conditioning embedding (B, D), the RoPE angles of the
    strip's tokens (T, d), the low-res windows of its blocks (B * blocks, W, D), the strip, and strip mode's memories
    with the evaluation index they are keyed by."""

    emb: Tensor
    cos: Tensor
    sin: Tensor
    lr: Tensor
    strip: Strip
    memory: Optional[StripMemory] = None
    evaluation: int = 0


class BlockAttention(nn.Module):
    """UniBA self-attention of one layer (a cache site: its output, before the residual add)."""

    def __init__(self, arch: InfDiTArch, layer: int) -> None:
        super().__init__()
        self.layer, self.heads, self.block = layer, arch.num_heads, arch.block_size
        self.qkv = nn.Linear(arch.hidden_size, 3 * arch.hidden_size)
        self.qk_norm = nn.LayerNorm(arch.head_dim, eps=1e-6)
        self.neighbour_embed = nn.Parameter(torch.zeros(4, arch.num_heads, arch.head_dim))  # self, TL, L, T
        self.proj = nn.Linear(arch.hidden_size, arch.hidden_size)

    def forward(self, x: Tensor, call: Call) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, -1).unbind(2)  # (B, T, H, d) each
        q, k = self.qk_norm(q), self.qk_norm(k)  # the original normalises keys with the query's LayerNorm
        q, k = rotate(q, call.cos, call.sin), rotate(k, call.cos, call.sin)
        q, k, v = (to_blocks(t, call.strip, self.block) for t in (q, k, v))  # (B, rows, cols, L, H, d)
        k_all, v_all = self._neighbours(k, v, call)  # (B, rows, cols, 4, L, H, d)
        k_all = k_all + self.neighbour_embed[:, None].to(k_all.dtype)
        n, L = B * call.strip.rows * call.strip.cols, self.block * self.block
        out = F.scaled_dot_product_attention(q.reshape(n, L, self.heads, -1).transpose(1, 2),
                                             k_all.reshape(n, 4 * L, self.heads, -1).transpose(1, 2),
                                             v_all.reshape(n, 4 * L, self.heads, -1).transpose(1, 2))
        out = out.transpose(1, 2).reshape(B, call.strip.rows, call.strip.cols, L, D)
        return self.proj(from_blocks(out, call.strip, self.block))

    def _neighbours(self, k: Tensor, v: Tensor, call: Call) -> tuple[Tensor, Tensor]:
        """Each block's (self, top-left, left, top) keys and values, from the grid extended by one block row on top
        (strip mode's memory of the row above, else the top row again) and one column on the left (the left column
        again): at the image's edges the nearest block stands in for a missing neighbour."""
        top = None
        if call.memory is not None:
            top = call.memory.exchange((call.evaluation, self.layer), call.strip, k, v)
        out = []
        for i, t in enumerate((k, v)):
            t = torch.cat([t[:, :1] if top is None else top[i][:, None], t], 1)  # (B, R + 1, C, ...)
            ext = torch.cat([t[:, :, :1], t], 2)  # (B, R + 1, C + 1, ...)
            out.append(torch.stack([ext[:, 1:, 1:], ext[:, :-1, :-1], ext[:, 1:, :-1], ext[:, :-1, 1:]], 3))
        return out[0], out[1]


class LowResCrossAttention(nn.Module):
    """Block 0's cross-attention from each block's queries to its 3x3-block window of low-res tokens (the original's
    `cross_attention_forward`); never cached."""

    def __init__(self, arch: InfDiTArch) -> None:
        super().__init__()
        D, H, d = arch.hidden_size, arch.num_heads, arch.head_dim
        self.heads, self.block = H, arch.block_size
        self.q, self.kv, self.proj = nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(D, D)
        self.q_norm, self.k_norm = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.query_pos = nn.Parameter(torch.zeros(1, arch.block_size**2, H, d))
        self.key_pos = nn.Parameter(torch.zeros(1, (3 * arch.lr_block_size) ** 2, H, d))

    def forward(self, x: Tensor, lr: Tensor, strip: Strip) -> Tensor:
        B, T, D = x.shape
        q = to_blocks(self.q(x).view(B, T, self.heads, -1), strip, self.block).flatten(0, 2)  # (n, L, H, d)
        k, v = self.kv(lr).view(*lr.shape[:2], 2, self.heads, -1).unbind(2)  # (n, W, H, d)
        q, k = self.q_norm(q) + self.query_pos, self.k_norm(k) + self.key_pos
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).reshape(B, strip.rows, strip.cols, -1, D)
        return self.proj(from_blocks(out, strip, self.block))


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InfDiTBlock(nn.Module):
    """One layer: x += attn(adaLN(norm1 x)); block 0: x += cross(norm2 x), h = norm_mlp x (affine); else h = norm2 x;
    x += mlp(adaLN(h)). No gates (`--nogate`)."""

    def __init__(self, arch: InfDiTArch, layer: int) -> None:
        super().__init__()
        D = arch.hidden_size
        self.layer = layer
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 4 * D))
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = BlockAttention(arch, layer)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        if layer == 0:
            self.cross_attn = LowResCrossAttention(arch)
            self.norm_mlp = nn.LayerNorm(D, eps=1e-6)
        self.mlp = MLP(D)

    def mlp_norm(self) -> nn.Module:
        """The LayerNorm whose output feeds only the MLP (through the adaLN modulation)."""
        return self.norm_mlp if self.layer == 0 else self.norm2

    def modulations(self, call: Call) -> tuple[Tensor, ...]:
        return self.modulation(call.emb).chunk(4, dim=1)  # shift_attn, scale_attn, shift_mlp, scale_mlp

    def forward(self, x: Tensor, call: Call) -> Tensor:
        shift_a, scale_a, shift_m, scale_m = self.modulations(call)
        x = x + self.attn(modulate(self.norm1(x), shift_a, scale_a), call)
        if self.layer == 0:
            x = x + self.cross_attn(self.norm2(x), call.lr, call.strip)
        return x + self.mlp(modulate(self.mlp_norm()(x), shift_m, scale_m))


class TimeEmbedding(nn.Module):
    """The original's `TimeEmbedding`: [cos, sin] of c_noise times 10000^(-i/half), then a 2-layer SiLU MLP."""

    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(channels, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: Tensor) -> Tensor:
        half = self.channels // 2
        freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32, device=c_noise.device) / half)
        x = torch.outer(c_noise, freqs.to(c_noise.dtype))
        return self.mlp(torch.cat([x.cos(), x.sin()], dim=1))


class FinalLayer(nn.Module):
    def __init__(self, arch: InfDiTArch) -> None:
        super().__init__()
        D, p = arch.hidden_size, arch.patch_size
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.linear = nn.Linear(D, p * p * arch.out_channels)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shift, scale = self.modulation(emb).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class InfDiT(nn.Module):
    """The Inf-DiT network: (c_in-scaled [noisy image, upsampled low-res], c_noise, CLIP embedding, low-res windows)
    -> the network output F (B, out_channels, h, w) of the strip, before EDM's c_out/c_skip combination."""

    def __init__(self, arch: InfDiTArch) -> None:
        super().__init__()
        D, p = arch.hidden_size, arch.patch_size
        self.arch = arch
        self.patch_embed = nn.Conv2d(arch.in_channels, D, p, stride=p)
        self.time_embed = TimeEmbedding(D, arch.time_channels)
        self.vector_embed = nn.Sequential(nn.Linear(arch.vector_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.lr_proj = nn.Conv2d(3, D, arch.lr_patch_size, stride=arch.lr_patch_size)
        self.blocks = nn.ModuleList(InfDiTBlock(arch, i) for i in range(arch.num_layers))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)  # SAT's final_layernorm
        self.final = FinalLayer(arch)
        cos, sin = rope_table(arch.rope_grid, arch.head_dim)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def conditioning(self, c_noise: Tensor, vector: Tensor) -> Tensor:
        """silu(time embedding + CLIP vector embedding), (B, D): what every adaLN modulation reads (through its own
        SiLU, so the original applies SiLU twice)."""
        return F.silu(self.time_embed(c_noise) + self.vector_embed(vector))

    def lr_windows(self, lr: Tensor, rows: int, cols: int) -> Tensor:
        """Each block's 3x3-block window of low-res tokens, zero-padded at the image's edges (the original's
        `process_lr`): (B, rows, cols, 9 * lr_block**2, D) for an image of rows x cols blocks."""
        b = self.arch.lr_block_size
        tokens = self.lr_proj(lr)  # (B, D, h / 2, w / 2)
        B, D = tokens.shape[:2]
        windows = F.unfold(tokens, kernel_size=3 * b, stride=b, padding=b)  # (B, D * 9b^2, blocks)
        windows = windows.view(B, D, 9 * b * b, -1).permute(0, 3, 2, 1)  # (B, blocks, 9b^2, D)
        return windows.reshape(B, rows, cols, 9 * b * b, D)

    def rope(self, strip: Strip) -> tuple[Tensor, Tensor]:
        """RoPE angles (T, d) of a strip's tokens at their global positions (modulo the table)."""
        n, grid = self.arch.block_size, self.arch.rope_grid
        rows = torch.arange(strip.row * n, (strip.row + strip.rows) * n, device=self.rope_cos.device)[:, None] % grid
        cols = torch.arange(strip.cols * n, device=self.rope_cos.device)[None, :] % grid
        return self.rope_cos[rows, cols].flatten(0, 1), self.rope_sin[rows, cols].flatten(0, 1)

    def forward(self, images: Tensor, c_noise: Tensor, vector: Tensor, lr_windows: Tensor, strip: Strip,
                memory: Optional[StripMemory] = None, evaluation: int = 0) -> Tensor:
        """Args:
            images: (B, in_channels, h, w) of the strip, already scaled by EDM's c_in.
            c_noise: (B,) EDM's 0.25 log(sigma).
            vector: (B, vector_dim) the CLIP image embedding.
            lr_windows: (B, rows, cols, W, D), the strip's blocks' low-res windows (`lr_windows`, sliced).
            strip: which block rows of the image `images` holds.
            memory, evaluation: strip mode's key/value memories and the evaluation they are keyed by.
        """
        p = self.arch.patch_size
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, T, D)
        emb = self.conditioning(c_noise, vector)
        cos, sin = self.rope(strip)
        call = Call(emb, cos.to(x.dtype), sin.to(x.dtype), lr_windows.flatten(0, 2), strip, memory, evaluation)
        for block in self.blocks:
            x = block(x, call)
        x = self.final(self.norm_out(x), emb)  # (B, T, p * p * C)
        B, (h, w) = x.shape[0], (images.shape[2] // p, images.shape[3] // p)
        x = x.view(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(B, -1, h * p, w * p)


class ClipImageEmbedding(nn.Module):
    """The OpenCLIP image embedding of the low-res input (the original's `OpenClipImageEncoder`, ViT-L/14): [-1, 1]
    -> [0, 1], bicubic resize of the short side to the tower's size (antialiased, torchvision's default), centre
    crop, CLIP's normalisation, the vision tower, L2-normalised (twice, as `encode_image(normalize=True)` and then
    `F.normalize` do)."""

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, embed_dim: int, vision_cfg: dict) -> None:
        super().__init__()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        self.visual = _build_vision_tower(embed_dim, CLIPVisionCfg(**vision_cfg))
        self.image_size = int(vision_cfg.get("image_size", 224))

    def forward(self, lr: Tensor) -> Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        x = (lr + 1) / 2
        x = TF.resize(x, self.image_size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        x = TF.center_crop(x, self.image_size)
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(3, 1, 1) for v in (self.MEAN, self.STD))
        x = (x - mean) / std  # TF.normalize's arithmetic, without its zero-std check (no .item() on the meta device)
        return F.normalize(F.normalize(self.visual(x), dim=-1), dim=-1)


def init_random(model: nn.Module, seed: int) -> None:
    """Seeded random weights for `model.weights=random`: PyTorch's default init, plus N(0, 0.02) for the learned
    embeddings the original initialises at zero, so every path carries signal."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
    for name, param in model.named_parameters():
        if name.endswith(("neighbour_embed", "query_pos", "key_pos")):
            nn.init.normal_(param, std=0.02)
        elif param.dim() == 1 and name.endswith("weight"):  # LayerNorm gains: near 1, not exactly
            nn.init.normal_(param, 1.0, 0.1)
