"""Step-wise engines: what a server needs from an engine, one scheduler iteration at a time.

The labs' engines are offline functions over a whole trace. A server cannot know the trace in advance: it
adds requests as they arrive and runs one step at a time. The protocol (``StepEngine``):

- ``check(request)`` raises ValueError for a request the engine can never serve (empty, too long, ...);
- ``add(request)`` queues a checked request; it joins the running batch at a later step;
- ``step()`` runs one scheduler iteration and returns a TokenEvent per token it produced;
- ``abort(request_id)`` forgets a request (a client went away), freeing its slot;
- ``has_work``: whether ``step()`` has anything to do.

An engine may also have ``stats() -> dict`` (shown under ``engine_stats`` in /metrics).

The shipped engines, by name (``servelab.serve.registry.ENGINES``): ``continuous`` (lab 01, here), ``paged``
(lab 02, ``servelab.serve.paged``), ``speculative`` (lab 03, ``servelab.serve.speculative``). They share
``QueueEngine``: the request check, the FIFO queue, sampling and when a token ends a request.

A learner's notebook can define such a class and serve it: ``servelab serve --engine my.ipynb:MyEngine``. It is
built as ``MyEngine(model, max_running=..., max_step_tokens=..., eos_id=..., max_len=...)``.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from servelab.generate import check_request
from servelab.reference.batching import left_pad


@dataclass
class EngineRequest:
    """A request as an engine sees it: token ids in, how many tokens out, and how to pick them."""

    id: int
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy (argmax), the labs' decoding
    seed: int | None = None  # for temperature > 0: the same seed gives the same tokens
    ignore_eos: bool = False  # run to max_new_tokens even past EOS (fixed output lengths for benchmarks)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass
class TokenEvent:
    request_id: int
    token: int
    finish_reason: str = ""  # "" while running; "stop" (EOS) or "length" (max_new_tokens) on its last token


@runtime_checkable
class StepEngine(Protocol):
    def check(self, request: EngineRequest) -> None: ...
    def add(self, request: EngineRequest) -> None: ...
    def step(self) -> list[TokenEvent]: ...
    def abort(self, request_id: int) -> bool: ...
    @property
    def has_work(self) -> bool: ...


@dataclass
class Seq:
    """A request being served: the tokens it has so far and, if sampled, its own generator."""

    request: EngineRequest
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # only for sampled requests
    slot: int = -1  # the continuous engine's cache row

    @classmethod
    def start(cls, request: EngineRequest, device) -> Seq:
        gen = None
        if request.temperature > 0:
            gen = torch.Generator(device=device)
            gen.manual_seed(request.seed if request.seed is not None else int(torch.randint(2**62, ())))
        return cls(request, generator=gen)

    @property
    def length(self) -> int:
        """Prompt plus generated tokens."""
        return self.request.prompt_len + len(self.tokens)

    @property
    def context(self) -> list[int]:
        return self.request.prompt_ids + self.tokens

    def emit(self, token: int, eos_id: int | None) -> TokenEvent:
        """Append ``token``; its event says whether it ends the request (EOS, unless ignored, or max_new_tokens)."""
        self.tokens.append(token)
        r = self.request
        finish = "stop" if token == eos_id and not r.ignore_eos else \
            "length" if len(self.tokens) >= r.max_new_tokens else ""
        return TokenEvent(r.id, token, finish)


def pick_tokens(logits: torch.Tensor, seqs: list[Seq]) -> list[int]:
    """Greedy rows by argmax (exactly the labs' decoding); sampled rows from softmax(logits / T)."""
    tokens = logits.argmax(-1).tolist()  # one device sync per forward
    for i, s in enumerate(seqs):
        if s.generator is not None:
            probs = torch.softmax(logits[i] / s.request.temperature, -1)
            tokens[i] = int(torch.multinomial(probs, 1, generator=s.generator))
    return tokens


class QueueEngine:
    """What the shipped engines share: the request check, a FIFO queue of waiting requests (each a ``Seq``
    from the moment it is added), abort, and turning each forward's logits into TokenEvents. A subclass
    keeps its running requests in ``running`` (a dict) and says how to let one go (``_release``)."""

    name = "?"

    def __init__(self, model, eos_id: int | None, max_len: int, sample_device=None):
        if max_len < 2:
            raise ValueError(f"need max_len >= 2, got {max_len}")
        self.model, self.eos_id, self.max_len = model, eos_id, max_len
        self.sample_device = model.device if sample_device is None else sample_device
        self.waiting: deque[Seq] = deque()
        self.running: dict = {}
        self.steps = 0

    def check(self, request: EngineRequest) -> None:
        check_request(request.prompt_ids, request.max_new_tokens, self.model.config.vocab_size, self.max_len)

    def add(self, request: EngineRequest) -> None:
        self.check(request)
        self.waiting.append(Seq.start(request, self.sample_device))

    def abort(self, request_id: int) -> bool:
        for seq in list(self.running.values()):
            if seq.request.id == request_id:
                self._release(seq)
                return True
        for seq in self.waiting:
            if seq.request.id == request_id:
                self.waiting.remove(seq)
                return True
        return False

    def _release(self, seq: Seq) -> None:
        """Take a running ``seq`` out of the batch and give back what it holds (finished, aborted, preempted)."""
        raise NotImplementedError

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def stats(self) -> dict:
        return {}

    def _emit(self, forwards: list[tuple[list[Seq], torch.Tensor]]) -> list[TokenEvent]:
        """One token per row of each forward's last-position logits [n, V]; finished requests are released."""
        events = []
        for seqs, logits in forwards:
            for seq, token in zip(seqs, pick_tokens(logits, seqs)):
                events.append(seq.emit(token, self.eos_id))
                if events[-1].finish_reason:
                    self._release(seq)
        return events


class ContinuousBatchingEngine(QueueEngine):
    """Lab 01's continuous batching (``servelab.reference.batching.continuous_batching``), one step at a time.

    Same policy: every step, admit waiting requests in arrival order while a slot is free and the step's token
    budget (``max_step_tokens``, one per running request plus each admitted prompt) allows (a lone prompt
    longer than the budget is admitted alone), prefill the admitted prompts (left-padded, one forward), decode
    the running ones (one forward), retire on EOS or max_new_tokens. ``max_running=1`` serves one at a time.
    """

    name = "continuous"

    def __init__(self, model, max_running: int = 16, max_step_tokens: int = 512, eos_id: int | None = None,
                 max_len: int = 1024):
        if max_running < 1 or max_step_tokens < 1:
            raise ValueError(f"need max_running >= 1 and max_step_tokens >= 1; got {max_running}, {max_step_tokens}")
        super().__init__(model, eos_id, max_len)
        self.max_running, self.max_step_tokens = max_running, max_step_tokens
        self.cache = model.new_cache(max_running, max_len)
        self.running: dict[int, Seq] = {}  # slot -> request state
        self.free = list(range(max_running - 1, -1, -1))  # pop() hands out the lowest slot first

    def _release(self, seq: Seq) -> None:
        del self.running[seq.slot]
        self.free.append(seq.slot)  # a freed slot's stale K/V is never read: positions restart at 0

    def step(self) -> list[TokenEvent]:
        budget = self.max_step_tokens - len(self.running)
        admitted: list[Seq] = []
        while self.waiting and self.free and \
                (self.waiting[0].request.prompt_len <= budget or not (admitted or self.running)):
            seq = self.waiting.popleft()
            seq.slot = self.free.pop()
            admitted.append(seq)
            budget -= seq.request.prompt_len
        forwards = []  # (sequences, last-position logits [n, V])
        if self.running:
            seqs = [self.running[s] for s in sorted(self.running)]
            last = torch.tensor([[s.tokens[-1]] for s in seqs])
            positions = torch.tensor([[s.length - 1] for s in seqs])
            forwards.append((seqs, self.model(last, positions, self.cache.rows([s.slot for s in seqs]))[:, -1]))
        if admitted:
            ids, positions = left_pad([s.request.prompt_ids for s in admitted])
            forwards.append((admitted, self.model(ids, positions, self.cache.rows([s.slot for s in admitted]))[:, -1]))
            self.running.update((s.slot, s) for s in admitted)
        self.steps += 1
        return self._emit(forwards)
