"""Lab 02's prefix-caching stretch: the solution cell passes both criteria; planted bugs fail a named one."""
from __future__ import annotations

import pytest
from planted import planted

import servelab.reference.paged as paged
from grader.labs import lab02_paged
from grader.spec import Context, Lab, Learner, run_criterion
from grader.thresholds import threshold


def lab() -> Lab:
    return lab02_paged.LAB


def learner(*edits: tuple[str, str]) -> Learner:
    """The solution (servelab.reference.paged, released from the notebook), with edits planted."""
    return planted(paged, *edits) if edits else Learner(vars(paged))


def ctx() -> Context:
    return Context("02_paged_attention", quick=True, seed=3,
                   threshold=threshold("cpu", "02_paged_attention", "prefix_cache_saves_prefill"))


def test_add_criteria_registers_the_exercise():
    lb = lab()
    assert "prefix_cached_batching" in lb.functions
    assert {c.id: (c.kind, c.points) for c in lb.criteria if c.exercise == "prefix_cached_batching"} == {
        "prefix_cache_matches_alone": ("correctness", 2), "prefix_cache_saves_prefill": ("performance", 1)}
    assert "prefix_cache_matches_alone" in lb.gates(lb.get("prefix_cache_saves_prefill"))


@pytest.mark.parametrize("criterion", ["prefix_cache_matches_alone", "prefix_cache_saves_prefill"])
def test_the_solution_passes_them(criterion):
    res = run_criterion(lab().get(criterion), learner(), ctx())
    assert res.status == "passed", res.message
    if criterion == "prefix_cache_saves_prefill":
        assert res.metrics["speedup"] >= 1.3 * ctx().threshold, res.metrics  # the solution: 4.5-5.5x fewer
        assert res.metrics["hit_rate"] > 0.7, res.metrics


def test_the_solution_agrees_with_the_paged_engine_and_reports_hits():
    from grader.labs.paged_prefix import _shared_trace
    from servelab.engine import StepClock

    c = ctx()
    reqs = _shared_trace(c, "test", 6, 16, (1, 6), (2, 6), rate=30.0)
    fn = learner().fn("prefix_cached_batching")
    base = paged.paged_continuous_batching(c.model(), reqs, 4, 64, None, StepClock(0.01), 64, 4)
    run = fn(c.model(), reqs, 4, 64, None, StepClock(0.01), 64, 4)
    assert {i: x.tokens for i, x in run.completions.items()} == {i: x.tokens for i, x in base.completions.items()}
    assert run.prompt_tokens == sum(r.prompt_len for r in reqs) and 0 < run.prefix_hit_tokens < run.prompt_tokens
    assert run.prefix_hit_rate == run.prefix_hit_tokens / run.prompt_tokens
    assert base.prefix_hit_tokens == base.prompt_tokens == 0 and base.prefix_hit_rate == 0


PLANTED = [
    ("a cached block shared without a reference (ref count not incremented, left evictable)",
     [("        if self.ref_counts[block] == 0:\n            del self.evictable[block]\n"
       "        self.ref_counts[block] += 1\n", "        pass\n")],
     "prefix_cache_matches_alone", "reserved"),
    ("a block hashed by its own tokens only: equal blocks after different prefixes are confused",
     [("parent = hash((parent, tuple(", "parent = hash((None, tuple(")], "prefix_cache_matches_alone", "expected"),
    ("whole prompt cached: the copied block is not filled (no copy made)",
     [("            if bs > 1:  # the copy", "            if False:  # the copy")],
     "prefix_cache_matches_alone", "expected"),
    ("hits reported but not used: the whole context is prefilled",
     [("        return num_tokens - 1 if whole else len(hits) * bs", "        return 0"),
      ("            run.prefix_hit_tokens += cached", "            run.prefix_hit_tokens += len(hits) * block_size")],
     "prefix_cache_matches_alone", "the model computed"),
]


@pytest.mark.parametrize("name,edits,criterion,words", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_bug_fails_its_criterion(name, edits, criterion, words):
    res = run_criterion(lab().get(criterion), learner(*edits), ctx())
    assert res.status == "failed", f"{name}: {criterion} {res.status}: {res.message}"
    assert words in res.message, f"{name}: {res.message}"


def test_no_prefix_cache_fails_the_saving():
    # the prefix engine with nothing ever found in the cache: correct tokens, no saving
    planted = learner(("            if h not in self.cached:\n                break",
                       "            if True:\n                break"))
    res = run_criterion(lab().get("prefix_cache_saves_prefill"), planted, ctx())
    assert res.status == "failed" and "1.0x fewer" in res.message, res.message
