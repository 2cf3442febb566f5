"""A tiny lab for the grader's own tests: no model, no torch in the criteria, runs in a blink.

Registered only when ``SERVELAB_GRADER_LABS=grader_stub_lab`` (tests/ on PYTHONPATH), see conftest.py.
Graded functions: ``mean(xs: list[float]) -> float`` and ``spin(n: int) -> int``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from grader.spec import Context, Fail, Lab, Learner, Outcome

LAB = Lab(
    id="stub",
    title="Grader self-test",
    notebook="stub.ipynb",
    module="stub",
    functions=("mean", "spin"),
    uses_servelab=False,
)


@dataclass
class Sample:
    """A library dataclass that validates its input (like servelab's RequestTimeline): its ``__init__`` is
    generated code (filename ``<string>``) that calls ``__post_init__``."""

    value: float

    def __post_init__(self) -> None:
        if math.isinf(self.value):
            raise ValueError(f"a sample must be finite, got {self.value}")


@LAB.criterion("mean_values", "correctness", 3, exercise="mean")
def mean_values(learner: Learner, ctx: Context) -> Outcome:
    """mean() of fresh random lists."""
    fn, rng = learner.fn("mean"), ctx.rng("mean")
    for k in range(5):
        xs = [rng.uniform(-10, 10) for _ in range(rng.randint(1, 9))]
        got = fn(list(xs))
        if not isinstance(got, (int, float)):
            raise Fail(f"list {k}: mean returned {type(got).__name__}; expected float")
        Sample(got)  # an infinite mean is rejected by "library code", not by the learner's
        if math.isnan(got):
            raise Fail(f"list {k} ({len(xs)} values): mean returned NaN")
        if abs(got - sum(xs) / len(xs)) > 1e-9:
            raise Fail(f"list {k} ({len(xs)} values): expected {sum(xs) / len(xs):.6f}, got {got:.6f}",
                       hint="sum(xs) / len(xs)")
    return Outcome(True, "5 hidden lists match", {"cases": 5})


@LAB.criterion("spin_stops", "correctness", 1, exercise="spin", timeout_s=4)
def spin_stops(learner: Learner, ctx: Context) -> Outcome:
    """spin(n) returns n."""
    got = learner.fn("spin")(3)
    return Outcome(got == 3, f"spin(3) returned {got!r}")


@LAB.criterion("mean_on_gpu", "gpu", 2, exercise="mean")
def mean_on_gpu(learner: Learner, ctx: Context) -> Outcome:
    """Needs a GPU (blocked on CPU)."""
    return Outcome(True, "ran on a GPU")


@LAB.criterion("mean_side_by_side", "gpu", 0, exercise="mean")
def mean_side_by_side(learner: Learner, ctx: Context) -> Outcome:
    """Optional, worth no points: a comparison that needs a GPU, like lab 01's vLLM side by side, whose
    first paragraph runs over two lines.

    A second paragraph: details `grader list` leaves out.
    """
    return Outcome(True, "compared on a GPU")


@LAB.criterion("mean_speed", "performance", 1, exercise="mean")
def mean_speed(learner: Learner, ctx: Context) -> Outcome:
    """A performance criterion: counts only when the correctness criteria passed."""
    t0 = time.perf_counter()
    learner.fn("mean")([1.0, 2.0])
    return Outcome(
        True, "fast enough", {"speedup": 2.0, "threshold": ctx.threshold, "seconds": time.perf_counter() - t0}
    )
