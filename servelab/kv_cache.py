"""KV caches: the attention-backend interface the model calls, and the simplest real cache.

The model computes q, k, v for the new tokens of a batch and hands them to ``cache.attend``; the
cache decides where K/V live and which attention implementation runs. Later labs plug in other
layouts (a paged block table, a Triton kernel) behind the same one-method interface.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from servelab.attention import reference_attention


class KVCache(ABC):
    """What a transformer layer sees: store this step's K/V, return attention over everything visible."""

    @abstractmethod
    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # [B, Hq, T, D]
        k: torch.Tensor,  # [B, Hkv, T, D] keys of the new tokens (RoPE applied)
        v: torch.Tensor,  # [B, Hkv, T, D]
        positions: torch.Tensor,  # [B, T], -1 = padding
    ) -> torch.Tensor:  # [B, Hq, T, D]
        ...


class NoCache(KVCache):
    """No memory between calls: every forward attends causally over exactly the tokens it is given."""

    def attend(self, layer, q, k, v, positions):
        return reference_attention(q, k, v, positions, positions)


class ContiguousKVCache:
    """One preallocated region of ``max_len`` tokens per slot: K/V of position p live at index p.

    Simple and fast to index, but every slot reserves ``max_len`` tokens whether its sequence uses them
    or not — the waste that paged attention (lab 02) removes.
    """

    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs num_slots >= 1 and max_len >= 1, got {num_slots} and {max_len}")
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_len = num_slots, max_len

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def rows(self, slot_ids: Sequence[int] | torch.Tensor) -> "SlotView":
        """The cache as seen by a batch whose row i belongs to slot ``slot_ids[i]``."""
        ids = [int(s) for s in (slot_ids.tolist() if isinstance(slot_ids, torch.Tensor) else slot_ids)]
        if ids and (min(ids) < 0 or max(ids) >= self.num_slots):  # checked in Python: a decode step does this
            raise ValueError(f"slot ids {ids} out of range: this cache has {self.num_slots} slots")
        if len(set(ids)) != len(ids):
            raise ValueError(f"slot ids {ids} repeat: two rows of one batch cannot share a slot")
        return SlotView(self, ids)


class SlotView(KVCache):
    def __init__(self, cache: ContiguousKVCache, ids: list[int]):
        self.cache = cache
        self.slots = torch.tensor(ids, dtype=torch.long, device=cache.k.device)
        # Attention reads slots 0..n-1 of the cache as a view (no copy of K/V). Rows of this batch are
        # scattered into that range; slots in it that this batch does not use are treated as padding.
        self.n = max(ids) + 1 if ids else 0
        self.identity = ids == list(range(self.n))

    def attend(self, layer, q, k, v, positions):
        if positions.shape[0] != self.slots.numel():
            raise ValueError(f"batch has {positions.shape[0]} rows but the cache view has {self.slots.numel()} slots")
        span = max(1, int(positions.max()) + 1)
        if span > self.cache.max_len:
            raise ValueError(f"position {span - 1} does not fit: this KV cache holds {self.cache.max_len} tokens per slot")
        rows, cols = (positions >= 0).nonzero(as_tuple=True)
        slot, pos = self.slots[rows], positions[rows, cols]
        self.cache.k[layer, slot, :, pos] = k[rows, :, cols].to(self.cache.k.dtype)
        self.cache.v[layer, slot, :, pos] = v[rows, :, cols].to(self.cache.v.dtype)
        keys = self.cache.k[layer, : self.n, :, :span].to(q.dtype)  # [n, Hkv, span, D], a view
        vals = self.cache.v[layer, : self.n, :, :span].to(q.dtype)
        if not self.identity:  # place each row's queries in its slot's row; unused slots stay padding
            q_full = q.new_zeros((self.n, *q.shape[1:]))
            q_full[self.slots] = q
            pos_full = positions.new_full((self.n, positions.shape[1]), -1)
            pos_full[self.slots] = positions
            q, positions = q_full, pos_full
        k_pos = torch.arange(span, device=positions.device).expand(self.n, span)
        out = reference_attention(q, keys, vals, positions, k_pos)
        return out if self.identity else out[self.slots]
