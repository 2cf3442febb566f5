"""Classic wrong implementations of lab 01, planted into the reference solution: each must fail the criterion
that is about it, with that check's own message and hint (issue #8)."""
from __future__ import annotations

import pytest
from planted import planted as plant

import servelab.reference.batching as solution
from grader.checks import speed_verdict
from grader.labs import lab01_batching as lab01
from grader.spec import Context, Fail, Learner, run_criterion
from servelab.timing import PairedResult


def planted(*edits: tuple[str, str]) -> Learner:
    return plant(solution, *edits)


def grade(learner: Learner, criterion: str):
    return run_criterion(lab01.LAB.get(criterion), learner, Context("01_batching", quick=True, seed=5))


PADS_AT_ZERO = ("positions = torch.full((len(prompts), width), -1, dtype=torch.long)",
                "positions = torch.zeros((len(prompts), width), dtype=torch.long)")
RE_PREFILL = ("            last = torch.tensor([[running[s][1].tokens[-1]] for s in slots])\n"
              "            positions = torch.tensor([[running[s][0].prompt_len + len(running[s][1].tokens) - 1] for s in slots])\n",
              "            last, positions = left_pad([running[s][0].prompt_ids + running[s][1].tokens for s in slots])\n")
EOS_ONLY_AT_PREFILL = ("            if out.add(token, now, eos_id, request.max_new_tokens):",
                       "            if out.add(token, now, eos_id if not out.tokens else None, request.max_new_tokens):")


def test_the_solution_passes_the_new_checks():
    for criterion in ("static_model_inputs", "continuous_model_inputs"):
        res = grade(Learner(vars(solution)), criterion)
        assert res.status == "passed", res.message


def test_pads_at_position_zero_fail_static_model_inputs():
    """Planted bug 1 passed every static criterion before: it happens to decode right on a CPU."""
    res = grade(planted(PADS_AT_ZERO), "static_model_inputs")
    assert res.status == "failed"
    assert "position 0 appears" in res.message and "Hint: padding has position -1" in res.message


def test_re_prefilling_engine_fails_continuous_model_inputs():
    """Planted bug 2: correct tokens, but every step re-runs every running sequence."""
    learner = planted(RE_PREFILL)
    assert grade(learner, "continuous_matches_alone").status == "passed"  # correct, so only counting catches it
    res = grade(learner, "continuous_model_inputs")
    assert res.status == "failed"
    assert "asked the model to compute" in res.message and "never its whole sequence again" in res.message


def test_eos_checked_only_at_prefill_fails_with_the_stopping_hint():
    """Planted bug 3: the later-EOS case catches it, and the hint is about stopping, not about positions."""
    res = grade(planted(EOS_ONLY_AT_PREFILL), "continuous_matches_alone")
    assert res.status == "failed"
    assert "eos_id" in res.message and "Hint: stop a request right after it emits eos_id" in res.message
    assert "position" not in res.message.split("Hint:")[1]


# (name, edits, criterion that must fail, words its message must hold)
CLASSIC = [
    ("LIFO admission", [("request = waiting.popleft()", "request = waiting.pop()")],
     "continuous_scheduling", "another order than they arrived"),
    ("slots freed only when all finish", [("                free.append(s)\n", ""),
                                          ("        budget = max_step_tokens - len(running)\n",
                                           "        free = free or ([] if running else list(range(max_running - 1, -1, -1)))\n"
                                           "        budget = max_step_tokens - len(running)\n")],
     "continuous_scheduling", "a slot sat idle"),
    ("over-admission", [("    cache = model.new_cache(max_running, max_len)\n    waiting",
                         "    cache = model.new_cache(max_running + 1, max_len)\n    waiting"),
                        ("free = list(range(max_running - 1, -1, -1))", "free = list(range(max_running, -1, -1))")],
     "continuous_scheduling", "never run more than max_running"),
    ("token budget ignored", [("(waiting[0].prompt_len <= budget or not (admitted or running))", "True")],
     "continuous_scheduling", "token budget"),
    ("EOS ignored", [("if out.add(token, now, eos_id, request.max_new_tokens):",
                      "if out.add(token, now, None, request.max_new_tokens):")],
     "continuous_matches_alone", "eos_id"),
    ("max_new_tokens + 1", [("if out.add(token, now, eos_id, request.max_new_tokens):",
                             "if out.add(token, now, eos_id, request.max_new_tokens + 1):")],
     "continuous_matches_alone", "expected"),
    ("max_new_tokens - 1", [("if out.add(token, now, eos_id, request.max_new_tokens):",
                             "if out.add(token, now, eos_id, max(1, request.max_new_tokens - 1)):")],
     "continuous_matches_alone", "expected"),
    ("pads at position 0", [PADS_AT_ZERO], "static_model_inputs", "position 0 appears"),
    ("admission before arrival", [("while waiting and free and waiting[0].arrival_s <= clock.now() and \\",
                                   "while waiting and free and \\")],
     "continuous_matches_alone", "before its arrival"),
    ("tokens stamped before clock.step()", [("        clock.step()\n        run.steps += 1\n        run.busy_slot_steps",
                                             "        run.steps += 1\n        run.busy_slot_steps"),
                                            ("                free.append(s)\n    run.seconds",
                                             "                free.append(s)\n        clock.step()\n    run.seconds")],
     "metrics_agree", "token times"),
    ("re-prefill every step", [RE_PREFILL], "continuous_model_inputs", "asked the model to compute"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,edits,criterion,words", CLASSIC, ids=[c[0] for c in CLASSIC])
def test_classic_bug_fails_its_criterion(name, edits, criterion, words):
    res = grade(planted(*edits), criterion)
    assert res.status == "failed", f"{name}: {criterion} {res.status}: {res.message}"
    assert words in res.message, f"{name}: {res.message}"


def test_a_noisy_miss_says_rerun_and_gives_no_hint():
    timing = PairedResult([1.0, 1.2, 1.1], [0.8, 0.7, 0.75])  # ratios 1.25, 1.71, 1.47 -> median 1.47
    with pytest.raises(Fail) as err:
        speed_verdict("throughput", timing, 1.5, "cpu", "2.75x fewer steps", True, {}, hint="batch your forwards")
    assert "looks like noise" in str(err.value) and "1.25, 1.71, 1.47" in str(err.value) and not err.value.hint
    with pytest.raises(Fail) as err:  # a clear miss with the deterministic figure failing too: the hint fits
        speed_verdict("throughput", PairedResult([1.0] * 3, [1.6] * 3), 1.5, "cpu", "1.1x fewer steps", False, {},
                      hint="batch your forwards")
    assert "noise" not in str(err.value) and err.value.hint == "batch your forwards"
    assert err.value.metrics["ratios"] == [0.625] * 3 and "noise" not in err.value.metrics  # a miss keeps its pairs
    wide = PairedResult([1.0, 1.0, 1.0], [1.6, 0.6, 2.0])  # median 0.62 far below 1.5, but one pair reached 1.67
    with pytest.raises(Fail) as err:
        speed_verdict("throughput", wide, 1.5, "cpu", "2.75x fewer steps", True, {}, hint="batch your forwards")
    assert "looks like noise" in str(err.value) and err.value.metrics["noise"] is True
    with pytest.raises(Fail) as err:  # the same pairs with the deterministic figure failing: slow code
        speed_verdict("throughput", wide, 1.5, "cpu", "1.1x fewer steps", False, {}, hint="batch your forwards")
    assert "noise" not in str(err.value) and "noise" not in err.value.metrics
    ok = speed_verdict("throughput", PairedResult([2.0] * 3, [1.0] * 3), 1.5, "cpu", "2.75x fewer steps", True, {})
    assert ok.passed and "median of 3 alternating pairs: 2.00, 2.00, 2.00" in ok.message


def test_static_steps_match_the_reference_static_engine():
    from servelab import load_model
    from servelab.engine import StepClock
    from servelab.workloads import Request

    model = load_model()
    reqs = [Request(i, [5 + i, 9, 11 + i], n, 0.0) for i, n in enumerate([3, 9, 1, 6, 4, 2, 7])]
    run = solution.static_batching(model, reqs, 3, None, StepClock())
    lengths = {r.id: len(run.completions[r.id].tokens) for r in reqs}
    assert lab01.static_steps(reqs, lengths, 3) == run.steps == 9 + 6 + 7
