"""Run a serving setup: 1 prefill + 1 decode worker in two processes, or one colocated engine.

Both setups get the same total CPU threads (two workers of 1 thread, or one engine of 2), so that their
comparison is fair. The learner's worker functions run inside forked ranks (notebook functions cannot be
pickled); each rank uses the parent's model where the device matches, else loads it on its own device.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from servelab.disagg.launch import RankContext, raise_not_implemented, run_ranks
from servelab.disagg.link import KIND_KV, Link
from servelab.engine import Completion, DisaggRun, EngineRun, Transfer, WallClock
from servelab.workloads import Request

FAULTS = ("prefill_dies", "transfer_stalls")  # "<fault>:<n>": once n requests were handed over


def _load(model, device: torch.device):
    """The model on this rank's device: the parent's own CausalLM where the devices match (a forked rank
    shares its memory), else loaded again from its name or path."""
    from servelab.loader import load_model

    if isinstance(model, str | os.PathLike):
        return load_model(model, device=device)
    if torch.device(model.device) == torch.device(device):
        return model
    return load_model(getattr(model, "source", None) or model.name, device=device, dtype=model.dtype)


def shared_clock(ctx: RankContext) -> WallClock:
    """One clock for both ranks: rank 0's start time, sent to rank 1 (perf_counter is system-wide)."""
    clock = WallClock()
    if ctx.link is not None:
        t0 = torch.tensor([round(clock.t0 * 1e9)], dtype=torch.long)
        if ctx.rank == 0:
            ctx.link.send(t0)
        else:
            ctx.link.recv_into(t0)
            clock.t0 = int(t0) / 1e9
    return clock


@dataclass
class ForwardLog:
    """The model, with ``[batch, tokens, start, seconds]`` of every forward kept: its shape, when it started on
    the shared clock and how long it took (what a simulator is calibrated with)."""

    model: object
    shapes: list[list[float]] = field(default_factory=list)
    t0: float = 0.0  # the shared clock's zero (perf_counter)

    def __call__(self, input_ids, positions=None, cache=None):
        start = time.perf_counter()
        out = self.model(input_ids, positions, cache)
        if getattr(out, "device", torch.device("cpu")).type == "cuda":
            torch.cuda.synchronize(out.device)  # the forward's time, not its launch's
        self.shapes.append([*input_ids.shape, start - self.t0, time.perf_counter() - start])
        return out

    def __getattr__(self, name):
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)


class TimedLink:
    """The decode side's link, timing each KV handover from its header to its last payload (as the decode
    worker sees it: when it finishes the receive)."""

    def __init__(self, link: Link):
        self.link, self.transfers, self._open, self._t0 = link, [], None, 0.0

    def _header(self, header):
        if header is not None and header["kind"] == KIND_KV:
            self._open = Transfer(header["request_id"], 0, 0.0)
            self._t0 = time.perf_counter()
            self.transfers.append(self._open)
        return header

    def poll_header(self):
        return self._header(self.link.poll_header())

    def wait_header(self, timeout_s=None):
        return self._header(self.link.wait_header(timeout_s))

    def recv_into(self, tensor, timeout_s=None):
        self.link.recv_into(tensor, timeout_s)
        self._count(tensor)()

    def irecv_into(self, tensor):
        """The receive's handle, whose wait() (once it has arrived) also closes the transfer's time."""
        handle = self.link.irecv_into(tensor)
        done, finish = self._count(tensor), handle.wait

        def wait(timeout_s=None):
            finish(timeout_s)
            done()

        handle.wait = wait
        return handle

    def _count(self, tensor) -> Callable[[], None]:
        """Count ``tensor`` into the open transfer now; the returned call stamps when it has arrived."""
        record, t0 = self._open, self._t0
        if record is None:
            return lambda: None
        record.bytes += tensor.numel() * tensor.element_size()
        return lambda: setattr(record, "seconds", max(record.seconds, time.perf_counter() - t0))

    def __getattr__(self, name):
        return getattr(self.link, name)


class FaultyPrefill:
    """Fault injection on the prefill side, after ``after`` KV headers: the process dies (SIGKILL) before the
    next forward, or the next transfer stalls forever after its header."""

    def __init__(self, link: Link, fault: str):
        kind, _, n = fault.partition(":")
        if kind not in FAULTS or not n.isdigit():
            raise ValueError(f"unknown fault {fault!r}: use one of {', '.join(f + ':<n>' for f in FAULTS)}")
        self.link, self.kind, self.after, self.headers = link, kind, int(n), 0

    def send_header(self, **fields):
        self.link.send_header(**fields)
        if fields.get("kind") == KIND_KV:
            self.headers += 1
            if self.kind == "transfer_stalls" and self.headers > self.after:
                time.sleep(3600)  # the header went out, its KV never will

    def __getattr__(self, name):
        return getattr(self.link, name)


class DyingModel:
    """The prefill side's model under a ``prefill_dies`` fault: the forward after the fault's point kills it."""

    def __init__(self, model, fault: FaultyPrefill):
        self.model, self.fault = model, fault

    def __call__(self, input_ids, positions=None, cache=None):
        if self.fault.kind == "prefill_dies" and self.fault.headers > self.fault.after:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.model(input_ids, positions, cache)

    def __getattr__(self, name):
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)


def serve_disaggregated(prefill: Callable, decode: Callable, model, requests: list[Request], eos_id, *,
                        max_running: int = 16, num_blocks: int = 512, block_size: int = 16, overlap: bool = True,
                        timeout_s: float = 120, link_timeout_s: float = 10, threads_per_rank: int = 1,
                        fault: str | None = None) -> DisaggRun:
    """Serve ``requests`` with ``prefill(link, model, requests, clock, block_size, overlap)`` on rank 0 and
    ``decode(link, model, eos_id, clock, max_running, num_blocks, block_size)`` on rank 1. ``model``: a name or
    path (loaded in each rank), or a CausalLM (CPU). A request that neither rank completed gets an error
    Completion that says which rank failed and how; nothing is left running after the call returns."""

    def rank(ctx: RankContext):
        ctx.link.timeout_s = link_timeout_s
        log = ForwardLog(_load(model, ctx.device))
        clock = shared_clock(ctx)
        log.t0 = clock.t0
        if ctx.rank == 0:
            link, m = ctx.link, log
            if fault:
                link = FaultyPrefill(ctx.link, fault)
                m = DyingModel(log, link)
            completions = prefill(link, m, requests, clock, block_size, overlap)
            return {"completions": completions, "forwards": log.shapes}
        link = TimedLink(ctx.link)
        completions = decode(link, log, eos_id, clock, max_running, num_blocks, block_size)
        return {"completions": completions, "forwards": log.shapes, "transfers": link.transfers}

    results = run_ranks([rank, rank], names=["prefill", "decode"], timeout_s=timeout_s,
                        threads_per_rank=threads_per_rank, last=1)
    raise_not_implemented(results)
    run = DisaggRun("disaggregated", {}, 0, max_running, overlap=overlap)
    for res in results:
        run.rank_errors[res.name] = res.error
        value = res.value if res.ok and isinstance(res.value, dict) else {}
        for rid, c in (value.get("completions") or {}).items():
            if rid not in run.completions or run.completions[rid].finish_reason == "error":
                run.completions[rid] = c
        if res.name == "prefill":
            run.prefill_forwards = value.get("forwards", [])
        else:
            run.decode_forwards = value.get("forwards", [])
            run.transfers = value.get("transfers", [])
        run.seconds = max(run.seconds, res.seconds)
    failed = "; ".join(f"{name} worker: {err}" for name, err in run.rank_errors.items() if err) or "no rank failed"
    for r in requests:
        if r.id not in run.completions:
            run.completions[r.id] = Completion(r.id, finish_reason="error",
                                               error=f"request {r.id} was not served ({failed})")
    run.steps = len(run.decode_forwards)
    run.seconds = max((t for c in run.completions.values() for t in c.token_times), default=0.0)
    return run


def serve_colocated(engine: Callable, model, requests: list[Request], eos_id, *, threads: int = 2,
                    timeout_s: float = 600, **engine_kwargs) -> EngineRun:
    """Run ``engine(model, requests, eos_id=..., clock=WallClock(), **engine_kwargs)``: one engine that both
    prefills and decodes, on as many CPU threads as the two workers of ``serve_disaggregated`` have together.

    On a CPU it runs here, in this process: OpenMP's thread pool does not survive a fork, so a forked rank
    runs 1 thread (the workers do). On a GPU it runs in a forked rank like the workers, so that this process
    stays off the GPU and can still fork them."""
    from servelab.device import get_device

    if get_device().type == "cuda":
        def rank(ctx: RankContext):
            return engine(_load(model, ctx.device), requests, eos_id=eos_id, clock=WallClock(), **engine_kwargs)

        [res] = run_ranks([rank], names=["colocated"], timeout_s=timeout_s)
        if not res.ok:
            raise RuntimeError(res.error)
        return res.value
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return engine(_load(model, get_device()), requests, eos_id=eos_id, clock=WallClock(), **engine_kwargs)
    finally:
        torch.set_num_threads(before)
