"""What every serving engine in the labs shares: clocks, per-request results, and an engine run record.

The schedulers themselves (one-at-a-time, static, continuous batching, ...) are what learners build;
this module only holds the bookkeeping so that every engine reports the same things the same way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from servelab.generate import check_request
from servelab.metrics import RequestTimeline
from servelab.workloads import Request


class WallClock:
    """Real time in seconds since the engine started; waiting for an arrival really sleeps."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def step(self) -> None:  # a forward pass took real time already
        pass

    def wait_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)


class StepClock:
    """Virtual time: each engine step costs ``step_s`` seconds. Deterministic, for tests and grading."""

    def __init__(self, step_s: float = 0.01):
        self.t, self.step_s = 0.0, step_s

    def now(self) -> float:
        return self.t

    def step(self) -> None:
        self.t += self.step_s

    def wait_until(self, t: float) -> None:
        self.t = max(self.t, t)


def reject_invalid(requests: list[Request], vocab_size: int, max_len: int) -> tuple[list[Request], dict[int, Completion]]:
    """Split requests into servable ones and rejected ones (a Completion with the reason), so that one
    bad request (empty prompt, max_new_tokens <= 0, too long for the cache) never affects the others."""
    ok, rejected = [], {}
    for r in requests:
        try:
            check_request(r.prompt_ids, r.max_new_tokens, vocab_size, max_len)
            ok.append(r)
        except ValueError as err:
            rejected[r.id] = Completion(r.id, finish_reason="error", error=f"request {r.id}: {err}")
    return ok, rejected


@dataclass
class Completion:
    """One served request: its new tokens and the clock time at which each one was produced."""

    request_id: int
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    finish_reason: str = ""  # "eos", "length", or "error" (the request was rejected; see ``error``)
    error: str = ""

    def add(self, token: int, t: float, eos_id: int | None, max_new_tokens: int) -> bool:
        """Record a token; returns True when the request is finished."""
        self.tokens.append(token)
        self.token_times.append(t)
        if token == eos_id:
            self.finish_reason = "eos"
        elif len(self.tokens) >= max_new_tokens:
            self.finish_reason = "length"
        return bool(self.finish_reason)


@dataclass
class Occupancy:
    """Request ``request_id`` held ``slot`` from engine step ``start`` to ``end`` (exclusive)."""

    slot: int
    start: int
    end: int
    request_id: int


@dataclass
class EngineRun:
    """Everything an engine reports about serving one trace."""

    engine: str
    completions: dict[int, Completion]
    steps: int  # scheduler iterations that ran the model
    num_slots: int
    occupancy: list[Occupancy] = field(default_factory=list)
    busy_slot_steps: int = 0  # slot-steps spent on a request that still needed tokens
    computed_slot_steps: int = 0  # slot-steps the model computed (busy + finished-but-still-batched + padding)
    max_running: int = 0  # most requests running at once
    seconds: float = 0.0

    @property
    def output_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.completions.values())

    @property
    def slot_utilization(self) -> float:
        """Useful slot-steps / all slot-steps the engine had (steps x slots)."""
        return self.busy_slot_steps / max(1, self.steps * self.num_slots)

    @property
    def wasted_fraction(self) -> float:
        """Share of computed slot-steps that produced nothing useful (finished or padded rows)."""
        return 1 - self.busy_slot_steps / max(1, self.computed_slot_steps)

    def timelines(self, requests: list[Request]) -> list[RequestTimeline]:
        """Per-request timelines for ``servelab.metrics.summarize``."""
        by_id = {r.id: r for r in requests}
        return [
            RequestTimeline(request_id=c.request_id, arrival_s=by_id[c.request_id].arrival_s,
                            token_times_s=list(c.token_times), prompt_len=len(by_id[c.request_id].prompt_ids))
            for c in sorted(self.completions.values(), key=lambda c: c.request_id)
            if c.tokens  # rejected requests produced no tokens and have no timeline
        ]

    def summary(self) -> dict:
        return {"engine": self.engine, "steps": self.steps, "output_tokens": self.output_tokens,
                "seconds": round(self.seconds, 4), "tokens_per_s": round(self.output_tokens / max(self.seconds, 1e-9), 1),
                "slot_utilization": round(self.slot_utilization, 3), "wasted_fraction": round(self.wasted_fraction, 3),
                "max_running": self.max_running}


@dataclass
class PagedEngineRun(EngineRun):
    """An engine run on a paged KV cache (lab 02): the KV blocks it had, and what it did with them."""

    num_blocks: int = 0
    block_size: int = 0
    preemptions: int = 0  # times a running sequence gave its blocks back to make room
    kv_tokens_used: list[int] = field(default_factory=list)  # per step: tokens the live sequences hold
    kv_tokens_reserved: list[int] = field(default_factory=list)  # per step: blocks in use * block_size
    prompt_tokens: int = 0  # prefix caching: tokens of the contexts admitted (re-admissions count again)
    prefix_hit_tokens: int = 0  # prefix caching: those of them served from cached blocks instead of computed

    @property
    def kv_waste_fraction(self) -> float:
        """Share of the reserved KV memory (token-steps) that held no token: the last blocks' empty tails."""
        return 1 - sum(self.kv_tokens_used) / max(1, sum(self.kv_tokens_reserved))

    @property
    def prefix_hit_rate(self) -> float:
        """Share of the admitted context tokens whose K/V came from the prefix cache (0 without one)."""
        return self.prefix_hit_tokens / max(1, self.prompt_tokens)


@dataclass
class Transfer:
    """One request's KV handover from the prefill worker to the decode worker, as the decode side saw it."""

    request_id: int
    bytes: int  # payload received: every layer's K and V blocks and the tail
    seconds: float  # from the header's arrival to the last payload's (the prefill runs in between)


@dataclass
class DisaggRun(EngineRun):
    """A run of 1 prefill worker + 1 decode worker (lab 04): completions from both, and what moved between them."""

    overlap: bool = False  # KV sent layer by layer during the prefill forward
    transfers: list[Transfer] = field(default_factory=list)
    rank_errors: dict[str, str] = field(default_factory=dict)  # rank name -> what went wrong ("" when it ended well)
    # [batch, tokens, start on the run's clock, seconds] of each forward, on either side
    prefill_forwards: list[list[float]] = field(default_factory=list)
    decode_forwards: list[list[float]] = field(default_factory=list)

    def handover_s(self, requests: list[Request]) -> dict[int, float]:
        """Per request: from the end of its prefill forward to its first token on the decode side, the part of
        the handover the user waits for. (The prefill worker serves valid requests one forward each, in
        arrival order.)"""
        served = sorted((r for r in requests if self.completions.get(r.id) and self.completions[r.id].tokens),
                        key=lambda r: (r.arrival_s, r.id))
        return {r.id: self.completions[r.id].token_times[0] - (f[2] + f[3])
                for r, f in zip(served, self.prefill_forwards)}
