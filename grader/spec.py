"""How a lab declares its criteria, and how one criterion runs against a learner's code.

The CLI grader (in a subprocess per criterion) and the notebook's inline ``check()`` both call
``run_criterion`` on the same ``Criterion`` objects, so a check cell and the final grade cannot disagree.
"""

from __future__ import annotations

import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

Kind = Literal["correctness", "interpreter", "gpu", "multi_gpu", "performance"]
Status = Literal["passed", "failed", "timeout", "error", "blocked"]
KINDS: tuple[str, ...] = ("correctness", "interpreter", "gpu", "multi_gpu", "performance")
# what a performance criterion waits for by default: the lab's correctness checks (`interpreter` ones are
# correctness checks of Triton kernels run in its interpreter); an optional `gpu` comparison is not one
GATING_KINDS: tuple[str, ...] = ("correctness", "interpreter")
GRADER_DIR = Path(__file__).resolve().parent
QUICK_ENV = "SERVELAB_QUICK"  # "1": smaller notebook experiments and fewer hidden cases (CI)


def quick_mode() -> bool:
    return os.environ.get(QUICK_ENV, "") not in ("", "0")


class Outcome(NamedTuple):
    """What a criterion function returns: (passed, message, metrics)."""

    passed: bool
    message: str
    metrics: dict | None = None


class Fail(Exception):
    """Raise from a criterion (or its helpers) to fail it with this message; reported as `failed`.

    ``hint``: advice for exactly this failed check, shown after the message. Give one only where it fits
    this failure; a failure with no fitting hint shows none.
    """

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class GradingError(Exception):
    """The criterion cannot run on this notebook (function missing, cell broken): reported as `error`."""


class Blocked(Exception):
    """Raise from a criterion when this machine lacks what it needs (a package, a GPU), found out only at run
    time: reported as `blocked` with this message (say what is missing and how to get it), not scored."""


class Learner:
    """The learner's definitions as criteria see them: a notebook's globals or the grader's extraction."""

    def __init__(self, namespace: dict[str, Any], load_errors: list[str] | None = None):
        self.namespace = namespace
        self.load_errors = list(load_errors or [])

    def fn(self, name: str) -> Callable:
        """The learner's function ``name``, or a GradingError that says why it is not usable."""
        obj = self.namespace.get(name)
        if obj is None:
            defined = sorted(
                k
                for k, v in self.namespace.items()
                if callable(v)
                and not k.startswith("_")
                and getattr(v, "__module__", None) == self.namespace.get("__name__")
            )
            msg = f"`{name}` is not defined by the notebook's graded cells"
            msg += f" (they define: {', '.join(defined)})" if defined else ""
            msg += ". Keep the exercise's function name and signature, and keep its cell tagged `graded`."
            if self.load_errors:
                msg += " Cells that failed to load: " + "; ".join(self.load_errors)
            raise GradingError(msg)
        if not callable(obj):
            raise GradingError(f"`{name}` is a {type(obj).__name__}, not a function")
        return obj


@dataclass
class Context:
    """Everything a criterion may use besides the learner's code: device, randomness, shared model."""

    lab: str
    device: str = "cpu"  # "cpu" | "cuda"
    device_class: str = "cpu"
    quick: bool = False
    seed: int = 0  # fresh per run (hidden cases differ each time); reported so a failure can be replayed
    threshold: float | None = None  # performance criteria: the speedup to reach on this device class

    def rng(self, salt: str = "") -> random.Random:
        return random.Random(f"{self.seed}:{salt}")

    def model(self, name: str | None = None):
        return _cached(("model", name, self.device), lambda: _load_model(name, self.device))

    def tokenizer(self, name: str | None = None):
        return _cached(("tok", name), lambda: _load_tokenizer(name))


_CACHE: dict = {}


def _cached(key, make):
    # one model per process: criteria subprocesses load it once, inline checks reuse it across cells
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _load_model(name, device):
    from servelab import load_model

    return load_model(name, device=device)


def _load_tokenizer(name):
    from servelab import load_tokenizer

    return load_tokenizer(name)


CriterionFn = Callable[[Learner, Context], Outcome]


@dataclass(frozen=True)
class Criterion:
    id: str
    kind: str
    points: int
    run: CriterionFn
    exercise: str  # the graded function it checks; `check("<exercise>")` runs all criteria of it
    description: str = ""
    timeout_s: float = 120.0
    gate: tuple[str, ...] | None = None  # performance: criteria that must pass first (default: GATING_KINDS)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"criterion {self.id!r}: kind {self.kind!r} is not one of {KINDS}")


@dataclass
class Lab:
    id: str  # folder name under solutions/ and labs/, e.g. "00_warmup"
    title: str
    notebook: str  # notebook file name inside the lab folder
    module: str  # generated reference module: servelab/reference/<module>.py
    functions: tuple[str, ...]  # graded functions: same signature in solution and learner notebooks
    uses_servelab: bool = True  # import servelab (Triton mode) before the learner's code runs
    criteria: list[Criterion] = field(default_factory=list)

    def criterion(
        self,
        id: str,
        kind: str,
        points: int,
        exercise: str | None = None,
        timeout_s: float = 120.0,
        gate: tuple[str, ...] | None = None,
    ) -> Callable[[CriterionFn], CriterionFn]:
        """Decorator: register ``fn(learner, ctx) -> Outcome`` as a criterion of this lab."""

        def register(fn: CriterionFn) -> CriterionFn:
            if any(c.id == id for c in self.criteria):
                raise ValueError(f"lab {self.id}: duplicate criterion id {id!r}")
            ex = exercise or (self.functions[0] if len(self.functions) == 1 else "")
            if ex not in self.functions:
                raise ValueError(
                    f"lab {self.id}: criterion {id!r} checks {ex!r}, not one of {self.functions}"
                )
            doc = (fn.__doc__ or "").strip().splitlines()
            self.criteria.append(
                Criterion(id, kind, points, fn, ex, doc[0] if doc else "", timeout_s, gate)
            )
            return fn

        return register

    def get(self, criterion_id: str) -> Criterion:
        for c in self.criteria:
            if c.id == criterion_id:
                return c
        raise KeyError(
            f"lab {self.id} has no criterion {criterion_id!r} (it has {[c.id for c in self.criteria]})"
        )

    def ordered(self) -> list[Criterion]:
        """Performance criteria last: they only count once the correctness criteria have passed."""
        return sorted(self.criteria, key=lambda c: c.kind == "performance")

    def selection(self, ids: set[str]) -> list[Criterion]:
        """Criteria ``ids`` plus the ones their performance criteria are gated on, in run order."""
        wanted = set(ids) | {g for c in self.criteria if c.id in ids for g in self.gates(c)}
        return [c for c in self.ordered() if c.id in wanted]

    def gates(self, crit: Criterion) -> tuple[str, ...]:
        """The criteria a performance criterion counts only after: its ``gate``, else every correctness
        check of the lab (kinds in GATING_KINDS). Other criteria never gate one."""
        if crit.kind != "performance":
            return ()
        if crit.gate is not None:
            return crit.gate
        return tuple(c.id for c in self.criteria if c.kind in GATING_KINDS)


@dataclass
class Result:
    id: str
    kind: str
    status: str
    points: float
    max_points: int
    message: str
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__)


def gate_failure(lab: Lab, crit: Criterion, done: dict[str, Result]) -> str | None:
    """Why a performance criterion must not count (a gating criterion did not pass), else None."""
    bad = [
        f"{g} ({done[g].status})"
        for g in lab.gates(crit)
        if g in done and done[g].status not in ("passed", "blocked")
    ]
    if bad:
        return "not run: correctness must pass before speed counts; not passed: " + ", ".join(bad)
    return None


def run_criterion(crit: Criterion, learner: Learner, ctx: Context) -> Result:
    """Run one criterion in this process and turn whatever happens into a Result (never raises)."""
    t0 = time.perf_counter()
    metrics: dict = {}
    try:
        with _one_cpu_thread(ctx.device):
            out = crit.run(learner, ctx)
        passed, message, metrics = bool(out[0]), str(out[1]), dict(out[2] or {}) if len(out) > 2 else {}
        status = "passed" if passed else "failed"
    except Fail as err:
        status, message = "failed", str(err) + (f"\nHint: {err.hint}" if err.hint else "")
    except GradingError as err:
        status, message = "error", str(err)
    except Blocked as err:
        status, message = "blocked", str(err)
    except NotImplementedError as err:
        status, message = (
            "failed",
            f"`{crit.exercise}` is not implemented yet: {err}" + _where(err, code=False),
        )
    except Exception as err:  # noqa: BLE001 - anything the learner's code raises is reported, not fatal
        status, message = "error", f"{type(err).__name__}: {err}" + _where(err)
    metrics.setdefault("seed", ctx.seed)
    return Result(
        crit.id,
        crit.kind,
        status,
        crit.points if status == "passed" else 0,
        crit.points,
        message,
        metrics,
        round(time.perf_counter() - t0, 3),
    )


@contextmanager
def _one_cpu_thread(device: str):
    """Criteria run small-batch decodes: on CPU one thread is faster, and far steadier on a busy machine
    than two threads fighting other processes (measured: ~6x slower checks with 2 threads under load)."""
    torch = sys.modules.get("torch")
    if device != "cpu" or torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SERVELAB_GRADER_THREADS", "1")))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _where(err: BaseException, code: bool = True) -> str:
    """' (raised in fn, <notebook cell N> line M: `code`)' for the innermost frame of the learner's code."""
    library = (str(GRADER_DIR), str(GRADER_DIR.parent / "servelab"), "site-packages", "/lib/python")
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not any(s in f.filename for s in library)]
    if not frames:
        return ""
    f = frames[-1]
    line = f": `{f.line.strip()}`" if f.line and code else ""
    where = "its notebook cell" if "ipykernel" in f.filename else f.filename  # inline check: a Jupyter cell
    return f" (raised in {f.name}, {where} line {f.lineno}{line})"
