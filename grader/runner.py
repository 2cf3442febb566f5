"""Grade a notebook: extract its graded code, run each criterion in its own process, collect results."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from grader import cache, discovery, integrity, labs, notebook, remote, report
from grader import sandbox as sandbox_mod
from grader.environment import Hardware, blocked_reason, probe
from grader.spec import GRADER_DIR, Context, Criterion, Lab, Result, Stopped, gate_failure, quick_mode, run_criterion
from grader.sandbox import MEMORY_SIGNS, Limits, human
from grader.thresholds import threshold


@dataclass
class Options:
    device: str = "auto"
    only: tuple[str, ...] = ()
    quick: bool | None = None  # None: $SERVELAB_QUICK
    seed: int | None = None  # None: fresh hidden cases every run
    timeout_scale: float = 1.0
    cache: bool = True  # reuse passes of the correctness criteria that --only brings along (grader.cache)
    limits: Limits = field(default_factory=Limits.from_env)  # each worker's (grader.sandbox)


def find_notebooks(path: Path) -> list[Path]:
    """A notebook, or the lab notebooks under a folder, by ``grader.discovery``'s rules (a folder of lab
    folders, a learner's folder, or a cohort of learners). What it skips, and why, ``discovery.discover``
    says; the CLI prints it."""
    return discovery.discover(path).notebooks()


def grade(path: Path, opts: Options) -> list[dict]:
    hw = probe(opts.device)
    return [grade_notebook(nb, opts, hw) for nb in find_notebooks(path)]


def grade_notebook(path: Path, opts: Options, hw: Hardware) -> dict:
    seed = opts.seed if opts.seed is not None else secrets.randbits(31)
    try:
        nb, load_error = notebook.load(path), None
    except notebook.NotebookError as err:
        nb, load_error = None, str(err)
    lab = labs.for_notebook(path, nb)
    if lab is None:
        known = ", ".join(labs.all_labs())
        return report.build(
            path,
            None,
            [],
            hw,
            None,
            seed,
            error=f"{path}: cannot tell which lab this notebook is (metadata servelab.lab, its folder "
            f"name or its file name should name one of: {known})",
        )
    extraction = (
        notebook.extract(nb, lab.functions, forbidden=integrity.forbidden_modules(lab, labs.all_labs()))
        if nb
        else None
    )
    crits = lab.ordered()
    if opts.only:
        unknown = sorted(set(opts.only) - {c.id for c in crits})
        if unknown:
            return report.build(
                path,
                lab,
                [],
                hw,
                extraction,
                seed,
                error=f"--only: lab {lab.id} has no criteria {unknown}; it has {[c.id for c in crits]}",
            )
        crits = lab.selection(set(opts.only))  # with their gates: speed never counts unchecked
    gates_only = [c.id for c in crits if c.id not in opts.only] if opts.only else []
    if gates_only:
        print(_gates_notice(path, opts, gates_only), file=sys.stderr, flush=True)
    quick = quick_mode() if opts.quick is None else opts.quick
    broken = _rules_broken(extraction)
    reach = extraction.reach() if extraction else {}
    stuck: dict[str, tuple[str, str]] = {}  # learner function -> (where it was stopped, in which criterion)
    sandbox: dict | None = None
    done: dict[str, Result] = {}
    for crit in crits:
        key = None
        if opts.cache and extraction and not load_error and cache.cacheable(crit):
            key = cache.key(lab.id, crit, extraction.sha256, hw.device_class, quick)
        if load_error:
            res = Result(crit.id, crit.kind, "error", 0, crit.points, load_error)
        elif reason := blocked_reason(lab, crit, hw):
            res = Result(crit.id, crit.kind, "blocked", 0, crit.points, reason)
        elif reason := gate_failure(lab, crit, done):
            res = Result(crit.id, crit.kind, "failed", 0, crit.points, reason)
        elif broken:
            res = Result(crit.id, crit.kind, "error", 0, crit.points, broken)
        elif reason := stuck_helper(crit, reach, stuck):
            res = Result(crit.id, crit.kind, "timeout", 0, crit.points, reason)
        elif key and crit.id in gates_only and (hit := cache.load(key, opts.seed)):
            res = hit  # only a gate brought along by --only is reused: what was asked for always runs
        else:
            run = run_worker(lab, crit, extraction, hw, quick, seed, opts.timeout_scale, opts.limits)
            res, sandbox = run.result, sandbox or run.sandbox
            if res.status == "timeout" and run.stopped_in:
                stuck.setdefault(run.stopped_in.split(".")[0], (run.stopped_in, crit.id))
            if key:
                cache.store(key, res)  # written here, in the parent: never by learner code
        done[crit.id] = res
    env = {**opts.limits.describe(hw.device), **(sandbox or _NOT_MEASURED)}
    return report.build(path, lab, list(done.values()), hw, extraction, seed, sandbox=env)


_NOT_MEASURED = {
    "network": "not measured: no criterion ran in a worker",
    "filesystem": "not measured: no criterion ran in a worker",
    "processes": "not measured: no criterion ran in a worker",
}


def _rules_broken(extraction: notebook.Extraction | None) -> str | None:
    """The message of every criterion when the graded code breaks the integrity rules (none of it runs)."""
    if not extraction or not extraction.violations:
        return None
    shown = extraction.violations[:5]
    more = len(extraction.violations) - len(shown)
    return (
        "not run: the graded code breaks the grader's rules, so none of it was run (see grader/README.md, "
        "'Integrity rules'): " + "; ".join(shown) + (f"; and {more} more (the report's sources.violations)" if more else "")
    )


def stuck_helper(crit: Criterion, reach: dict[str, set[str]], stuck: dict[str, tuple[str, str]]) -> str | None:
    """Fail fast: why a criterion is not run because a learner function it needs already timed out.

    A function is marked when a criterion timed out (or hit its CPU limit) while it was the innermost learner
    function running (the worker names it when the grader stops it). A later criterion needs the functions
    its exercise reaches by name in the graded code (``Extraction.reach``): it is then reported `timeout`
    without running, instead of waiting out its own time limit on the same endless loop."""
    needs = {crit.exercise} | reach.get(crit.exercise, set())
    for name in sorted(needs & set(stuck)):
        where, other = stuck[name]
        via = "" if name == crit.exercise else f" (`{crit.exercise}` calls it)"
        return f"not run: `{where}` timed out in {other}{via}; fix that first, then grade again"
    return None


def _gates_notice(path: Path, opts: Options, gates: list[str]) -> str:
    asked = ", ".join(opts.only)
    how = (
        "a pass cached for this same graded code is reused (--no-cache re-runs them)"
        if opts.cache
        else "--no-cache: each of them runs again"
    )
    return (
        f"{path.name}: --only {asked} also runs {', '.join(gates)} first: a speed result counts only once "
        f"the correctness criteria it waits for pass; {how}"
    )


@dataclass
class WorkerRun:
    result: Result
    sandbox: dict | None = None  # what the worker could isolate ({"network": ..., "filesystem": ...})
    stopped_in: str | None = None  # the learner function a timeout or the CPU limit stopped (its qualname)


def run_worker(
    lab: Lab,
    crit: Criterion,
    extraction: notebook.Extraction,
    hw: Hardware,
    quick: bool,
    seed: int,
    timeout_scale: float = 1.0,
    limits: Limits | None = None,
) -> WorkerRun:
    """Run one criterion here, in the harness, against the learner's code in a fresh worker process
    (``grader.remote``): its own process group, the limits of ``grader.sandbox``, a fresh folder (cwd, HOME,
    TMPDIR; removed afterwards), output to a capped in-memory sink. The verdict, the timing and the result
    never leave this process; the worker only answers calls with data."""
    limits = limits or Limits.from_env()
    timeout = crit.timeout_s * timeout_scale
    forbidden = integrity.forbidden_modules(lab, labs.all_labs())
    spec = {
        "lab": lab.id,
        "device": hw.device,
        "uses_servelab": lab.uses_servelab,
        "cells": [{"index": c.index, "text": c.text} for c in extraction.cells],
        "errors": extraction.errors,
        "forbidden": list(forbidden),
        "hide": hidden_paths(forbidden),
        "limits": {
            "memory": limits.memory_for(hw.device),
            "cpu": limits.cpu_for(timeout),
            "file": limits.file_bytes,
            "isolate": limits.isolate,
        },
    }
    if hw.device == "cuda" and limits.isolate:  # only the namespaces this machine's CUDA survives
        mode, why = sandbox_mod.cuda_isolation()
        spec["limits"].update(isolate=mode, why_not_isolated=why if mode else sandbox_mod.not_isolated_on_cuda(why))
    # the worker runs in its own folder: make every import path absolute first
    paths = [str(GRADER_DIR.parent)] + [
        os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    env = dict(os.environ, SERVELAB_DEVICE=hw.device, PYTHONPATH=os.pathsep.join(paths))
    env.pop(cache.CACHE_ENV, None)  # learner code has no business with the results cache
    ctx = Context(lab.id, hw.device, hw.device_class, quick, seed, threshold(hw.device_class, lab.id, crit.id))
    t0 = time.perf_counter()
    worker = remote.Worker(spec, timeout, limits.output_bytes, env)
    try:
        res = run_criterion(crit, remote.RemoteLearner(worker), ctx)
        sandbox = worker.ready().get("sandbox") if res.status != "timeout" and worker.proc.poll() is None else None
    except Stopped:  # the worker died before it said what it isolated
        sandbox = None
    finally:
        worker.close()
    res.seconds = round(time.perf_counter() - t0, 3)
    memory = spec["limits"]["memory"]
    if memory and res.status == "error" and any(s in res.message for s in MEMORY_SIGNS) \
            and "memory limit" not in res.message:
        res.message = f"memory limit of {human(memory)} reached: {res.message}"
    if note := worker.output.note():
        res.message += f"\n({note})"
        res.metrics["output_bytes"] = worker.output.total
    qualname = res.metrics.get("stopped_in")
    return WorkerRun(res, sandbox if isinstance(sandbox, dict) else None, qualname)


def hidden_paths(forbidden: tuple[str, ...]) -> list[str]:
    """Files and folders the worker sees empty: the forbidden modules' sources (and their compiled copies),
    the grader's criteria and the solutions."""
    import importlib.util

    out = [str(GRADER_DIR / "labs"), str(GRADER_DIR.parent / "solutions")]
    for name in forbidden:
        if not name.startswith("servelab.reference."):
            continue
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(name)
            if spec and spec.origin and os.path.isfile(spec.origin):
                src = Path(spec.origin)
                out.append(str(src))
                out += [str(p) for p in (src.parent / "__pycache__").glob(f"{src.stem}.*.pyc")]
    return out

