"""What a prefill, a decode step and a KV handover cost, as lines fitted to a real run: a simulator's inputs.

Each cost is ``base + slope * size``, fitted by least squares to the medians per size, so that a few slow
outliers (a step that waited for a transfer, a busy machine) do not tilt the line.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from servelab.workloads import Request


@dataclass
class Costs:
    """Seconds per piece of work, each a line: ``base + slope * size``."""

    prefill_base_s: float
    prefill_per_token_s: float  # a prefill of n prompt tokens: prefill_base_s + n * prefill_per_token_s
    decode_base_s: float
    decode_per_seq_s: float  # a decode step of b running requests: decode_base_s + b * decode_per_seq_s
    transfer_base_s: float
    # the handover of an n-token prompt: from the end of its prefill until its first token can be out on the
    # decode side, transfer_base_s + n * transfer_per_token_s (the decode worker keeps decoding meanwhile)
    transfer_per_token_s: float
    # workers that share a machine slow each other down (memory bandwidth, caches): a decode step that starts
    # while a prefill runs costs (1 + this) times as much. 0 for workers on machines (or GPUs) of their own.
    decode_slowdown_while_prefill: float = 0.0

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_base_s + tokens * self.prefill_per_token_s

    def decode_step_s(self, batch: int, prefilling: bool = False) -> float:
        alone = self.decode_base_s + batch * self.decode_per_seq_s
        return alone * (1 + self.decode_slowdown_while_prefill) if prefilling else alone

    def transfer_s(self, tokens: int) -> float:
        return self.transfer_base_s + tokens * self.transfer_per_token_s


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(base, slope) of the least-squares line through the median y of each x; (median, 0) for a single x."""
    by_x: dict[float, list[float]] = defaultdict(list)
    for x, y in points:
        by_x[x].append(y)
    if not by_x:
        raise ValueError("fit_line needs at least one point")
    xs = sorted(by_x)
    ys = [statistics.median(by_x[x]) for x in xs]
    if len(xs) == 1:
        return ys[0], 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def costs_from_run(run, requests: list[Request]) -> Costs:
    """Fit Costs to a DisaggRun: each prefill forward's time against its tokens; the time from one decode
    forward's start to the next against the batch (a step, bookkeeping included; gaps over 5x the median,
    where the worker sat idle, are left out), from the steps that ran while no prefill did, and how much
    longer the others took; each handover (``run.handover_s``) against its prompt length."""
    prefill = [(f[1], f[3]) for f in run.prefill_forwards]
    spans = [(f[2], f[2] + f[3]) for f in run.prefill_forwards]
    steps = [(a[0], b[2] - a[2], any(s < b[2] and a[2] < e for s, e in spans))
             for a, b in zip(run.decode_forwards, run.decode_forwards[1:])]
    if not prefill or not steps:
        raise ValueError("costs_from_run needs a run with prefills and at least two decode steps")
    typical = statistics.median(dt for _, dt, _ in steps)
    steps = [s for s in steps if s[1] <= 5 * typical]
    quiet = [(b, dt) for b, dt, busy in steps if not busy] or [(b, dt) for b, dt, _ in steps]
    base, slope = fit_line(quiet)
    slowed = [dt / (base + slope * b) for b, dt, busy in steps if busy and base + slope * b > 0]
    lengths = {r.id: r.prompt_len for r in requests}
    transfers = [(lengths[rid], s) for rid, s in run.handover_s(requests).items()]
    if not transfers:
        raise ValueError("costs_from_run needs a run in which requests were handed over")
    return Costs(*fit_line(prefill), base, slope, *fit_line(transfers),
                 max(0.0, statistics.median(slowed) - 1) if slowed else 0.0)
