"""Lab 03 measurements on the shipped pair, batch 1, one torch thread: the numbers the thresholds rest on.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/measure_speculative.py [--pairs 5] [--prompts 2] [--json out.json]

For gamma 1..7: alpha, tokens per target forward, the paired speedup of speculative_greedy over lab 00's
cached greedy_decode, c and v measured inside the loops and the formula's prediction; prompt lookup on code
prompts; the draft's cost when it runs alone; the verify cost (gamma + 1 tokens vs 1) at batch 1, 4, 16.
The timed comparisons are the grader's own (``grader.labs.lab03_speculative.timed_comparison``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def verify_cost(model, batch: int, context: int = 64, tokens: int = 5, repeats: int = 30) -> float:
    """Median seconds of a cached forward of ``tokens`` new tokens per row over ``context`` cached ones,
    relative to a 1-token forward, at ``batch`` rows."""
    from servelab.device import synchronize

    dev = model.device
    view = model.new_cache(batch, context + tokens + 1).rows(list(range(batch)))
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=dev)
    model(ids, torch.arange(context, device=dev).expand(batch, context), view)

    def one(t: int) -> float:
        x = torch.randint(0, model.config.vocab_size, (batch, t), device=dev)
        pos = torch.arange(context, context + t, device=dev).expand(batch, t)
        synchronize(dev)
        t0 = time.perf_counter()
        model(x, pos, view)
        synchronize(dev)  # on a GPU the forward only queued its kernels
        return time.perf_counter() - t0

    singles, multis = [], []
    for _ in range(repeats):  # interleaved, so drift hits both alike
        singles.append(one(1))
        multis.append(one(tokens))
    return statistics.median(multis) / statistics.median(singles), statistics.median(singles)


def draft_alone(draft, target, prompt: list[int], new: int = 128) -> tuple[float, float]:
    """(draft step, target step) in seconds, each decoding alone with its own cache (nothing else running)."""
    from grader.probes import CountingModel
    from servelab.reference.warmup import greedy_decode

    out = []
    for m in (draft, target):
        probe = CountingModel(m)
        greedy_decode(probe, prompt, new)
        probe.calls.clear()
        greedy_decode(probe, prompt, new)
        out.append(statistics.median(c.seconds for c in probe.calls if c.tokens == 1))
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--gammas", default="1,2,3,4,5,6,7")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    import servelab.reference.speculative as solution
    from grader.labs.lab03_speculative import speed_prompts, timed_comparison
    from grader.spec import Context, Learner
    from servelab.loader import load_draft

    learner, ctx = Learner(vars(solution)), Context(lab="03_speculative", seed=args.seed)
    target, draft = ctx.model(), load_draft()
    results: dict = {"draft": [], "lookup": []}

    d_alone, t_alone = draft_alone(draft, target, speed_prompts(ctx, "draft", 1)[0])
    results["alone"] = {"draft_ms": d_alone * 1e3, "target_ms": t_alone * 1e3, "c_alone": d_alone / t_alone}
    print(f"alone: draft step {d_alone * 1e3:.2f} ms, target step {t_alone * 1e3:.2f} ms, c = {d_alone / t_alone:.3f}",
          flush=True)

    head = (f"{'method':8} {'gamma':>5} {'alpha':>6} {'tok/fwd':>7} {'c':>6} {'v':>6} {'step ms':>7} "
            f"{'pred':>6} {'meas':>6} {'err':>6}  pair ratios")
    print(head, flush=True)
    for kind, gammas in (("draft", [int(g) for g in args.gammas.split(",")]), ("lookup", [4, 8])):
        prompts = speed_prompts(ctx, kind, args.prompts)
        for g in gammas:
            timing, stats = timed_comparison(learner, ctx, kind, g, args.pairs, prompts)
            err = timing.speedup / stats["predicted"] - 1
            row = {**stats, "speedup": timing.speedup, "ratios": timing.ratios, "error": err}
            results[kind].append(row)
            print(f"{kind:8} {g:5d} {stats['alpha']:6.3f} {stats['tokens_per_verify']:7.2f} {stats['c']:6.3f} "
                  f"{stats['v']:6.3f} {stats['step_ms']:7.2f} {stats['predicted']:6.2f} {timing.speedup:6.2f} "
                  f"{err:+6.1%}  {', '.join(f'{r:.2f}' for r in timing.ratios)}", flush=True)

    results["verify_cost"] = {}
    for b in (1, 4, 16):
        v, single = verify_cost(target, b)
        results["verify_cost"][b] = {"v": v, "one_token_ms": single * 1e3}
        print(f"verify cost, batch {b:2d}: 5-token forward / 1-token forward = {v:.2f} "
              f"(1-token forward {single * 1e3:.2f} ms)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
