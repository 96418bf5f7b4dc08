"""Numerics of column-sparse deltas (Chipmunk, arXiv:2506.03275): the token order of Chipmunk's FLUX code, grouped
sparse attention over per-group key sets, attention column sums, and per-block column selection.

Sparse work runs as gathers plus batched matmuls over the selected keys or columns only, so what `FlopCounterMode`
counts is the work Chipmunk's kernels do; each function states its FLOPs' closed form.
"""

import math
from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from methods.base import TokenLayout

QUERY_CHUNK = 1024  # queries per chunk of an explicit attention map


def _logits(q: Tensor, k: Tensor) -> Tensor:
    """Scaled attention logits q k^T / sqrt(d), in float32 at least (float64 stays float64)."""
    return (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * q.shape[-1] ** -0.5


@lru_cache(maxsize=64)
def token_groups(layout: Optional[TokenLayout], count: int, size: int, chunks: tuple[int, int], device: str) -> Tensor:
    """(groups, size) token indices: consecutive runs of `size` tokens in Chipmunk's order, the last run padded by
    repeating its last token (as Chipmunk's kernels pad a partial tile; padded rows are computed and dropped).

    Chipmunk's FLUX code runs the model on patchified image tokens (`chipmunk.ops.patch.patchify`): text tokens as
    they are, the image grid in `chunks[0]`-square tiles, each in `chunks[1]`-square sub-tiles, row-major at every
    level. That order applies when `layout` describes `count` tokens with a 2-D grid the tiles divide; otherwise the
    sequence's own order does (a video grid, a grid the tiles do not divide).
    """
    order = torch.arange(count)
    if layout is not None and len(layout.grid) == 2 and layout.text + math.prod(layout.grid) == count:
        (h, w), (c1, c2) = layout.grid, chunks
        if c1 > 1 and c1 % c2 == 0 and h % c1 == 0 and w % c1 == 0:
            image = torch.arange(h * w).view(h // c1, c1 // c2, c2, w // c1, c1 // c2, c2)
            image = image.permute(0, 3, 1, 4, 2, 5).reshape(-1)  # tile, sub-tile, token: row-major each
            text = torch.arange(layout.text)
            order = (torch.cat([text, image + layout.text]) if layout.text_first
                     else torch.cat([image, text + h * w]))
    pad = -count % size
    if pad:
        order = torch.cat([order, order[-1:].expand(pad)])
    return order.view(-1, size).to(device)


def key_bias(mask: Optional[Tensor]) -> Optional[Tensor]:
    """An attention mask over keys (boolean: True attends, or additive), (B, 1, 1, S) -> additive float bias; masked
    keys get the float minimum rather than -inf, so a query group whose selected keys are all masked stays finite."""
    if mask is None:
        return None
    if mask.shape[-2] != 1:
        raise ValueError(f"Chipmunk's sparse attention takes a mask over keys, (B, 1, 1, S); got {tuple(mask.shape)}.")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, torch.finfo().min)
    return mask.float()


def attention_lse(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Dense attention with each query's log-sum-exp, (B, H, S, d) -> ((B, H, S, d), (B, H, S)), in query chunks.
    FLOPs: 4 B H S^2 d (as `scaled_dot_product_attention`)."""
    out, lse = [], []
    for start in range(0, q.shape[2], QUERY_CHUNK):
        logits = _logits(q[:, :, start:start + QUERY_CHUNK], k)
        logits = logits if bias is None else logits + bias
        lse.append(logits.logsumexp(-1))
        out.append(logits.softmax(-1).to(v.dtype) @ v)
    return torch.cat(out, 2), torch.cat(lse, 2)


def attention_column_sums(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], groups: Tensor,
                          previous_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Dense attention and, per query group, each key's summed attention under the previous step's normalisers
    (Chipmunk's `dense_colsum_attn`: sum over the group's queries of exp(s_qk - lse_prev_q)).

    Returns:
        out (B, H, S, d) and column sums (B, H, groups, S) float32. FLOPs: 4 B H (groups x size) S d.
    """
    B, H, S, d = q.shape
    out = torch.empty_like(q)
    sums = []
    per_chunk = max(1, QUERY_CHUNK // groups.shape[1])
    for start in range(0, groups.shape[0], per_chunk):
        rows = groups[start:start + per_chunk]  # (c, size)
        queries = rows.reshape(-1)
        logits = _logits(q[:, :, queries], k)  # (B, H, c * size, S)
        logits = logits if bias is None else logits + bias
        out[:, :, queries] = logits.softmax(-1).to(v.dtype) @ v
        weights = (logits - previous_lse[:, :, queries, None]).exp()
        sums.append(weights.view(B, H, *rows.shape, S).sum(-2))
    return out, torch.cat(sums, 2)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], groups: Tensor, keys: Tensor) -> Tensor:
    """Each query group attends to its own keys only, softmax over them (Chipmunk's `csp_attn`).

    Args:
        q, k, v: (B, H, S, d).
        bias: None or (B, 1, 1, S) additive key bias.
        groups: (G, size) query indices per group.
        keys: (B, H, G, n) key indices per group.

    Returns:
        (B, H, S, d); zeros when n = 0. FLOPs: 4 B H G size n d.
    """
    B, H, S, d = q.shape
    G, n = groups.shape[0], keys.shape[-1]
    if n == 0:
        return torch.zeros_like(q)
    flat = keys.reshape(B, H, G * n, 1).expand(-1, -1, -1, d)
    k_sel, v_sel = (x.gather(2, flat).view(B, H, G, n, d) for x in (k, v))
    logits = _logits(q[:, :, groups], k_sel)  # (B, H, G, size, n)
    if bias is not None:
        logits = logits + bias.reshape(B, 1, S).expand(B, H, S).gather(2, keys.reshape(B, H, G * n)).view(B, H, G, 1, n)
    out = torch.empty_like(q)
    out[:, :, groups.reshape(-1)] = (logits.softmax(-1).to(v.dtype) @ v_sel).reshape(B, H, -1, d)
    return out


def column_count(columns: int, top: float, random: float, multiple: int) -> tuple[int, int]:
    """(top, total) columns a block recomputes: the top share by change, random columns among the rest, rounded
    up to a multiple (Chipmunk's `topk_indices`, at its expected count)."""
    n_top = round(top * columns)
    total = n_top + round(random * (columns - n_top))
    return n_top, min(columns, multiple * math.ceil(total / multiple))


def select_columns(change: Tensor, top: float, random: float, multiple: int, generator: torch.Generator) -> Tensor:
    """(B, blocks, F) change per hidden column -> (B, blocks, k) the columns each block recomputes: its top
    `column_count` by change, the others drawn uniformly from the remaining columns."""
    n_top, total = column_count(change.shape[-1], top, random, multiple)
    chosen = change.topk(n_top, dim=-1).indices
    if total == n_top:
        return chosen
    draw = (torch.empty(change.shape, device="meta") if change.device.type == "meta"
            else torch.rand(change.shape, generator=generator).to(change.device))
    draw.scatter_(-1, chosen, -1.0)  # the top columns are not drawn again
    return torch.cat([chosen, draw.topk(total - n_top, dim=-1).indices], -1)
