"""Lab 01 (batching): one request at a time, static batching, continuous batching.

Graded functions (see the notebook for their contracts):
``generate_one(model, request, eos_id, clock) -> Completion``,
``left_pad(prompts, pad_id=0) -> (input_ids, positions)``,
``static_batching(model, requests, batch_size, eos_id, clock, max_len=1024) -> EngineRun``,
``continuous_batching(model, requests, max_running, max_step_tokens, eos_id, clock, max_len=1024) -> EngineRun``.

Every engine's tokens are compared with each request decoded alone (lab 00's reference greedy decode,
itself checked against ``servelab.reference_greedy``). Scheduling is checked on a virtual ``StepClock``:
the time stamp of each token says in which engine step it was produced.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from grader.checks import compare_tokens, token_list
from grader.spec import Blocked, Context, Fail, GradingError, Lab, Learner, Outcome, _cached

LAB = Lab(
    id="01_batching",
    title="Batching: from one request at a time to static and continuous batching",
    notebook="batching.ipynb",
    module="batching",
    functions=("generate_one", "left_pad", "static_batching", "continuous_batching"),
)
DT = 0.01  # StepClock seconds per engine step


# ----------------------------------------------------------------------------- helpers
def _requests(ctx: Context, salt: str, n: int, prompt: tuple[int, int], out: tuple[int, int],
              rate: float | None = None, corpus: bool = False) -> list:
    """Fresh hidden requests: random-id or held-out prompts, uniform lengths, all at t=0 or Poisson."""
    from servelab.workloads import Request

    rng, vocab = ctx.rng(salt), ctx.model().config.vocab_size
    reqs, t = [], 0.0
    text_ids = None
    if corpus:
        from grader.checks import corpus_prompts

        text_ids = [p for _, p in corpus_prompts(ctx, n, prompt, salt)]
    for i in range(n):
        ids = text_ids[i] if text_ids else [rng.randrange(vocab) for _ in range(rng.randint(*prompt))]
        reqs.append(Request(i, ids, rng.randint(*out), t))
        if rate:
            t += rng.expovariate(rate)
    return reqs


def _alone(ctx: Context, request, eos_id) -> list[int]:
    from servelab.reference.warmup import greedy_decode

    key = ("alone", tuple(request.prompt_ids), request.max_new_tokens, eos_id)
    return _cached(key, lambda: greedy_decode(ctx.model(), request.prompt_ids, request.max_new_tokens, eos_id))


def _run(learner: Learner, fn: str, *args):
    from servelab.engine import EngineRun

    run = learner.fn(fn)(*args)
    if not isinstance(run, EngineRun):
        raise Fail(f"{fn} returned {type(run).__name__}; expected a servelab.engine.EngineRun")
    return run


def _check_outputs(ctx: Context, run, requests, eos_id, fn: str, case: str) -> int:
    """Every request's tokens equal it decoded alone; returns the number of tokens checked."""
    missing = [r.id for r in requests if r.id not in run.completions]
    if missing:
        raise Fail(f"{case}: {fn} returned no Completion for requests {missing[:8]} (of {len(requests)}); "
                   "every request must finish — is one starving in the queue?")
    total = 0
    for r in requests:
        c = run.completions[r.id]
        got = token_list(c.tokens, fn, f"{case}, request {r.id}")
        compare_tokens(_alone(ctx, r, eos_id), got, f"{case}: request {r.id} (prompt {len(r.prompt_ids)} tokens, "
                       f"max_new_tokens={r.max_new_tokens}, eos_id={eos_id})", ctx.model(), r.prompt_ids)
        if len(c.token_times) != len(got):
            raise Fail(f"{case}: request {r.id} has {len(got)} tokens but {len(c.token_times)} token times; "
                       "record each token with completion.add(token, clock.now(), ...)")
        if any(b < a for a, b in zip(c.token_times, c.token_times[1:])) or (c.token_times and c.token_times[0] < r.arrival_s):
            raise Fail(f"{case}: request {r.id}'s token times go backwards or start before its arrival "
                       f"({r.arrival_s:.3f} s): {c.token_times[:5]}")
        total += len(got)
    return total


def _tokens_per_step(run, requests) -> Counter:
    """StepClock: the time of a token tells the engine step that produced it."""
    return Counter(round(t / DT) for r in requests for t in run.completions[r.id].token_times)


def _eos_case(ctx: Context, requests) -> int:
    """An eos_id that is the very first greedy token of request 0 (so it must stop after one token)."""
    return _alone(ctx, replace(requests[0], max_new_tokens=1), None)[0]


# ----------------------------------------------------------------------------- part 1
@LAB.criterion("generate_one_matches", "correctness", 2, exercise="generate_one")
def generate_one_matches(learner: Learner, ctx: Context) -> Outcome:
    """Same tokens as decoding alone, one clock step per token, clear errors for bad requests."""
    from servelab.engine import Completion, StepClock
    from servelab.workloads import Request

    reqs = _requests(ctx, "one", 3 if ctx.quick else 5, (2, 48), (4, 24), corpus=False)
    reqs += _requests(ctx, "one-corpus", 2, (4, 40), (4, 24), corpus=True)
    reqs = [Request(i, r.prompt_ids, r.max_new_tokens, 0.0) for i, r in enumerate(reqs)]
    reqs.append(Request(len(reqs), reqs[0].prompt_ids[:1], 6, 0.0))  # prompt of one token
    reqs.append(Request(len(reqs), reqs[1].prompt_ids, 1, 0.0))  # max_new_tokens = 1
    eos = _eos_case(ctx, reqs)
    for r in reqs:
        for eos_id in ((None, eos) if r.id == 0 else (None,)):
            clock = StepClock(DT)
            c = learner.fn("generate_one")(ctx.model(), r, eos_id, clock)
            case = f"request {r.id} (prompt {len(r.prompt_ids)} tokens, max_new_tokens={r.max_new_tokens}, eos_id={eos_id})"
            if not isinstance(c, Completion):
                raise Fail(f"{case}: generate_one returned {type(c).__name__}; expected a servelab.engine.Completion")
            got = token_list(c.tokens, "generate_one", case)
            compare_tokens(_alone(ctx, r, eos_id), got, case, ctx.model(), r.prompt_ids)
            expected_times = [round((i + 1) * DT, 6) for i in range(len(got))]
            if [round(t, 6) for t in c.token_times] != expected_times:
                raise Fail(f"{case}: token times {c.token_times[:4]}... on a StepClock({DT}) should be "
                           f"{expected_times[:4]}...: call clock.step() once per forward, before stamping the token")
    for bad, why in (([], "an empty prompt"), ([1, 2], "max_new_tokens=0")):
        r = Request(99, bad, 0 if bad else 4, 0.0)
        try:
            learner.fn("generate_one")(ctx.model(), r, None, StepClock(DT))
        except ValueError:
            continue
        except Exception as err:  # noqa: BLE001
            raise Fail(f"{why}: raised {type(err).__name__}: {err}; expected a ValueError saying what is wrong") from None
        raise Fail(f"{why}: generate_one returned instead of raising ValueError (use servelab.generate.check_request)")
    return Outcome(True, f"{len(reqs) + 1} requests match decoding alone; bad requests raise ValueError",
                   {"cases": len(reqs) + 1})


@LAB.criterion("left_pad_layout", "correctness", 1, exercise="left_pad")
def left_pad_layout(learner: Learner, ctx: Context) -> Outcome:
    """Left padding with positions -1 for random prompt lengths (including a 1-token prompt)."""
    import torch

    rng = ctx.rng("pad")
    for case in range(4):
        prompts = [[rng.randrange(1, 4096) for _ in range(rng.randint(1, 20))] for _ in range(rng.randint(1, 5))]
        if case == 0:
            prompts.append([7])
        pad = rng.choice([0, 5])
        out = learner.fn("left_pad")(prompts, pad)
        if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
            raise Fail(f"left_pad returned {type(out).__name__}; expected a tuple (input_ids, positions) of tensors")
        ids, pos = out
        width = max(map(len, prompts))
        want = (len(prompts), width)
        if tuple(ids.shape) != want or tuple(pos.shape) != want:
            raise Fail(f"prompt lengths {list(map(len, prompts))}: shapes {tuple(ids.shape)} and {tuple(pos.shape)}, "
                       f"expected {want} for both")
        if ids.dtype != torch.long or pos.dtype != torch.long:
            raise Fail(f"dtypes {ids.dtype} / {pos.dtype}: both must be torch.long (the model embeds token ids)")
        for i, p in enumerate(prompts):
            exp_ids = [pad] * (width - len(p)) + p
            exp_pos = [-1] * (width - len(p)) + list(range(len(p)))
            if ids[i].tolist() != exp_ids or pos[i].tolist() != exp_pos:
                raise Fail(f"row {i} (prompt of {len(p)} tokens, pad_id={pad}): got ids {ids[i].tolist()} positions "
                           f"{pos[i].tolist()}; expected ids {exp_ids} positions {exp_pos}")
    return Outcome(True, "4 random batches padded correctly")


# ----------------------------------------------------------------------------- part 2
def _static_trace(ctx: Context):
    return _requests(ctx, "static", 7 if ctx.quick else 11, (1, 40), (1, 28 if ctx.quick else 40))


@LAB.criterion("static_matches_alone", "correctness", 3, exercise="static_batching")
def static_matches_alone(learner: Learner, ctx: Context) -> Outcome:
    """Hidden traces (more requests than the batch, 1-token prompts, max_new_tokens=1, EOS at step 1,
    arrivals during a batch): every request's tokens equal it decoded alone."""
    from servelab.engine import StepClock

    reqs = _static_trace(ctx)
    reqs[1].prompt_ids = reqs[1].prompt_ids[:1]
    reqs[2].max_new_tokens = 1
    eos = _eos_case(ctx, reqs)
    arriving = _requests(ctx, "static-arrivals", 6, (2, 30), (2, 20), rate=30.0)
    n = 0
    for case, rs, batch, eos_id in (("all at t=0, batch 4", reqs, 4, None), ("eos_id set, batch 3", reqs, 3, eos),
                                    ("Poisson arrivals, batch 4", arriving, 4, None)):
        run = _run(learner, "static_batching", ctx.model(), rs, batch, eos_id, StepClock(DT))
        n += _check_outputs(ctx, run, rs, eos_id, "static_batching", case)
    return Outcome(True, f"3 hidden traces, {n} tokens, all equal to decoding each request alone", {"tokens": n})


@LAB.criterion("static_accounting", "correctness", 1, exercise="static_batching")
def static_accounting(learner: Learner, ctx: Context) -> Outcome:
    """Steps and slot-steps match what batches of the given size must cost (the waste is measured)."""
    from servelab.engine import StepClock

    reqs, batch = _static_trace(ctx), 4
    run = _run(learner, "static_batching", ctx.model(), reqs, batch, None, StepClock(DT))
    lengths = [len(_alone(ctx, r, None)) for r in reqs]
    chunks = [lengths[i:i + batch] for i in range(0, len(lengths), batch)]
    expected = {"steps": sum(max(c) for c in chunks), "busy_slot_steps": sum(lengths),
                "computed_slot_steps": sum(len(c) * max(c) for c in chunks), "max_running": batch}
    got = {k: getattr(run, k) for k in expected}
    if got != expected:
        raise Fail(f"{len(reqs)} requests in batches of {batch}: got {got}, expected {expected}")
    return Outcome(True, f"{expected['steps']} steps, {run.wasted_fraction:.0%} of computed slot-steps wasted", expected)


def _bad_requests(learner: Learner, ctx: Context, fn: str, *engine_args) -> Outcome:
    from servelab.engine import StepClock
    from servelab.workloads import Request

    good = _requests(ctx, "bad-" + fn, 4, (3, 20), (2, 10))
    bad = [Request(4, [], 5, 0.0), Request(5, [1, 2, 3], 0, 0.0), Request(6, [3] * 60, 10, 0.0)]
    reqs = good[:2] + bad + good[2:]
    run = _run(learner, fn, ctx.model(), reqs, *engine_args, None, StepClock(DT), 64)
    for r in bad:
        c = run.completions.get(r.id)
        if c is None or c.tokens or c.finish_reason != "error" or not c.error:
            raise Fail(f"bad request {r.id} (prompt {len(r.prompt_ids)} tokens, max_new_tokens={r.max_new_tokens}, "
                       f"cache max_len=64) should come back as a Completion with finish_reason 'error', an error "
                       f"message and no tokens; got {c!r}. servelab.engine.reject_invalid does this.")
    _check_outputs(ctx, run, good, None, fn, "trace with 3 bad requests")
    return Outcome(True, "3 bad requests rejected with a message; the 4 others served correctly")


@LAB.criterion("static_bad_requests", "correctness", 1, exercise="static_batching")
def static_bad_requests(learner: Learner, ctx: Context) -> Outcome:
    """Empty prompt, max_new_tokens=0 and a prompt longer than the cache are rejected; others unaffected."""
    return _bad_requests(learner, ctx, "static_batching", 3)


# ----------------------------------------------------------------------------- part 3
@LAB.criterion("continuous_matches_alone", "correctness", 4, exercise="continuous_batching")
def continuous_matches_alone(learner: Learner, ctx: Context) -> Outcome:
    """Hidden traces: more requests than slots, arrivals while others run, very different lengths,
    1-token prompts, max_new_tokens=1, EOS at step 1, a token budget that binds."""
    from servelab.engine import StepClock

    mixed = _requests(ctx, "cont", 9 if ctx.quick else 14, (1, 48), (1, 40))
    mixed[1].prompt_ids = mixed[1].prompt_ids[:1]
    mixed[2].max_new_tokens = 1
    eos = _eos_case(ctx, mixed)
    arriving = _requests(ctx, "cont-arrivals", 10, (2, 40), (2, 30), rate=25.0, corpus=True)
    skewed = _requests(ctx, "cont-skew", 6, (2, 10), (1, 3)) + _requests(ctx, "cont-long", 2, (2, 10), (40, 60))
    for i, r in enumerate(skewed):
        r.id = i
    n = 0
    for case, rs, slots, budget, eos_id in (
        ("all at t=0, 4 slots", mixed, 4, 512, None),
        ("eos_id set, 3 slots", mixed, 3, 512, eos),
        ("Poisson arrivals, 4 slots", arriving, 4, 512, None),
        ("token budget 50, 5 slots", mixed, 5, 50, None),
        ("2 long and 6 short requests, 2 slots", skewed, 2, 512, None),
    ):
        run = _run(learner, "continuous_batching", ctx.model(), rs, slots, budget, eos_id, StepClock(DT))
        n += _check_outputs(ctx, run, rs, eos_id, "continuous_batching", case)
    return Outcome(True, f"5 hidden traces, {n} tokens, all equal to decoding each request alone", {"tokens": n})


@LAB.criterion("continuous_scheduling", "correctness", 3, exercise="continuous_batching")
def continuous_scheduling(learner: Learner, ctx: Context) -> Outcome:
    """No request starves; a finished request's slot is reused the next step; the running set never
    exceeds max_running; a step never computes more than the token budget (beyond one lone prompt)."""
    from servelab.engine import StepClock

    reqs, slots = _requests(ctx, "sched", 12, (2, 24), (1, 30)), 4
    run = _run(learner, "continuous_batching", ctx.model(), reqs, slots, 10_000, None, StepClock(DT))
    _check_outputs(ctx, run, reqs, None, "continuous_batching", "all at t=0, 4 slots")
    per_step = _tokens_per_step(run, reqs)
    # ideal: every step runs min(slots, unfinished) requests, since a slot is refilled the step after it frees
    remaining = [len(_alone(ctx, r, None)) for r in reqs]
    queue, running, step, expected = list(range(len(reqs))), [], 0, Counter()
    while queue or running:
        while queue and len(running) < slots:
            running.append(queue.pop(0))
        step += 1
        expected[step] = len(running)
        for i in running:
            remaining[i] -= 1
        running = [i for i in running if remaining[i] > 0]
    if per_step != expected:
        bad = min(s for s in set(per_step) | set(expected) if per_step[s] != expected[s])
        raise Fail(f"12 requests at t=0 with 4 slots: at engine step {bad} {per_step[bad]} requests produced a "
                   f"token, but {expected[bad]} should have (every slot busy while requests wait; a finished "
                   f"request's slot refilled at the next step; at most 4 running)")
    if run.max_running > slots:
        raise Fail(f"run.max_running = {run.max_running} > max_running = {slots}")
    # the token budget: 30 tokens per step, prompts of 12-20 tokens
    budget, budget_reqs = 30, _requests(ctx, "budget", 6, (12, 20), (3, 6))
    budget_run = _run(learner, "continuous_batching", ctx.model(), budget_reqs, 6, budget, None, StepClock(DT))
    _check_outputs(ctx, budget_run, budget_reqs, None, "continuous_batching", f"token budget {budget}")
    tokens, first_step = _tokens_per_step(budget_run, budget_reqs), Counter()
    prefill = Counter()  # step -> prompt tokens of the requests whose first token came from that step
    for r in budget_reqs:
        s = round(budget_run.completions[r.id].token_times[0] / DT)
        first_step[s] += 1
        prefill[s] += r.prompt_len
    for s in sorted(prefill):
        admitted = first_step[s]
        decodes = tokens[s] - admitted
        lone = admitted == 1 and decodes == 0  # a single prompt may exceed the budget when nothing else runs
        if prefill[s] + decodes > budget and not lone:
            raise Fail(f"token budget {budget}: step {s} prefilled {admitted} prompts ({prefill[s]} tokens) and decoded "
                       f"{decodes} requests = {prefill[s] + decodes} tokens; admit a request only while its prompt "
                       "fits what the running requests leave of the budget")
    return Outcome(True, f"{step} steps, every slot refilled at once; the token budget held",
                   {"steps": step, "max_running": run.max_running})


@LAB.criterion("continuous_bad_requests", "correctness", 1, exercise="continuous_batching")
def continuous_bad_requests(learner: Learner, ctx: Context) -> Outcome:
    """Empty prompt, max_new_tokens=0 and a prompt longer than the cache are rejected; others unaffected."""
    return _bad_requests(learner, ctx, "continuous_batching", 3, 512)


@LAB.criterion("metrics_agree", "correctness", 1, exercise="continuous_batching")
def metrics_agree(learner: Learner, ctx: Context) -> Outcome:
    """On the same Poisson trace and virtual clock, the learner's engine and the reference engine give
    the same TTFT, TPOT, ITL and E2E (vLLM's definitions, servelab.metrics)."""
    from servelab.engine import StepClock
    from servelab.metrics import summarize
    from servelab.reference.batching import continuous_batching as reference

    reqs = _requests(ctx, "metrics", 10, (4, 30), (2, 24), rate=20.0)
    theirs = summarize(_run(learner, "continuous_batching", ctx.model(), reqs, 3, 512, None, StepClock(DT)).timelines(reqs))
    ours = summarize(reference(ctx.model(), reqs, 3, 512, None, StepClock(DT)).timelines(reqs))
    keys = ("mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "mean_e2e_ms", "output_throughput")
    metrics = {k: round(getattr(theirs, k), 3) for k in keys}
    for k in keys:
        a, b = getattr(theirs, k), getattr(ours, k)
        if abs(a - b) > 0.05 * max(abs(b), 1e-9):
            raise Fail(f"{k}: your engine {a:.2f}, reference {b:.2f} on the same trace and StepClock; "
                       "the token times (and so the schedule) differ")
    return Outcome(True, "TTFT, TPOT, ITL, E2E and throughput agree with the reference engine", metrics)


# ----------------------------------------------------------------------------- performance
def _skewed(ctx: Context):
    from servelab.workloads import standard_trace

    return standard_trace("skewed", encode=ctx.tokenizer()).requests


@LAB.criterion("continuous_step_ratio", "performance", 1, exercise="continuous_batching", timeout_s=300)
def continuous_step_ratio(learner: Learner, ctx: Context) -> Outcome:
    """Engine steps of the reference static batching / your continuous batching, skewed trace, 8 slots."""
    from servelab.engine import StepClock
    from servelab.reference.batching import static_batching

    reqs, eos = _skewed(ctx), ctx.tokenizer().eos_token_id
    static = static_batching(ctx.model(), reqs, 8, eos, StepClock(DT))
    cont = _run(learner, "continuous_batching", ctx.model(), reqs, 8, 2048, eos, StepClock(DT))
    ratio = static.steps / max(1, cont.steps)
    ok = ctx.threshold is not None and ratio >= ctx.threshold
    return Outcome(ok, f"{static.steps} static steps / {cont.steps} continuous steps = {ratio:.2f}x "
                       f"({'reaches' if ok else 'is below'} {ctx.threshold}x)",
                   {"speedup": round(ratio, 3), "threshold": ctx.threshold, "static_steps": static.steps,
                    "continuous_steps": cont.steps, "slot_utilization": round(cont.slot_utilization, 3)})


@LAB.criterion("continuous_speedup", "performance", 3, exercise="continuous_batching", timeout_s=600)
def continuous_speedup(learner: Learner, ctx: Context) -> Outcome:
    """Throughput of your continuous batching over the reference static batching, skewed trace, 8 slots:
    median of paired, alternating wall-clock runs."""
    from servelab.engine import WallClock
    from servelab.reference.batching import static_batching
    from servelab.timing import paired_benchmark

    reqs, eos, model = _skewed(ctx), ctx.tokenizer().eos_token_id, ctx.model()
    fn = learner.fn("continuous_batching")
    timing = paired_benchmark(lambda: static_batching(model, reqs, 8, eos, WallClock()),
                              lambda: fn(model, reqs, 8, 2048, eos, WallClock()),
                              repeats=3, warmup=0, device=model.device)
    ok = ctx.threshold is not None and timing.speedup >= ctx.threshold
    return Outcome(ok, f"continuous / static throughput {timing.speedup:.2f}x (median of {len(timing.ratios)} "
                       f"paired runs) {'reaches' if ok else 'is below'} the {ctx.threshold}x threshold",
                   {"speedup": round(timing.speedup, 3), "threshold": ctx.threshold,
                    "ratios": [round(r, 3) for r in timing.ratios],
                    "static_s": [round(t, 3) for t in timing.baseline_s],
                    "continuous_s": [round(t, 3) for t in timing.candidate_s]})


@LAB.criterion("vllm_side_by_side", "gpu", 0, exercise="continuous_batching", timeout_s=600)
def vllm_side_by_side(learner: Learner, ctx: Context) -> Outcome:
    """Optional: vLLM serves the shipped model on the skewed trace next to your engine (needs vllm)."""
    import time

    from grader import environment
    from servelab.engine import WallClock
    from servelab.loader import resolve_model_path

    if reason := environment.vllm_missing(ctx.device):  # the one probe for "CUDA and vllm here"
        raise Blocked(reason)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model = ctx.model()  # loaded first: vLLM then reserves most of what GPU memory is left
    if model.device.type != ctx.device:
        raise GradingError(f"the grader's model is on {model.device}, but this run is on {ctx.device}: "
                           "the learner's engine must run on the device vLLM is compared on")
    reqs, eos = _skewed(ctx), ctx.tokenizer().eos_token_id
    llm = LLM(model=str(resolve_model_path()), max_num_seqs=8, enforce_eager=True)
    params = [SamplingParams(temperature=0, max_tokens=r.max_new_tokens) for r in reqs]
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=r.prompt_ids) for r in reqs], params)
    vllm_tps = sum(len(o.outputs[0].token_ids) for o in outs) / max(time.perf_counter() - t0, 1e-9)
    run = _run(learner, "continuous_batching", model, reqs, 8, 2048, eos, WallClock())
    ours = run.output_tokens / max(run.seconds, 1e-9)
    return Outcome(True, f"vLLM {vllm_tps:.0f} tokens/s, your engine {ours:.0f} tokens/s "
                         f"({len(reqs)} requests, 8 slots, on {model.device})",
                   {"vllm_tokens_per_s": round(vllm_tps, 1), "learner_tokens_per_s": round(ours, 1)})
