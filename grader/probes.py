"""Wrap a model to see how learner code calls it: tokens per forward, cache use, time per call.

Counting what a decode loop feeds the model gives deterministic evidence of KV caching (one new
token per step) that does not depend on how busy the machine is.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Call:
    tokens: int  # input_ids.shape[1]: tokens computed by this forward (per row)
    batch: int
    cached: bool  # a KV cache (view) was passed
    seconds: float
    positions: list[list[int]] = field(default_factory=list)  # per row, as fed (-1 = padding)

    @property
    def max_position(self) -> int:
        """Position of the newest token this call fed."""
        return max((p for row in self.positions for p in row), default=self.tokens - 1)

    @property
    def real_tokens(self) -> int:
        """Tokens that are not padding: what the step really asked the model to compute."""
        return sum(p >= 0 for row in self.positions for p in row)


@dataclass
class CountingModel:
    """Behaves like the model for ``model(...)``, ``model.forward(...)`` and every attribute."""

    model: object
    calls: list[Call] = field(default_factory=list)

    def __call__(self, input_ids, positions=None, cache=None):
        from servelab.timing import timer

        with timer(input_ids.device) as t:
            out = self.model(input_ids, positions, cache)
        rows = (positions.tolist() if positions is not None
                else [list(range(input_ids.shape[1]))] * input_ids.shape[0])
        self.calls.append(Call(input_ids.shape[1], input_ids.shape[0], cache is not None, t.elapsed_s, rows))
        return out

    def forward(self, *args, **kwargs):
        return self(*args, **kwargs)

    def __getattr__(self, name):  # config, device, dtype, new_cache, ... come from the real model
        if name == "model":  # not yet set (copy, pickle): avoid recursing forever
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def forward_tokens(self) -> int:
        return sum(c.tokens * c.batch for c in self.calls)

    @property
    def real_forward_tokens(self) -> int:
        return sum(c.real_tokens for c in self.calls)


class CountingClock:
    """A StepClock whose step() calls the grader counts itself: a step count that does not rest on what the
    engine reports (``run.steps``)."""

    def __init__(self, step_s: float = 0.01):
        from servelab.engine import StepClock

        self.clock, self.steps = StepClock(step_s), 0

    def now(self) -> float:
        return self.clock.now()

    def step(self) -> None:
        self.steps += 1
        self.clock.step()

    def wait_until(self, t: float) -> None:
        self.clock.wait_until(t)
