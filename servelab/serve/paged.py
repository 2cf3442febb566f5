"""`--engine paged`: lab 02's paged continuous batching (``servelab.reference.paged.paged_continuous_batching``),
one step at a time.

K/V live in ``num_blocks`` blocks of ``block_size`` tokens (``PagedKVCache``); the reference ``BlockManager``
says which request holds which. The policy is the reference's: each step, every running request first gets a
slot for the token it feeds (when no block is free, the newest running request is preempted: its blocks go
back and it returns to the head of the queue, keeping its tokens, to be prefilled again with them); then
waiting requests are admitted first come, first served while a lane (``max_running``), blocks for their
whole context and the step's token budget allow. The attention backend is ``servelab.device.paged_backend``'s
choice, as in the lab: the lab's Triton kernels on CUDA, plain PyTorch on CPU.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from servelab.device import paged_backend
from servelab.paged.cache import PagedKVCache, blocks_for
from servelab.reference.batching import left_pad
from servelab.reference.paged import BlockManager, paged_decode, store_kv
from servelab.serve.engines import EngineRequest, QueueEngine, Seq, TokenEvent

DEFAULT_BLOCK_SIZE = 8  # lab 02's BLOCK


class PagedEngine(QueueEngine):
    name = "paged"

    def __init__(self, model, max_running: int = 16, max_step_tokens: int = 512, eos_id: int | None = None,
                 max_len: int = 1024, num_blocks: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 kernels=None):
        if max_running < 1 or max_step_tokens < 1 or block_size < 1:
            raise ValueError(f"need max_running >= 1, max_step_tokens >= 1, block_size >= 1; got {max_running}, "
                             f"{max_step_tokens}, {block_size}")
        super().__init__(model, eos_id, max_len)
        if num_blocks is None:  # the KV memory of the continuous engine's cache: max_running x max_len tokens
            num_blocks = max_running * max_len // block_size
        if num_blocks < 1:
            raise ValueError(f"--num-blocks must be >= 1, got {num_blocks}")
        self.max_running, self.max_step_tokens = max_running, max_step_tokens
        if kernels is None and paged_backend(model.device) == "triton":  # the device decides, as in the lab
            kernels = SimpleNamespace(store_kv=store_kv, paged_decode=paged_decode)
        self.backend = "torch" if kernels is None else "triton"
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size, kernels)
        self.blocks = BlockManager(num_blocks, block_size)
        self.running: dict[int, Seq] = {}  # request id -> sequence, in admission order: the last is preempted first
        self.preemptions = 0

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    def check(self, request: EngineRequest) -> None:
        super().check(request)
        # at its longest a sequence holds its prompt and all but its last generated token
        need = blocks_for(request.prompt_len + request.max_new_tokens - 1, self.block_size)
        if need > self.num_blocks:
            raise ValueError(f"prompt ({request.prompt_len} tokens) + max_new_tokens ({request.max_new_tokens}) "
                             f"needs up to {need} KV blocks of {self.block_size} tokens but the cache has "
                             f"{self.num_blocks}: ask for fewer tokens, or start the server with more --num-blocks")

    def _release(self, seq: Seq) -> None:
        del self.running[seq.request.id]
        self.blocks.free(seq.request.id)

    def stats(self) -> dict:
        return {"num_blocks": self.num_blocks, "block_size": self.block_size, "backend": self.backend,
                "free_blocks": self.blocks.num_free_blocks, "preemptions": self.preemptions}

    def step(self) -> list[TokenEvent]:
        for rid in list(self.running):  # running sequences first: a slot for the token each feeds this step
            while rid in self.running and not self.blocks.can_append(rid):
                victim = self.running[next(reversed(self.running))]
                self._release(victim)
                self.waiting.appendleft(victim)  # keeps its tokens: re-admitted with prompt + tokens
                self.preemptions += 1
            if rid in self.running:
                self.blocks.append_slot(rid)
        budget = self.max_step_tokens - len(self.running)
        admitted: list[Seq] = []
        while self.waiting and len(self.running) + len(admitted) < self.max_running:
            n = self.waiting[0].length
            if not self.blocks.can_allocate(n) or (n > budget and (admitted or self.running)):
                break  # first come, first served: nobody overtakes the head of the queue
            seq = self.waiting.popleft()
            self.blocks.allocate(seq.request.id, n)
            admitted.append(seq)
            budget -= n
        forwards = []  # (sequences, last-position logits [n, V])
        if self.running:
            seqs = list(self.running.values())
            last = torch.tensor([[s.tokens[-1]] for s in seqs])
            positions = torch.tensor([[s.length - 1] for s in seqs])
            forwards.append((seqs, self.model(last, positions, self._view(seqs))[:, -1]))
        if admitted:
            ids, positions = left_pad([s.context for s in admitted])
            forwards.append((admitted, self.model(ids, positions, self._view(admitted))[:, -1]))
            self.running.update((s.request.id, s) for s in admitted)
        self.steps += 1
        return self._emit(forwards)

    def _view(self, seqs: list[Seq]):
        return self.cache.view([self.blocks.block_table(s.request.id) for s in seqs], self.blocks.take_copies())
