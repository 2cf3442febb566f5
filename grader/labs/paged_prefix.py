"""Lab 02, stretch: prefix caching on the paged engine, graded separately.

Graded: ``prefix_cached_batching(model, requests, max_running, max_step_tokens, eos_id, clock, num_blocks,
block_size, max_len=1024, kernels=None) -> PagedEngineRun``: ``paged_continuous_batching``'s contract and
greedy tokens, plus ``run.prompt_tokens`` (tokens of every context admitted) and ``run.prefix_hit_tokens``
(those served from cached blocks instead of computed).

``add_criteria(LAB)`` registers the two criteria on lab 02's ``Lab``. Tokens are compared with decoding
alone; what the run reports is checked against what the model was asked to compute (a ``CountingModel``):
every forward row computes its real tokens and produces one output token, so the model computes
``prompt_tokens - prefix_hit_tokens + output_tokens - admissions`` tokens, admissions being the run's
occupancy spans.
"""

from __future__ import annotations

from grader.spec import Context, Fail, Lab, Learner, Outcome

EXERCISE = "prefix_cached_batching"
DT = 0.01
BLOCK = 4
MIN_SAVING = 3.0  # the CPU / GPU threshold (a token count: the same on every device); see _prefill_saving


def _engine(learner: Learner, *args):
    from grader.labs.lab02_paged import _engine  # lab02_paged imports this module: import late

    return _engine(learner, *args, exercise=EXERCISE)


def _shared_trace(ctx: Context, salt: str, n: int, system: int, question: tuple[int, int], out: tuple[int, int],
                  rate: float, systems: int = 1) -> list:
    """Requests that start with one of ``systems`` hidden system prompts of ``system`` tokens (a multiple of
    BLOCK) followed by a distinct question; Poisson arrivals at ``rate``. Then three later requests: the
    system prompt alone and a copy of request 0 (whose length is a multiple of BLOCK), both entirely cached,
    an echo whose second block repeats its first, and the system prompt shifted by one block (equal blocks
    after different prefixes)."""
    from servelab.workloads import Request

    rng, vocab = ctx.rng(salt), ctx.model().config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(system)] for _ in range(systems)]
    reqs, t = [], 0.0
    for i in range(n):
        q = rng.randint(*question)
        if i == 0:
            q = max(BLOCK, q - q % BLOCK)  # request 0's prompt fills whole blocks: its copy is a full hit
        ids = prompts[i % systems] + [rng.randrange(vocab) for _ in range(q)]
        reqs.append(Request(i, ids, rng.randint(*out), t))
        t += rng.expovariate(rate)
    reqs.append(Request(n, list(prompts[0]), rng.randint(*out), t))
    reqs.append(Request(n + 1, list(reqs[0].prompt_ids), rng.randint(*out), t + 2 * DT))
    echo = prompts[0][:BLOCK] + prompts[0][:system - BLOCK] + [rng.randrange(vocab) for _ in range(3)]
    reqs.append(Request(n + 2, echo, out[1], t + 4 * DT))
    shifted = prompts[0][BLOCK:] + [rng.randrange(vocab) for _ in range(3)]  # its blocks, one block earlier
    reqs.append(Request(n + 3, shifted, out[1], t + 4 * DT))
    return reqs


def _check_report(run, probe, requests, case: str) -> dict:
    """prompt_tokens / prefix_hit_tokens consistent with the run and with what the model computed."""
    served = [r for r in requests if run.completions[r.id].tokens]
    hits, prompt = run.prefix_hit_tokens, run.prompt_tokens
    for name, v in (("prompt_tokens", prompt), ("prefix_hit_tokens", hits)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise Fail(f"{case}: run.{name} is {v!r}; expected an int")
    least = sum(r.prompt_len for r in served)
    if prompt < least or (run.preemptions == 0 and prompt != least):
        raise Fail(f"{case}: run.prompt_tokens is {prompt}; the {len(served)} served requests' prompts hold {least} "
                   f"tokens ({run.preemptions} preemptions)",
                   "add the tokens of each context you admit (prompt, plus generated tokens on a re-admission)")
    if not 0 <= hits < prompt:
        raise Fail(f"{case}: run.prefix_hit_tokens is {hits} with prompt_tokens {prompt}; expected 0 <= hits < "
                   "prompt tokens (each admission computes at least its last token)")
    admissions = len(run.occupancy)
    want = prompt - hits + run.output_tokens - admissions
    got = probe.real_forward_tokens
    if got != want:
        raise Fail(f"{case}: the model computed {got} tokens (not counting padding), but the run reports "
                   f"prompt_tokens {prompt} - prefix_hit_tokens {hits} + {run.output_tokens} output tokens - "
                   f"{admissions} admissions = {want}",
                   "prefill only the tokens after the cached ones, count as hits exactly the tokens you did not "
                   "compute, and feed each running request one token per decode step" if got > want else
                   "prefix_hit_tokens counts only tokens whose K/V came from cached blocks")
    return {"prompt_tokens": prompt, "prefix_hit_tokens": hits, "forward_tokens": got}


def prefix_cache_matches_alone(learner: Learner, ctx: Context) -> Outcome:
    """Hidden traces, every request's tokens equal to decoding it alone: a shared system prompt (with a
    prompt that is entirely cached, and with eos_id), ordinary prompts, and so few blocks that cached
    blocks must be evicted and sequences preempted; the reported hit counts agree with what was computed."""
    from dataclasses import replace

    from grader.labs.lab01_batching import _check_outputs, _eos_case, _requests
    from grader.probes import CountingModel
    from servelab.engine import StepClock
    from servelab.paged.cache import blocks_for

    n = 8 if ctx.quick else 12
    shared = _shared_trace(ctx, "prefix-shared", n, 8 * BLOCK, (1, 10), (2, 16), rate=30.0)
    plain = _requests(ctx, "prefix-plain", n, (2, 20), (2, 20), rate=40.0)
    two = _shared_trace(ctx, "prefix-tight", n, 6 * BLOCK, (1, 10), (2, 20), rate=60.0, systems=2)
    # tight: the largest request alone and a little more, far less than two system prompts and 4 runners
    tight = max(blocks_for(r.prompt_len + r.max_new_tokens - 1, BLOCK) for r in two) + 3
    big = replace(two[-1], id=len(two), prompt_ids=two[-1].prompt_ids[:4], max_new_tokens=4 * tight + 1)
    eos = _eos_case(ctx, shared)
    cases = (("shared system prompt, 256 blocks of 4", shared, 256, None),
             ("shared system prompt, 256 blocks of 4, eos_id set", shared, 256, eos),
             ("ordinary prompts, 256 blocks of 4", plain, 256, None),
             (f"two system prompts, {tight} blocks of 4 (eviction, preemption)", two + [big], tight, None))
    tokens, report = 0, {}
    for case, rs, blocks, eos_id in cases:
        probe = CountingModel(ctx.model())
        run = _engine(learner, probe, rs, 4, 64, eos_id, StepClock(DT), blocks, BLOCK)
        served = [r for r in rs if r is not big]
        tokens += _check_outputs(ctx, run, served, eos_id, EXERCISE, case)
        _check_kv(run, blocks, case)
        if big in rs:
            c = run.completions.get(big.id)
            if c is None or c.tokens or c.finish_reason != "error" or not c.error:
                raise Fail(f"{case}: request {big.id} needs more blocks than the cache has; expected a Completion "
                           f"with finish_reason 'error' and a message; got {c!r}")
        report[case] = _check_report(run, probe, served, case) | {"preemptions": run.preemptions}
        if rs is shared and run.prefix_hit_tokens == 0:
            raise Fail(f"{case}: prefix_hit_tokens is 0: no request shared the {8 * BLOCK}-token system prompt's "
                       "blocks, though requests arrived after its first prefill",
                       "after a prefill, enter each full prompt block under hash((parent hash, its tokens)); on "
                       "admission share the longest run of cached blocks from the prompt's start")
    first = report[cases[0][0]]
    rate = first["prefix_hit_tokens"] / first["prompt_tokens"]
    tight_case = report[cases[-1][0]]
    return Outcome(True, f"4 hidden traces, {tokens} tokens, all equal to decoding alone; shared system prompt: "
                         f"hit rate {rate:.0%} ({first['prefix_hit_tokens']} of {first['prompt_tokens']} prompt "
                         f"tokens from the cache); {tight} blocks: {tight_case['preemptions']} preemptions",
                   {"tokens": tokens, "hit_rate": round(rate, 3), "tight_preemptions": tight_case["preemptions"]})


def _check_kv(run, num_blocks: int, case: str) -> None:
    from grader.labs.lab02_paged import _check_kv_records  # lab02_paged imports this module: import late

    _check_kv_records(run, num_blocks, BLOCK, case, "reserved: blocks that sequences hold x block size, a shared "
                      "block once (a cached block nobody holds counts as free); used: their tokens, a shared block's "
                      "once. A block counted free while a sequence holds it was shared without a reference")


def _prefill_tokens(run, probe) -> int:
    """Prompt tokens the model computed: every real token fed, less one fed-back token per output token
    not produced by a prefill."""
    return probe.real_forward_tokens - (run.output_tokens - len(run.occupancy))


def prefix_cache_saves_prefill(learner: Learner, ctx: Context) -> Outcome:
    """Deterministic: on a hidden trace of 20 requests sharing a 96-token system prompt (blocks of 8, arrivals
    over time), the prompt tokens the model computes, against paged_continuous_batching's on the same trace."""
    from grader.probes import CountingModel
    from servelab.engine import StepClock
    from servelab.reference.paged import paged_continuous_batching

    reqs = _shared_trace(ctx, "prefix-saving", 16, 96, (4, 16), (4, 16), rate=20.0)
    model, block, num_blocks = ctx.model(), 8, 512
    base_probe, probe = CountingModel(model), CountingModel(model)
    base = paged_continuous_batching(base_probe, reqs, 8, 512, None, StepClock(DT), num_blocks, block)
    run = _engine(learner, probe, reqs, 8, 512, None, StepClock(DT), num_blocks, block)
    differ = [r.id for r in reqs if r.id not in run.completions
              or list(run.completions[r.id].tokens) != list(base.completions[r.id].tokens)]
    if differ:
        raise Fail(f"{len(differ)} of {len(reqs)} requests (e.g. {differ[:5]}) differ from "
                   "paged_continuous_batching's tokens on the same trace; a saving counts only for a run that "
                   "served the trace")
    computed, baseline = _prefill_tokens(run, probe), _prefill_tokens(base, base_probe)
    ratio = baseline / max(1, computed)
    need = ctx.threshold
    metrics = {"speedup": round(ratio, 3), "threshold": need, "prefill_tokens": computed,
               "baseline_prefill_tokens": baseline, "hit_rate": round(run.prefix_hit_rate, 3)}
    verdict = (f"{len(reqs)} requests sharing a 96-token system prompt: the model computed {computed} prompt tokens "
               f"against paged_continuous_batching's {baseline} ({ratio:.1f}x fewer, {computed / max(1, baseline):.0%}); "
               f"reported hit rate {run.prefix_hit_rate:.0%}")
    if need is not None and ratio >= need:
        return Outcome(True, f"{verdict}; threshold {need}x fewer (at most {1 / need:.0%})", metrics)
    raise Fail(f"{verdict}; the threshold is {need or MIN_SAVING}x fewer (at most {1 / (need or MIN_SAVING):.0%})",
               "a request that arrives after the system prompt was prefilled should compute only its own "
               "question and the system prompt's last partial block")


def add_criteria(lab: Lab) -> None:
    """Register the prefix-caching criteria (exercise ``prefix_cached_batching``) on lab 02's ``Lab``."""
    if EXERCISE not in lab.functions:
        lab.functions = (*lab.functions, EXERCISE)
    lab.criterion("prefix_cache_matches_alone", "correctness", 2, exercise=EXERCISE,
                  timeout_s=240)(prefix_cache_matches_alone)
    lab.criterion("prefix_cache_saves_prefill", "performance", 1, exercise=EXERCISE,
                  timeout_s=240)(prefix_cache_saves_prefill)
