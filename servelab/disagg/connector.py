"""Check a KV connector (lab 04's ``send_kv_layer`` and ``recv_kv``) across two real processes.

Both ranks fill a small paged cache with seeded random values (different seeds); rank 0 sends the blocks of
``src_table`` layer by layer, rank 1 receives them into ``dst_table``. Whoever knows the seeds can compute
what rank 1's cache must hold afterwards: the grader does, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from servelab.disagg.launch import RankContext, raise_not_implemented, run_ranks
from servelab.disagg.link import wait_for
from servelab.paged.cache import PagedKVCache

SHAPE = {"num_layers": 3, "num_kv_heads": 2, "head_dim": 8}  # small: the layout is what is under test


def seeded_cache(seed: int, num_blocks: int, block_size: int, device="cpu") -> PagedKVCache:
    cache = PagedKVCache(SHAPE["num_layers"], num_blocks, block_size, SHAPE["num_kv_heads"], SHAPE["head_dim"],
                         device=device)
    gen = torch.Generator().manual_seed(seed)
    for blocks in cache.k + cache.v:
        blocks.copy_(torch.randn(blocks.shape, generator=gen))
    return cache


def expected_after(seed: int, num_blocks: int, block_size: int, src_table: list[int],
                   dst_table: list[int]) -> dict[str, list[torch.Tensor]]:
    """Rank 1's cache after a correct transfer: its own values, with block dst_table[i] = rank 0's src_table[i]."""
    src, dst = seeded_cache(seed, num_blocks, block_size), seeded_cache(seed + 1, num_blocks, block_size)
    for a, b in zip(src.k + src.v, dst.k + dst.v):
        b[dst_table] = a[src_table]
    return {"k": dst.k, "v": dst.v}


def connector_roundtrip(send_kv_layer: Callable, recv_kv: Callable, *, seed: int, num_blocks: int, block_size: int,
                        src_table: list[int], dst_table: list[int], timeout_s: float = 60,
                        count_bytes: bool = False) -> dict:
    """Send ``src_table``'s blocks with ``send_kv_layer`` (every layer) from rank 0 and receive them with
    ``recv_kv`` into ``dst_table`` on rank 1 (polling its ``arrived()`` until True); returns rank 1's whole
    cache afterwards, ``{"k": [...], "v": [...]}`` per layer, on the CPU. ``count_bytes``: also
    ``"bytes_received"``, the payload bytes rank 1 took off the link (what a compressed connector saves).
    Raises RuntimeError naming the rank that failed."""
    if len(src_table) != len(dst_table):
        raise ValueError(f"src_table has {len(src_table)} blocks, dst_table {len(dst_table)}: they must match")

    def rank(ctx: RankContext):
        cache = seeded_cache(seed + ctx.rank, num_blocks, block_size, ctx.device)
        if ctx.rank == 0:
            sends = []
            for layer in range(len(cache.k)):
                sends += send_kv_layer(ctx.link, cache, layer, list(src_table)) or []
            for s in sends:
                s.wait()
            return None
        arrived = recv_kv(ctx.link, cache, list(dst_table))
        if not callable(arrived):
            raise TypeError(f"recv_kv returned {type(arrived).__name__}; expected its arrived() function")
        wait_for(arrived, ctx.link.timeout_s, "the KV transfer")
        got = {"k": [t.cpu() for t in cache.k], "v": [t.cpu() for t in cache.v]}
        return (got | {"bytes_received": ctx.link.bytes_received}) if count_bytes else got

    results = run_ranks([rank, rank], names=["sender", "receiver"], timeout_s=timeout_s)
    raise_not_implemented(results)
    errors = [f"{r.name}: {r.error}" for r in results if not r.ok]
    if errors:
        raise RuntimeError("the KV transfer failed: " + "; ".join(errors))
    return results[1].value
