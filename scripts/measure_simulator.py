"""Lab 04's simulator against real 1P + 1D runs, each calibrated on itself: the numbers its README states.

    PYTHONPATH=. python scripts/measure_simulator.py [--rates 4,8,12] [--runs 3] [--seeds 4] [--json out.json]

For each rate, seed and run: the reference workers serve the mixed trace (40 requests, two processes of 1 thread),
``costs_from_run`` fits Costs to that run, and the reference ``simulate`` replays the trace with them. Prints the
measured median TTFT, median TPOT and p99 TPOT with the simulation's error on each, then how many runs had both
medians within 15% and within ``simulate_validates``'s tolerance. A run's own error is the model's (what it leaves
out) plus how far the machine's speed drifted within that run, which a constant-cost model cannot follow.
"""
from __future__ import annotations

import argparse
import json
import sys

KEYS = (("TTFT p50", "median_ttft_ms"), ("TPOT p50", "median_tpot_ms"), ("TPOT p99", "p99_tpot_ms"))


def value(summary, key: str) -> float:
    return summary.percentiles[key] if key.startswith("p99") else getattr(summary, key)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="4,8,12", help="requests per second, comma-separated")
    ap.add_argument("--runs", type=int, default=3, help="runs per rate and seed")
    ap.add_argument("--seeds", default="4", help="mixed-trace seeds, comma-separated (4: the notebook's trace)")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--json", help="write every run's numbers here")
    args = ap.parse_args(argv)

    from grader.thresholds import threshold
    from servelab import load_model, load_tokenizer
    from servelab.disagg.costs import costs_from_run
    from servelab.metrics import RequestTimeline, summarize
    from servelab.reference.disaggregation import disaggregated, simulate
    from servelab.workloads import mixed_trace

    engine = {"max_running": 16, "num_blocks": 1024, "block_size": 16}
    model, tok = load_model(device="cpu"), load_tokenizer()
    rows = []
    print(f"{'rate':>4} {'seed':>4} {'run':>3}  " + "  ".join(f"{name:>8} {'sim':>5}" for name, _ in KEYS))
    for rate in (float(r) for r in args.rates.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            reqs = mixed_trace(rate_per_s=rate, n_requests=args.requests, seed=seed, encode=tok).requests
            for i in range(args.runs):
                run = disaggregated(model.source, reqs, None, overlap=True, **engine)
                if any(run.rank_errors.values()):
                    print(f"rate {rate:g}, seed {seed}: a worker failed: {run.rank_errors}", file=sys.stderr)
                    return 1
                costs = costs_from_run(run, reqs)
                times = simulate(reqs, costs, 1, 1, engine["max_running"])
                real = summarize(run.timelines(reqs))
                sim = summarize([RequestTimeline(r.id, r.arrival_s, times[r.id], r.prompt_len) for r in reqs])
                row = {"rate": rate, "seed": seed, "run": i + 1, "costs": vars(costs)}
                for _, key in KEYS:
                    row[key] = value(real, key)
                    row[key + "_error"] = value(sim, key) / value(real, key) - 1
                rows.append(row)
                print(f"{rate:4g} {seed:4d} {i + 1:3d}  " + "  ".join(
                    f"{row[key]:6.1f}ms {row[key + '_error']:+5.0%}" for _, key in KEYS), flush=True)
    medians = [max(abs(r["median_ttft_ms_error"]), abs(r["median_tpot_ms_error"])) for r in rows]
    for tol in (0.15, threshold("cpu", "04_disaggregation", "simulate_validates")):
        print(f"both medians within {tol:.0%}: {sum(m <= tol for m in medians)} of {len(rows)} runs")
    for name, key in KEYS:
        errors = [r[key + "_error"] for r in rows]
        print(f"{name}: errors {min(errors):+.0%} to {max(errors):+.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
