"""Step-wise engines: what a server needs from an engine, one scheduler iteration at a time.

The labs' engines are offline functions over a whole trace. A server cannot know the trace in advance: it
adds requests as they arrive and runs one step at a time. The protocol (``StepEngine``):

- ``check(request)`` raises ValueError for a request the engine can never serve (empty, too long, ...);
- ``add(request)`` queues a checked request; it joins the running batch at a later step;
- ``step()`` runs one scheduler iteration and returns a TokenEvent per token it produced;
- ``abort(request_id)`` forgets a request (a client went away), freeing its slot;
- ``has_work``: whether ``step()`` has anything to do.

A learner's notebook can define such a class and serve it: ``servelab serve --engine my.ipynb:MyEngine``. It is
built as ``MyEngine(model, max_running=..., max_step_tokens=..., eos_id=..., max_len=...)``.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from servelab.generate import check_request
from servelab.reference.batching import left_pad


@dataclass
class EngineRequest:
    """A request as an engine sees it: token ids in, how many tokens out, and how to pick them."""

    id: int
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy (argmax), the labs' decoding
    seed: int | None = None  # for temperature > 0: the same seed gives the same tokens
    ignore_eos: bool = False  # run to max_new_tokens even past EOS (fixed output lengths for benchmarks)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass
class TokenEvent:
    request_id: int
    token: int
    finish_reason: str = ""  # "" while running; "stop" (EOS) or "length" (max_new_tokens) on its last token


@runtime_checkable
class StepEngine(Protocol):
    def check(self, request: EngineRequest) -> None: ...
    def add(self, request: EngineRequest) -> None: ...
    def step(self) -> list[TokenEvent]: ...
    def abort(self, request_id: int) -> bool: ...
    @property
    def has_work(self) -> bool: ...


@dataclass
class _Running:
    request: EngineRequest
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # only for sampled requests


class ContinuousBatchingEngine:
    """Lab 01's continuous batching (``servelab.reference.batching.continuous_batching``), one step at a time.

    Same policy: every step, admit waiting requests in arrival order while a slot is free and the step's token
    budget (``max_step_tokens``, one per running request plus each admitted prompt) allows (a lone prompt
    longer than the budget is admitted alone), prefill the admitted prompts (left-padded, one forward), decode
    the running ones (one forward), retire on EOS or max_new_tokens. ``max_running=1`` serves one at a time.
    """

    name = "continuous"

    def __init__(self, model, max_running: int = 16, max_step_tokens: int = 512, eos_id: int | None = None,
                 max_len: int = 1024):
        if max_running < 1 or max_step_tokens < 1 or max_len < 2:
            raise ValueError(f"need max_running >= 1, max_step_tokens >= 1, max_len >= 2; got {max_running}, "
                             f"{max_step_tokens}, {max_len}")
        self.model, self.eos_id, self.max_len = model, eos_id, max_len
        self.max_running, self.max_step_tokens = max_running, max_step_tokens
        self.cache = model.new_cache(max_running, max_len)
        self.waiting: deque[EngineRequest] = deque()
        self.running: dict[int, _Running] = {}  # slot -> request state
        self.free = list(range(max_running - 1, -1, -1))  # pop() hands out the lowest slot first
        self.steps = 0

    def check(self, request: EngineRequest) -> None:
        check_request(request.prompt_ids, request.max_new_tokens, self.model.config.vocab_size, self.max_len)

    def add(self, request: EngineRequest) -> None:
        self.check(request)
        self.waiting.append(request)

    def abort(self, request_id: int) -> bool:
        for s, r in list(self.running.items()):
            if r.request.id == request_id:
                del self.running[s]
                self.free.append(s)  # a freed slot's stale K/V is never read: positions restart at 0
                return True
        for r in self.waiting:
            if r.id == request_id:
                self.waiting.remove(r)
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def step(self) -> list[TokenEvent]:
        budget = self.max_step_tokens - len(self.running)
        admitted: list[tuple[int, EngineRequest]] = []
        while self.waiting and self.free and \
                (self.waiting[0].prompt_len <= budget or not (admitted or self.running)):
            request = self.waiting.popleft()
            admitted.append((self.free.pop(), request))
            budget -= request.prompt_len
        forwards = []  # (slots, last-position logits [n, V])
        if self.running:
            slots = sorted(self.running)
            last = torch.tensor([[self.running[s].tokens[-1]] for s in slots])
            positions = torch.tensor([[self.running[s].request.prompt_len + len(self.running[s].tokens) - 1]
                                      for s in slots])
            forwards.append((slots, self.model(last, positions, self.cache.rows(slots))[:, -1]))
        if admitted:
            slots = [s for s, _ in admitted]
            ids, positions = left_pad([r.prompt_ids for _, r in admitted])
            forwards.append((slots, self.model(ids, positions, self.cache.rows(slots))[:, -1]))
            for s, r in admitted:
                gen = None
                if r.temperature > 0:
                    gen = torch.Generator(device=self.model.device)
                    gen.manual_seed(r.seed if r.seed is not None else int(torch.randint(2**62, ())))
                self.running[s] = _Running(r, generator=gen)
        self.steps += 1
        events = []
        for slots, logits in forwards:
            for s, token in zip(slots, self._pick(logits, [self.running[s] for s in slots])):
                state = self.running[s]
                state.tokens.append(token)
                r = state.request
                finish = "stop" if token == self.eos_id and not r.ignore_eos else \
                    "length" if len(state.tokens) >= r.max_new_tokens else ""
                events.append(TokenEvent(r.id, token, finish))
                if finish:
                    del self.running[s]
                    self.free.append(s)
        return events

    @staticmethod
    def _pick(logits: torch.Tensor, states: list[_Running]) -> list[int]:
        """Greedy rows by argmax (exactly the labs' decoding); sampled rows from softmax(logits / T)."""
        tokens = logits.argmax(-1).tolist()  # one device sync per forward
        for i, st in enumerate(states):
            if st.generator is not None:
                probs = torch.softmax(logits[i] / st.request.temperature, -1)
                tokens[i] = int(torch.multinomial(probs, 1, generator=st.generator))
        return tokens


ENGINES = {"continuous": ContinuousBatchingEngine}
# later labs' engines are offline functions over a whole trace (servelab.reference.paged, .speculative); they
# have no step-wise version yet, so asking for them by name says so
NOT_YET = {"paged": "lab 02's paged_continuous_batching", "prefix": "lab 02's prefix_cached_batching",
           "speculative": "lab 03's speculative decoding"}


def make_engine(spec: str, model, **kw) -> StepEngine:
    """``spec``: an engine name (``continuous``), or ``path/to/notebook.ipynb[:ClassName]`` for a learner's own."""
    if spec in ENGINES:
        return ENGINES[spec](model, **kw)
    if spec in NOT_YET:
        raise ValueError(f"--engine {spec}: {NOT_YET[spec]} has no step-wise (serving) version yet; engines that "
                         f"exist: {', '.join(ENGINES)}, or path/to/notebook.ipynb:ClassName")
    path, _, cls_name = spec.partition(":") if ".ipynb" in spec else (spec, "", "")
    if not path.endswith(".ipynb"):
        raise ValueError(f"unknown --engine {spec!r}: use one of {', '.join(ENGINES)} or path/to/notebook.ipynb:ClassName")
    return notebook_engine(Path(path), cls_name or None)(model, **kw)


def notebook_engine(path: Path, cls_name: str | None = None) -> type:
    """The step-engine class a notebook defines, run the way the grader runs a notebook's code: only its
    top-level imports, definitions and assignments (its ``graded`` cells, plus any cell defining ``cls_name``)."""
    from grader import notebook as nb_tools

    nb = nb_tools.load(path)
    extraction = nb_tools.extract(nb, (cls_name,) if cls_name else (), forbidden=())
    if extraction.errors:
        raise ValueError(f"{path}: " + "; ".join(extraction.errors))
    cells = extraction.cells
    if cls_name is None:  # no class named: every code cell, and the one step engine among them
        cells = [nb_tools.GradedCell(i, nb_tools.filter_top_level(nb_tools.source(c)))
                 for i, c in enumerate(nb["cells"]) if c.get("cell_type") == "code"]
    ns, errors = nb_tools.execute(cells, module_name=f"servelab_engine_{path.stem}")
    classes = {k: v for k, v in ns.items() if isinstance(v, type) and all(
        callable(getattr(v, m, None)) for m in ("check", "add", "step", "abort")) and hasattr(v, "has_work")}
    if cls_name is not None:
        if cls_name not in ns:
            raise ValueError(f"{path} defines no {cls_name} at the top of a code cell" +
                             (f" (errors: {'; '.join(errors)})" if errors else ""))
        if cls_name not in classes:
            raise ValueError(f"{path}: {cls_name} is not a step engine: it needs check, add, step, abort and has_work")
        return classes[cls_name]
    own = [c for c in classes.values() if c.__module__ == f"servelab_engine_{path.stem}"]
    if len(own) != 1:
        raise ValueError(f"{path} defines {len(own)} step-engine classes ({', '.join(c.__name__ for c in own) or 'none'})"
                         f": name one with --engine {path}:ClassName")
    return own[0]
