"""Classic wrong implementations of lab 03, planted into the solution: each must fail a named criterion."""
from __future__ import annotations

import pytest
from planted import assert_fails

import servelab.reference.speculative as solution
from grader.labs import lab03_speculative as lab03

CLASSIC = [
    ("prompt lookup: the first occurrence instead of the most recent",
     [("        for start in range(len(context) - n - 1, -1, -1):", "        for start in range(0, len(context) - n):")],
     "lookup_proposals", "expected [8]"),
    ("formula: gamma drafted tokens per round instead of gamma + 1 possible",
     [("(1 - alpha ** (gamma + 1)) / (1 - alpha)", "(1 - alpha ** gamma) / (1 - alpha)")], "formula", "over a round's cost"),
    ("bookkeeping: the target's own token counted as an accepted draft",
     [("        d_len = min(d_len, len(seq) - 1)  # the draft's K/V past the accepted prefix get overwritten\n"
       "        run.rounds.append((len(drafted), j))",
       "        d_len = min(d_len, len(seq) - 1)  # the draft's K/V past the accepted prefix get overwritten\n"
       "        run.rounds.append((len(drafted), min(len(drafted), j + 1)))")], "bookkeeping", "a replay of the same tokens gives"),
    # the real models' test, not only the hand-made one, rejects biased rules (seed 3: p-values 2e-176 and 3e-6)
    ("sampling on the real models: every draft accepted",
     [("        if r * q[i, tok] < p[i, tok]:  # r < p/q, without dividing by q", "        if True:")],
     "sampling_real_models", "vs the target's distribution"),
    ("sampling on the real models: a rejected draft resampled from p, not max(0, p - q)",
     [("        residual = (p[i] - q[i]).clamp(min=0)", "        residual = p[i].clone()")],
     "sampling_real_models", "vs the target's distribution"),
]


@pytest.mark.parametrize("name,edits,criterion,words", CLASSIC, ids=[c[0] for c in CLASSIC])
def test_classic_bug_fails_its_criterion(name, edits, criterion, words):
    assert_fails(lab03.LAB, solution, name, edits, criterion, words)


@pytest.mark.slow
def test_a_draft_without_its_cache_misses_the_prediction():
    """Right tokens, but the draft runs over the whole sequence for every drafted token (its cache unused): time
    the formula does not count. The speed criterion says so by its prediction band, whatever the threshold,
    with the hint that fits."""
    from grader.spec import Context, run_criterion
    from planted import planted

    cached = ("            logits = draft(torch.tensor([new]), torch.arange(d_len, d_len + len(new))[None], d_view)\n"
              "            d_len += len(new)\n            new = [int(logits[0, -1].argmax())]")
    bug = planted(solution, (cached, cached.replace("torch.tensor([new]), torch.arange(d_len, d_len + len(new))",
                                                    "torch.tensor([seq + drafted]), torch.arange(len(seq) + len(drafted))")))
    res = run_criterion(lab03.LAB.get("draft_speedup"), bug, Context(lab03.LAB.id, quick=True, seed=3, threshold=0.1))
    assert res.status == "failed" and "beyond its 15% band" in res.message, res.message
    assert "position 0" in res.message and not res.metrics.get("noise"), res.message
    assert res.metrics["prediction_error"] < -0.15 and len(res.metrics["ratios"]) == 5


def test_a_one_token_prompt_has_no_prefill_to_skip():
    """A 1-token prompt's first round starts at position 0: it is a verify forward, not a prefill (a CI run with
    such a hidden prompt once counted one verify too few)."""
    from servelab import load_draft, load_model

    target, draft = load_model(), load_draft()
    for name, args in (("speculative_lookup", ()), ("speculative_greedy", (draft,))):
        rec = lab03.Recorder(target, draft if args else None)
        fn = getattr(solution, name)
        run = fn(rec.target, *((rec.draft,) if args else ()), [5], 12, 4)
        lab03._one_verify_per_round(rec, run, "1-token prompt", name, 1)
        if args:
            assert len(lab03._after_prefill(rec.draft.calls, 1)) == run.draft_forwards
