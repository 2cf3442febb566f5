"""The paged KV cache: K/V live in fixed-size blocks, and each sequence's block table says which ones.

Per layer one tensor ``k`` and one ``v`` of layout [num_blocks, block_size, num_kv_heads, head_dim] (the
layout the lab's Triton kernels read). A sequence holds only the blocks its tokens fill, so the cache wastes
at most one partly filled block per sequence instead of ``max_len - length`` tokens (``ContiguousKVCache``).

Who owns which block is not the cache's business: the engine's block manager (the lab's exercise) decides,
and each step hands the view the rows' block tables. Attention runs on plain PyTorch (gather the blocks, the
reference), or on kernels the engine passes in (``kernels.store_kv`` and ``kernels.paged_decode``: the lab's
Triton kernels); ``servelab.device.paged_backend()`` is the one place that says which a machine should use.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from servelab.attention import CausalMask, causal_mask, reference_attention
from servelab.attention_metadata import AttentionMetadata
from servelab.kv_cache import KVCache


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


class PagedKVCache:
    """K/V blocks of every layer. ``kernels``: an object with ``store_kv`` and ``paged_decode`` (e.g. the
    lab's Triton kernels) used for writes and decode steps; None: plain PyTorch."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", kernels=None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a paged cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # zeros, not empty: a key past a sequence's end is masked out, but NaN garbage would survive the mask
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size, self.kernels = num_blocks, block_size, kernels

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int, kernels=None) -> PagedKVCache:
        c = model.config
        return cls(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, model.dtype, model.device, kernels)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def view(self, block_tables: Sequence[Sequence[int]], copies: Sequence[tuple[int, int]] = ()) -> PagedView:
        """The cache as seen by one batch: row i's tokens live in the blocks ``block_tables[i]`` (position p in
        block ``table[p // block_size]`` at offset ``p % block_size``). ``copies``: (src, dst) block copies
        to make before this step writes (a block manager's copy on write)."""
        tables = [[int(b) for b in t] for t in block_tables]
        bad = [b for t in tables for b in t if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"block ids {bad[:5]} out of range: this cache has {self.num_blocks} blocks")
        return PagedView(self, tables, [(int(a), int(b)) for a, b in copies])


@dataclass
class PagedMetadata(AttentionMetadata):
    """One step through a ``PagedView``. Built as int64 on the host so every tensor rides the one packed copy."""

    slot_mapping: torch.Tensor  # [B*T] slot of each new token's K/V (row-major over (row, token)), -1 = padding
    write_index: torch.Tensor  # [N] which of the B*T new tokens are real
    write_slot: torch.Tensor  # [N] their slots: slot_mapping without the padding
    block_tables: torch.Tensor  # [B, max_blocks] each row's blocks; 0 past its end (masked, never used)
    seq_lens: torch.Tensor  # [B] tokens of each row's sequence after this step (0: a padding row)
    k_pos: torch.Tensor  # [B, max_blocks * block_size] position of each gathered key, -1 past seq_lens
    copy_src: torch.Tensor  # [C] copy-on-write: block copy_src[i] is copied to copy_dst[i] before any write
    copy_dst: torch.Tensor
    dense: bool  # no padding among the new tokens
    has_copies: bool
    kernel_decode: bool  # T == 1 on the triton backend: paged_decode reads the blocks, no mask needed
    mask: CausalMask | None = field(default=None, kw_only=True)

    def on_device(self) -> None:
        self.block_tables, self.seq_lens = self.block_tables.int(), self.seq_lens.int()  # the kernels' dtype
        if not self.kernel_decode:
            self.mask = causal_mask(self.positions, self.k_pos, self.dense)


class PagedView(KVCache):
    def __init__(self, cache: PagedKVCache, tables: list[list[int]], copies: list[tuple[int, int]]):
        self.cache, self.tables, self.copies = cache, tables, copies

    def plan(self, positions: torch.Tensor) -> PagedMetadata:
        """Once per step, on the host: slot mapping, block tables and lengths for every layer."""
        B, T = positions.shape
        if B != len(self.tables):
            raise ValueError(f"batch has {B} rows but the cache view has {len(self.tables)} block tables")
        bs = self.cache.block_size
        seq_lens = (positions.max(dim=1).values + 1).clamp(min=0)
        tables = []
        for row, (table, n) in enumerate(zip(self.tables, seq_lens.tolist())):
            if n > len(table) * bs:
                raise ValueError(f"row {row}: position {n - 1} has no slot: its block table {table[:8]} holds "
                                 f"{len(table) * bs} tokens; give the sequence a block before the step")
            tables.append(table[:blocks_for(n, bs)])
        block_tables = torch.zeros(B, max([1, *map(len, tables)]), dtype=torch.long)
        for row, table in enumerate(tables):
            block_tables[row, :len(table)] = torch.tensor(table, dtype=torch.long)
        real, pos = positions >= 0, positions.clamp(min=0)
        slot_mapping = torch.where(real, block_tables.gather(1, pos // bs) * bs + pos % bs, -1).flatten()
        write_index = real.flatten().nonzero().flatten()  # on the host: no GPU sync
        span = torch.arange(block_tables.shape[1] * bs).expand(B, -1)
        copies = torch.tensor(self.copies, dtype=torch.long).reshape(-1, 2)
        return PagedMetadata(positions, slot_mapping=slot_mapping, write_index=write_index,
                             write_slot=slot_mapping[write_index], block_tables=block_tables, seq_lens=seq_lens,
                             k_pos=torch.where(span < seq_lens[:, None], span, -1), copy_src=copies[:, 0],
                             copy_dst=copies[:, 1], dense=bool(real.all()), has_copies=len(copies) > 0,
                             kernel_decode=self.cache.kernels is not None and T == 1)

    def attend(self, layer, q, k, v, meta: PagedMetadata):
        k_cache, v_cache, kernels = self.cache.k[layer], self.cache.v[layer], self.cache.kernels
        if meta.has_copies:
            k_cache[meta.copy_dst], v_cache[meta.copy_dst] = k_cache[meta.copy_src], v_cache[meta.copy_src]
        B, Hkv, T, D = k.shape
        k_new = k.transpose(1, 2).reshape(B * T, Hkv, D).to(k_cache.dtype)  # row-major over (row, token)
        v_new = v.transpose(1, 2).reshape(B * T, Hkv, D).to(v_cache.dtype)
        if kernels is not None:
            kernels.store_kv(k_new.contiguous(), v_new.contiguous(), k_cache, v_cache, meta.slot_mapping)
        else:
            if not meta.dense:  # padding's K/V must never land in the cache
                k_new, v_new = k_new[meta.write_index], v_new[meta.write_index]
            k_cache.view(-1, Hkv, D).index_copy_(0, meta.write_slot, k_new)  # flat view: row = slot
            v_cache.view(-1, Hkv, D).index_copy_(0, meta.write_slot, v_new)
        if meta.kernel_decode:
            out = kernels.paged_decode(q[:, :, 0].contiguous(), k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                       1.0 / math.sqrt(D))[:, :, None]
            return out if meta.dense else out.masked_fill(meta.positions[:, None, :, None] < 0, 0.0)
        # gather each row's blocks into one contiguous run of keys: [B, max_blocks * block_size, Hkv, D]
        keys = k_cache[meta.block_tables].flatten(1, 2).transpose(1, 2).to(q.dtype)
        vals = v_cache[meta.block_tables].flatten(1, 2).transpose(1, 2).to(q.dtype)
        return reference_attention(q, keys, vals, mask=meta.mask)
