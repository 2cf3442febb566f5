"""KV caches: the attention-backend interface the model calls, and the simplest real cache.

The model computes q, k, v for the new tokens of a batch and hands them to ``cache.attend``; the
cache decides where K/V live and which attention implementation runs. Later labs plug in other
layouts (a paged block table, a Triton kernel) behind the same one-method interface.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from servelab.attention import SEES_EVERY_KEY, CausalMask, causal_mask, reference_attention
from servelab.attention_metadata import AttentionMetadata


class KVCache(ABC):
    """What a transformer layer sees: store this step's K/V, return attention over everything visible.

    Two calls per forward: ``plan`` once per step, on the host, builds the step's attention metadata
    (the model moves it to the device in one copy); ``attend`` in every layer only does device work.
    """

    @abstractmethod
    def plan(self, positions: torch.Tensor) -> AttentionMetadata:
        """positions: host LongTensor [B, T], -1 = padding. Validate and build what every layer needs."""

    @abstractmethod
    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # [B, Hq, T, D]
        k: torch.Tensor,  # [B, Hkv, T, D] keys of the new tokens (RoPE applied)
        v: torch.Tensor,  # [B, Hkv, T, D]
        meta: AttentionMetadata,  # from plan(), on the device
    ) -> torch.Tensor:  # [B, Hq, T, D]
        ...


@dataclass
class CausalMetadata(AttentionMetadata):
    dense: bool  # no padding among the new tokens
    mask: CausalMask | None = field(default=None, kw_only=True)  # built on the device, shared by all layers

    def on_device(self) -> None:
        self.mask = causal_mask(self.positions, self.positions, self.dense)


class NoCache(KVCache):
    """No memory between calls: every forward attends causally over exactly the tokens it is given."""

    def plan(self, positions):
        return CausalMetadata(positions, dense=bool((positions >= 0).all()))

    def attend(self, layer, q, k, v, meta):
        return reference_attention(q, k, v, mask=meta.mask)


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


@dataclass
class SlotMetadata(AttentionMetadata):
    """One step through a ``SlotView``: where each new token's K/V go, and what each query may see."""

    write_index: torch.Tensor  # [N] which of the B*T new tokens are real (row-major index), N <= B*T
    write_slot: torch.Tensor  # [N] the cache slot each real token's K/V go to
    write_pos: torch.Tensor  # [N] the index in that slot: the token's position
    slots: torch.Tensor  # [B] the slot of each batch row
    q_pos: torch.Tensor  # [n, T] positions laid out by slot 0..n-1 (-1: a slot this batch does not use)
    k_pos: torch.Tensor  # [S] key positions 0..S-1 of the span read from every slot
    dense: bool  # no padding: every one of the B*T tokens is written (skip the gather)
    identity: bool  # the batch's rows are slots 0..B-1 in order (no scatter of queries)
    sees_every_key: bool  # each row has one query, at the last position of the span: no mask needed
    mask: CausalMask | None = field(default=None, kw_only=True)

    def on_device(self) -> None:
        n, span = self.q_pos.shape[0], self.k_pos.shape[0]
        self.mask = SEES_EVERY_KEY if self.sees_every_key else \
            causal_mask(self.q_pos, self.k_pos.expand(n, span), self.dense)


class SlotView(KVCache):
    """The cache as seen by one batch: row i of the batch reads and writes slot ``ids[i]``."""

    def __init__(self, cache: ContiguousKVCache, ids: list[int]):
        self.cache, self.ids = cache, ids
        # Attention reads slots 0..n-1 of the cache as a view (no copy of K/V). Rows of this batch are
        # scattered into that range; slots in it that this batch does not use are treated as padding.
        self.n = max(ids) + 1 if ids else 0
        self.identity = ids == list(range(self.n))

    def plan(self, positions: torch.Tensor) -> SlotMetadata:
        B, T = positions.shape
        if B != len(self.ids):
            raise ValueError(f"batch has {B} rows but the cache view has {len(self.ids)} slots")
        span = max(1, int(positions.max()) + 1) if positions.numel() else 1
        if span > self.cache.max_len:
            raise ValueError(f"position {span - 1} does not fit: this KV cache holds {self.cache.max_len} tokens per slot")
        slots = torch.tensor(self.ids, dtype=torch.long)
        real = positions >= 0
        rows, cols = real.nonzero(as_tuple=True)  # on the host: no GPU sync
        q_pos = positions
        if not self.identity:
            q_pos = positions.new_full((self.n, T), -1)
            q_pos[slots] = positions
        return SlotMetadata(positions, write_index=rows * T + cols, write_slot=slots[rows], write_pos=positions[rows, cols],
                            slots=slots, q_pos=q_pos, k_pos=torch.arange(span), dense=bool(real.all()),
                            identity=self.identity,
                            sees_every_key=self.identity and T == 1 and bool((positions == span - 1).all()))

    def attend(self, layer, q, k, v, meta: SlotMetadata):
        B, Hkv, T, D = k.shape
        k_new = k.transpose(1, 2).reshape(B * T, Hkv, D)  # [B*T, Hkv, D], row-major over (row, token)
        v_new = v.transpose(1, 2).reshape(B * T, Hkv, D)
        if not meta.dense:  # drop padding: its K/V must never land in the cache
            k_new, v_new = k_new[meta.write_index], v_new[meta.write_index]
        self.cache.k[layer, meta.write_slot, :, meta.write_pos] = k_new.to(self.cache.k.dtype)
        self.cache.v[layer, meta.write_slot, :, meta.write_pos] = v_new.to(self.cache.v.dtype)
        span = meta.k_pos.shape[0]
        keys = self.cache.k[layer, : self.n, :, :span].to(q.dtype)  # [n, Hkv, span, D], a view
        vals = self.cache.v[layer, : self.n, :, :span].to(q.dtype)
        if not meta.identity:  # place each row's queries in its slot's row; unused slots stay padding
            q_full = q.new_zeros((self.n, *q.shape[1:]))
            q_full[meta.slots] = q
            q = q_full
        out = reference_attention(q, keys, vals, mask=meta.mask)
        return out if meta.identity else out[meta.slots]
