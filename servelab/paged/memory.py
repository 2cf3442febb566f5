"""KV memory accounting: what a cache reserves vs what it uses, step by step (lab 02 measures both).

A contiguous slot reserves ``max_len`` tokens for the whole run, a paged sequence reserves its blocks, at
most one partly filled. "Used" is the K/V of tokens a live sequence actually holds.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import cycle

import torch

from servelab.paged.cache import blocks_for

MIB = 2**20


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """K and V of one token in every layer."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * torch.empty(0, dtype=dtype).element_size()


@dataclass
class KVMemory:
    layout: str
    used_tokens: list[int]  # per engine step
    reserved_tokens: list[int]  # per engine step
    bytes_per_token: int

    @property
    def waste_fraction(self) -> float:
        """Share of the reserved KV bytes (summed over steps) that held no token."""
        return 1 - sum(self.used_tokens) / max(1, sum(self.reserved_tokens))

    @property
    def peak_reserved_bytes(self) -> int:
        return max(self.reserved_tokens, default=0) * self.bytes_per_token

    def summary(self) -> dict:
        mib = self.bytes_per_token / max(1, len(self.used_tokens)) / MIB  # per step, on average
        return {"layout": self.layout, "steps": len(self.used_tokens), "waste_fraction": round(self.waste_fraction, 4),
                "mean_used_mib": round(sum(self.used_tokens) * mib, 3),
                "mean_reserved_mib": round(sum(self.reserved_tokens) * mib, 3),
                "peak_reserved_mib": round(self.peak_reserved_bytes / MIB, 3)}

    def bars(self) -> dict[str, float]:
        """Mean MiB per step as {"used", "wasted"}, for ``servelab.plots.memory_bars``."""
        s = self.summary()
        return {"used": s["mean_used_mib"], "wasted": s["mean_reserved_mib"] - s["mean_used_mib"]}


def paged_run_memory(run, bytes_per_token: int) -> KVMemory:
    """What a ``paged_continuous_batching`` run recorded itself (correct with preemptions too)."""
    return KVMemory("paged", list(run.kv_tokens_used), list(run.kv_tokens_reserved), bytes_per_token)


def max_concurrent_sequences(kv_bytes: int, bytes_per_token: int, seq_lens: Sequence[int], max_len: int,
                             block_size: int) -> dict[str, int]:
    """How many sequences fit at once in ``kv_bytes`` of KV cache, for each layout.

    Contiguous: every slot reserves ``max_len`` tokens, however long its sequence. Paged: sequences with the
    lengths ``seq_lens`` (taken in order, repeating; e.g. the trace's prompt + max_new_tokens, so every one
    at its longest) are added while their blocks fit.
    """
    if not seq_lens or min(seq_lens) < 1:
        raise ValueError("max_concurrent_sequences needs sequence lengths >= 1")
    tokens = kv_bytes // bytes_per_token
    free_blocks, paged = tokens // block_size, 0
    for n in cycle(seq_lens):
        if blocks_for(n, block_size) > free_blocks:
            break
        free_blocks -= blocks_for(n, block_size)
        paged += 1
    return {"contiguous": tokens // max_len, "paged": paged}
