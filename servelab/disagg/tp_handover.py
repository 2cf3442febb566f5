"""Lab 04's stretch: hand prompts over between a prefill and a decode side that run different tensor parallelism.

Three processes. ``"2->1"``: ranks 0 and 1 prefill tensor-parallel (each holds half of the KV heads), rank 2
decodes alone with all the heads. ``"1->2"``: rank 0 prefills alone, ranks 1 and 2 decode tensor-parallel.
Every side moves the KV with the learner's two connector functions, one process to many or many to one:

- ``send_kv_split(links, cache, layer, table)``: this rank's blocks ``table`` of one layer, split by heads into
  ``len(links)`` parts, part r sent on ``links[r]`` (one link: the blocks as they are);
- ``recv_kv_merged(links, cache, table) -> arrived()``: every layer's parts, one from each of ``links``, merged
  by heads (in link order) into this rank's blocks ``table``.

Per prompt, in order: every layer's KV, then (from the prefill rank 0 only) a 1-number tail, the first token.
The decode side receives into blocks of its own (``decode_table``: not the sender's ids), decodes greedily
until ``max_new_tokens`` and returns the tokens, and the received blocks as they were before decoding wrote
into them (merged over the decode ranks by heads, so always the full model's layout).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from servelab.disagg.launch import RankContext, raise_not_implemented, run_ranks
from servelab.disagg.link import wait_for
from servelab.disagg.serve import _load
from servelab.disagg.tp import shard_model
from servelab.paged.cache import PagedKVCache, blocks_for

DIRECTIONS = {"2->1": ((0, 1), (2,)), "1->2": ((0,), (1, 2))}  # (prefill ranks, decode ranks)


def decode_table(num_blocks: int, spare: int = 3) -> list[int]:
    """The decode side's blocks for a sequence of ``num_blocks`` blocks: others than the sender's 0, 1, ...
    (reversed, past a few spare ones), so a connector that writes the sender's ids shows."""
    return list(range(num_blocks + spare - 1, spare - 1, -1))


def _greedy_from(model, cache: PagedKVCache, table: list[int], prompt_len: int, first: int,
                 max_new_tokens: int) -> list[int]:
    """Greedy decoding on a cache that already holds the prompt's KV in ``table``: one token per forward."""
    tokens = [first]
    while len(tokens) < max_new_tokens:
        pos = prompt_len + len(tokens) - 1
        logits = model(torch.tensor([[tokens[-1]]]), torch.tensor([[pos]]), cache.view([table]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


def tp_handover(send_kv_split: Callable, recv_kv_merged: Callable, model, prompts: list[list[int]],
                max_new_tokens: int, direction: str, block_size: int = 4, timeout_s: float = 120) -> dict:
    """Prefill every prompt on one side and decode it on the other (``direction`` "2->1" or "1->2", see the
    module docstring). Returns ``{"tokens": [per prompt], "blocks": [per prompt {"k": [per layer [n,
    block_size, num_kv_heads, head_dim]], "v": [...]}], "bytes_sent": {rank: payload bytes}}``. Raises
    RuntimeError naming the rank that failed."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {sorted(DIRECTIONS)}, got {direction!r}")
    prefill_ranks, decode_ranks = DIRECTIONS[direction]
    tp_ranks = prefill_ranks if len(prefill_ranks) > 1 else decode_ranks

    @torch.inference_mode()
    def rank(ctx: RankContext):
        group = dist.new_group(list(tp_ranks))  # every rank creates every group, in the same order
        full = _load(model, ctx.device)
        mine = shard_model(full, tp_ranks.index(ctx.rank), len(tp_ranks), group) if ctx.rank in tp_ranks else full
        if ctx.rank in prefill_ranks:
            links = [ctx.links[r] for r in decode_ranks]
            for prompt in prompts:
                table = list(range(blocks_for(len(prompt), block_size)))
                cache = PagedKVCache.for_model(mine, len(table), block_size)
                logits = mine(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache.view([table]))
                sends = []
                for layer in range(mine.config.num_layers):
                    sends += send_kv_split(links, cache, layer, table) or []
                if ctx.rank == prefill_ranks[0]:
                    sends += [link.isend(logits[0, -1].argmax().reshape(1)) for link in links]
                for s in sends:
                    s.wait()  # before the next prompt's cache
            return {"bytes_sent": sum(link.bytes_sent for link in links)}
        links = [ctx.links[r] for r in prefill_ranks]
        out = {"tokens": [], "blocks": [], "bytes_sent": 0}
        for prompt in prompts:
            n = blocks_for(len(prompt), block_size)
            table = decode_table(blocks_for(len(prompt) + max_new_tokens - 1, block_size))
            cache = PagedKVCache.for_model(mine, max(table) + 1, block_size)
            arrived = recv_kv_merged(links, cache, table[:n])
            if not callable(arrived):
                raise TypeError(f"recv_kv_merged returned {type(arrived).__name__}; expected its arrived() function")
            first = torch.empty(1, dtype=torch.long)
            tail = links[0].irecv_into(first)
            wait_for(arrived, links[0].timeout_s, f"the KV of a {len(prompt)}-token prompt")
            tail.wait()
            out["blocks"].append({kind: [t[table[:n]].cpu() for t in getattr(cache, kind)] for kind in ("k", "v")})
            out["tokens"].append(_greedy_from(mine, cache, table, len(prompt), int(first), max_new_tokens))
        return out

    names = [("prefill" if r in prefill_ranks else "decode") + (f" (TP rank {tp_ranks.index(r)})"
                                                               if r in tp_ranks else "") for r in range(3)]
    results = run_ranks([rank] * 3, names=names, timeout_s=timeout_s, last=decode_ranks[-1])
    raise_not_implemented(results)
    errors = [r.error for r in results if not r.ok]
    if errors:
        raise RuntimeError(f"the {direction} handover failed: " + "; ".join(errors))
    decoded = [results[r].value for r in decode_ranks]
    if any(d["tokens"] != decoded[0]["tokens"] for d in decoded):  # TP ranks all-reduce: the same logits
        raise RuntimeError(f"the {direction} handover: the decode ranks produced different tokens "
                           f"{[d['tokens'] for d in decoded]}")
    blocks = [{kind: [torch.cat(parts, dim=2) for parts in zip(*(d["blocks"][i][kind] for d in decoded))]
               for kind in ("k", "v")} for i in range(len(prompts))]
    return {"tokens": decoded[0]["tokens"], "blocks": blocks,
            "bytes_sent": {r: results[r].value["bytes_sent"] for r in prefill_ranks}}
