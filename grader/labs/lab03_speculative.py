"""Lab 03 (speculative decoding): draft and verify, lossless sampling, prompt lookup, and the formula.

Graded (see the notebook for the contracts): ``speculative_greedy(target, draft, prompt_ids, max_new_tokens,
gamma, eos_id=None) -> SpecRun``, ``accept_or_resample(p, q, drafted, generator) -> (accepted, next_token)``,
``speculative_sample(target, draft, prompt_ids, max_new_tokens, gamma, temperature, generator)``,
``prompt_lookup_propose(context, ngram, k)``, ``speculative_lookup(target, prompt_ids, max_new_tokens, gamma,
ngram=3, eos_id=None)`` and ``predicted_speedup(alpha, gamma, c, v)``.

Greedy runs are compared token for token with plain greedy decoding; the models are wrapped in the
grader's ``CountingModel`` so that what the loop fed them (one verify forward per round, the caches'
contents after rejections, the time of every forward) is seen by the grader, not reported by the learner.
Sampling is checked with chi-square tests at a fixed significance.
"""

from __future__ import annotations

import math
import statistics

from grader.checks import compare_tokens, corpus_prompts, random_prompts, speed_verdict, timing_metrics, token_list
from grader.probes import NegatedModel, OtherVocabModel
from grader.spec import DRAFT, Blocked, Context, Fail, Lab, Learner, Outcome

LAB = Lab(
    id="03_speculative",
    title="Speculative decoding: draft and verify, lossless sampling, prompt lookup",
    notebook="speculative.ipynb",
    module="speculative",
    functions=("speculative_greedy", "accept_or_resample", "speculative_sample", "prompt_lookup_propose",
               "speculative_lookup", "predicted_speedup"),
)
GAMMAS = (1, 2, 4, 7)
SIGNIFICANCE = 1e-4  # per chi-square test: a correct implementation fails one with this probability


# ----------------------------------------------------------------------------- shared helpers
def chi_square(counts: list[int], probs: list[float], min_expected: float = 5.0) -> tuple[float, int, float]:
    """Pearson's goodness-of-fit test: (statistic, degrees of freedom, p-value). Cells with an expected count
    below ``min_expected`` are pooled into one."""
    import torch

    n = sum(counts)
    cells, pool_obs, pool_exp = [], 0, 0.0
    for obs, p in zip(counts, probs):
        if n * p >= min_expected:
            cells.append((obs, n * p))
        else:
            pool_obs, pool_exp = pool_obs + obs, pool_exp + n * p
    if pool_exp > 0:
        if pool_exp < min_expected and cells:  # too small on its own: merge with the smallest cell
            obs, exp = cells.pop(min(range(len(cells)), key=lambda i: cells[i][1]))
            pool_obs, pool_exp = pool_obs + obs, pool_exp + exp
        cells.append((pool_obs, pool_exp))
    stat = sum((o - e) ** 2 / e for o, e in cells if e > 0) + sum(1e9 for o, e in cells if e == 0 and o > 0)
    df = max(1, len(cells) - 1)
    pvalue = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                           torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, df, pvalue


# the hand-made vocabulary: gamma = 2 drafts; p has a third row for the bonus token. q differs from p so that
# drafts are often rejected, and the bonus row differs from the others so that using the wrong row shows.
HAND_P = [[0.40, 0.30, 0.15, 0.10, 0.05], [0.10, 0.50, 0.10, 0.20, 0.10], [0.05, 0.05, 0.20, 0.30, 0.40]]
HAND_Q = [[0.10, 0.20, 0.40, 0.20, 0.10], [0.30, 0.10, 0.30, 0.20, 0.10]]


def hand_made_test(fn, seed: int, trials: int = 20000) -> list[tuple[str, float, str]]:
    """Drive ``fn`` (an accept_or_resample) on the hand-made vocabulary ``trials`` times, drafts sampled from q
    by the grader. Three chi-square tests: the first emitted token against p[0], the second (given the first
    draft was accepted) against p[1], and the bonus token (all accepted) against p[2]. Returns (what, p-value,
    detail) per test; raises Fail for answers that are not an (int, token) pair in range."""
    import torch

    p, q = torch.tensor(HAND_P), torch.tensor(HAND_Q)
    draws, gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    drafted = torch.stack([torch.multinomial(q[i], trials, replacement=True, generator=draws) for i in range(2)], 1)
    first, second, bonus = [0] * 5, [0] * 5, [0] * 5
    for d in drafted.tolist():
        out = fn(p, q, d, gen)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise Fail(f"accept_or_resample returned {out!r}; expected a pair (accepted count, next token)")
        k, nxt = (int(x) if hasattr(x, "__int__") and not isinstance(x, bool) else x for x in out)
        if not (isinstance(k, int) and 0 <= k <= 2 and isinstance(nxt, int) and 0 <= nxt < 5):
            raise Fail(f"accept_or_resample(p, q, {d}, generator) returned {out!r}; expected (accepted in 0..2, "
                       "a token id in 0..4) for 2 drafts over a 5-token vocabulary")
        emitted = d[:k] + [nxt]
        first[emitted[0]] += 1
        if k >= 1:
            second[emitted[1]] += 1
        if k == 2:
            bonus[nxt] += 1
    out = []
    for what, counts, row in (("first emitted token vs p[0]", first, 0),
                              ("second token after an accepted draft vs p[1]", second, 1),
                              ("bonus token after all drafts accepted vs p[2]", bonus, 2)):
        n = sum(counts)
        if n < 100:
            out.append((what, 0.0, f"only {n} such rounds in {trials} (the acceptance rate is far too low)"))
            continue
        stat, df, pv = chi_square(counts, HAND_P[row])
        seen = ", ".join(f"{c / n:.3f}" for c in counts)
        out.append((what, pv, f"observed [{seen}] against [{', '.join(f'{x:.2f}' for x in HAND_P[row])}], "
                              f"chi2 {stat:.1f} (df {df}), p-value {pv:.2g}, {n} samples"))
    return out


class Recorder:
    """Target and draft wrapped in the grader's RecordingModel: every call counted, its input ids kept and
    (``logits=True``) its logits, in the order of the calls across both models (``log``)."""

    def __init__(self, target, draft=None, logits: bool = False):
        from grader.probes import RecordingModel

        self.target = RecordingModel(target, logits=logits)
        self.draft = RecordingModel(draft, logits=logits) if draft is not None else None

    @property
    def log(self) -> list[tuple[str, list[int], list[int], object]]:
        """(who, tokens, positions, logits) of row 0 of every call, in call order."""
        out = []
        for who, probe in (("target", self.target), ("draft", self.draft)):
            for call, f in zip(probe.calls, probe.forwards) if probe is not None else ():
                logits = f.logits[0].float() if f.logits is not None else None
                out.append((f.seq, who, f.ids[0], call.positions[0], logits))
        return [entry[1:] for entry in sorted(out, key=lambda e: e[0])]


def check_caches(rec: Recorder, seq: list[int], case: str, tol: float = 1e-3) -> int:
    """Every decode forward of either model must give the logits a fresh forward (no cache) gives over what
    that model should hold: the final sequence up to the round's last token, then the tokens this round fed
    it. A stale K/V entry left by a rejected draft, or a skipped position, shows up here. Returns calls checked."""
    import torch

    calls, checked = rec.log, 0
    for i, (who, toks, pos, logits) in enumerate(calls):
        if logits is None:
            raise ValueError("check_caches needs a Recorder(..., logits=True)")
        if pos[0] == 0:
            continue  # a prefill: nothing cached before it
        nxt = next((c for c in calls[i:] if c[0] == "target"), None)  # the verify that closes this round
        committed = nxt[2][0] + 1 if nxt is not None else len(seq)
        fed = {}
        for w, t2, p2, _ in calls[:i]:  # what this model was fed at each position so far (latest wins)
            if w == who:
                fed.update(zip(p2, t2))
        context = [seq[j] if j < committed else fed.get(j, -1) for j in range(pos[0])]
        if -1 in context:
            raise Fail(f"{case}: the {who} model's forward at positions {pos[0]}..{pos[-1]} attends to position "
                       f"{context.index(-1)}, which it was never fed",
                       "after a round where every draft was accepted, the draft has not seen the last draft: "
                       "feed it together with the bonus token")
        model = rec.target.model if who == "target" else rec.draft.model
        fresh = model(torch.tensor([context + toks]))[0, len(context):]
        scale = max(1.0, float(fresh.abs().max()))
        if not torch.allclose(logits.to(fresh.device), fresh, atol=tol * scale, rtol=0):
            raise Fail(f"{case}: the {who} model's forward at positions {pos[0]}..{pos[-1]} gives logits that differ "
                       f"from a fresh forward over the sequence (max difference "
                       f"{float((logits.to(fresh.device) - fresh).abs().max()):.3g})",
                       "its cache holds something else at an earlier position: after a rejection, the next forward "
                       "must start at the first rejected position (so it overwrites it)")
        checked += 1
    return checked


def _run(learner: Learner, name: str, *args) -> object:
    from servelab.speculative import SpecRun

    run = learner.fn(name)(*args)
    if not isinstance(run, SpecRun):
        raise Fail(f"{name} returned {type(run).__name__}; expected a servelab.speculative.SpecRun")
    for r in run.rounds:
        if not (isinstance(r, tuple | list) and len(r) == 2 and all(type(x) is int for x in r)):
            raise Fail(f"{name}: SpecRun.rounds holds {r!r}; each round should be a pair of ints (drafted, "
                       "accepted)")
    for what in ("target_forwards", "draft_forwards"):
        if type(getattr(run, what)) is not int:
            raise Fail(f"{name}: SpecRun.{what} is {getattr(run, what)!r}; it should be an int")
    return run


def _after_prefill(calls: list, prompt_len: int) -> list:
    """The forwards after a model's prefill of prompt[:-1], from the probe's record. A 1-token prompt has no
    prefill: its first round's forwards start at position 0 too."""
    return [c for c in calls if c.positions[0][0] != 0 or prompt_len == 1]


def _one_verify_per_round(rec: Recorder, run, case: str, name: str, prompt_len: int) -> None:
    verifies = _after_prefill(rec.target.calls, prompt_len)
    if len(verifies) != len(run.rounds):
        raise Fail(f"{case}: {name} called the target {len(verifies)} times after the prefill for {len(run.rounds)} "
                   "rounds; expected exactly one verify forward per round",
                   "score the last token and all the round's drafts in ONE target forward")
    for r, (call, (drafted, accepted)) in enumerate(zip(verifies, run.rounds)):
        if call.tokens != drafted + 1 or not 0 <= accepted <= drafted:
            raise Fail(f"{case}: round {r} records (drafted {drafted}, accepted {accepted}) but its verify forward fed "
                       f"{call.tokens} tokens; expected drafted + 1 (the last token and each draft)")


def _prompts(ctx: Context, salt: str, n: int) -> list[tuple[str, list[int]]]:
    return random_prompts(ctx, n, (1, 24), salt + "-r") + corpus_prompts(ctx, n, (8, 64), salt + "-c")


WrongDraft = NegatedModel  # a draft whose every first proposal of a round is rejected (its least likely token)


# ----------------------------------------------------------------------------- greedy
@LAB.criterion("greedy_identical", "correctness", 4, exercise="speculative_greedy", timeout_s=300)
def greedy_identical(learner: Learner, ctx: Context) -> Outcome:
    """Identical tokens to plain greedy decoding for gamma in {1, 2, 4, 7} on hidden random and corpus prompts,
    with the shipped draft, with a draft whose every first proposal is rejected, and with draft = target
    (everything accepted up to max_new_tokens); EOS stops; one verify forward per round."""
    from servelab.generate import reference_greedy

    target, draft = ctx.model(), ctx.model(DRAFT)
    prompts = _prompts(ctx, "greedy", 2 if ctx.quick else 4)
    n, new = 0, 24 if ctx.quick else 40
    for g in GAMMAS:
        for k, (what, prompt) in enumerate(prompts):
            expected = reference_greedy(target, prompt, new)
            for label, d in (("shipped draft", draft), ("a draft always rejected", WrongDraft(draft)),
                             ("draft = target", target)):
                if label != "shipped draft" and k % 2:
                    continue
                case = f"gamma={g}, {what}, {label}"
                rec = Recorder(target, d)
                run = _run(learner, "speculative_greedy", rec.target, rec.draft, prompt, new, g)
                got = token_list(run.tokens, "speculative_greedy", case)
                compare_tokens(expected, got, case, target, prompt,
                               first_hint="the first round starts from the prompt's last token",
                               later_hint="accept drafts only while they equal the target's argmax; then append the "
                                          "target's token at the first mismatch (or the bonus token)")
                _one_verify_per_round(rec, run, case, "speculative_greedy", len(prompt))
                if label == "draft = target" and run.accepted != run.drafted:
                    raise Fail(f"{case}: with the target as its own draft only {run.accepted} of {run.drafted} drafts "
                               "were accepted; every one should be")
                if label == "a draft always rejected" and run.accepted:
                    raise Fail(f"{case}: {run.accepted} drafts of a draft that proposes the target's least likely "
                               "token were accepted")
                n += 1
        eos_prompt = prompts[0][1]
        full = reference_greedy(target, eos_prompt, new)
        eos = full[len(full) // 2]
        expected = full[: full.index(eos) + 1]
        run = _run(learner, "speculative_greedy", target, draft, eos_prompt, new, g, eos)
        compare_tokens(expected, token_list(run.tokens, "speculative_greedy", "eos"), f"gamma={g}, eos_id={eos}",
                       length_hint="stop right after emitting eos_id, even in the middle of a round's accepted drafts")
    return Outcome(True, f"{n} runs for gamma {GAMMAS} (incl. rejected-first and all-accepted drafts) and EOS "
                         "stops: every token equal to plain greedy, one verify forward per round", {"runs": n})


@LAB.criterion("caches_consistent", "correctness", 2, exercise="speculative_greedy", timeout_s=300)
def caches_consistent(learner: Learner, ctx: Context) -> Outcome:
    """After rejections (and after all-accepted rounds), every later forward of target and draft gives the logits
    of a fresh forward over the sequence: no stale K/V of a rejected draft, no skipped position."""

    target, draft = ctx.model(), ctx.model(DRAFT)
    checked = rejections = 0
    for g in (2, 4):
        for what, prompt in _prompts(ctx, "cache", 1):
            rec = Recorder(target, draft, logits=True)
            run = _run(learner, "speculative_greedy", rec.target, rec.draft, prompt, 24, g)
            checked += check_caches(rec, list(prompt) + list(run.tokens), f"gamma={g}, {what}")
            rejections += sum(a < d for d, a in run.rounds)
    return Outcome(True, f"{checked} forwards after {rejections} rejections: each equals a fresh forward",
                   {"forwards": checked, "rejections": rejections})


@LAB.criterion("bad_inputs", "correctness", 1, exercise="speculative_greedy")
def bad_inputs(learner: Learner, ctx: Context) -> Outcome:
    """Clear ValueErrors from speculative_greedy: gamma < 1, a draft with another vocabulary, an empty prompt
    (speculative_sample's temperature <= 0 and speculative_lookup's gamma < 1 are checked with them)."""
    target, draft = ctx.model(), ctx.model(DRAFT)
    cases = [((target, draft, [1, 2], 4, 0), "gamma=0"),
             ((target, OtherVocabModel(draft, 7), [1, 2], 4, 2), "a draft with another vocabulary"),
             ((target, draft, [], 4, 2), "an empty prompt")]
    for args, what in cases:
        expect_value_error(learner, "speculative_greedy", args, what)
    return Outcome(True, f"{len(cases)} bad inputs, each a clear ValueError")


def expect_value_error(learner: Learner, name: str, args: tuple, what: str) -> None:
    """``name(*args)`` must raise a ValueError that says something (Fail otherwise)."""
    try:
        learner.fn(name)(*args)
    except ValueError as err:
        if len(str(err)) < 10:
            raise Fail(f"{name} with {what}: the ValueError says only {str(err)!r}; say what is wrong") from None
        return
    except NotImplementedError:
        raise
    except Exception as err:  # noqa: BLE001
        raise Fail(f"{name} with {what} raised {type(err).__name__}: {err}; expected a ValueError") from None
    raise Fail(f"{name} with {what} returned instead of raising ValueError")


# ----------------------------------------------------------------------------- bookkeeping
@LAB.criterion("bookkeeping", "correctness", 2, exercise="speculative_greedy", timeout_s=240)
def bookkeeping(learner: Learner, ctx: Context) -> Outcome:
    """Per-round (drafted, accepted), alpha and the accepted length equal servelab.acceptance's replay of the
    same run; forward counts equal the forwards the grader saw."""
    from servelab.acceptance import measure_acceptance

    target, draft = ctx.model(), ctx.model(DRAFT)
    n = 0
    for g in (1, 3, 4):
        for what, prompt in corpus_prompts(ctx, 2, (16, 64), f"book-{g}"):
            rec = Recorder(target, draft)
            run = _run(learner, "speculative_greedy", rec.target, rec.draft, prompt, 48, g)
            case = f"gamma={g}, {what}"
            ref = measure_acceptance(target, draft, [prompt], 0, g, continuations=[list(run.tokens)])
            mine = (run.accepted, run.checked, len(run.rounds))
            if mine != (ref.accepted, ref.checked, ref.rounds):
                raise Fail(f"{case}: the run records (accepted, checked, rounds) = {mine}; a replay of the same tokens "
                           f"gives {(ref.accepted, ref.checked, ref.rounds)}",
                           "a round drafts min(gamma, tokens still to produce); record (drafted, accepted) per round")
            draft_calls = len(_after_prefill(rec.draft.calls, len(prompt)))
            if run.target_forwards != len(run.rounds) or run.draft_forwards != draft_calls:
                raise Fail(f"{case}: target_forwards {run.target_forwards}, draft_forwards {run.draft_forwards}; the "
                           f"grader saw {len(run.rounds)} verify and {draft_calls} draft forwards after the prefills")
            _one_verify_per_round(rec, run, case, "speculative_greedy", len(prompt))
            n += 1
    return Outcome(True, f"{n} runs: rounds, alpha and forward counts equal the replay", {"runs": n})


# ----------------------------------------------------------------------------- sampling
@LAB.criterion("sampling_hand_made", "correctness", 3, exercise="accept_or_resample")
def sampling_hand_made(learner: Learner, ctx: Context) -> Outcome:
    """On a 5-token vocabulary with known p and q (2 drafts): chi-square tests at significance 1e-4 that the
    first, second and bonus tokens follow p's rows (always-accept, resampling from p, and a wrong bonus fail)."""
    results = hand_made_test(learner.fn("accept_or_resample"), ctx.rng("hand").randrange(2**31),
                             8000 if ctx.quick else 20000)
    bad = [(w, d) for w, pv, d in results if pv < SIGNIFICANCE]
    if bad:
        what, detail = bad[0]
        raise Fail(f"{what}: {detail}: below the significance {SIGNIFICANCE}",
                   "accept draft i with probability min(1, p/q); at the first rejection sample from max(0, p - q) "
                   "normalised; when all are accepted sample the bonus from p[k] (the row after the last draft)")
    return Outcome(True, "; ".join(f"{w}: p-value {pv:.2g}" for w, pv, _ in results),
                   {w: round(pv, 4) for w, pv, _ in results})


def sampling_prompt(ctx: Context, temperature: float) -> tuple[list[int], list[float]]:
    """A hidden corpus prompt whose target next-token distribution is spread out (top token < 0.5), and it."""
    import torch

    target = ctx.model()
    for _, prompt in corpus_prompts(ctx, 40, (6, 24), "sample-prompt"):
        probs = torch.softmax(target(torch.tensor([prompt]))[0, -1] / temperature, -1)
        if float(probs.max()) < 0.5:
            return prompt, probs.tolist()
    raise Fail("no hidden prompt with a spread-out next-token distribution (grader problem: rerun)")


@LAB.criterion("sampling_real_models", "correctness", 2, exercise="speculative_sample", timeout_s=300)
def sampling_real_models(learner: Learner, ctx: Context) -> Outcome:
    """On the shipped pair at temperature 1: the first emitted token of many seeded runs follows the target's
    next-token distribution (chi-square over its top tokens, significance 1e-4); the same seed, the same run;
    temperature <= 0 is a clear ValueError."""
    import torch


    target, draft, temp = ctx.model(), ctx.model(DRAFT), 1.0
    for bad in (0.0, -1.0):
        expect_value_error(learner, "speculative_sample",
                           (target, draft, [1, 2], 4, 2, bad, torch.Generator().manual_seed(0)), f"temperature {bad}")
    prompt, probs = sampling_prompt(ctx, temp)
    fn, runs = learner.fn("speculative_sample"), 300 if ctx.quick else 600
    seed = ctx.rng("sample-seeds").randrange(2**31)
    counts = [0] * len(probs)
    for r in range(runs):
        run = fn(target, draft, prompt, 2, 2, temp, torch.Generator().manual_seed(seed + r))
        tokens = token_list(getattr(run, "tokens", run), "speculative_sample", f"seeded run {r}")
        if len(tokens) != 2:
            raise Fail(f"seeded run {r}: {len(tokens)} tokens for max_new_tokens=2")
        counts[tokens[0]] += 1
    again = fn(target, draft, prompt, 2, 2, temp, torch.Generator().manual_seed(seed))
    first = fn(target, draft, prompt, 2, 2, temp, torch.Generator().manual_seed(seed))
    if list(again.tokens) != list(first.tokens):
        raise Fail("two runs with generators seeded alike gave different tokens",
                   "take every random draw from the generator passed in")
    stat, df, pv = chi_square(counts, probs)
    top = sorted(range(len(probs)), key=lambda t: -probs[t])[:5]
    detail = ", ".join(f"token {t}: {counts[t] / runs:.3f} vs {probs[t]:.3f}" for t in top)
    if pv < SIGNIFICANCE:
        raise Fail(f"first tokens of {runs} seeded runs vs the target's distribution: chi2 {stat:.1f} (df {df}), "
                   f"p-value {pv:.2g} < {SIGNIFICANCE} ({detail})",
                   "sample drafts from the draft's softmax(logits / temperature) and keep those rows as q")
    return Outcome(True, f"{runs} seeded runs: chi2 {stat:.1f} (df {df}), p-value {pv:.2g} ({detail})",
                   {"p_value": round(pv, 4), "runs": runs})


# ----------------------------------------------------------------------------- prompt lookup
LOOKUP_CASES = [  # (context, ngram, k, expected)
    ([1, 2, 3, 4, 1, 2, 3], 3, 2, [4, 1]),
    ([5, 1, 2, 9, 1, 2], 2, 3, [9, 1, 2]),
    ([1, 2, 7, 1, 2, 8, 1, 2], 2, 1, [8]),  # the most recent earlier occurrence
    ([4, 5, 6, 3, 6], 3, 2, [3, 6]),  # no 3- or 2-gram match: fall back to the 1-gram 6
    ([1, 2, 3], 2, 4, []),
    ([7], 3, 2, []),
    ([7, 7, 7, 7], 2, 4, [7]),  # the occurrence right before the tail: one token follows it
]


@LAB.criterion("lookup_proposals", "correctness", 1, exercise="prompt_lookup_propose")
def lookup_proposals(learner: Learner, ctx: Context) -> Outcome:
    """Hand-made contexts and hidden random ones with repeats: the tokens after the most recent earlier
    occurrence of the last n-gram, falling back to shorter n-grams, [] when none."""
    return _lookup_proposals(learner, ctx)


def _reference_lookup(context: list[int], ngram: int, k: int) -> list[int]:
    for n in range(min(ngram, len(context) - 1), 0, -1):
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == context[-n:]:
                return list(context[start + n : start + n + k])
    return []


def _lookup_proposals(learner: Learner, ctx: Context) -> Outcome:
    fn, rng = learner.fn("prompt_lookup_propose"), ctx.rng("lookup")
    cases = list(LOOKUP_CASES)
    for _ in range(30):
        ctx_ids = [rng.randrange(6) for _ in range(rng.randint(1, 30))]
        ngram, k = rng.randint(1, 4), rng.randint(1, 5)
        cases.append((ctx_ids, ngram, k, _reference_lookup(ctx_ids, ngram, k)))
    for context, ngram, k, want in cases:
        got = fn(list(context), ngram, k)
        got = list(got) if isinstance(got, tuple | list) else got
        if got != want:
            raise Fail(f"prompt_lookup_propose({context}, ngram={ngram}, k={k}) returned {got!r}; expected {want}",
                       "search the last n tokens' most recent EARLIER occurrence (one that ends before the last "
                       "token); try n = ngram, ngram - 1, ..., 1; return at most k tokens")
    return Outcome(True, f"{len(cases)} contexts: every proposal right")


@LAB.criterion("lookup_identical", "correctness", 2, exercise="speculative_lookup", timeout_s=240)
def lookup_identical(learner: Learner, ctx: Context) -> Outcome:
    """speculative_lookup gives plain greedy's tokens on hidden prompts for gamma in {1, 2, 4, 7}, with EOS;
    gamma < 1 is a clear ValueError."""
    from servelab.generate import reference_greedy

    target, n = ctx.model(), 0
    expect_value_error(learner, "speculative_lookup", (target, [1, 2], 4, 0), "gamma=0")
    for g in GAMMAS:
        for what, prompt in _prompts(ctx, f"lookup-{g}", 1):
            expected = reference_greedy(target, prompt, 32)
            rec = Recorder(target)
            run = _run(learner, "speculative_lookup", rec.target, prompt, 32, g)
            case = f"gamma={g}, {what}"
            compare_tokens(expected, token_list(run.tokens, "speculative_lookup", case), case, target, prompt)
            _one_verify_per_round(rec, run, case, "speculative_lookup", len(prompt))
            n += 1
    prompt = speed_prompts(ctx, "lookup", 1)[0]  # a trace lookup proposes on, so EOS can fall among accepted drafts
    full = reference_greedy(target, prompt, 32)
    eos = full[len(full) // 2]
    expected = full[: full.index(eos) + 1]
    run = _run(learner, "speculative_lookup", target, prompt, 32, 4, 3, eos)
    compare_tokens(expected, token_list(run.tokens, "speculative_lookup", "eos"), f"gamma=4, eos_id={eos}",
                   length_hint="stop right after emitting eos_id, even in the middle of a round's accepted drafts")
    return Outcome(True, f"{n} runs equal to plain greedy, one verify forward per round; EOS stops")


@LAB.criterion("formula", "correctness", 1, exercise="predicted_speedup")
def formula(learner: Learner, ctx: Context) -> Outcome:
    """predicted_speedup against the closed form on hidden values, its alpha = 1 limit, and bad inputs."""
    fn, rng = learner.fn("predicted_speedup"), ctx.rng("formula")
    cases = [(rng.uniform(0, 0.99), rng.randint(1, 8), rng.uniform(0, 1), rng.uniform(1, 3)) for _ in range(20)]
    cases += [(1.0, 4, 0.1, 1.2), (0.0, 3, 0.2, 1.0)]
    for a, g, c, v in cases:
        want = (g + 1 if a == 1 else (1 - a ** (g + 1)) / (1 - a)) / (g * c + v)
        got = fn(a, g, c, v)
        if not isinstance(got, float | int) or not math.isclose(got, want, rel_tol=1e-6):
            hint = ("at alpha = 1 use the limit gamma + 1 for (1 - alpha^(gamma+1)) / (1 - alpha)" if a == 1 else
                    "expected tokens per round (1 - alpha^(gamma+1)) / (1 - alpha), over a round's cost gamma*c + v")
            raise Fail(f"predicted_speedup({a:.4f}, {g}, {c:.4f}, {v:.4f}) returned {got!r}; expected {want:.6f}", hint)
    for bad in ((1.5, 4, 0.1, 1.0), (0.5, 0, 0.1, 1.0), (0.5, 4, -0.1, 1.0)):
        try:
            fn(*bad)
        except ValueError:
            continue
        raise Fail(f"predicted_speedup{bad} did not raise ValueError")
    return Outcome(True, f"{len(cases)} values and 3 bad inputs right")


# ----------------------------------------------------------------------------- performance
SPEED_NEW_TOKENS = 128


LOOKUP_CANDIDATES = 3  # code prompts tried for each one the lookup trace keeps


def speed_prompts(ctx: Context, kind: str, n: int) -> list[list[int]]:
    """Corpus prompts: 32 tokens for the draft model. For prompt lookup, a code trace whose output repeats its
    input, as when a model edits or re-emits code it was given: 200 tokens of a source file, then its first
    16 tokens again. The target does not always go on re-emitting the file (one hidden prompt gave 1.4 tokens
    per verify), so of ``LOOKUP_CANDIDATES`` such prompts per one needed, the trace keeps those whose greedy
    output lookup proposes best (``lookup_tokens_per_verify``: from the target's tokens alone, whatever the
    learner's code), so that the trace is what it claims to be."""
    if kind == "draft":
        return [p for _, p in corpus_prompts(ctx, n, (32, 32), "speed-draft")]
    from servelab.reference.warmup import greedy_decode

    target = ctx.model()
    candidates = [p + p[:16] for _, p in corpus_prompts(ctx, LOOKUP_CANDIDATES * n, (200, 200), "speed-lookup")]
    score = {id(p): lookup_tokens_per_verify(p, greedy_decode(target, p, SPEED_NEW_TOKENS)) for p in candidates}
    return sorted(candidates, key=lambda p: -score[id(p)])[:n]


def lookup_tokens_per_verify(prompt: list[int], output: list[int], gamma: int = 4, ngram: int = 3) -> float:
    """The tokens per verify forward that greedy prompt lookup reaches on a trace, from the greedy ``output``
    alone: the target's own tokens decide every acceptance, so no model runs here."""
    context, done, rounds = list(prompt), 0, 0
    while done < len(output):
        proposal = _reference_lookup(context, ngram, min(gamma, len(output) - done))
        accepted = 0
        while accepted < len(proposal) and proposal[accepted] == output[done + accepted]:
            accepted += 1
        emitted = output[done : done + accepted + 1]  # the accepted drafts and the target's own token
        context += emitted
        done, rounds = done + len(emitted), rounds + 1
    return len(output) / max(1, rounds)


def timed_comparison(learner: Learner, ctx: Context, kind: str, gamma: int, repeats: int, prompts: list[list[int]]):
    """Plain cached greedy (lab 00's reference) vs the learner's speculative loop on ``prompts``, in alternating
    pairs; every forward timed by the grader's probes. Returns (timing, stats) where stats has alpha, tokens
    per verify, c, v (both measured in the loops) and the prediction."""
    from servelab.reference.warmup import greedy_decode
    from servelab.timing import paired_benchmark

    from grader.probes import CountingModel

    target = ctx.model()
    draft = ctx.model(DRAFT) if kind == "draft" else None
    expected = [greedy_decode(target, p, SPEED_NEW_TOKENS) for p in prompts]
    base_probe, probes, runs = CountingModel(target), [], []

    def baseline():
        for p in prompts:
            greedy_decode(base_probe, p, SPEED_NEW_TOKENS)

    def candidate():
        t, d = CountingModel(target), CountingModel(draft) if draft is not None else None
        probes.append((t, d))
        for p in prompts:
            runs.append(_run(learner, "speculative_greedy", t, d, p, SPEED_NEW_TOKENS, gamma) if kind == "draft"
                        else _run(learner, "speculative_lookup", t, p, SPEED_NEW_TOKENS, gamma))

    timing = paired_benchmark(baseline, candidate, repeats=repeats, warmup=1, device=target.device)
    for k, run in enumerate(runs):
        if list(run.tokens) != expected[k % len(prompts)]:
            raise Fail(f"timed run {k}: the tokens differ from plain greedy decoding; a time counts only for a right run")
    step = statistics.median(c.seconds for c in base_probe.calls if c.tokens == 1)  # in the plain loop
    verify = [c.seconds for t, _ in probes[1:] for c in t.calls if c.max_position >= c.tokens]  # not prefills
    drafts = [c.seconds for _, d in probes[1:] if d is not None for c in d.calls if c.max_position >= c.tokens]
    last = runs[-len(prompts):]
    accepted, checked = sum(r.accepted for r in last), sum(r.checked for r in last)
    alpha = accepted / max(1, checked)
    verifies = sum(r.target_forwards for r in last)
    drafted = sum(r.drafted for r in last)
    g_eff = drafted / max(1, verifies)  # prompt lookup may propose fewer than gamma
    if kind == "draft":
        c = statistics.mean(drafts) / step if drafts else 0.0  # none: every draft forward started at position 0
    else:  # the proposer's cost: what the runs spent outside target forwards, per drafted token
        outside = statistics.median(s - sum(c.seconds for c in t.calls) for s, (t, _) in zip(timing.candidate_s,
                                                                                              probes[1:]))
        c = max(0.0, outside / max(1, drafted)) / step
    v = statistics.mean(verify) / step
    prediction = predicted(alpha, [d for r in last for d, _ in r.rounds], c, v)
    stats = {"gamma": gamma, "alpha": round(alpha, 4), "tokens_per_verify": round(
        sum(len(r.tokens) for r in last) / max(1, verifies), 3), "drafts_per_round": round(g_eff, 3),
        "c": round(c, 3), "v": round(v, 3), "step_ms": round(step * 1e3, 3), "predicted": round(prediction, 3)}
    return timing, stats


def predicted(alpha: float, drafts_per_round: list[int], c: float, v: float) -> float:
    """The formula applied round by round to the proposals made: expected tokens over cost, both summed over
    the rounds. With gamma drafts every round (a draft model) this is (1 - a^(g+1)) / ((1 - a)(g c + v)) itself;
    prompt lookup proposes fewer in some rounds, none where the n-gram has no earlier match, and the formula
    at the mean proposal count overstates its tokens (measured: by 8%)."""
    def tokens(d: int) -> float:
        return d + 1 if alpha >= 1 else (1 - alpha ** (d + 1)) / (1 - alpha)

    return sum(map(tokens, drafts_per_round)) / max(1e-9, sum(d * c + v for d in drafts_per_round))


@LAB.criterion("tokens_per_forward", "performance", 2, exercise="speculative_greedy", timeout_s=240)
def tokens_per_forward(learner: Learner, ctx: Context) -> Outcome:
    """Deterministic: new tokens per target verify forward at gamma = 4 with the shipped draft on hidden corpus
    prompts (counted by the grader's probe), outputs equal to plain greedy."""
    from servelab.reference.warmup import greedy_decode

    target, draft = ctx.model(), ctx.model(DRAFT)
    tokens = verifies = 0
    for p in speed_prompts(ctx, "draft", 3 if ctx.quick else 6):
        rec = Recorder(target, draft)
        run = _run(learner, "speculative_greedy", rec.target, rec.draft, p, SPEED_NEW_TOKENS, 4)
        if list(run.tokens) != greedy_decode(target, p, SPEED_NEW_TOKENS):
            raise Fail("a run's tokens differ from plain greedy decoding")
        tokens += len(run.tokens)
        verifies += sum(1 for c in rec.target.calls if c.positions[0][0] != 0)
    ratio = tokens / max(1, verifies)
    metrics = {"speedup": round(ratio, 3), "threshold": ctx.threshold, "tokens": tokens, "verifies": verifies}
    said = f"{tokens} tokens in {verifies} verify forwards: {ratio:.2f} tokens per target forward at gamma = 4"
    if ctx.threshold is not None and ratio >= ctx.threshold:
        return Outcome(True, f"{said}; threshold {ctx.threshold}", metrics)
    raise Fail(f"{said}, below the threshold {ctx.threshold}",
               "accept every agreeing draft and always add the target's own token (the bonus when all agree)")


PREDICTION_BAND = 0.15  # the measured speedup must be within 15% of the formula's prediction (issue #13)
SPREAD_NOISE = 1.3  # pairs spreading wider than this (max / min, the extreme two set aside) say the machine was busy


def _speed(learner: Learner, ctx: Context, kind: str) -> Outcome:
    gammas = (1, 2, 3, 4) if kind == "draft" else (4, 8)
    prompts = speed_prompts(ctx, kind, 1 if ctx.quick else 2)
    best = max(gammas, key=lambda g: timed_comparison(learner, ctx, kind, g, 1, prompts[:1])[1]["predicted"])
    timing, stats = timed_comparison(learner, ctx, kind, best, 5 if ctx.quick else 7, prompts)
    off = timing.speedup / stats["predicted"] - 1
    what = "draft-model speculation" if kind == "draft" else "prompt lookup on code"
    det = (f"gamma {best} (best predicted of {gammas}), alpha {stats['alpha']:.2f}, {stats['tokens_per_verify']:.2f} "
           f"tokens per verify, in-loop c {stats['c']:.2f} and v {stats['v']:.2f} predict {stats['predicted']:.2f}x "
           f"({off:+.0%} off)")
    metrics = {**stats, "prediction_error": round(off, 3)}
    middle = sorted(timing.ratios)[1:-1] if len(timing.ratios) >= 5 else timing.ratios  # one stray pair aside
    steady = max(middle) / min(middle) <= SPREAD_NOISE
    no_pair_near = max(timing.ratios) < stats["predicted"] * (1 - PREDICTION_BAND)  # noise does not slow every pair
    if off < -PREDICTION_BAND and (steady or no_pair_near):  # below the prediction, steadily or in every pair: the code
        raise Fail(f"{what}: {timing.speedup:.2f}x measured (pairs {', '.join(f'{r:.2f}' for r in timing.ratios)}) is "
                   f"{off:+.0%} off the formula's prediction, beyond its {PREDICTION_BAND:.0%} band: {det}. The "
                   "rounds spend time outside the two models' forwards that the formula does not count",
                   "time one round piece by piece: per-token .item() calls, copying token lists or caches, or "
                   "running the draft again over tokens it already saw (a forward from position 0) add up",
                   {**metrics, **timing_metrics(timing, ctx.threshold)})
    out = speed_verdict(f"{what}: plain cached greedy / speculative time", timing, ctx.threshold, ctx.device_class,
                        det, stats["tokens_per_verify"] >= 1.5, metrics,
                        "time the loop: a Python-heavy round adds cost the formula does not count")
    if abs(off) <= PREDICTION_BAND:
        return Outcome(True, f"{out.message}, within {PREDICTION_BAND:.0%} of the prediction", out.metrics)
    # faster than predicted, or pairs all over the place: the timings, not the code
    raise Fail(f"{out.message}; but it is {off:+.0%} off the formula's prediction (band {PREDICTION_BAND:.0%}), and "
               f"the pairs spread {min(timing.ratios):.2f}-{max(timing.ratios):.2f}x: this looks like noise. Rerun "
               "this check on a quieter machine", metrics={**out.metrics, "noise": True})


@LAB.criterion("draft_speedup", "performance", 2, exercise="speculative_greedy", timeout_s=400)
def draft_speedup(learner: Learner, ctx: Context) -> Outcome:
    """Wall clock, batch 1, shipped pair: plain cached greedy / speculative_greedy at the best gamma (median of
    alternating pairs), within 15% of the prediction from alpha, c and v measured inside the loops."""
    return _speed(learner, ctx, "draft")


@LAB.criterion("lookup_speedup", "performance", 2, exercise="speculative_lookup", timeout_s=400)
def lookup_speedup(learner: Learner, ctx: Context) -> Outcome:
    """Wall clock, batch 1: plain cached greedy / speculative_lookup on a code trace that re-emits its prompt
    (median of alternating pairs), within 15% of the prediction from alpha, c and v measured inside the loops."""
    return _speed(learner, ctx, "lookup")


# ----------------------------------------------------------------------------- GPU
@LAB.criterion("gpu_hf_pair", "gpu", 2, exercise="speculative_greedy", timeout_s=600)
def gpu_hf_pair(learner: Learner, ctx: Context) -> Outcome:
    """On a GPU with a Hugging Face target/draft pair sharing a tokenizer ($SERVELAB_MODEL,
    $SERVELAB_DRAFT_MODEL, e.g. a ~1.5B target and a ~0.5B draft of one family): identical greedy tokens and
    >= 2x over plain cached greedy at batch 1."""
    import os

    import torch

    if ctx.device != "cuda" or not torch.cuda.is_available():
        raise Blocked("needs a CUDA GPU")
    if not (os.environ.get("SERVELAB_MODEL") and os.environ.get("SERVELAB_DRAFT_MODEL")):
        raise Blocked("set $SERVELAB_MODEL and $SERVELAB_DRAFT_MODEL to a target/draft pair that shares a tokenizer "
                      "(e.g. Qwen/Qwen2.5-1.5B and Qwen/Qwen2.5-0.5B)")
    from servelab.reference.warmup import greedy_decode
    from servelab.timing import paired_benchmark

    target, draft = ctx.model(dtype=torch.bfloat16), ctx.model(DRAFT, dtype=torch.bfloat16)
    prompt = [p for _, p in corpus_prompts(ctx, 1, (64, 64), "gpu")][0]
    expected = greedy_decode(target, prompt, 128)
    runs = []
    timing = paired_benchmark(lambda: greedy_decode(target, prompt, 128),
                              lambda: runs.append(_run(learner, "speculative_greedy", target, draft, prompt, 128, 4)),
                              repeats=3, warmup=1, device="cuda")
    if any(list(r.tokens) != expected for r in runs):
        raise Fail("speculative_greedy's tokens differ from plain greedy decoding on the GPU pair")
    metrics = {"speedup": round(timing.speedup, 3), "alpha": round(runs[-1].alpha, 3)}
    said = f"{target.name} with draft {draft.name}: {timing.speedup:.2f}x, alpha {runs[-1].alpha:.2f}"
    if timing.speedup >= 2.0:
        return Outcome(True, said, metrics)
    raise Fail(f"{said}; the bar is 2x")
