"""The bookkeeping every engine shares: clocks, completions, rejection of bad requests, run metrics."""
import pytest

from servelab.engine import Completion, EngineRun, StepClock, WallClock, reject_invalid
from servelab.metrics import summarize
from servelab.workloads import Request


def test_step_clock_is_virtual_and_waits_by_jumping():
    c = StepClock(0.5)
    c.step()
    c.step()
    assert c.now() == 1.0
    c.wait_until(3.0)
    assert c.now() == 3.0
    c.wait_until(1.0)  # never goes back
    assert c.now() == 3.0


def test_wall_clock_waits_for_real():
    c = WallClock()
    c.wait_until(0.02)
    assert c.now() >= 0.02


def test_completion_stops_on_eos_or_length():
    c = Completion(1)
    assert not c.add(5, 0.1, eos_id=9, max_new_tokens=3)
    assert c.add(9, 0.2, eos_id=9, max_new_tokens=3) and c.finish_reason == "eos"
    d = Completion(2)
    assert [d.add(t, t, None, 2) for t in (1, 2)] == [False, True] and d.finish_reason == "length"


def test_bad_requests_are_rejected_one_by_one():
    reqs = [Request(0, [1, 2], 4, 0.0), Request(1, [], 4, 0.0), Request(2, [1], 0, 0.0),
            Request(3, [1] * 30, 5, 0.0), Request(4, [5000], 2, 0.0)]
    ok, rejected = reject_invalid(reqs, vocab_size=4096, max_len=32)
    assert [r.id for r in ok] == [0]
    assert set(rejected) == {1, 2, 3, 4}
    assert "empty prompt" in rejected[1].error and "max_new_tokens" in rejected[2].error
    assert "exceeds the context" in rejected[3].error and "token ids" in rejected[4].error
    assert all(c.finish_reason == "error" and not c.tokens for c in rejected.values())


def test_run_utilization_and_timelines():
    reqs = [Request(0, [1, 2, 3], 2, 0.0), Request(1, [4], 1, 0.5), Request(2, [], 1, 0.0)]
    run = EngineRun("x", {0: Completion(0, [7, 8], [1.0, 1.5], "length"), 1: Completion(1, [9], [2.0], "length"),
                          2: Completion(2, finish_reason="error", error="empty")}, steps=4, num_slots=2,
                    busy_slot_steps=3, computed_slot_steps=6)
    assert run.output_tokens == 3
    assert run.slot_utilization == pytest.approx(3 / 8)
    assert run.wasted_fraction == pytest.approx(0.5)
    tl = run.timelines(reqs)
    assert [t.request_id for t in tl] == [0, 1]  # the rejected request has no timeline
    res = summarize(tl)
    assert res.mean_ttft_ms == pytest.approx((1000 + 1500) / 2)
