"""What a prefill, a decode step and a KV handover cost, as lines fitted to a real run: a simulator's inputs.

Each cost is ``base + slope * size``, fitted by least squares to a center per size: medians for a prefill (one
forward: an outlier is noise), means for a decode step (TPOT is a mean: a step that waited is part of it).
"""

from __future__ import annotations

import bisect
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

    # a line fitted to noisy points may cross zero below the sizes it saw: a cost is never negative
    def prefill_s(self, tokens: int) -> float:
        return max(0.0, self.prefill_base_s + tokens * self.prefill_per_token_s)

    def decode_step_s(self, batch: int, prefilling: bool = False) -> float:
        alone = max(0.0, self.decode_base_s + batch * self.decode_per_seq_s)
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


def decode_intervals(run, spans: list[tuple[float, float]]) -> list[tuple[int, float, bool]]:
    """``(batch, seconds, prefilling)`` of every interval between two tokens of one request on the decode side:
    what TPOT is made of, stalls included. ``batch``: the size of the decode forward that produced the later
    token; ``prefilling``: a prefill (one of ``spans``, ``(start, end)``) was running when that forward started
    (as a simulator decides it: at the start of each step)."""
    starts = [f[2] for f in run.decode_forwards]
    out = []
    for c in run.completions.values():
        for a, b in zip(c.token_times, c.token_times[1:]):
            i = bisect.bisect_left(starts, b) - 1  # the last forward to start before the token was stamped
            if i >= 0:
                start = starts[i]
                out.append((int(run.decode_forwards[i][0]), b - a, any(s <= start < e for s, e in spans)))
    return out


def costs_from_run(run, requests: list[Request]) -> Costs:
    """Fit Costs to a DisaggRun: each prefill forward's time against its tokens (medians: a prefill is one
    forward); a decode step against its batch from the intervals between the tokens of each request
    (``decode_intervals``), by their mean, since TPOT is a mean and every stall in it counts, from the
    intervals no prefill overlapped, and how much longer (on average) the others took; each handover
    (``run.handover_s``) against its prompt length."""
    prefill = [(f[1], f[3]) for f in run.prefill_forwards]
    spans = [(f[2], f[2] + f[3]) for f in run.prefill_forwards]
    steps = decode_intervals(run, spans)
    if not prefill or not steps:
        raise ValueError("costs_from_run needs a run with prefills and requests of at least two tokens")
    quiet = [(b, dt) for b, dt, busy in steps if not busy] or [(b, dt) for b, dt, _ in steps]
    base, slope = fit_line(quiet, statistics.fmean, rising=True)
    slowed = [dt / (base + slope * b) for b, dt, busy in steps if busy and base + slope * b > 0]
    lengths = {r.id: r.prompt_len for r in requests}
    transfers = [(lengths[rid], s) for rid, s in run.handover_s(requests).items()]
    if not transfers:
        raise ValueError("costs_from_run needs a run in which requests were handed over")
    return Costs(*fit_line(prefill, rising=True), base, slope, *fit_line(transfers, rising=True),
                 max(0.0, statistics.fmean(slowed) - 1) if slowed else 0.0)
