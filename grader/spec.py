"""How a lab declares its criteria, and how one criterion runs against a learner's code.

The CLI grader (in a subprocess per criterion) and the notebook's inline ``check()`` both call
``run_criterion`` on the same ``Criterion`` objects, so a check cell and the final grade cannot disagree.
"""

from __future__ import annotations

import inspect
import os
import random
import sys
import sysconfig
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, suppress
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
    this failure; a failure with no fitting hint shows none. ``metrics``: what was measured, kept in the
    report like a pass's (a failed speed check still shows its pairs).
    """

    def __init__(self, message: str, hint: str = "", metrics: dict | None = None):
        super().__init__(message)
        self.hint, self.metrics = hint, dict(metrics or {})


class GradingError(Exception):
    """The criterion cannot run on this notebook (function missing, cell broken): reported as `error`."""


class Blocked(Exception):
    """Raise from a criterion when this machine lacks what it needs (a package, a GPU), found out only at run
    time: reported as `blocked` with this message (say what is missing and how to get it), not scored."""


class Stopped(BaseException):
    """The learner's worker ended or was stopped in the middle of a criterion (timeout, a limit, a crash, a
    forged message): reported with ``status`` and ``message`` as they are. A BaseException, so that a
    criterion's ``except Exception`` around a learner call cannot swallow it."""

    def __init__(self, status: str, message: str, stopped_in: str | None = None):
        super().__init__(message)
        self.status, self.message, self.stopped_in = status, message, stopped_in


class UsageError(ValueError):
    """The grader cannot run as asked (no such notebook, --device cuda without a GPU, an unwritable --json
    path): nothing is graded. The CLI prints the message and exits with its usage code (64)."""


class Learner:
    """The learner's definitions as criteria see them: a notebook's globals or the grader's extraction."""

    def __init__(self, namespace: dict[str, Any], load_errors: list[str] | None = None):
        self.namespace = namespace
        self.load_errors = list(load_errors or [])

    def fn(self, name: str) -> Callable:
        """The learner's function ``name``, or a GradingError that says why it is not usable."""
        obj = self.namespace.get(name)
        if obj is None:
            own = self.namespace.get("__name__")
            defined = [k for k, v in self.namespace.items()
                       if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == own]
            raise GradingError(missing_function(name, defined, self.load_errors))
        if not callable(obj):
            raise GradingError(f"`{name}` is a {type(obj).__name__}, not a function")
        return obj


def missing_function(name: str, defined: list[str], load_errors: list[str]) -> str:
    msg = f"`{name}` is not defined by the notebook's graded cells"
    msg += f" (they define: {', '.join(sorted(defined))})" if defined else ""
    msg += ". Keep the exercise's function name and signature, and keep its cell tagged `graded`."
    if load_errors:
        msg += " Cells that failed to load: " + "; ".join(load_errors)
    return msg


def call_in_place(fn: Callable, *args) -> tuple[Any, tuple]:
    """(what ``fn(*args)`` returned, the arguments as it left them): for learner functions that write into
    their arguments (a kernel's ``out``, a KV cache). A learner function in a worker sends them back
    (``grader.remote``); one in this process changed the objects themselves."""
    if _in_worker(fn):
        return fn.call(args, {}, echo=True)
    return fn(*args), args


def _in_worker(fn: Callable) -> bool:
    """Is ``fn`` a proxy to a learner function in a worker (``grader.remote``), not one in this process?"""
    from grader.remote import RemoteFunction  # grader.remote imports this module: import late

    return isinstance(fn, RemoteFunction)


def bench_calls(fn: Callable, recipe: dict, kwargs: dict, indices: list[int], device: str) -> tuple[float, list]:
    """(seconds for ``recipe['repeat']`` calls of ``fn`` on a problem built from ``recipe``, the outputs of calls
    ``indices``), timed by this process: for a worker's function the problem is built there
    (``grader.remote``), for one in this process here."""
    if _in_worker(fn):
        return fn.bench(recipe, kwargs, indices)
    from servelab.device import synchronize
    from servelab.paged.bench import build_problem

    problem = build_problem(recipe, device)
    fn(*problem.args(0), **kwargs)
    synchronize(device)
    t0 = time.perf_counter()
    outs = [fn(*problem.args(i), **kwargs) for i in range(problem.repeat)]
    synchronize(device)
    return time.perf_counter() - t0, [outs[i] for i in indices]


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

    def model(self, name: str | None = None, dtype=None, device: str | None = None):
        """The model ``name`` on this context's device, loaded once per process: None is the lab's target
        (``$SERVELAB_MODEL``, else the shipped target); "draft" the draft of speculative decoding
        (``$SERVELAB_DRAFT_MODEL``, else the shipped draft); else a shipped name, a folder or a hub id.
        ``dtype`` (a torch dtype; default float32) is part of the name a worker loads it under. ``device``:
        "cpu" for a model handed to code that forks GPU processes (lab 04's ranks load it on their GPU), which
        must not initialise CUDA itself."""
        device = device or self.device
        if dtype is None:
            return _cached(("model", name, device), lambda: _load_model(name, device))
        dtype_name = str(dtype).removeprefix("torch.")
        return _cached(("model", name, device, dtype_name), lambda: _load_model(name, device, dtype))

    def tokenizer(self, name: str | None = None):
        return _cached(("tok", name), lambda: _load_tokenizer(name))


_CACHE: dict = {}


def _cached(key, make):
    # one model per process: criteria subprocesses load it once, inline checks reuse it across cells
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


DRAFT = "draft"  # Context.model(DRAFT): the draft model, as servelab.loader.load_draft finds it


def _load_model(name, device, dtype=None):
    import servelab

    kw = {"device": device} if dtype is None else {"device": device, "dtype": dtype}
    return servelab.load_draft(**kw) if name == DRAFT else servelab.load_model(name, **kw)


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
    description: str = ""  # the first paragraph of the criterion function's docstring, on one line
    timeout_s: float = 120.0
    gate: tuple[str, ...] | None = None  # performance: criteria that must pass first (default: GATING_KINDS)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"criterion {self.id!r}: kind {self.kind!r} is not one of {KINDS}")


def _first_paragraph(fn: Callable) -> str:
    """A docstring's first paragraph as one line (`grader list` wraps it to the terminal)."""
    doc = inspect.cleandoc(fn.__doc__ or "")
    return " ".join(doc.split("\n\n")[0].split())


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
            self.criteria.append(Criterion(id, kind, points, fn, ex, _first_paragraph(fn), timeout_s, gate))
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
        status, message, metrics = "failed", str(err) + (f"\nHint: {err.hint}" if err.hint else ""), err.metrics
    except GradingError as err:
        status, message = "error", str(err)
    except Blocked as err:
        status, message = "blocked", str(err)
    except Stopped as err:
        status, message = err.status, err.message
        if err.stopped_in:
            metrics["stopped_in"] = err.stopped_in
    except NotImplementedError as err:
        status, message = (
            "failed",
            f"`{crit.exercise}` is not implemented yet: {err}" + _where(err, crit, code=False),
        )
    except Exception as err:  # noqa: BLE001 - anything the learner's code raises is reported, not fatal
        status, message = "error", f"{type(err).__name__}: {err}" + _where(err, crit)
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


def _where(err: BaseException, crit: Criterion | None = None, code: bool = True) -> str:
    """Where the learner's code raised: ' (raised in fn, notebook cell N line M: `code`)' for the innermost
    frame that is the learner's. When no frame is (the error came from library code handed bad input, e.g. a
    servelab dataclass rejecting what the learner's function returned), name the library frame and the
    exercise being graded instead."""
    frames = getattr(err, "remote_frames", None)  # raised in the learner's worker (grader.remote)
    if frames is None:
        frames = traceback.extract_tb(err.__traceback__)
    library = _library_paths(crit)
    mine = [f for f in frames if _is_learners(f.filename, library)]
    if mine:
        f = mine[-1]
        line = f": `{f.line.strip()}`" if f.line and code else ""
        return f" (raised in {f.name}, {_cell_label(f.filename)} line {f.lineno}{line})"
    if crit is None:
        return ""
    real = [f for f in frames if not f.filename.startswith("<")]  # generated code has no file to point at
    origin = f"in {_library_name(real[-1].filename)} line {real[-1].lineno} ({real[-1].name}), " if real else ""
    return (
        f" (raised {origin}not in your code, while grading `{crit.exercise}`: check what it returned "
        "or passed to the library)"
    )


def _library_paths(crit: Criterion | None) -> tuple[str, ...]:
    """Folders and files whose frames are not the learner's: the grader, servelab, Python and its packages,
    and the module that defines the criterion (a lab outside grader/, e.g. the tests' stub lab)."""
    paths = [str(GRADER_DIR), str(GRADER_DIR.parent / "servelab")]
    servelab = sys.modules.get("servelab")
    if getattr(servelab, "__file__", None):
        paths.append(os.path.dirname(servelab.__file__))
    paths += [sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    if crit is not None:
        with suppress(TypeError, OSError):
            paths.append(inspect.getsourcefile(crit.run) or "")
    return tuple(p for p in paths if p)


def _is_learners(filename: str, library: tuple[str, ...]) -> bool:
    """A notebook cell (the grader's `<notebook cell N>`, IPython's cells) or a file of the learner's own;
    not generated code (`<string>`, e.g. a dataclass's __init__), not the grader, servelab or Python."""
    if filename.startswith("<"):
        return filename.startswith(("<notebook cell ", "<ipython-input-"))
    if "site-packages" in filename or "dist-packages" in filename:
        return False
    return not any(filename == p or filename.startswith(p.rstrip(os.sep) + os.sep) for p in library)


def _cell_label(filename: str) -> str:
    """'notebook cell 20' (the grader's extraction), 'notebook cell In[7]' (a Jupyter cell, as IPython names
    it in tracebacks), else the learner's file."""
    if filename.startswith("<notebook cell "):
        return filename.strip("<>")
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None:
        with suppress(Exception):  # an IPython without format_code_name: fall back to the generic label
            named = shell.compile.format_code_name(filename)
            if named:
                return f"notebook cell {named[1]}"
    if "ipykernel" in filename or filename.startswith("<ipython-input-"):
        return "your notebook cell"
    return os.path.relpath(filename) if os.path.isabs(filename) else filename


def _library_name(filename: str) -> str:
    """servelab/metrics.py, torch/nn/functional.py: a library file without its install path."""
    parts = filename.replace(os.sep, "/").split("/")
    for i in range(len(parts) - 2, -1, -1):  # the innermost package folder names it
        if parts[i] in ("site-packages", "dist-packages"):
            return "/".join(parts[i + 1 :])
        if parts[i] in ("servelab", "grader"):
            return "/".join(parts[i:])
    return parts[-1]
