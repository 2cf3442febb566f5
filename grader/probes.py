"""Wrap a model to see how learner code calls it: tokens per forward, cache use, time per call.

Counting what a decode loop feeds the model gives deterministic evidence of KV caching (one new
token per step) that does not depend on how busy the machine is. ``RecordingModel`` also keeps the input
ids and logits of each forward (lab 03 checks the caches' contents with them); ``NegatedModel`` and
``OtherVocabModel`` are drafts made to fail (every proposal rejected; another vocabulary). All of them cross
to a learner's worker as handles (``grader.remote.Handles``, ``grader.worker.Server``).
"""

from __future__ import annotations

import itertools
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
    engine reports (``run.steps``). Each step also takes a number from the sequence that numbers every
    ``RecordingModel`` forward (``marks``): a forward numbered below ``marks[i]`` and above ``marks[i - 1]``
    ran in step i + 1, so a criterion can add up what each step computed."""

    def __init__(self, step_s: float = 0.01):
        from servelab.engine import StepClock

        self.clock, self.steps, self.marks = StepClock(step_s), 0, []

    def now(self) -> float:
        return self.clock.now()

    def step(self) -> None:
        self.steps += 1
        self.marks.append(next(_FORWARDS))
        self.clock.step()

    def wait_until(self, t: float) -> None:
        self.clock.wait_until(t)


_FORWARDS = itertools.count()  # numbers every RecordingModel forward in this process: their order across probes


@dataclass
class Forward:
    """What a ``RecordingModel`` saw in one forward, beyond its ``Call``."""

    seq: int  # this forward's number among every recording probe's forwards (their order across models)
    ids: list[list[int]]  # the input token ids, per row
    logits: object = None  # the output as a float16 tensor [batch, tokens, vocab] (None: not kept)


@dataclass
class RecordingModel(CountingModel):
    """A ``CountingModel`` that also keeps each forward's input ids and (``logits=True``) its output logits in
    float16, numbered across all recording probes: what a check of the caches' contents needs (lab 03
    recomputes each forward fresh and compares)."""

    logits: bool = False
    forwards: list[Forward] = field(default_factory=list)

    def __call__(self, input_ids, positions=None, cache=None):
        out = CountingModel.__call__(self, input_ids, positions, cache)
        kept = out.detach().to("cpu", copy=True).half() if self.logits else None
        self.forwards.append(Forward(next(_FORWARDS), input_ids.tolist(), kept))
        return out


class _Wrapper:
    """A model behind another forward: every attribute (config, device, new_cache, ...) is the model's."""

    def __init__(self, model):
        self.model = model

    def forward(self, *args, **kwargs):
        return self(*args, **kwargs)

    def __getattr__(self, name):
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)


class NegatedModel(_Wrapper):
    """The model with negated logits: its argmax is the model's least likely token. As a draft, every first
    proposal of a round is one the target rejects (lab 03)."""

    def __call__(self, input_ids, positions=None, cache=None):
        return -self.model(input_ids, positions, cache)


class OtherVocabModel(_Wrapper):
    """The model with ``extra`` more tokens in its vocabulary (their logits -inf): a draft that does not share
    the target's tokenizer, for the "different vocabularies" ValueError."""

    MAX_EXTRA = 4096

    def __init__(self, model, extra: int = 7):
        if isinstance(extra, bool) or not isinstance(extra, int) or not 1 <= extra <= self.MAX_EXTRA:
            raise ValueError(f"extra must be an int in 1..{self.MAX_EXTRA}, got {extra!r}")
        super().__init__(model)
        self.extra = extra
        cfg = model.config
        self.config = type(cfg)(**{**cfg.__dict__, "vocab_size": cfg.vocab_size + extra})

    def __call__(self, input_ids, positions=None, cache=None):
        import torch

        out = self.model(input_ids, positions, cache)
        pad = torch.full((*out.shape[:-1], self.extra), float("-inf"), dtype=out.dtype, device=out.device)
        return torch.cat([out, pad], -1)
