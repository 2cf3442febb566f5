"""`servelab tour`: the main job. Loads the default models, generates, and prints each lab's headline.

Each lab adds one section (a function returning a dict of results) to ``SECTIONS``.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from tqdm.auto import tqdm

from servelab.acceptance import measure_acceptance
from servelab.device import describe, get_device
from servelab.loader import load_draft, load_model, load_tokenizer
from servelab.workloads import fixed, make_trace, standard_trace, all_at_once

PROMPTS = [  # each ends mid-line: a prompt ending in "\n" hides the indentation the next token carries
    "def fibonacci(n):\n    if n <",
    "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def push(self, item):\n        self.",
    "import os\nimport sys\n\n\ndef main(argv):\n    parser =",
    "    def __repr__(self):\n        return",
]


ROLES = ("target", "draft")


def section_models(ctx: dict) -> dict:
    """One column per model, so its full name fits an 80-column terminal (a row per model cut names short)."""
    out, cells = {}, {}
    for role in ROLES:
        m = ctx[role]
        c = m.config
        params = sum(p.numel() for p in m.parameters())
        mib = sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20
        kv = c.kv_bytes_per_token(m.lm_head.weight.element_size()) / 1024
        cells[role] = {"model": m.name, "layers": str(c.num_layers), "hidden": str(c.hidden_size),
                       "heads (q/kv)": f"{c.num_heads}/{c.num_kv_heads}", "params": f"{params / 1e6:.2f}M",
                       "weights MiB": f"{mib:.1f}", "KV KiB/token": f"{kv:.1f}"}
        out[role] = {"name": m.name, "params": params, "weights_mib": round(mib, 2), "kv_kib_per_token": kv}
    table = Table(title="models")
    table.add_column("")
    for role in ROLES:
        table.add_column(role, justify="right", overflow="fold")  # a long name folds; it is never cut
    for row in cells["target"]:
        table.add_row(row, *(cells[role][row] for role in ROLES))
    ctx["console"].print(table)
    return out


def section_generate(ctx: dict) -> dict:
    from servelab.reference.warmup import greedy_decode  # lab 00's solution: greedy decoding with a KV cache

    tok, n, console = ctx["tokenizer"], ctx["new_tokens"], ctx["console"]
    out = {}
    for role in ROLES:
        model, tokens, seconds, completions = ctx[role], 0, 0.0, []
        for prompt in tqdm(PROMPTS, desc=f"generating ({role})", leave=False):
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            t0 = time.perf_counter()
            new = greedy_decode(model, ids, n, tok.eos_token_id)
            seconds += time.perf_counter() - t0
            tokens += len(new)
            completions.append(tok.decode(new))
        out[role] = {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}
        if role == "target":  # every prompt timed is shown: the prompt dim, what the model wrote after it bold
            out[role]["completions"] = completions
            for i, (prompt, completion) in enumerate(zip(PROMPTS, completions), 1):
                console.rule(f"[dim]target, greedy, prompt {i} of {len(PROMPTS)}")
                console.print(Text(prompt, style="dim") + Text(completion, style="bold"), highlight=False)
            console.rule(style="dim")
    return out


def section_roofline(ctx: dict) -> dict:
    """Batch-1 decode of the target against its memory roofline (weight bytes / copy bandwidth measured here),
    eager and with CUDA graphs (``servelab.graphs``), alternating over one kept cache each."""
    from servelab.ceilings import copy_bandwidth
    from servelab.device import graph_backend
    from servelab.graphs import with_cuda_graphs
    from servelab.roofline import decode_loop_rates, decode_roofline_tokens_per_s, weight_bytes

    target = ctx["target"]
    bandwidth = copy_bandwidth(target.device)
    prompt = ctx["tokenizer"](PROMPTS[0], add_special_tokens=False)["input_ids"]
    rates = decode_loop_rates({"eager": target, "cuda_graphs": with_cuda_graphs(target)}, prompt, ctx["new_tokens"],
                              repeats=2 if ctx["quick"] else 3)
    roof = decode_roofline_tokens_per_s(weight_bytes(target), bandwidth)
    med = {k: statistics.median(v) for k, v in rates.items()}
    note = "" if max(med.values()) <= roof else " (above it: the weights sit in the CPU's caches, not in DRAM)"
    if target.device.type == "cuda" and graph_backend(target.device) != "cuda":
        note += " (graphs not recorded: $SERVELAB_CUDA_GRAPHS=1 records them, see servelab.device.graph_backend)"
    return {"copy_bytes_per_s": bandwidth, "roofline_tokens_per_s": roof, "tokens_per_s": med, "runs": rates,
            "headline": {"target decode vs its roofline (batch 1, weight bytes / copy bandwidth)":
                         f"eager {med['eager']:.0f} ({med['eager'] / roof:.0%}), CUDA graphs {med['cuda_graphs']:.0f} "
                         f"({med['cuda_graphs'] / roof:.0%}) of {roof:.0f} tokens/s{note}"}}


def section_acceptance(ctx: dict) -> dict:
    trace = make_trace("tour-acceptance", ctx["acceptance_prompts"], fixed(32), fixed(ctx["new_tokens"]),
                       all_at_once(), seed=11, encode=ctx["tokenizer"])
    prompts = [r.prompt_ids for r in trace.requests]
    acc = measure_acceptance(ctx["target"], ctx["draft"], prompts, ctx["new_tokens"], gamma=4)
    return acc.to_dict()


BATCHING_PAIRS = 3  # alternating static/continuous pairs; the headline is their median ratio, as the grader's
# the skewed trace's size: a full-size pair (128 requests) takes ~30-60 s on a 2-core CPU, so three of them
# would more than double the tour; half size (64 requests) keeps three pairs near one full-size pair's time
BATCHING_SCALE = {"quick": 0.25, "full": 0.5}


def section_batching(ctx: dict) -> dict:
    """Lab 01's headline: static vs continuous batching on the skewed trace (8 slots), timed in alternating
    pairs; the speedup is the median of the per-pair ratios (servelab.timing.paired_benchmark)."""
    from servelab.engine import WallClock
    from servelab.reference.batching import continuous_batching, static_batching
    from servelab.timing import paired_benchmark

    model, eos = ctx["target"], ctx["tokenizer"].eos_token_id
    scale = BATCHING_SCALE["quick" if ctx["quick"] else "full"]
    trace = standard_trace("skewed", encode=ctx["tokenizer"], scale=scale)
    runs = {}

    def static():
        runs["static"] = static_batching(model, trace.requests, 8, eos, WallClock())

    def continuous():
        runs["continuous"] = continuous_batching(model, trace.requests, 8, 2048, eos, WallClock())

    timing = paired_benchmark(static, continuous, repeats=BATCHING_PAIRS, warmup=0, device=model.device,
                              progress=True, baseline_name="static", candidate_name="continuous")
    s, c = runs["static"], runs["continuous"]  # steps and tokens are the same in every pair
    steps_ratio = s.steps / c.steps
    ratios = [round(r, 3) for r in timing.ratios]
    pairs = f"median of {len(ratios)} pairs: " + ", ".join(f"{r:.2f}" for r in ratios)
    return {"trace": trace.describe(), "static": s.summary(), "continuous": c.summary(),
            "speedup": round(timing.speedup, 3), "pairs": len(ratios), "ratios": ratios,
            "steps_ratio": round(steps_ratio, 3),
            "headline": {f"lab 01: continuous vs static batching ({len(trace)} requests, 8 slots)":
                         f"{timing.speedup:.2f}x tokens/s ({pairs}), {steps_ratio:.2f}x fewer steps"}}


PAGING_SCALE = {"quick": 0.5, "full": 1.0}  # counted on a virtual clock: seconds, not minutes, at full size


def section_paging(ctx: dict) -> dict:
    """Lab 02's headline: the skewed trace in lab 01's KV memory (8 slots x 1,024 tokens), contiguous vs paged
    (blocks of 8): KV waste and sequences at once. Counted on a virtual clock: deterministic."""
    from servelab.engine import StepClock
    from servelab.reference.batching import continuous_batching
    from servelab.reference.paged import kv_usage, paged_continuous_batching

    model, eos = ctx["target"], ctx["tokenizer"].eos_token_id
    trace = standard_trace("skewed", encode=ctx["tokenizer"], scale=PAGING_SCALE["quick" if ctx["quick"] else "full"])
    slots, max_len, block = 8, 1024, 8
    base = continuous_batching(model, trace.requests, slots, 4096, eos, StepClock(), max_len)
    used, reserved = kv_usage(base, trace.requests, max_len)
    paged = paged_continuous_batching(model, trace.requests, 256, 4096, eos, StepClock(), slots * max_len // block,
                                      block, max_len)
    contiguous_waste = 1 - sum(used) / max(1, sum(reserved))
    return {"trace": trace.describe(), "contiguous_waste": round(contiguous_waste, 4),
            "paged_waste": round(paged.kv_waste_fraction, 4), "contiguous_max_running": base.max_running,
            "paged_max_running": paged.max_running, "preemptions": paged.preemptions,
            "headline": {f"lab 02: paged KV cache ({len(trace)} requests, {slots} x {max_len} tokens of KV)":
                         f"waste {contiguous_waste:.0%} -> {paged.kv_waste_fraction:.1%}, "
                         f"{paged.max_running / base.max_running:.0f}x the sequences at once"}}


SPEC_PAIRS = 3  # alternating plain/speculative pairs over the tour's prompts; the headline is their median


def section_speculative(ctx: dict) -> dict:
    """Lab 03's headline: greedy speculative decoding with the shipped draft at batch 1: tokens per target
    forward at gamma 4 (deterministic) and the wall-clock speedup over plain cached decoding at gamma 2 (the
    best gamma on a CPU, where the draft costs half a target step), median of alternating pairs."""
    from servelab.reference.speculative import speculative_greedy
    from servelab.reference.warmup import greedy_decode
    from servelab.timing import paired_benchmark

    target, draft, tok, n = ctx["target"], ctx["draft"], ctx["tokenizer"], ctx["new_tokens"]
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    runs = [speculative_greedy(target, draft, p, n, 4) for p in prompts]
    for p, run in zip(prompts, runs):  # the contract: speculation never changes the tokens
        assert run.tokens == greedy_decode(target, p, n), "speculative decoding changed the output"
    per_forward = sum(len(r.tokens) for r in runs) / sum(max(1, r.target_forwards) for r in runs)
    accepted, checked = sum(r.accepted for r in runs), sum(r.checked for r in runs)
    timing = paired_benchmark(lambda: [greedy_decode(target, p, n) for p in prompts],
                              lambda: [speculative_greedy(target, draft, p, n, 2) for p in prompts],
                              repeats=SPEC_PAIRS, warmup=0, device=target.device)
    pairs = ", ".join(f"{r:.2f}" for r in timing.ratios)
    return {"alpha": round(accepted / max(1, checked), 3), "tokens_per_target_forward": round(per_forward, 2),
            "speedup": round(timing.speedup, 3), "ratios": [round(r, 3) for r in timing.ratios],
            "headline": {"lab 03: speculative decoding, shipped draft, batch 1":
                         f"{per_forward:.2f} tokens per target forward (gamma 4), {timing.speedup:.2f}x tokens/s "
                         f"(gamma 2, median of {len(timing.ratios)} pairs: {pairs})"}}


def section_disaggregation(ctx: dict) -> dict:
    """Lab 04's headline: the mixed trace (chats decoding while long documents arrive), p99 TPOT of colocated
    continuous batching (one process, 2 threads) against 1 prefill + 1 decode worker (two processes, 1 thread
    each), one run each; and what the split costs in median TTFT."""
    from servelab.device import cuda_initialized
    from servelab.disagg.serve import serve_colocated, serve_disaggregated
    from servelab.metrics import summarize
    from servelab.reference.disaggregation import decode_worker, prefill_worker
    from servelab.reference.paged import paged_continuous_batching
    from servelab.workloads import mixed_trace

    if cuda_initialized():
        return {"skipped": "the tour's process holds the GPU, and worker processes cannot be forked from it: "
                           "lab 04 runs them on a GPU"}
    trace = mixed_trace(n_requests=20 if ctx["quick"] else 40, encode=ctx["tokenizer"])
    engine = {"max_running": 16, "num_blocks": 1024, "block_size": 16}
    colo = serve_colocated(paged_continuous_batching, ctx["target"], trace.requests, None, threads=2,
                           max_step_tokens=4096, **engine)
    disagg = serve_disaggregated(prefill_worker, decode_worker, ctx["target"], trace.requests, None, **engine)
    failed = {k: v for k, v in disagg.rank_errors.items() if v}
    if failed:
        raise RuntimeError(f"the disaggregated run failed: {failed}")
    c, d = (summarize(r.timelines(trace.requests)) for r in (colo, disagg))
    tpot = (c.percentiles["p99_tpot_ms"], d.percentiles["p99_tpot_ms"])
    return {"trace": trace.params, "colocated": c.to_dict(), "disaggregated": d.to_dict(),
            "headline": {f"lab 04: prefill/decode split ({len(trace)} requests, chats + long documents)":
                         f"p99 TPOT {tpot[0]:.0f} -> {tpot[1]:.0f} ms ({tpot[0] / tpot[1]:.1f}x), median TTFT "
                         f"{c.median_ttft_ms:.0f} -> {d.median_ttft_ms:.0f} ms (one run each)"}}


SECTIONS: list[tuple[str, Callable[[dict], dict]]] = [
    ("models", section_models),
    ("generation", section_generate),
    ("roofline", section_roofline),
    ("draft_acceptance", section_acceptance),
    ("batching", section_batching),
    ("paging", section_paging),
    ("speculative", section_speculative),
    ("disaggregation", section_disaggregation),
]


def run_tour(model=None, draft=None, device=None, quick: bool = False, console: Console | None = None) -> dict:
    console = console or Console()
    info = describe(device)  # the device the labs will use, and why; an impossible choice stops here
    console.print(f"[bold]servelab tour[/] on {info['device']} ({info['device_name']}), torch {info['torch']}, "
                  f"Triton {info['triton_mode']}")
    console.print(f"[dim]device {info['device']}: {escape(info['device_choice'])}")
    torch.manual_seed(0)
    if get_device(device).type == "cpu":
        torch.set_num_threads(1)  # small batches through a small model: one thread is fastest and steadiest
    ctx = {
        "console": console,
        "target": load_model(model, device=device),
        "draft": load_draft(draft, device=device),
        "tokenizer": load_tokenizer(model),
        "new_tokens": 24 if quick else 64,
        "acceptance_prompts": 4 if quick else 16,
        "quick": quick,
    }
    results = {"machine": info}
    for name, section in SECTIONS:
        results[name] = section(ctx)
    summary = Table(title="servelab tour: headline numbers")
    summary.add_column("what")
    summary.add_column("value", justify="right")
    g = results["generation"]
    summary.add_row("target decode, batch 1 (KV cache)", f"{g['target']['tokens_per_s']:.0f} tokens/s")
    summary.add_row("draft decode, batch 1 (KV cache)", f"{g['draft']['tokens_per_s']:.0f} tokens/s")
    a = results["draft_acceptance"]
    summary.add_row("draft acceptance alpha (greedy, 4 drafted/round)", f"{a['alpha']:.2f}  ({a['accepted']}/{a['checked']})")
    for name, _ in SECTIONS:
        for label, value in results[name].get("headline", {}).items():
            summary.add_row(label, value)
    console.print(summary)
    return results
