"""Continuous batching vs one request at a time, both behind `servelab serve`, measured by `servelab bench`.

In one run: the same server is started with lab 01's continuous batching (16 slots) and with --max-running 1.
Each is probed on a fixed ladder of request rates, each rung ~4 s of Poisson arrivals (at least 32 requests) from
the uniform trace at half size (outputs of exactly 8-64 tokens, via ignore_eos), so that a rate above what a
server sustains piles up a queue that shows in TTFT. A rate passes when p99 TTFT <= the SLO.
The walk starts at a guessed rung and goes up while it passes, down while it fails, so it finds the highest
passing rung of the ladder (p99 TTFT grows with the rate) without running every rung; the time goes to the
rungs that decide. Continuous batching must sustain >= 2x the rate of batch 1.

Also reported (not asserted): the HTTP + SSE overhead, the client's TPOT and TTFT minus the server's own.
"""
from __future__ import annotations

import json

import httpx
import pytest

from serve_helpers import serve
from servelab.bench.run import BenchConfig, load_trace, run

LADDER = (2, 4, 8, 16, 32, 64)  # requests/s
SLO_P99_TTFT_MS = 1000.0
RUNG_S = 4.0  # seconds of arrivals per rung
MIN_REQUESTS = 32


def requests_at(rate: float) -> int:
    return max(MIN_REQUESTS, round(rate * RUNG_S))


def probe(url: str, trace, rate: float) -> dict:
    cfg = BenchConfig(base_url=url, trace="uniform", rate=rate, num_requests=requests_at(rate), scale=0.5,
                      ignore_eos=True, progress=False, seed=1)
    result, summary = run(cfg, trace)
    assert summary is not None and result["completed"] == requests_at(rate), result["errors"]
    return result


def highest_passing(url: str, trace, start: int) -> tuple[float, dict[float, dict]]:
    """The highest rung whose p99 TTFT meets the SLO (0 if none), and every probe's result."""
    for _ in range(2):  # warm-up: first forwards of each shape, connection set-up
        httpx.post(url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}, timeout=60)
    seen: dict[float, dict] = {}

    def ok(i: int) -> bool:
        seen[LADDER[i]] = probe(url, trace, LADDER[i])
        return seen[LADDER[i]]["p99_ttft_ms"] <= SLO_P99_TTFT_MS

    i = start
    if ok(i):
        while i + 1 < len(LADDER) and ok(i + 1):
            i += 1
        return LADDER[i], seen
    while i > 0:
        i -= 1
        if ok(i):
            return LADDER[i], seen
    return 0.0, seen


def saturated_in_process(trace) -> float:
    """Output tokens/s of lab 01's reference engine on the same requests, all at once, in this process."""
    import torch

    from servelab.engine import WallClock
    from servelab.loader import load_model
    from servelab.reference.batching import continuous_batching

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server has it
    try:
        model = load_model()
        continuous_batching(model, trace.requests[:2], 16, 512, None, WallClock())  # warm-up
        run_ = continuous_batching(model, trace.requests, 16, 512, None, WallClock())  # eos None: fixed lengths
    finally:
        torch.set_num_threads(threads)
    return run_.output_tokens / run_.seconds


@pytest.mark.slow
def test_continuous_batching_sustains_twice_the_rate_of_batch_one_at_the_same_p99_ttft():
    trace = load_trace(BenchConfig(trace="uniform", scale=0.5))
    with serve("--max-running", "1") as s:
        one, one_seen = highest_passing(s.url, trace, start=1)
    with serve("--max-running", "16") as s:
        cb, cb_seen = highest_passing(s.url, trace, start=3)
        saturated = run(BenchConfig(base_url=s.url, trace="uniform", scale=0.5, ignore_eos=True, progress=False),
                        trace)[0]  # every request at once
    in_process = saturated_in_process(trace)
    rows = [(name, rate, r["p99_ttft_ms"], r["request_throughput"], r["output_throughput"], r["mean_tpot_ms"],
             r.get("http_overhead_tpot_ms"), r.get("http_overhead_ttft_ms"))
            for name, seen in (("batch-1", one_seen), ("continuous", cb_seen)) for rate, r in sorted(seen.items())]
    print(f"\nSLO p99 TTFT <= {SLO_P99_TTFT_MS:.0f} ms, {RUNG_S:.0f} s of arrivals (>= {MIN_REQUESTS} requests) per rung")
    print("server      rate  p99TTFT  req/s  tok/s  TPOT  http+sse/token  http/request(TTFT)")
    for row in rows:
        print("{:<10} {:>5} {:>8.0f} {:>6.2f} {:>6.0f} {:>5.2f} {:>10.2f} ms {:>10.2f} ms".format(*row))
    print(f"all {len(trace)} requests at once: {saturated['output_throughput']:.0f} output tokens/s through HTTP, "
          f"{in_process:.0f} in process (the same engine policy without a server)")
    print(json.dumps({"batch1_rate": one, "continuous_rate": cb, "ratio": cb / one if one else None,
                      "saturated_http_tok_s": saturated["output_throughput"], "saturated_in_process_tok_s": in_process}))
    assert one > 0, f"batch 1 meets the SLO at no rung of {LADDER}: {rows}"
    assert cb >= 2 * one, f"continuous batching sustains {cb}/s, batch 1 {one}/s: less than 2x ({rows})"
