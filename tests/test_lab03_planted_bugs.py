"""Classic wrong implementations of lab 03, planted into the solution: each must fail a named criterion."""
from __future__ import annotations

import pytest
from planted import planted as plant

import servelab.reference.speculative as solution
from grader.labs import lab03_speculative as lab03
from grader.spec import Context, run_criterion

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
]


@pytest.mark.parametrize("name,edits,criterion,words", CLASSIC, ids=[c[0] for c in CLASSIC])
def test_classic_bug_fails_its_criterion(name, edits, criterion, words):
    res = run_criterion(lab03.LAB.get(criterion), plant(solution, *edits), Context("03_speculative", quick=True, seed=3))
    assert res.status == "failed", f"{name}: {criterion} {res.status}: {res.message}"
    assert words in res.message, f"{name}: {res.message}"
