"""Lab 00 (warm-up): greedy decoding with a KV cache.

Graded function: ``greedy_decode(model, prompt_ids, max_new_tokens, eos_id=None) -> list[int]``,
the new tokens only, including the EOS token it stops on (as ``servelab.reference_greedy``).
"""

from __future__ import annotations

from grader.checks import compare_tokens, corpus_prompts, random_prompts, speed_verdict, token_list
from grader.spec import Context, Fail, Lab, Learner, Outcome

LAB = Lab(
    id="00_warmup",
    title="Warm-up: greedy decoding with a KV cache",
    notebook="warmup.ipynb",
    module="warmup",
    functions=("greedy_decode",),
)
FN = "greedy_decode"


def _decode(learner: Learner, model, prompt: list[int], n: int, eos_id: int | None, case: str) -> list[int]:
    return token_list(learner.fn(FN)(model, list(prompt), n, eos_id), FN, case)


FIRST = ("the first new token comes from the prefill: run the whole prompt in one forward with positions "
         "0..P-1 and take the argmax of its last logits")
LATER = ("check the position of each decode step (prompt length + tokens generated so far - 1) and that "
         "you feed the newest token")
LENGTH = ("append a token before testing it against eos_id, so the EOS token itself is included; otherwise stop "
          "at max_new_tokens")


@LAB.criterion("matches_reference", "correctness", 4)
def matches_reference(learner: Learner, ctx: Context) -> Outcome:
    """Same tokens as reference_greedy on fresh random-id and corpus prompts."""
    from servelab import reference_greedy

    model = ctx.model()
    n = 3 if ctx.quick else 6
    cases = random_prompts(ctx, n, (2, 48), "random") + corpus_prompts(ctx, n, (4, 64), "corpus")
    rng = ctx.rng("lengths")
    for k, (label, prompt) in enumerate(cases):
        new = rng.randint(8, 24 if ctx.quick else 40)
        case = f"prompt {k} ({label}, max_new_tokens={new})"
        got = _decode(learner, model, prompt, new, None, case)  # first: a broken function fails fast
        compare_tokens(reference_greedy(model, prompt, new), got, case, model, prompt, FIRST, LATER, LENGTH)
    return Outcome(
        True, f"{len(cases)} hidden prompts match reference_greedy token for token", {"cases": len(cases)}
    )


@LAB.criterion("edge_cases", "correctness", 2)
def edge_cases(learner: Learner, ctx: Context) -> Outcome:
    """Prompt of 1 token, max_new_tokens=1, EOS on the first and a later step, an EOS that never comes."""
    from servelab import reference_greedy

    model = ctx.model()
    (_, p10), (_, p_long) = random_prompts(ctx, 1, (10, 10), "p10") + random_prompts(
        ctx, 1, (150, 150), "long"
    )
    p1 = [ctx.rng("p1").randrange(model.config.vocab_size)]
    _decode(
        learner, model, p1, 2, None, "prompt of 1 token"
    )  # a broken function fails before the slow references
    ref12 = reference_greedy(model, p10, 12)
    later = ref12.index(ref12[6])  # EOS = a token first produced at step `later` (1..6)
    absent = next(t for t in range(model.config.vocab_size) if t not in ref12)
    cases = [
        ("prompt of 1 token", p1, 6, None, reference_greedy(model, p1, 6)),
        ("max_new_tokens=1", p10, 1, None, ref12[:1]),
        ("EOS is the first generated token", p10, 12, ref12[0], ref12[:1]),
        (f"EOS first generated at step {later}", p10, 12, ref12[later], ref12[: later + 1]),
        ("eos_id that is never generated", p10, 12, absent, ref12),
        ("prompt of 150 tokens", p_long, 8, None, reference_greedy(model, p_long, 8)),
    ]
    for label, prompt, new, eos, expected in cases:
        case = f"{label} (prompt {len(prompt)} tokens, max_new_tokens={new}, eos_id={eos})"
        compare_tokens(expected, _decode(learner, model, prompt, new, eos, case), case, model, prompt,
                       FIRST, LATER, LENGTH)
    return Outcome(True, f"{len(cases)} edge cases match", {"cases": len(cases)})


@LAB.criterion("one_token_per_step", "correctness", 2)
def one_token_per_step(learner: Learner, ctx: Context) -> Outcome:
    """Uses the KV cache: one prefill over the prompt, then exactly one new token per forward."""
    from grader.probes import CountingModel

    ((_, prompt),) = random_prompts(ctx, 1, (12, 24), "steps")
    new = 10
    probe = CountingModel(ctx.model())
    _decode(learner, probe, prompt, new, None, "counting run")
    calls = probe.calls
    if not calls:
        raise Fail("greedy_decode never called the model")
    if not all(c.cached for c in calls):
        k = next(i for i, c in enumerate(calls) if not c.cached)
        raise Fail(
            f"forward call {k} got no KV cache: pass `cache.rows([0])` as the third argument of every call"
        )
    if calls[0].tokens != len(prompt):
        raise Fail(
            f"the first forward (prefill) fed {calls[0].tokens} tokens; feed the whole prompt "
            f"({len(prompt)} tokens) in one call"
        )
    for k, c in enumerate(calls[1:], start=1):
        if c.tokens != 1:
            raise Fail(
                f"forward call {k} fed {c.tokens} tokens; after the prefill each step should feed only "
                "the newest token, shape [1, 1] (the cache already holds the rest)"
            )
    if len(calls) > new:
        raise Fail(
            f"{len(calls)} forward calls for {new} new tokens; the prefill already yields the first "
            f"token, so {new} calls at most ({new - 1} if you skip feeding the last token)"
        )
    metrics = {
        "forward_calls": len(calls),
        "forward_tokens": probe.forward_tokens,
        "no_cache_forward_tokens": sum(len(prompt) + i for i in range(new)),
    }
    return Outcome(True, f"prefill of {len(prompt)} tokens, then {len(calls) - 1} one-token steps", metrics)


@LAB.criterion("kv_cache_speedup", "performance", 2, timeout_s=180)
def kv_cache_speedup(learner: Learner, ctx: Context) -> Outcome:
    """Cached decode vs reference_greedy (no cache): median of paired, alternating runs, 64 new tokens."""
    from grader.probes import CountingModel
    from servelab import reference_greedy
    from servelab.timing import paired_benchmark

    model, new = ctx.model(), 64
    ((_, prompt),) = corpus_prompts(ctx, 1, (32, 32), "speed")
    fn, outputs = learner.fn(FN), {"reference": [], "yours": []}
    timing = paired_benchmark(
        lambda: outputs["reference"].append(reference_greedy(model, prompt, new)),
        lambda: outputs["yours"].append(fn(model, list(prompt), new, None)),
        repeats=3 if ctx.quick else 5,
        device=model.device,
    )
    want = outputs["reference"][0]
    for k, got in enumerate(outputs["yours"]):  # a time counts only for a run that decoded right
        compare_tokens(want, token_list(got, FN, f"timed run {k + 1}"), f"timed run {k + 1} (prompt {len(prompt)} "
                       f"tokens, {new} new)", model, prompt, FIRST, LATER, LENGTH)
    probe = CountingModel(model)
    fn(probe, list(prompt), new, None)
    uncached = sum(len(prompt) + i for i in range(new))
    cached = len(prompt) + new - 1  # the prompt once, then each new token but the last
    metrics = {"prompt_tokens": len(prompt), "new_tokens": new, "forward_tokens": probe.real_forward_tokens,
               "no_cache_forward_tokens": uncached}
    deterministic = (f"{probe.real_forward_tokens} token computations against {uncached} without a cache "
                     f"({uncached / max(1, probe.real_forward_tokens):.1f}x fewer)")
    return speed_verdict(f"prompt {len(prompt)}, {new} new tokens: cached decode over the no-cache reference",
                         timing, ctx.threshold, ctx.device_class, deterministic,
                         probe.real_forward_tokens <= cached, metrics,
                         hint="make each step O(1) outside the model: no re-tokenising, no torch.cat of the whole "
                              "sequence, no copies of large tensors between devices")
