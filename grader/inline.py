"""``check("greedy_decode")``: run an exercise's criteria right inside the notebook.

The same Criterion objects the CLI grader runs, called on the functions defined in the notebook.
A check that does not pass raises ``CheckFailed`` so the cell turns red (learner notebooks tag check
cells ``raises-exception`` so that CI accepts this).
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
from collections import Counter
from contextlib import contextmanager, suppress

from grader import labs
from grader.environment import blocked_reason, probe
from grader.spec import Context, Criterion, Lab, Learner, Result, gate_failure, quick_mode, run_criterion
from grader.thresholds import threshold

MARK = {"passed": "✅", "failed": "❌", "timeout": "⏱️", "error": "💥", "blocked": "⏸️"}


class CheckFailed(AssertionError):
    """An inline check did not pass; the printed lines above say which input went wrong."""


class CheckResults(list):
    """What ``check()`` returns: its Results, as a list. Its repr is one line, so a check cell, whose last
    expression Jupyter echoes, ends with a short summary rather than a dump of every Result."""

    def __repr__(self) -> str:
        counts = Counter(r.status for r in self)
        return "CheckResults(" + ", ".join(f"{counts[s]} {s}" for s in MARK if counts[s]) + ")"

    def _repr_pretty_(self, p, cycle: bool) -> None:  # IPython's display of the cell's value
        p.text(repr(self))


class _TimeLimit(BaseException):  # BaseException: run_criterion must not turn it into an ordinary error
    pass


def check(
    name: str, lab: str | None = None, namespace: dict | None = None, seed: int | None = None,
    speed: bool | None = None,
) -> CheckResults:
    """Run the criteria of exercise (or criterion id) ``name`` on the caller's definitions and print one
    line each. Returns their Results as ``CheckResults`` (a list; its repr is one line); raises
    ``CheckFailed`` when one did not pass (a speed miss that looks like a busy machine only warns: the
    notebook goes on, and the grader's own run decides).

    ``speed=False`` skips the performance criteria (quick iterations on correctness); the default runs them,
    except in quick mode ($SERVELAB_QUICK, CI), where the grader's own run times them instead.
    """
    __tracebackhide__ = True  # IPython: show the failure, not the grader's frames
    ns = namespace if namespace is not None else sys._getframe(1).f_globals
    the_lab, crits = find(name, lab)
    why = "speed=False" if speed is False else "quick mode ($SERVELAB_QUICK)"
    if speed is None:
        speed = not quick_mode()
    skipped = [] if speed else [c.id for c in crits if c.kind == "performance" and c.id != name]
    if skipped:
        crits = [c for c in crits if c.id not in skipped]
        print(f"({why}: speed criteria not run: {', '.join(skipped)}; `check({name!r}, speed=True)` "
              f"or `python -m grader check` runs them)", flush=True)
    hw = probe(os.environ.get("SERVELAB_DEVICE", "auto"))
    ctx = Context(
        the_lab.id,
        hw.device,
        hw.device_class,
        quick_mode(),
        seed if seed is not None else secrets.randbits(31),
    )
    learner = Learner(ns)
    for warning in integrity_warnings(the_lab, ns):
        print(f"⚠️ {warning}", flush=True)
    done: dict[str, Result] = {}
    for crit in sorted(crits, key=lambda c: c.kind == "performance"):  # speed after correctness
        if reason := blocked_reason(the_lab, crit, hw):
            res = Result(crit.id, crit.kind, "blocked", 0, crit.points, reason)
        elif reason := gate_failure(the_lab, crit, done):
            res = Result(crit.id, crit.kind, "failed", 0, crit.points, reason)
        else:
            ctx.threshold = threshold(hw.device_class, the_lab.id, crit.id)
            res = _run_with_limit(crit, learner, ctx)
        done[crit.id] = res
        print(_line(res), flush=True)
    bad = [r.id for r in done.values() if r.status in ("failed", "timeout", "error") and not noisy(r)]
    if noise := [r.id for r in done.values() if noisy(r)]:
        print(f"⚠️ {', '.join(noise)}: a busy machine, not your code (its deterministic figure passed); not counted "
              f"as passed: rerun `check({name!r})` when the machine is quieter", flush=True)
    if bad:
        raise CheckFailed(
            f"{name}: {len(bad)} of {len(done)} checks did not pass ({', '.join(bad)}); "
            f"see the messages above (seed {ctx.seed})"
        )
    return CheckResults(done.values())


def noisy(res: Result) -> bool:
    """A speed check that missed on wall time while its deterministic figure passed (see speed_verdict)."""
    return res.status == "failed" and res.kind == "performance" and bool(res.metrics.get("noise"))


def integrity_warnings(lab: Lab, ns: dict) -> list[str]:
    """The grader's integrity rules (grader/integrity.py) applied to this notebook's graded functions, so a
    rule that `python -m grader check` will enforce is seen here first (the CLI checks whole cells)."""
    import ast
    import inspect
    import types

    from grader import integrity

    modules = [f"import {v.__name__} as {k}" for k, v in ns.items()
               if isinstance(v, types.ModuleType) and not k.startswith("_")]
    sources = []
    for fn in (ns.get(f) for f in lab.functions):
        with suppress(OSError, TypeError):  # no source to read (defined by exec): the CLI grader still checks it
            sources.append(inspect.getsource(fn))
    try:
        tree = ast.parse("\n".join(modules) + "\n" + "\n\n".join(sources))
    except SyntaxError:
        return []
    found = integrity.check([(0, tree)], integrity.forbidden_modules(lab, labs.all_labs()))
    return [f"the grader will reject this notebook: {v.what} (in {', '.join(lab.functions)})" for v in found]


def find(name: str, lab_id: str | None = None) -> tuple[Lab, list[Criterion]]:
    hits = [
        (lab, [c for c in lab.criteria if name in (c.exercise, c.id)])
        for lab in labs.all_labs().values()
        if lab_id in (None, lab.id)
    ]
    hits = [(lab, cs) for lab, cs in hits if cs]
    if not hits:
        raise KeyError(f"no exercise or criterion named {name!r}" + (f" in lab {lab_id}" if lab_id else ""))
    if len(hits) > 1:
        raise KeyError(f"{name!r} exists in labs {[lab.id for lab, _ in hits]}: pass lab=... to check()")
    return hits[0]


def _run_with_limit(crit: Criterion, learner: Learner, ctx: Context) -> Result:
    try:
        with _time_limit(crit.timeout_s):
            return run_criterion(crit, learner, ctx)
    except _TimeLimit:
        return Result(
            crit.id,
            crit.kind,
            "timeout",
            0,
            crit.points,
            f"did not finish within {crit.timeout_s:.0f} s (an endless loop?)",
            {"seed": ctx.seed},
        )


@contextmanager
def _time_limit(seconds: float):
    """SIGALRM-based limit (the kernel runs cells in its main thread); no limit where that is unavailable."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _TimeLimit()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _line(r: Result) -> str:
    head = f"{MARK[r.status]} {r.id} [{r.kind}, {r.max_points} pts] {r.status} in {r.seconds:.1f} s: "
    return head + r.message.replace("\n", "\n    ")
