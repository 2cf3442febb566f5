"""Classic wrong implementations of lab 00's greedy_decode, planted into the solution: each fails its criterion."""
from __future__ import annotations

import pytest
from planted import planted as plant

import servelab.reference.warmup as solution
from grader.labs import lab00_warmup as lab00
from grader.spec import Context, Learner, run_criterion

CLASSIC = [
    ("decode position off by one", [("position = len(prompt_ids) + len(out) - 1", "position = len(prompt_ids) + len(out)")],
     "matches_reference", "diverged at token 1"),
    ("no cache: the whole sequence every step",
     [("logits = model(torch.tensor([[token]]), torch.tensor([[position]]), view)",
       "logits = model(torch.tensor([list(prompt_ids) + out]))")],
     "one_token_per_step", "got no KV cache"),
    ("EOS ignored", [("if token == eos_id or len(out) == max_new_tokens:", "if len(out) == max_new_tokens:")],
     "edge_cases", "EOS"),
]


def planted(*edits: tuple[str, str]) -> Learner:
    return plant(solution, *edits)


@pytest.mark.slow
@pytest.mark.parametrize("name,edits,criterion,words", CLASSIC, ids=[c[0] for c in CLASSIC])
def test_classic_bug_fails_its_criterion(name, edits, criterion, words):
    res = run_criterion(lab00.LAB.get(criterion), planted(*edits), Context("00_warmup", quick=True, seed=3))
    assert res.status == "failed", f"{name}: {criterion} {res.status}: {res.message}"
    assert words in res.message, f"{name}: {res.message}"


def test_the_solution_passes_them():
    for criterion in ("matches_reference", "edge_cases", "one_token_per_step"):
        res = run_criterion(lab00.LAB.get(criterion), Learner(vars(solution)), Context("00_warmup", quick=True, seed=3))
        assert res.status == "passed", res.message
