"""What a prefill, a decode step and a KV handover cost, as lines fitted to a real run: a simulator's inputs.

Each cost is a base plus a slope per unit of size, fitted by least squares: a prefill by medians per prompt length
(one forward: an outlier is noise), a decode step by the mean of the intervals between tokens (TPOT is a mean: a
step that waited is part of it), against its batch and the KV it reads.
"""

from __future__ import annotations

import bisect
import statistics
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from servelab.workloads import Request


@dataclass
class Costs:
    """Seconds per piece of work, each a line: ``base + slope * size``."""

    prefill_base_s: float
    # a prefill of n prompt tokens keeps its worker busy prefill_base_s + n * prefill_per_token_s (its forward,
    # then the wait for its KV to leave)
    prefill_per_token_s: float
    decode_base_s: float
    decode_per_seq_s: float  # a decode step of b running requests: decode_base_s + b * decode_per_seq_s + ...
    transfer_base_s: float
    # the handover of an n-token prompt: from the end of its prefill until its first token can be out on the
    # decode side, transfer_base_s + n * transfer_per_token_s (the decode worker keeps decoding meanwhile)
    transfer_per_token_s: float
    # workers that share a machine slow each other down (memory bandwidth, caches): a decode step that starts
    # while a prefill runs costs (1 + this) times as much. 0 for workers on machines (or GPUs) of their own.
    decode_slowdown_while_prefill: float = 0.0
    # ... + b * longest * decode_per_kv_token_s: a step reads the KV of every running request, each row padded to
    # the longest context (prompt + tokens so far); a document's 700 tokens make the whole batch's step slower
    decode_per_kv_token_s: float = 0.0

    # a line fitted to noisy points may cross zero below the sizes it saw: a cost is never negative
    def prefill_s(self, tokens: int) -> float:
        return max(0.0, self.prefill_base_s + tokens * self.prefill_per_token_s)

    def decode_step_s(self, batch: int, prefilling: bool = False, longest: int = 0) -> float:
        alone = max(0.0, self.decode_base_s + batch * self.decode_per_seq_s
                    + batch * longest * self.decode_per_kv_token_s)
        return alone * (1 + self.decode_slowdown_while_prefill) if prefilling else alone

    def transfer_s(self, tokens: int) -> float:
        return max(0.0, self.transfer_base_s + tokens * self.transfer_per_token_s)


def fit_line(points: list[tuple[float, float]], center=statistics.median, rising: bool = False) -> tuple[float, float]:
    """(base, slope) of the least-squares line through the ``center`` (median, or e.g. the mean) y of each x,
    each x weighted by its number of points (a batch size seen once does not tilt the line as much as one
    seen a thousand times); (that center, 0) for a single x. ``rising``: a cost that cannot fall as its size
    grows; a falling fit (noise) becomes the flat line at the weighted mean, never a negative cost."""
    by_x: dict[float, list[float]] = defaultdict(list)
    for x, y in points:
        by_x[x].append(y)
    if not by_x:
        raise ValueError("fit_line needs at least one point")
    xs = sorted(by_x)
    ys, ws = [center(by_x[x]) for x in xs], [len(by_x[x]) for x in xs]
    if len(xs) == 1:
        return ys[0], 0.0
    total = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs)) / total
    my = sum(w * y for w, y in zip(ws, ys)) / total
    slope = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
    return (my, 0.0) if rising and slope < 0 else (my - slope * mx, slope)


def fit_rising(rows: list[tuple[float, ...]], ys: list[float]) -> list[float]:
    """``[base, slope, slope, ...]``: least squares ``y = base + sum(slope_k * row[k])`` over every point (a fit to
    the means), with no slope below 0: a falling one (noise, or two sizes that grow together) is dropped, and the
    others refitted without it."""
    x = np.column_stack([np.ones(len(rows)), np.asarray(rows, dtype=float).reshape(len(rows), -1)])
    keep = list(range(x.shape[1]))
    while True:
        coef = np.linalg.lstsq(x[:, keep], np.asarray(ys, dtype=float), rcond=None)[0]
        falling = [k for k, c in zip(keep[1:], coef[1:]) if c < 0]
        if not falling:
            out = [0.0] * x.shape[1]
            for k, c in zip(keep, coef):
                out[k] = float(c)
            return out
        keep.remove(falling[0])


def decode_intervals(run, requests: list[Request], spans: list[tuple[float, float]]) -> list[tuple[int, int, float, bool]]:
    """``(batch, longest, seconds, prefilling)`` of every interval between two tokens of one request on the decode
    side: what TPOT is made of, stalls included. ``batch``: the size of the decode forward that produced the later
    token; ``longest``: the longest context (prompt + tokens so far) of that forward's requests; ``prefilling``: a
    prefill (one of ``spans``, ``(start, end)``) was running when that forward started (as a simulator decides it:
    at the start of each step)."""
    starts = [f[2] for f in run.decode_forwards]
    prompt = {r.id: r.prompt_len for r in requests}
    longest = [0] * len(starts)
    hits = []  # (forward, seconds)
    for c in run.completions.values():
        for k, (a, b) in enumerate(zip(c.token_times, c.token_times[1:]), 1):
            i = bisect.bisect_left(starts, b) - 1  # the last forward to start before the token was stamped
            if i >= 0:
                longest[i] = max(longest[i], prompt[c.request_id] + k)  # k tokens so far when it started
                hits.append((i, b - a))
    return [(int(run.decode_forwards[i][0]), longest[i], dt, any(s <= starts[i] < e for s, e in spans))
            for i, dt in hits]


def prefill_turns(run, requests: list[Request]) -> list[tuple[int, float]]:
    """``(prompt tokens, seconds)`` of each prefill: its worker's whole turn, from the forward's start to the next
    forward's start when the next request was already waiting (the worker also waits for its KV to leave before it
    takes the next), else the forward alone (the worker then idled: the end of its turn was not seen)."""
    served = sorted((r for r in requests if run.completions.get(r.id) and run.completions[r.id].tokens),
                    key=lambda r: (r.arrival_s, r.id))  # the order the prefill worker took them in
    fwd, turns = run.prefill_forwards, []
    for i, f in enumerate(fwd):
        waiting = i + 1 < min(len(fwd), len(served)) and served[i + 1].arrival_s <= f[2] + f[3]
        turns.append((f[1], fwd[i + 1][2] - f[2] if waiting else f[3]))
    return turns


ROUNDS = 100  # the line and the slowdown, fitted in turn until the slowdown settles


def costs_from_run(run, requests: list[Request]) -> Costs:
    """Fit Costs to a DisaggRun: each prefill's turn (``prefill_turns``) against its tokens (medians: one forward
    each, an outlier is noise); a decode step against its batch and KV read from the intervals between the tokens of each request
    (``decode_intervals``), by their mean, since TPOT is a mean and every stall in it counts; each handover
    (``run.handover_s``) against its prompt length.

    The decode line and the slowdown are fitted together: every interval is a point of the line, one that ran
    during a prefill divided by (1 + slowdown), and the slowdown is how much longer those took in all than the
    line says. A few rounds settle both; the line never rests on the few intervals with no prefill running (a
    busy prefill worker leaves only the run's start and end)."""
    prefill = prefill_turns(run, requests)
    spans = [(f[2], f[2] + f[3]) for f in run.prefill_forwards]
    steps = decode_intervals(run, requests, spans)
    if not prefill or not steps:
        raise ValueError("costs_from_run needs a run with prefills and requests of at least two tokens")
    slowdown, before = 0.0, -1.0
    for _ in range(ROUNDS):
        if abs(slowdown - before) < 1e-9:
            break
        base, per_seq, per_kv = fit_rising([(b, b * n) for b, n, _, _ in steps],
                                           [dt / (1 + slowdown) if busy else dt for _, _, dt, busy in steps])
        alone = [(base + b * per_seq + b * n * per_kv, dt) for b, n, dt, busy in steps if busy]
        predicted = sum(p for p, _ in alone)
        before, slowdown = slowdown, max(0.0, sum(dt for _, dt in alone) / predicted - 1) if predicted > 0 else 0.0
    lengths = {r.id: r.prompt_len for r in requests}
    transfers = [(lengths[rid], s) for rid, s in run.handover_s(requests).items()]
    if not transfers:
        raise ValueError("costs_from_run needs a run in which requests were handed over")
    return Costs(*fit_line(prefill, rising=True), base, per_seq, *fit_line(transfers, rising=True), slowdown, per_kv)
