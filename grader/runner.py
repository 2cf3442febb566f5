"""Grade a notebook: extract its graded code, run each criterion in its own process, collect results."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from grader import cache, channel, discovery, integrity, labs, notebook, report
from grader.environment import Hardware, blocked_reason, probe
from grader.spec import GRADER_DIR, Criterion, Lab, Result, gate_failure, quick_mode
from grader.sandbox import MEMORY_SIGNS, CappedOutput, Limits, human, worker_env
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
    """Run one criterion in a fresh process group with the limits of ``grader.sandbox``, in a fresh folder
    (its cwd, HOME and TMPDIR; removed afterwards). On timeout, ask the worker where the learner's code is
    stuck, then kill the whole group (the learner's children too). The result comes back sealed over a pipe
    (``grader.channel``); output goes to a capped in-memory sink."""
    limits = limits or Limits.from_env()
    timeout = crit.timeout_s * timeout_scale
    memory = limits.memory_for(hw.device)
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
        "limits": {
            "memory": memory,
            "cpu": limits.cpu_for(timeout),
            "file": limits.file_bytes,
            "isolate": limits.isolate,
        },
    }
    # the worker runs in its own folder: make every import path absolute first
    paths = [str(GRADER_DIR.parent)] + [
        os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    key = channel.new_key()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="grader-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp) / "work"
        (work / "tmp").mkdir(parents=True)
        env = worker_env(dict(os.environ, SERVELAB_DEVICE=hw.device, PYTHONPATH=os.pathsep.join(paths)), work)
        env.pop(cache.CACHE_ENV, None)  # learner code has no business with the results cache
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec), encoding="utf-8")
        key_r, key_w = os.pipe()
        os.write(key_w, key.hex().encode("ascii"))  # 64 bytes: fits any pipe buffer
        os.close(key_w)
        result_r, result_w = os.pipe()
        marker_r, marker_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "grader.worker", str(spec_file), str(result_w), str(marker_w)],
                stdin=key_r,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=work,
                env=env,
                start_new_session=True,
                pass_fds=(result_w, marker_w),
            )
        except BaseException:
            for fd in (result_r, marker_r):
                os.close(fd)
            raise
        finally:
            for fd in (key_r, result_w, marker_w):
                os.close(fd)
        output = CappedOutput(proc.stdout, limits.output_bytes)
        sealed = _PipeReader(result_r, cap=16 * 1024 * 1024)
        timed_out, stopped_in = False, None
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGUSR1)  # "where are you?": the worker answers on the marker pipe
            stopped_in = _read_marker(marker_r, wait=1.0)
        finally:
            kill_group(proc.pid)
            proc.wait()
        if stopped_in is None and proc.returncode == -signal.SIGXCPU:
            stopped_in = _read_marker(marker_r, wait=0)
        os.close(marker_r)
        output.join(timeout=5)
        sealed.join(timeout=5)
    seconds = round(time.perf_counter() - t0, 3)
    where = _describe_where(stopped_in)
    qualname = stopped_in.split("\t")[0] if stopped_in else None
    metrics = {"seed": seed, **({"stopped_in": qualname} if qualname else {})}
    if timed_out:
        message = (
            f"did not finish within {timeout:.0f} s and was stopped{where} (an endless loop, or a decode "
            "that never stops?)"
        )
        return _with_output(
            WorkerRun(Result(crit.id, crit.kind, "timeout", 0, crit.points, message, metrics, seconds), None, qualname),
            output,
        )
    payload = channel.unseal(sealed.data, key)
    if payload is None:
        status, message = _no_result(proc.returncode, sealed.data, output, spec["limits"], where)
        return _with_output(
            WorkerRun(Result(crit.id, crit.kind, status, 0, crit.points, message, metrics, seconds), None, qualname),
            output,
        )
    res = Result(**payload["result"])
    res.id, res.kind, res.max_points, res.seconds = crit.id, crit.kind, crit.points, seconds
    res.points = crit.points if res.status == "passed" else 0
    return _with_output(WorkerRun(res, payload.get("sandbox"), qualname), output)


def _no_result(
    returncode: int, data: bytes, output: CappedOutput, limits: dict, where: str
) -> tuple[str, str]:
    """(status, message) of a worker that sent no sealed result."""
    tail = output.text()[-1500:]
    ends = f"; its output ends with:\n{tail}" if tail.strip() else "; it printed nothing"
    if data:
        return "error", (
            "result not from the grader: the worker's result pipe carried data the grader did not seal "
            "(learner code wrote to it?), so it was ignored"
        )
    if returncode == -signal.SIGXCPU:
        return "timeout", f"CPU time limit of {limits['cpu']} s reached and the worker was stopped{where}"
    if limits.get("memory") and any(s in tail for s in MEMORY_SIGNS):
        return "error", f"memory limit of {human(limits['memory'])} reached and the worker died{ends}"
    if returncode == -signal.SIGKILL:
        return "error", (
            f"the worker was killed (SIGKILL){where}: its CPU time limit's hard stop, or the system's "
            f"out-of-memory killer{ends}"
        )
    if returncode == 0:
        return "error", (
            f"the worker exited (exit code 0) without reporting a result: code it ran ended the process "
            f"(os._exit?){where}{ends}"
        )
    how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
    return "error", f"the grading process died ({how}) before reporting{where}{ends}"


def _with_output(run: WorkerRun, output: CappedOutput) -> WorkerRun:
    if note := output.note():
        run.result.message += f"\n({note})"
        run.result.metrics["output_bytes"] = output.total
    return run


def _describe_where(marker: str | None) -> str:
    """' while running `left_pad` (notebook cell 11 line 7)' from the worker's marker line."""
    if not marker:
        return ""
    qualname, cell, line = (marker.split("\t") + ["", ""])[:3]
    return f" while running `{qualname}` (notebook cell {cell} line {line})"


def _read_marker(fd: int, wait: float) -> str | None:
    """The worker's last 'qualname<TAB>cell<TAB>line' line on the marker pipe, waiting up to ``wait`` s."""
    import select

    data = b""
    deadline = time.monotonic() + wait
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        if data.endswith(b"\n"):
            break
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else None


class _PipeReader:
    """Read a pipe to its end in a thread (the worker may write more than a pipe buffer holds), keeping at
    most ``cap`` bytes (more than that is no result of ours: its seal will not match)."""

    def __init__(self, fd: int, cap: int):
        self.fd, self.cap, self.data = fd, cap, b""
        self._thread = threading.Thread(target=self._pump, name="worker-result", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        parts, size = [], 0
        while chunk := os.read(self.fd, 1 << 16):
            if size < self.cap:
                parts.append(chunk)
            size += len(chunk)
        self.data = b"".join(parts)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if not self._thread.is_alive():
            os.close(self.fd)


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone
