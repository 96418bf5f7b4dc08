"""Chipmunk (Sandy Research, arXiv:2506.03275): cached attention and MLP outputs plus column-sparse deltas.

As its FLUX code runs it (sandyresearch/chipmunk: src/chipmunk/modules/attn.py `SparseDiffAttn`,
src/chipmunk/modules/mlp.py `SparseDiffMlp`, examples/flux/chipmunk-config.yml), in PyTorch (its kernels are
Hopper-only); layers count double then single blocks, and the first `first_dense` layers are always dense:
- attention: dense at steps k < 2 and k % N == 0. Step 0 keeps each query's log-sum-exp; step 1 sums, per group
  of `query_group` queries in Chipmunk's token order (`methods._sparse.token_groups`), each key's attention under
  those normalisers and keeps the top `attn_top_keys` share of keys per group (rounded to `attn_multiple`), fixed
  from then on. A dense step from step 1 on caches o - sparse(o), the dense output minus the attention of each
  group over its keys alone; the other steps return cache + sparse(q, k, v).
- MLP (an image or single-stream MLP; text MLPs stay dense): dense at k % N == 0, caching the activations, the
  output and the block means (over `mlp_block` tokens) of the pre-activations. The other steps pick, per block
  of tokens, the hidden columns whose pre-activation changed most (the block mean's change, |up(mean x) - cached
  mean|; recomputed at every step before step 10 and at even steps after, else kept), recompute those columns'
  activations for the block's tokens and add (new - cached activations) @ down's columns to the cached output.
FLOPs count the sparse work itself (gathered keys and columns, batched matmuls). A GPU's latency is not the
kernels': records mark it as a dense emulation. N=1 is the uncached model.

Deviation from the official code, on purpose: a block recomputes a fixed number of columns, the official
kernel's expected count (the top `mlp_top_keys` share plus `mlp_random_keys` of the rest, drawn at random,
rounded up to `mlp_multiple`), so FLOPs do not depend on data and count on the meta device; the kernel estimates
the cutoff from a block's first 1024 columns and draws the random columns independently, so its count varies
around this one from block to block. docs/methods.md lists the other differences.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from methods import register
from methods._sparse import (attention_column_sums, attention_lse, key_bias, select_columns, sparse_attention,
                             token_groups)
from methods.base import DELTA, FULL, CacheConfig, CacheMethod, FeedForward, Plan, SiteKey, Step, Tokens

MASK_REFRESH_FROM = 10  # SparseDiffMlp recomputes its columns at every sparse step before step 10


@dataclass
class ChipmunkConfig(CacheConfig):
    """Attributes (defaults: examples/flux/chipmunk-config.yml):
    N: `full_step_every` of attention and MLP (attention is also dense at steps 0 and 1).
    first_dense: `first_n_dense_layers`.
    attn_top_keys, attn_multiple, query_group: the share of keys each query group keeps, the multiple it rounds
        to (`counts_multiple_of`), and the queries per group (`mbm`).
    mlp_top_keys, mlp_random_keys, mlp_multiple, mlp_block: the share of hidden columns a block recomputes by
        change, the share of the others drawn at random, the multiple the count rounds up to, tokens per block.
    mask_every: `block_mask_cache`: from step 10 on, the MLP columns are re-picked every `mask_every` steps.
    patch_tile, patch_subtile: Chipmunk's token-order tiles (`patchify.chunk_size_1`, `chunk_size_2`); 1 keeps the
        sequence's order.
    seed: seed of the random columns' generator (reset at every generation).
    """

    name: str = "chipmunk"
    N: int = 10
    first_dense: int = 2
    attn_top_keys: float = 0.165
    attn_multiple: int = 112
    query_group: int = 192
    mlp_top_keys: float = 0.3
    mlp_random_keys: float = 0.05
    mlp_multiple: int = 256
    mlp_block: int = 128
    mask_every: int = 2
    patch_tile: int = 8
    patch_subtile: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for knob in ("attn_top_keys", "mlp_top_keys", "mlp_random_keys"):
            if not 0.0 <= getattr(self, knob) <= 1.0:
                raise ValueError(f"cache.{knob}={getattr(self, knob)} is a share of keys or columns: use [0, 1].")
        for knob in ("attn_multiple", "query_group", "mlp_multiple", "mlp_block", "mask_every"):
            if getattr(self, knob) < 1:
                raise ValueError(f"cache.{knob}={getattr(self, knob)} must be >= 1.")
        if self.first_dense < 0 or min(self.patch_tile, self.patch_subtile) < 1:
            raise ValueError(f"cache.first_dense={self.first_dense} must be >= 0, and cache.patch_tile="
                             f"{self.patch_tile}, cache.patch_subtile={self.patch_subtile} >= 1 (Chipmunk's: 8, 4).")


@dataclass
class _Attention:
    lse: Optional[Tensor] = None  # (B, H, S) step 0's log-sum-exp per query
    keys: Optional[Tensor] = None  # (B, H, groups, n) each query group's keys
    cache: Optional[Tensor] = None  # (B, H, S, d) dense minus sparse output at the last dense step


@dataclass
class _MLP:
    act: Tensor  # (B, blocks, m, F) activations
    out: Tensor  # (B, blocks, m, D_out) output
    means: Tensor  # (B, blocks, F) block means of the pre-activations
    columns: Optional[Tensor] = None  # (B, blocks, k) each block's recomputed columns


@register("chipmunk")
class Chipmunk(CacheMethod):
    config_class = ChipmunkConfig
    roles = ("attn", "attn_core", "mlp", "fused")
    delta = True
    latency_note = ("dense emulation: Chipmunk's sparse work runs as PyTorch gathers and matmuls, not its Hopper "
                    "kernels, so this latency is not Chipmunk's (its FLOPs are)")

    def reset(self) -> None:
        self.attention: dict[SiteKey, _Attention] = {}
        self.mlp: dict[SiteKey, _MLP] = {}
        self.generator = torch.Generator().manual_seed(self.cfg.seed)

    def plan(self, step: Step) -> Plan:
        return FULL if self.cfg.N == 1 else DELTA

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        pass  # full steps run the model as it is; Chipmunk caches inside attention cores and MLPs (DELTA steps)

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        raise RuntimeError("Chipmunk never reuses a whole site: it adds sparse deltas to cached attention and MLPs.")

    def groups(self, tokens: Tokens, size: int, device: torch.device) -> Tensor:
        tiles = (self.cfg.patch_tile, self.cfg.patch_subtile)
        return token_groups(tokens.layout, tokens.count, size, tiles, str(device))

    def attend(self, key: SiteKey, step: Step, tokens: Tokens, q: Tensor, k: Tensor, v: Tensor,
               mask: Optional[Tensor] = None) -> Tensor:
        i = step.index
        if tokens.layer < self.cfg.first_dense:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        state, bias = self.attention.setdefault(key, _Attention()), key_bias(mask)
        groups = self.groups(tokens, self.cfg.query_group, q.device)
        if i < 2 or i % self.cfg.N == 0 or state.keys is None:
            if state.lse is None:  # step 0: dense, keep the normalisers
                out, state.lse = attention_lse(q, k, v, bias)
                return out
            if state.keys is None:  # step 1: dense, pick each group's keys by their column sums
                out, sums = attention_column_sums(q, k, v, bias, groups, state.lse)
                multiple = self.cfg.attn_multiple
                n = min(multiple * round(self.cfg.attn_top_keys * k.shape[2] / multiple), k.shape[2])
                state.keys = sums.topk(n, dim=-1).indices
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            state.cache = out - sparse_attention(q, k, v, bias, groups, state.keys)
            return out
        return state.cache + sparse_attention(q, k, v, bias, groups, state.keys)

    def feed_forward(self, key: SiteKey, step: Step, tokens: Tokens, x: Tensor, ffn: FeedForward) -> Tensor:
        i = step.index
        if tokens.layer < self.cfg.first_dense or (i % self.cfg.N == 0 or key not in self.mlp):
            hidden = ffn.up(x)  # (B, S, F)
            act = ffn.act(hidden)
            out = ffn.down(act, bias=True)  # (B, S, D_out)
            if tokens.layer >= self.cfg.first_dense:  # the columns picked before a dense step stay picked
                blocks = self.groups(tokens, self.cfg.mlp_block, x.device)
                columns = self.mlp[key].columns if key in self.mlp else None
                self.mlp[key] = _MLP(act[:, blocks], out[:, blocks], hidden[:, blocks].mean(-2), columns)
            return out
        state = self.mlp[key]
        blocks = self.groups(tokens, self.cfg.mlp_block, x.device)
        x_blocks = x[:, blocks]  # (B, blocks, m, D)
        if state.columns is None or i < MASK_REFRESH_FROM or i % self.cfg.mask_every == 0:
            means = ffn.up(x_blocks.mean(-2))  # (B, blocks, F)
            state.columns = select_columns((means - state.means).abs(), self.cfg.mlp_top_keys,
                                           self.cfg.mlp_random_keys, self.cfg.mlp_multiple, self.generator)
            state.means.scatter_(-1, state.columns, means.gather(-1, state.columns))
        columns = state.columns.unsqueeze(-2).expand(-1, -1, x_blocks.shape[2], -1)  # (B, blocks, m, k)
        new = ffn.act(ffn.up(x_blocks, state.columns))
        delta = new - state.act.gather(-1, columns)
        state.act.scatter_(-1, columns, new)
        state.out += ffn.down(delta, state.columns)
        out = x.new_empty(*x.shape[:2], state.out.shape[-1])
        out[:, blocks.reshape(-1)] = state.out.flatten(1, 2)
        return out
