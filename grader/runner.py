"""Grade a notebook: extract its graded code, run each criterion in its own process, collect results."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from grader import cache, discovery, labs, notebook, report
from grader.environment import Hardware, blocked_reason, probe
from grader.spec import GRADER_DIR, Criterion, Lab, Result, gate_failure, quick_mode
from grader.thresholds import threshold


@dataclass
class Options:
    device: str = "auto"
    only: tuple[str, ...] = ()
    quick: bool | None = None  # None: $SERVELAB_QUICK
    seed: int | None = None  # None: fresh hidden cases every run
    timeout_scale: float = 1.0
    cache: bool = True  # reuse passes of the correctness criteria that --only brings along (grader.cache)


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
    extraction = notebook.extract(nb, lab.functions) if nb else None
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
        elif key and crit.id in gates_only and (hit := cache.load(key, opts.seed)):
            res = hit  # only a gate brought along by --only is reused: what was asked for always runs
        else:
            res = run_isolated(lab, crit, extraction, hw, quick, seed, path.parent, opts.timeout_scale)
            if key:
                cache.store(key, res)  # written here, in the parent: never by learner code
        done[crit.id] = res
    return report.build(path, lab, list(done.values()), hw, extraction, seed)


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


def run_isolated(
    lab: Lab,
    crit: Criterion,
    extraction: notebook.Extraction,
    hw: Hardware,
    quick: bool,
    seed: int,
    cwd: Path,
    timeout_scale: float = 1.0,
) -> Result:
    """Run one criterion in a fresh process group; on timeout kill the whole group (learner's children too)."""
    spec = {
        "lab": lab.id,
        "criterion": crit.id,
        "device": hw.device,
        "device_class": hw.device_class,
        "quick": quick,
        "seed": seed,
        "threshold": threshold(hw.device_class, lab.id, crit.id),
        "cells": [{"index": c.index, "text": c.text} for c in extraction.cells],
        "errors": extraction.errors,
    }
    # the worker runs in the notebook's folder: make every import path absolute first
    paths = [str(GRADER_DIR.parent)] + [
        os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    env = dict(os.environ, SERVELAB_DEVICE=hw.device, PYTHONPATH=os.pathsep.join(paths))
    env.pop(cache.CACHE_ENV, None)  # learner code has no business with the results cache
    timeout = crit.timeout_s * timeout_scale
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="grader-") as tmp:
        spec_file, out_file, log_file = (Path(tmp) / n for n in ("spec.json", "result.json", "log.txt"))
        spec_file.write_text(json.dumps(spec), encoding="utf-8")
        with open(log_file, "wb") as log:  # a file, not a pipe: a stray child holding a pipe cannot hang us
            proc = subprocess.Popen(
                [sys.executable, "-m", "grader.worker", str(spec_file), str(out_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                kill_group(proc.pid)
                proc.wait()
        seconds = round(time.perf_counter() - t0, 3)
        if timed_out:
            return Result(
                crit.id,
                crit.kind,
                "timeout",
                0,
                crit.points,
                f"did not finish within {timeout:.0f} s and was stopped (an endless loop, or a decode that "
                f"never stops?)",
                {"seed": seed},
                seconds,
            )
        try:
            res = Result(**json.loads(out_file.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            tail = log_file.read_text(encoding="utf-8", errors="replace")[-1500:]
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
            return Result(
                crit.id,
                crit.kind,
                "error",
                0,
                crit.points,
                f"the grading process died ({how}) before reporting; its output ends with:\n{tail}",
                {"seed": seed},
                seconds,
            )
    res.kind, res.max_points, res.seconds = crit.kind, crit.points, seconds
    return res


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone
