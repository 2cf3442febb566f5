"""Continuous batching (lab 01's scheduler) on the paged KV cache, under a fixed budget of KV blocks.

Memory is now the limit, not slots: a request is admitted only when its prompt's blocks are free, and a
running sequence that needs a new block when none is free makes room by preemption (recompute policy): the
most recently admitted sequence gives all its blocks back and returns to the front of the queue. It keeps
the tokens it generated, so when it is admitted again it re-prefills prompt + generated tokens and continues
exactly where it stopped (greedy decoding is deterministic).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from servelab.engine import Completion, EngineRun, Occupancy, reject_invalid
from servelab.paged.block_manager import blocks_for
from servelab.paged.cache import PagedKVCache
from servelab.reference.batching import left_pad
from servelab.workloads import Request


@dataclass
class PagedEngineRun(EngineRun):
    num_blocks: int = 0
    block_size: int = 0
    preemptions: int = 0  # times a running sequence gave its blocks back to make room
    kv_tokens_used: list[int] = field(default_factory=list)  # per step: tokens whose K/V the cache holds
    kv_tokens_reserved: list[int] = field(default_factory=list)  # per step: blocks in use * block_size

    @property
    def kv_waste_fraction(self) -> float:
        """Share of the reserved KV memory (token-steps) that held no token: the last blocks' empty tails."""
        return 1 - sum(self.kv_tokens_used) / max(1, sum(self.kv_tokens_reserved))


@dataclass
class Active:
    request: Request
    out: Completion  # survives preemption: its tokens are re-prefilled on re-admission
    lane: int  # batch lane, for the occupancy chart
    start: int  # step it was (re-)admitted

    @property
    def context(self) -> list[int]:
        return self.request.prompt_ids + self.out.tokens


def paged_continuous_batching(model, requests: list[Request], max_running: int, max_step_tokens: int, eos_id,
                              clock, num_blocks: int, block_size: int, max_len: int = 1024,
                              backend: str | None = None) -> PagedEngineRun:
    """Serve ``requests`` with continuous batching in ``num_blocks`` KV blocks of ``block_size`` tokens.

    Greedy; every request's tokens equal it decoded alone, preempted or not. A request that could not fit
    even with the whole cache to itself is rejected (a Completion with an error), like any invalid request.
    """
    run = PagedEngineRun("paged", {}, 0, max_running, num_blocks=num_blocks, block_size=block_size)
    valid, run.completions = reject_invalid(requests, model.config.vocab_size, max_len)
    cache = PagedKVCache.for_model(model, num_blocks, block_size, backend)
    blocks = cache.blocks
    fitting = []
    for r in valid:  # at its longest a sequence holds its prompt and all but its last generated token
        need = blocks_for(r.prompt_len + r.max_new_tokens - 1, block_size)
        if need <= num_blocks:
            fitting.append(r)
        else:
            run.completions[r.id] = Completion(r.id, finish_reason="error", error=(
                f"request {r.id}: needs up to {need} KV blocks of {block_size} tokens but the cache has "
                f"{num_blocks}: it could never run"))
    waiting = deque((r, Completion(r.id)) for r in sorted(fitting, key=lambda r: (r.arrival_s, r.id)))
    running: dict[int, Active] = {}  # request id -> sequence, in admission order: the last is preempted first
    lanes = list(range(max_running - 1, -1, -1))  # pop() hands out the lowest lane first

    def retire(seq: Active) -> None:
        del running[seq.request.id]
        blocks.free(seq.request.id)
        lanes.append(seq.lane)
        run.occupancy.append(Occupancy(seq.lane, seq.start, run.steps, seq.request.id))

    while waiting or running:
        if not running and waiting[0][0].arrival_s > clock.now():
            clock.wait_until(waiting[0][0].arrival_s)
        for seq_id in list(running):  # running sequences first: a slot for the token each feeds this step
            while seq_id in running and not blocks.can_append(seq_id):
                victim = running[next(reversed(running))]
                retire(victim)
                waiting.appendleft((victim.request, victim.out))
                run.preemptions += 1
            if seq_id in running:
                blocks.append_slot(seq_id)
        budget = max_step_tokens - len(running)
        admitted: list[Active] = []
        while waiting and lanes and waiting[0][0].arrival_s <= clock.now():
            request, out = waiting[0]
            n = request.prompt_len + len(out.tokens)
            if not blocks.can_allocate(n) or (n > budget and (admitted or running)):
                break  # first come, first served: nobody overtakes the head of the queue
            waiting.popleft()
            blocks.allocate(request.id, n)
            admitted.append(Active(request, out, lanes.pop(), run.steps))
            budget -= n
        forwards = []  # (request ids, next token of each row, still on the device)
        if running:
            ids = list(running)
            last = torch.tensor([[running[i].out.tokens[-1]] for i in ids])
            positions = torch.tensor([[len(running[i].context) - 1] for i in ids])
            forwards.append((ids, model(last, positions, cache.rows(ids))[:, -1].argmax(-1)))
        if admitted:
            ids = [s.request.id for s in admitted]
            input_ids, positions = left_pad([s.context for s in admitted])
            forwards.append((ids, model(input_ids, positions, cache.rows(ids))[:, -1].argmax(-1)))
            running.update((s.request.id, s) for s in admitted)
        new_tokens = {}  # request id -> token; .tolist() waits for the device once per forward
        for ids, tokens in forwards:
            new_tokens.update(zip(ids, tokens.tolist()))
        clock.step()
        run.steps += 1
        run.busy_slot_steps += len(new_tokens)
        run.computed_slot_steps += len(new_tokens)
        run.max_running = max(run.max_running, len(running))
        run.kv_tokens_used.append(sum(blocks.lengths.values()))
        run.kv_tokens_reserved.append((num_blocks - blocks.num_free_blocks) * block_size)
        now = clock.now()
        for seq_id, token in new_tokens.items():
            seq = running[seq_id]
            if seq.out.add(token, now, eos_id, seq.request.max_new_tokens):
                run.completions[seq_id] = seq.out
                retire(seq)
    run.seconds = clock.now()
    return run
