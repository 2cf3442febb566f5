"""Plain PyTorch versions of the PagedAttention kernels: slow, obviously right, what the kernels are tested against.

Layout (per layer), shared with ``servelab.paged.kernels``:
    k_cache, v_cache  [num_blocks, block_size, Hkv, D]  token slot s lives at [s // block_size, s % block_size]
    slot_mapping      [N] int64                          where each new token goes, -1 = padding (not stored)
    block_tables      [B, max_blocks] int32              logical block i of sequence b -> physical block
    seq_lens          [B] int32                          tokens each query attends to (its own included, >= 1)
"""
from __future__ import annotations

import torch


def store_kv_reference(
    k: torch.Tensor,  # [N, Hkv, D] keys of the new tokens
    v: torch.Tensor,  # [N, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], written in place
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], written in place
    slot_mapping: torch.Tensor,  # [N] int64, -1 = skip
) -> None:
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache[slots // block_size, slots % block_size] = k[keep].to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = v[keep].to(v_cache.dtype)


def paged_decode_reference(
    q: torch.Tensor,  # [B, Hq, D] one query token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
) -> torch.Tensor:  # [B, Hq, D] in q's dtype
    """Gather each sequence's K/V block by block into order, then ordinary softmax attention in fp32."""
    B, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for b in range(B):
        n = int(seq_lens[b])
        blocks = block_tables[b, : -(-n // block_size)].long()  # only the blocks that hold its tokens
        k = k_cache[blocks].reshape(-1, Hkv, D)[:n].float()  # [n, Hkv, D] in sequence order
        v = v_cache[blocks].reshape(-1, Hkv, D)[:n].float()
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # [n, Hq, D]: query head h reads KV head h // (Hq // Hkv)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale  # [Hq, n]
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out
