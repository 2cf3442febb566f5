"""One command that checks every lab on a CUDA GPU (and measures the same things on a CPU), then writes one
JSON and one markdown table (issue #14's `gpu_check`).

    python scripts/check_gpu.py                  # the device servelab picks (CUDA when present)
    python scripts/check_gpu.py --dry-run        # list the steps and the bars, run nothing (exit 0)
    python scripts/check_gpu.py --device cpu     # the same figures on this CPU, for before/after
    python scripts/check_gpu.py --skip-grader --skip-tour   # decode speed only (seconds)

The steps, each printed with its number and the bar it must reach on a GPU:
1. the ceilings (copy bandwidth, matmul rate in the serving dtype), as `servelab doctor` measures them;
2. decode tokens/s of the shipped target at batch 1 with lab 00's KV-cache decode (bar: >= 500 on a GPU);
3. batch-1 decode of the benchmark preset (bench-1b on a GPU, bench-tiny on a CPU), eager and with CUDA graphs
   (``servelab.graphs``), as a fraction of its roofline (weight bytes / the measured copy bandwidth); bar on a GPU:
   >= 60% with graphs;
4. each solution lab graded on its performance and `gpu` criteria (lab 02 also its kernels at GPU sizes):
   every one must pass, or be blocked with its reason (a second GPU, vLLM, a Hugging Face pair);
5. `servelab tour` wall time on this device.
Exit code 0 when every bar that applies to this device is met. The markdown table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_DECODE_BAR = 500.0  # tokens/s at batch 1, eager (issue #7)
KV_CACHE_BAR = 1.5
ROOFLINE_GOAL = 0.6  # bench-1b batch-1 decode with CUDA graphs, as a fraction of weight bytes / copy bandwidth (#14)


def decode_tokens_per_s(device: str, new_tokens: int = 128, repeats: int = 5) -> dict:
    """Median tokens/s of lab 00's cached greedy decode, batch 1, over a few prompts (after a warm-up)."""
    import torch

    from servelab import load_model

    if device == "cpu":
        torch.set_num_threads(1)  # the tour's and the grader's setting for batch-1 decoding on CPU
    model = load_model(device=device)
    prompts = [[(7 * i + 3 * k) % model.config.vocab_size for k in range(32)] for i in range(repeats)]
    rates = decode_rates(model, prompts, new_tokens)
    return {"tokens_per_s": round(statistics.median(rates), 1), "runs": [round(r, 1) for r in rates],
            "new_tokens": new_tokens, "prompt_tokens": 32}


def decode_rates(model, prompts: list[list[int]], new_tokens: int) -> list[float]:
    """Tokens/s of lab 00's cached greedy decode of each prompt at batch 1, after a warm-up."""
    from servelab.reference.warmup import greedy_decode
    from servelab.timing import timer

    greedy_decode(model, prompts[0], 16)  # warm-up: allocator, kernels, caches
    rates = []
    for p in prompts:
        with timer(model.device) as t:
            out = greedy_decode(model, p, new_tokens)
        rates.append(len(out) / t.elapsed_s)
    return rates


def diagnostics(device: str) -> dict:
    """Where a decode step's time goes: ms per step, kernels (or ops) per step, and cached vs recompute
    at a few prompt lengths (the same paired timing as the grader's kv_cache_speedup)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from servelab import load_model, reference_greedy
    from servelab.reference.warmup import greedy_decode
    from servelab.timing import paired_benchmark, timer

    model = load_model(device=device)
    view = model.new_cache(1, 512).rows([0])
    model(torch.arange(32)[None], torch.arange(32)[None], view)

    def step(p: int):
        return int(model(torch.tensor([[5]]), torch.tensor([[p]]), view)[0, -1].argmax())

    for p in range(32, 42):
        step(p)
    with timer(model.device) as t:
        for p in range(42, 242):
            step(p)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        step(250)
    gpu = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    out = {"ms_per_step": round(t.elapsed_s / 200 * 1e3, 3), "cuda_kernels_per_step": sum(e.count for e in gpu),
           "cuda_kernels": [(e.key[:60], e.count) for e in sorted(gpu, key=lambda e: -e.count)[:25]],
           "aten_ops_per_step": sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")),
           "top_ops": [(e.key, e.count) for e in sorted(prof.key_averages(), key=lambda e: -e.count)[:12]]}
    speed = {}
    for plen in (32, 256, 1024):
        prompt = [(11 * k) % model.config.vocab_size for k in range(plen)]
        res = paired_benchmark(lambda p=prompt: reference_greedy(model, p, 64), lambda p=prompt: greedy_decode(model, p, 64),
                               repeats=3, device=model.device)
        speed[plen] = round(res.speedup, 2)
    out["kv_cache_speedup_by_prompt_len"] = speed
    return out


def graphs_vs_eager(device: str, new_tokens: int = 48) -> dict:
    """Lab 00's cached decode of the shipped target, eager and through ``with_cuda_graphs`` (recorded on a GPU,
    whatever $SERVELAB_CUDA_GRAPHS says), each step's logits against a no-cache forward of the same tokens:
    which path leaves the reference, at which step, and by how much (the first H200 run saw graphed and eager
    logits part by up to 0.6 from the 2nd replay without telling which was wrong). A third path records the
    graphs with SDPA held to its math backend: if only that one stays on the reference, a fused attention
    kernel (cuDNN's or the memory-efficient one, chosen per shape) is what replays wrongly, not the graph."""
    import contextlib
    from unittest import mock

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from servelab import load_model
    from servelab.device import CUDA_GRAPHS_ENV
    from servelab.graphs import with_cuda_graphs
    from servelab.reference.warmup import greedy_decode

    class Logged:  # the model, keeping each call's last-position logits
        def __init__(self, model):
            self.model, self.logits = model, []

        def __call__(self, ids, positions=None, cache=None):
            out = self.model(ids, positions, cache)
            self.logits.append(out[0, -1].float().cpu())
            return out

        def __getattr__(self, name):
            return getattr(self.model, name)

    with mock.patch.dict(os.environ, {CUDA_GRAPHS_ENV: "1"}):  # recorded on a GPU, whatever the switch says
        model = load_model(device=device)
        prompt = list(range(3, 40))
        out = {}
        paths = (("eager", model, contextlib.nullcontext), ("cuda_graphs", with_cuda_graphs(model), contextlib.nullcontext),
                 ("cuda_graphs_math_sdpa", with_cuda_graphs(model), lambda: sdpa_kernel(SDPBackend.MATH)))
        for name, m, backends in paths:
            logged = Logged(m)
            with backends():
                tokens = greedy_decode(logged, prompt, new_tokens)
            ref = [model(torch.tensor([prompt + tokens[:i]]))[0, -1].float().cpu() for i in range(len(tokens))]
            diffs = [float((a - b).abs().max()) for a, b in zip(logged.logits, ref)]
            worst = max(range(len(diffs)), key=diffs.__getitem__)
            out[name] = {"max_abs_logit_diff": round(max(diffs), 6), "at_step": worst,
                         "first_step_over_1e-3": next((i for i, d in enumerate(diffs) if d > 1e-3), None),
                         "tokens_equal_reference": [int(r.argmax()) for r in ref] == tokens}
        return out


# on a GPU, the correctness criteria whose code paths only a GPU takes, graded before the speed ones: lab 02's
# compiled kernels at real sizes and the engine on them; lab 04's two workers sharing one card
GPU_CORRECTNESS = {
    "02_paged_attention": ["store_kv_matches", "paged_decode_matches", "paged_decode_split_matches",
                           "paged_engine_matches_alone"],
    "04_disaggregation": ["disagg_identical"],
}


def grading_plan(device: str, only_labs: list[str] | None = None) -> dict[str, list[str]]:
    """lab -> the criteria this check grades: every performance and `gpu` criterion of every lab (lab 02's
    kernels too, on a GPU). On a CPU the `gpu` ones resolve to blocked, each with its reason."""
    from grader import labs

    every = labs.all_labs()
    plan = {}
    for lab_id in only_labs or list(every):  # in the order asked for: the most wanted first
        ids = [c.id for c in every[lab_id].criteria if c.kind in ("performance", "gpu")]
        plan[lab_id] = (GPU_CORRECTNESS.get(lab_id, []) if device == "cuda" else []) + ids
    return plan


def grade(lab: str, only: list[str], device: str, timeout_s: float | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "grader", "check", f"solutions/{lab}", "--device", device,
               "--json", str(out), "--only", *only]
        # its own process group, so a timeout ends the grader's workers too (they hold the GPU)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            return {"error": f"the grader ran past --grade-timeout {timeout_s:.0f} s\n{log[-1500:]}"}
        if not out.exists():
            return {"error": log[-2000:]}
        report = json.loads(out.read_text())
    reports = report.get("reports", [report])
    results = [r for rep in reports for r in rep.get("criteria", [])]
    return {r["id"]: {"status": r["status"], "message": r["message"].splitlines()[0],
                      "speedup": r.get("metrics", {}).get("speedup")} for r in results}


def tour_seconds(device: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "servelab.cli", "tour", "--device", device],
                          cwd=ROOT, capture_output=True, text=True)
    return {"seconds": round(time.perf_counter() - t0, 1), "exit": proc.returncode,
            "tail": proc.stdout[-1500:] + proc.stderr[-500:]}


def roofline_decode(device: str, bandwidth: float, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Batch-1 decode of the benchmark preset (bench-1b on a GPU, bench-tiny on a CPU), eager and with CUDA
    graphs (``servelab.graphs``; on a CPU the same fixed-shape step without the recording), against its
    roofline: weight bytes / ``bandwidth`` (the measured copy bandwidth)."""
    from servelab import load_model
    from servelab.device import graph_backend
    from servelab.graphs import with_cuda_graphs
    from servelab.roofline import decode_loop_rates, decode_roofline_tokens_per_s, weight_bytes

    name = "bench-1b" if device == "cuda" else "bench-tiny"
    model = load_model(name, device=device)
    prompt = [(13 * k) % model.config.vocab_size for k in range(32)]
    rates = decode_loop_rates({"eager": model, "cuda_graphs": with_cuda_graphs(model)}, prompt, new_tokens, repeats)
    roof = decode_roofline_tokens_per_s(weight_bytes(model), bandwidth)
    out = {"model": name, "weight_bytes": weight_bytes(model), "roofline_tokens_per_s": round(roof, 1)}
    for k, rs in rates.items():
        out[k] = {"tokens_per_s": round(statistics.median(rs), 1), "runs": [round(r, 1) for r in rs],
                  "fraction_of_roofline": round(statistics.median(rs) / roof, 3)}
    out["graphs_speedup"] = round(out["cuda_graphs"]["tokens_per_s"] / out["eager"]["tokens_per_s"], 3)
    out["graphs_backend"] = graph_backend(device)  # "cuda": recorded; "eager": the fixed-shape step called again
    return out


def steps(device: str, args) -> list[tuple[str, str]]:
    """(step, what it checks and its bar here), in the order they run."""
    gpu = device == "cuda"
    out = [] if getattr(args, "skip_decode", False) else [
        ("ceilings", "copy bandwidth and matmul rate (no bar: the yardstick)"),
        ("decode", "shipped target, batch 1, lab 00's cached decode" + (f" (bar >= {GPU_DECODE_BAR:.0f} tokens/s)"
                                                                      if gpu else " (no bar on a CPU)")),
        ("roofline", f"{'bench-1b' if gpu else 'bench-tiny'}, batch 1, eager and with CUDA graphs: fraction of "
                     "the roofline" + (f" (bar with graphs >= {ROOFLINE_GOAL:.0%})" if gpu else " (no bar on a CPU)"))]
    if not args.skip_grader:
        for lab, ids in grading_plan(device, args.labs).items():
            out.append((f"grade {lab}", f"{', '.join(ids)}: each passed, or blocked with its reason"))
    if not args.skip_tour:
        out.append(("tour", "`servelab tour` runs to the end on this device"))
    return out


def measure_decode(device: str, args, results: dict, rows: list, save) -> bool:
    """Steps 1-3: the ceilings, the shipped target's decode, bench-1b's roofline eager and with graphs."""
    from servelab.ceilings import measure

    ok = True
    c = measure(device)
    results["ceilings"] = {"copy_bytes_per_s": c.copy_bytes_per_s, "matmul_flops_per_s": c.matmul_flops_per_s,
                           "matmul_dtype": c.matmul_dtype}
    rows += [(k, v, "measured") for k, v in c.rows()]
    results["decode"] = decode_tokens_per_s(device)
    rate = results["decode"]["tokens_per_s"]
    bar = GPU_DECODE_BAR if device == "cuda" else None
    print(f"decode, batch 1, shipped target: {rate:.0f} tokens/s (runs {results['decode']['runs']})"
          + (f"  bar {bar:.0f}: {'PASS' if rate >= bar else 'FAIL'}" if bar else ""), flush=True)
    rows.append(("decode, shipped target, batch 1", f"{rate:.0f} tokens/s",
                 (f"{'PASS' if rate >= bar else 'FAIL'} (bar {bar:.0f})" if bar else "no bar on a CPU")))
    ok &= bar is None or rate >= bar
    save()
    results["roofline"] = r = roofline_decode(device, c.copy_bytes_per_s)
    goal = ROOFLINE_GOAL if device == "cuda" else None
    for k in ("eager", "cuda_graphs"):
        one = r[k]
        print(f"decode, batch 1, {r['model']}, {k}: {one['tokens_per_s']:.0f} tokens/s (runs {one['runs']}), roofline "
              f"{r['roofline_tokens_per_s']:.0f} ({one['fraction_of_roofline']:.0%})", flush=True)
        recorded = r["graphs_backend"] == "cuda"  # opt-in on a GPU: servelab.device.graph_backend says why
        graded = goal is not None and k != "eager" and recorded
        met = not graded or one["fraction_of_roofline"] >= goal
        verdict = (f"{'PASS' if met else 'FAIL'} (bar {goal:.0%})" if graded else "reported"
                   + ("" if recorded or k == "eager" or goal is None else
                      " (not recorded: SERVELAB_CUDA_GRAPHS=1 records them, see servelab.device.graph_backend)"))
        rows.append((f"decode, {r['model']}, batch 1, {k.replace('_', ' ')}", f"{one['tokens_per_s']:.0f} tokens/s = "
                     f"{one['fraction_of_roofline']:.0%} of the roofline ({r['roofline_tokens_per_s']:.0f})", verdict))
        ok &= met
    print(f"CUDA graphs / eager: {r['graphs_speedup']:.2f}x", flush=True)
    rows.append(("CUDA graphs / eager", f"{r['graphs_speedup']:.2f}x", "reported"))
    save()
    if args.diagnostics:
        results["diagnostics"] = diagnostics(device)
        print(f"diagnostics: {results['diagnostics']}", flush=True)
        results["graphs_vs_eager"] = g = graphs_vs_eager(device)
        print(f"graphs vs eager, each against a no-cache forward: {g}", flush=True)
        for k, v in g.items():
            rows.append((f"{k} decode vs no-cache forward (shipped target)", f"max logit diff {v['max_abs_logit_diff']:.1e} "
                         f"at step {v['at_step']}; tokens equal: {v['tokens_equal_reference']}",
                         "PASS" if v["tokens_equal_reference"] and v["max_abs_logit_diff"] < 1e-2 else "FAIL"))
            ok &= v["tokens_equal_reference"] and v["max_abs_logit_diff"] < 1e-2
        save()
    return ok


def markdown(rows: list[tuple[str, str, str]], device: str) -> str:
    lines = [f"| check ({device}) | result | verdict |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu | cuda (default: what servelab picks)")
    ap.add_argument("--dry-run", action="store_true", help="list the steps and their bars, run nothing")
    ap.add_argument("--skip-grader", action="store_true")
    ap.add_argument("--skip-decode", action="store_true", help="skip steps 1-3 (ceilings, decode, roofline)")
    ap.add_argument("--skip-tour", action="store_true")
    ap.add_argument("--labs", nargs="+", help="grade only these labs, in this order (default: all)")
    ap.add_argument("--grade-timeout", type=float, default=None, help="seconds per lab's grading (default: none)")
    ap.add_argument("--diagnostics", action="store_true", help="also: ms and kernels per step, cache speedup vs length")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--markdown", help="write the summary table here too")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from servelab.device import describe, get_device

    device = str(get_device(args.device).type)
    from grader import labs

    if args.labs and (unknown := sorted(set(args.labs) - set(labs.all_labs()))):
        ap.error(f"--labs: no lab {unknown}; the labs are {sorted(labs.all_labs())}")
    if args.dry_run:
        print(f"would run on {device}:")
        for k, (name, what) in enumerate(steps(device, args), 1):
            print(f"{k:2d}. {name}: {what}")
        return 0
    results: dict = {"machine": describe(device), "device": device}

    def save() -> None:  # after every step, so a run cut short still leaves what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    rows: list[tuple[str, str, str]] = []
    ok = True
    if not args.skip_decode:
        ok &= measure_decode(device, args, results, rows, save)
    if not args.skip_grader:
        results["grader"] = {}
        for lab, ids in grading_plan(device, args.labs).items():
            res = results["grader"][lab] = grade(lab, ids, device, args.grade_timeout)
            save()
            if "error" in res:  # the grader itself did not run: loud
                print(f"{lab}: THE GRADER FAILED\n{res['error']}", flush=True)
                rows.append((f"grade {lab}", "the grader did not run", "FAIL"))
                ok = False
                continue
            for cid, one in res.items():
                print(f"{lab}/{cid}: {one['status']}: {one['message']}", flush=True)
                good = one["status"] in ("passed", "blocked")
                ok &= good
                rows.append((f"{lab}/{cid}", one["message"][:140].replace("|", "/"), one["status"].upper()
                             if good else f"FAIL ({one['status']})"))
    if not args.skip_tour:
        results["tour"] = tour_seconds(device)
        print(f"servelab tour on {device}: {results['tour']['seconds']} s (exit {results['tour']['exit']})")
        print(results["tour"]["tail"], flush=True)
        ok &= results["tour"]["exit"] == 0
        rows.append(("servelab tour", f"{results['tour']['seconds']} s", "PASS" if results["tour"]["exit"] == 0
                     else "FAIL"))
    table = markdown(rows, device)
    results["table"] = table
    save()
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
