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

from grader.checks import compare_tokens, speed_verdict, timed_runs_differ, token_list
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


# Hints, each for one kind of failure (shown only with that failure).
HINTS = {
    "prefill": "the first token comes from the prefill: its logits are those of the prompt's last (rightmost) "
               "column, with prompt positions 0..len-1 and padding at -1",
    "decode": {"generate_one": "each decode step feeds the newest token at position len(prompt) + generated - 1",
               "static_batching": "each decode step feeds every row's newest token at position len(prompt_i) + "
                                  "generated_i - 1; a finished row feeds position -1",
               "continuous_batching": "a request decodes in its own slot at position len(prompt) + generated - 1, "
                                      "from the step after the one that prefilled it"},
    "length": "stop a request right after it emits eos_id (the EOS token is included) or when it has "
              "max_new_tokens tokens: completion.add(...) returns True exactly then, at every step, not only "
              "after the prefill",
    "times": "record each token with completion.add(token, clock.now(), eos_id, max_new_tokens) right after "
             "clock.step()",
}


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
                       f"max_new_tokens={r.max_new_tokens}, eos_id={eos_id})", ctx.model(), r.prompt_ids,
                       HINTS["prefill"], HINTS["decode"].get(fn, HINTS["decode"]["continuous_batching"]), HINTS["length"])
        _check_times(c, r, len(got), case)
        total += len(got)
    return total


def _check_times(c, r, n: int, case: str) -> None:
    if len(c.token_times) != n:
        raise Fail(f"{case}: request {r.id} has {n} tokens but {len(c.token_times)} token times", HINTS["times"])
    if any(b < a for a, b in zip(c.token_times, c.token_times[1:])) or (c.token_times and c.token_times[0] < r.arrival_s):
        raise Fail(f"{case}: request {r.id}'s token times go backwards or start before its arrival "
                   f"({r.arrival_s:.3f} s): {c.token_times[:5]}",
                   "admit a request only once clock.now() >= its arrival_s; stamp tokens with clock.now()")


def _check_model_inputs(probe, fn: str, case: str) -> None:
    """What the engine fed the model: per row, padding at -1 and the real tokens at consecutive positions.

    A pad at position 0 writes its K/V where the real token 0 goes; which write wins is undefined on a GPU,
    so a layout that happens to work on a CPU is still wrong.
    """
    for k, call in enumerate(probe.calls):
        if not call.cached:
            raise Fail(f"{case}: forward call {k} of {fn} got no KV cache view",
                       "pass cache.rows(slots) as the third argument of every model call")
        for row, pos in enumerate(call.positions):
            real = [p for p in pos if p >= 0]
            if any(p < -1 for p in pos) or real != list(range(real[0], real[0] + len(real)) if real else []):
                repeated = sorted({p for p in real if real.count(p) > 1})
                what = (f"position {repeated[0]} appears {real.count(repeated[0])} times" if repeated
                        else "the tokens' positions are not consecutive (padding must be exactly -1)")
                raise Fail(f"{case}: forward call {k} of {fn}, row {row}: positions {_short_list(pos)}: {what}",
                           "padding has position -1 so that nothing is stored for it; a pad at position 0 "
                           "overwrites the K/V of the real token 0 (on a GPU in no defined order)")


def _check_forward_tokens(probe, run, requests, fn: str, case: str) -> dict:
    """Each prompt token and each fed-back token is computed once: the KV cache holds everything else."""
    needed = sum(r.prompt_len + max(0, len(run.completions[r.id].tokens) - 1) for r in requests)
    got = probe.real_forward_tokens
    if got > needed:
        raise Fail(f"{case}: {fn} asked the model to compute {got} tokens (not counting padding); this trace "
                   f"needs {needed}: each prompt once, then one token per request per decode step",
                   "the cache already holds every earlier token: after the prefill, feed each running request "
                   "only its newest token — never its whole sequence again")
    return {"forward_tokens": got, "needed_forward_tokens": needed}


def _short_list(xs: list, n: int = 12) -> str:
    return str(xs) if len(xs) <= n else str(xs[:n])[:-1] + ", ...]"


def _tokens_per_step(run, requests) -> Counter:
    """StepClock: the time of a token tells the engine step that produced it."""
    return Counter(round(t / DT) for r in requests for t in run.completions[r.id].token_times)


def _eos_case(ctx: Context, requests) -> int:
    """An eos_id that is the very first greedy token of request 0 (so it must stop after one token)."""
    return _alone(ctx, replace(requests[0], max_new_tokens=1), None)[0]


def _later_eos_case(ctx: Context, requests) -> tuple[int, int, int]:
    """(eos_id, request id, step): a token that request ``id`` first produces at a later decode step (>= 2),
    so that stopping on EOS is tested after the prefill's token too."""
    for r in requests:
        out = _alone(ctx, r, None)
        for i in range(2, len(out)):
            if out[i] not in out[:i]:
                return out[i], r.id, i
    raise RuntimeError("no request of this trace produces a new token after step 2; lengthen the trace")


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
    later_eos, later_id, _ = _later_eos_case(ctx, reqs)
    for r in reqs:
        for eos_id in ((None, eos) if r.id == 0 else (later_eos,) if r.id == later_id else (None,)):
            clock = StepClock(DT)
            c = learner.fn("generate_one")(ctx.model(), r, eos_id, clock)
            case = f"request {r.id} (prompt {len(r.prompt_ids)} tokens, max_new_tokens={r.max_new_tokens}, eos_id={eos_id})"
            if not isinstance(c, Completion):
                raise Fail(f"{case}: generate_one returned {type(c).__name__}; expected a servelab.engine.Completion")
            got = token_list(c.tokens, "generate_one", case)
            compare_tokens(_alone(ctx, r, eos_id), got, case, ctx.model(), r.prompt_ids,
                           HINTS["prefill"], HINTS["decode"]["generate_one"], HINTS["length"])
            expected_times = [round((i + 1) * DT, 6) for i in range(len(got))]
            if [round(t, 6) for t in c.token_times] != expected_times:
                raise Fail(f"{case}: token times {c.token_times[:4]}... on a StepClock({DT}) should be "
                           f"{expected_times[:4]}...", "call clock.step() once per forward, before stamping the token")
    for bad, why in (([], "an empty prompt"), ([1, 2], "max_new_tokens=0")):
        r = Request(99, bad, 0 if bad else 4, 0.0)
        try:
            learner.fn("generate_one")(ctx.model(), r, None, StepClock(DT))
        except ValueError:
            continue
        except Exception as err:  # noqa: BLE001
            raise Fail(f"{why}: raised {type(err).__name__}: {err}; expected a ValueError saying what is wrong",
                       "servelab.generate.check_request raises the right ValueError") from None
        raise Fail(f"{why}: generate_one returned instead of raising ValueError",
                   "call servelab.generate.check_request(prompt, max_new_tokens, vocab_size, max_len) first")
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
            raise Fail(f"left_pad returned {type(out).__name__}; expected a tuple (input_ids, positions) of tensors",
                       "return ids, positions")
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
                           f"{pos[i].tolist()}; expected ids {exp_ids} positions {exp_pos}",
                           "row i ends with prompt i: ids[i, T-len:] = prompt, positions[i, T-len:] = 0..len-1, "
                           "everything before is pad_id / -1")
    return Outcome(True, "4 random batches padded correctly")


# ----------------------------------------------------------------------------- part 2
def _static_trace(ctx: Context):
    return _requests(ctx, "static", 7 if ctx.quick else 11, (1, 40), (1, 28 if ctx.quick else 40))


@LAB.criterion("static_matches_alone", "correctness", 3, exercise="static_batching")
def static_matches_alone(learner: Learner, ctx: Context) -> Outcome:
    """Hidden traces (more requests than the batch, 1-token prompts, max_new_tokens=1, EOS at the first and at
    a later step, arrivals during a batch): every request's tokens equal it decoded alone."""
    from servelab.engine import StepClock

    reqs = _static_trace(ctx)
    reqs[1].prompt_ids = reqs[1].prompt_ids[:1]
    reqs[2].max_new_tokens = 1
    eos = _eos_case(ctx, reqs)
    later_eos, later_id, step = _later_eos_case(ctx, reqs)
    arriving = _requests(ctx, "static-arrivals", 6, (2, 30), (2, 20), rate=30.0)
    n = 0
    for case, rs, batch, eos_id in (("all at t=0, batch 4", reqs, 4, None), ("eos_id set, batch 3", reqs, 3, eos),
                                    (f"eos_id first produced by request {later_id} at decode step {step}, batch 4",
                                     reqs, 4, later_eos),
                                    ("Poisson arrivals, batch 4", arriving, 4, None)):
        run = _run(learner, "static_batching", ctx.model(), rs, batch, eos_id, StepClock(DT))
        n += _check_outputs(ctx, run, rs, eos_id, "static_batching", case)
    return Outcome(True, f"4 hidden traces, {n} tokens, all equal to decoding each request alone", {"tokens": n})


def _model_inputs(learner: Learner, ctx: Context, fn: str, engine_args: tuple, case: str) -> Outcome:
    from grader.probes import CountingModel
    from servelab.engine import StepClock

    reqs = _requests(ctx, "inputs-" + fn, 7, (1, 30), (2, 16))
    reqs[0].prompt_ids = reqs[0].prompt_ids[:1]
    probe = CountingModel(ctx.model())
    run = _run(learner, fn, probe, reqs, *engine_args, None, StepClock(DT))
    _check_outputs(ctx, run, reqs, None, fn, case)
    _check_model_inputs(probe, fn, case)
    counts = _check_forward_tokens(probe, run, reqs, fn, case)
    return Outcome(True, f"{len(probe.calls)} forward calls: padding at -1, every position once, "
                         f"{counts['forward_tokens']} tokens computed (each prompt once, one per decode step)", counts)


@LAB.criterion("static_model_inputs", "correctness", 1, exercise="static_batching")
def static_model_inputs(learner: Learner, ctx: Context) -> Outcome:
    """What static batching feeds the model: padding at position -1, no position twice in a row, each
    prompt token and each new token computed once."""
    return _model_inputs(learner, ctx, "static_batching", (3,), "7 requests at t=0, batch 3")


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
        wrong = ", ".join(f"{k} {got[k]} (expected {expected[k]})" for k in expected if got[k] != expected[k])
        raise Fail(f"{len(reqs)} requests at t=0 in batches of {batch}: {wrong}",
                   "steps: one per engine step (one clock.step()); computed_slot_steps += rows in the batch every "
                   "step; busy_slot_steps += rows that still needed a token; max_running: the largest batch")
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
                       f"message and no tokens; got {c!r}",
                       "split the requests with servelab.engine.reject_invalid(requests, vocab_size, max_len) "
                       "before scheduling, and put its rejections into run.completions")
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
    1-token prompts, max_new_tokens=1, EOS at the first and at a later step, a token budget that binds."""
    from servelab.engine import StepClock

    mixed = _requests(ctx, "cont", 9 if ctx.quick else 14, (1, 48), (1, 40))
    mixed[1].prompt_ids = mixed[1].prompt_ids[:1]
    mixed[2].max_new_tokens = 1
    eos = _eos_case(ctx, mixed)
    later_eos, later_id, step = _later_eos_case(ctx, mixed)
    arriving = _requests(ctx, "cont-arrivals", 10, (2, 40), (2, 30), rate=25.0, corpus=True)
    skewed = _requests(ctx, "cont-skew", 6, (2, 10), (1, 3)) + _requests(ctx, "cont-long", 2, (2, 10), (40, 60))
    for i, r in enumerate(skewed):
        r.id = i
    n = 0
    for case, rs, slots, budget, eos_id in (
        ("all at t=0, 4 slots", mixed, 4, 512, None),
        ("eos_id set, 3 slots", mixed, 3, 512, eos),
        (f"eos_id first produced by request {later_id} at decode step {step}, 4 slots", mixed, 4, 512, later_eos),
        ("Poisson arrivals, 4 slots", arriving, 4, 512, None),
        ("token budget 50, 5 slots", mixed, 5, 50, None),
        ("2 long and 6 short requests, 2 slots", skewed, 2, 512, None),
    ):
        run = _run(learner, "continuous_batching", ctx.model(), rs, slots, budget, eos_id, StepClock(DT))
        n += _check_outputs(ctx, run, rs, eos_id, "continuous_batching", case)
    return Outcome(True, f"6 hidden traces, {n} tokens, all equal to decoding each request alone", {"tokens": n})


@LAB.criterion("continuous_model_inputs", "correctness", 2, exercise="continuous_batching")
def continuous_model_inputs(learner: Learner, ctx: Context) -> Outcome:
    """What continuous batching feeds the model: padding at position -1, no position twice in a row, each
    prompt token and each new token computed once (no re-running of whole sequences)."""
    return _model_inputs(learner, ctx, "continuous_batching", (3, 512), "7 requests at t=0, 3 slots")


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
        lo, hi = max(1, bad - 2), bad + 3
        window = ", ".join(f"step {k}: {per_step[k]} (expected {expected[k]})" for k in range(lo, hi))
        if per_step[bad] > slots:
            hint = "never run more than max_running requests at once"
        elif per_step[bad] < expected[bad]:
            hint = ("a slot sat idle while requests waited: retire a request in the step it finishes and give its "
                    "slot to the next waiting request at the start of the next step")
        else:
            hint = ("requests ran in another order than they arrived: admit FCFS, sorted by (arrival_s, id), so "
                    "they finish at other steps than expected")
        raise Fail(f"12 requests at t=0 with 4 slots: the number of requests that produced a token differs first "
                   f"at engine step {bad} (steps count from 1): {window}", hint)
    if run.max_running > slots:
        raise Fail(f"run.max_running = {run.max_running} > max_running = {slots}",
                   "admit a request only while fewer than max_running are running")
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
            raise Fail(f"token budget {budget}: step {s} (counting from 1) prefilled {admitted} prompts "
                       f"({prefill[s]} tokens) and decoded {decodes} requests: {prefill[s] + decodes} tokens",
                       "admit a request only while its prompt fits what the running requests leave of the budget "
                       "(each running request costs one token)")
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
    case = "10 requests, Poisson arrivals, 3 slots"
    run = _run(learner, "continuous_batching", ctx.model(), reqs, 3, 512, None, StepClock(DT))
    _check_outputs(ctx, run, reqs, None, "continuous_batching", case)  # tokens and their times are sane first
    ref = reference(ctx.model(), reqs, 3, 512, None, StepClock(DT))
    theirs, ours = summarize(run.timelines(reqs)), summarize(ref.timelines(reqs))
    keys = ("mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "mean_e2e_ms", "output_throughput")
    metrics = {k: round(getattr(theirs, k), 3) for k in keys}
    for k in keys:
        a, b = getattr(theirs, k), getattr(ours, k)
        if abs(a - b) > 0.05 * max(abs(b), 1e-9):
            r = next(r for r in reqs if run.completions[r.id].token_times != ref.completions[r.id].token_times)
            got, want = run.completions[r.id].token_times, ref.completions[r.id].token_times
            raise Fail(f"{case}: {k} is {a:.2f} for your engine, {b:.2f} for the reference on the same trace and "
                       f"StepClock. The schedules differ first at request {r.id} (arrives {r.arrival_s:.3f} s): its "
                       f"token times are {_short_list([round(t, 3) for t in got], 6)}, the reference's "
                       f"{_short_list([round(t, 3) for t in want], 6)}")
    return Outcome(True, "TTFT, TPOT, ITL, E2E and throughput agree with the reference engine", metrics)


# ----------------------------------------------------------------------------- performance
WALL_SCALE = 0.5  # the wall-clock criterion times the skewed trace at half size: 3 pairs in about a minute
HALF_TRACE_STEP_BAR = 1.8  # on that half trace the solution takes 2.25x fewer steps than static batching


def _skewed(ctx: Context, scale: float = 1.0):
    from servelab.workloads import standard_trace

    return standard_trace("skewed", encode=ctx.tokenizer(), scale=scale).requests


def static_steps(requests, lengths: dict[int, int], batch: int) -> int:
    """Steps static batching needs for these output lengths (FCFS batches of ``batch``, all at t=0): each batch
    runs as long as its longest request. Same count as the reference static_batching, without running it."""
    order = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    if any(r.arrival_s > 0 for r in order):
        raise ValueError("static_steps counts traces whose requests all arrive at t=0")
    return sum(max(lengths[r.id] for r in order[i:i + batch]) for i in range(0, len(order), batch))


@LAB.criterion("continuous_step_ratio", "performance", 3, exercise="continuous_batching", timeout_s=240)
def continuous_step_ratio(learner: Learner, ctx: Context) -> Outcome:
    """Engine steps static batching needs / steps your continuous batching takes, skewed trace (128
    requests), 8 slots: deterministic, so it is this lab's main speed figure."""
    from grader.probes import CountingClock
    from servelab.reference.batching import continuous_batching as reference

    reqs, eos = _skewed(ctx), ctx.tokenizer().eos_token_id
    ref = reference(ctx.model(), reqs, 8, 2048, eos, CountingClock(DT))  # trusted output lengths
    clock = CountingClock(DT)
    run = _run(learner, "continuous_batching", ctx.model(), reqs, 8, 2048, eos, clock)
    for r in reqs:
        got = run.completions.get(r.id)
        if got is None or list(got.tokens) != ref.completions[r.id].tokens:
            raise Fail(f"skewed trace: request {r.id}'s tokens differ from the reference engine's; the step count "
                       "only counts for a correct run (the correctness criteria show where)")
    if run.steps != clock.steps:
        raise Fail(f"run.steps is {run.steps} but the engine called clock.step() {clock.steps} times",
                   "count one step per iteration of the engine loop, and call clock.step() once in it")
    static = static_steps(reqs, {r.id: len(ref.completions[r.id].tokens) for r in reqs}, 8)
    ratio = static / max(1, clock.steps)
    metrics = {"speedup": round(ratio, 3), "threshold": ctx.threshold, "static_steps": static,
               "continuous_steps": clock.steps, "slot_utilization": round(run.slot_utilization, 3)}
    verdict = f"{static} static steps / {clock.steps} continuous steps = {ratio:.2f}x fewer steps"
    if ctx.threshold is not None and ratio >= ctx.threshold:
        return Outcome(True, f"{verdict} (threshold {ctx.threshold}x)", metrics)
    raise Fail(f"{verdict}, below the {ctx.threshold}x threshold; {run.slot_utilization:.0%} of slot-steps were busy",
               "keep every slot busy: admit waiting requests as soon as a slot frees (the same step it frees "
               "is too early, the next step is right), and never hold a finished request in its slot")


def _paired_speedup(learner: Learner, ctx: Context, model, reqs, eos, what: str) -> Outcome:
    """Wall-clock throughput of the learner's continuous batching over the reference static batching, 8 slots,
    alternating pairs in one process; the step counts of the same runs are the deterministic figure."""
    from grader.probes import CountingClock, CountingModel
    from servelab.engine import WallClock
    from servelab.reference.batching import static_batching
    from servelab.timing import paired_benchmark

    fn = learner.fn("continuous_batching")
    runs: dict[str, list] = {"static": [], "continuous": []}

    def static():
        runs["static"].append(static_batching(model, reqs, 8, eos, WallClock()))

    def continuous():
        runs["continuous"].append(_run(learner, "continuous_batching", model, reqs, 8, 2048, eos, WallClock()))

    timing = paired_benchmark(static, continuous, repeats=2 if ctx.quick else 3, warmup=0, device=model.device)
    differ = timed_runs_differ(runs["static"], runs["continuous"], reqs, "static batching")
    step_ratio = runs["static"][0].steps / max(1, runs["continuous"][0].steps)
    deterministic = f"{step_ratio:.2f}x fewer steps in the same runs"
    hint = ""
    if timing.speedup < (ctx.threshold or 0) * 0.75:  # a clear miss: look at how the engine calls the model
        probe = CountingModel(model)
        small = _requests(ctx, "speed-probe", 6, (4, 20), (4, 12))
        small = [replace(r, prompt_ids=[t % model.config.vocab_size for t in r.prompt_ids]) for r in small]
        steps = fn(probe, small, 3, 512, None, CountingClock(DT)).steps
        if len(probe.calls) > 2 * max(1, steps):
            hint = (f"your engine made {len(probe.calls)} model calls in {steps} steps on a small trace: run one "
                    "batched decode forward for all running requests per step (plus one prefill for admissions)")
    return speed_verdict(what, timing, ctx.threshold, ctx.device_class, deterministic, step_ratio >= HALF_TRACE_STEP_BAR,
                         {"static_steps": runs["static"][0].steps, "continuous_steps": runs["continuous"][0].steps,
                          "requests_differing_from_static": differ},
                         hint)


@LAB.criterion("continuous_speedup", "performance", 1, exercise="continuous_batching", timeout_s=240)
def continuous_speedup(learner: Learner, ctx: Context) -> Outcome:
    """Wall-clock throughput of your continuous batching over the reference static batching, skewed trace
    at half size (64 requests), 8 slots: median of 3 alternating pairs."""
    reqs = _skewed(ctx, WALL_SCALE)
    return _paired_speedup(learner, ctx, ctx.model(), reqs, ctx.tokenizer().eos_token_id,
                           f"skewed trace at half size ({len(reqs)} requests, 8 slots): continuous / static throughput")


@LAB.criterion("preset_speedup", "gpu", 2, exercise="continuous_batching", timeout_s=600)
def preset_speedup(learner: Learner, ctx: Context) -> Outcome:
    """On a GPU, a model of real shape: the same comparison with the bench-1b preset (1.1B, random weights, no
    EOS: each request runs to its length), where a step costs what its weights and batch cost, not launches.
    Off a GPU only a test runs it, with bench-tiny on a quarter of that trace."""
    if ctx.threshold is None:
        raise Blocked(f"no bar for device class {ctx.device_class!r}: measure one with scripts/check_gpu.py and add "
                      "it to grader/thresholds.py")
    gpu = ctx.device == "cuda"
    name, scale = ("bench-1b", WALL_SCALE) if gpu else ("bench-tiny", WALL_SCALE / 4)
    model = ctx.model(name)
    vocab = model.config.vocab_size  # the trace's token ids, folded into the preset's vocabulary
    reqs = [replace(r, prompt_ids=[t % vocab for t in r.prompt_ids]) for r in _skewed(ctx, scale)]
    return _paired_speedup(learner, ctx, model, reqs, None,
                           f"{name}, skewed trace at {scale:g} of its size ({len(reqs)} requests, 8 slots): continuous "
                           "/ static throughput")


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
