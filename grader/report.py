"""Grading reports: one JSON document per notebook, a rich table for people, and the exit code."""

from __future__ import annotations

import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from grader.environment import Hardware, report_environment
from grader.notebook import Extraction
from grader.spec import Lab, Result

SCHEMA = 1
STATUSES = ("passed", "failed", "timeout", "error", "blocked")
STYLE = {"passed": "green", "failed": "red", "timeout": "red", "error": "red", "blocked": "yellow"}


def build(
    path: Path,
    lab: Lab | None,
    results: list[Result],
    hw: Hardware,
    extraction: Extraction | None,
    seed: int,
    error: str | None = None,
    sandbox: dict | None = None,
) -> dict:
    return {
        "schema": SCHEMA,
        "lab": lab.id if lab else None,
        "title": lab.title if lab else None,
        "notebook": str(path),
        "error": error,  # the whole notebook could not be graded (unknown lab, bad --only)
        "criteria": [r.to_json() for r in results],
        "totals": totals(results, error),
        "seed": seed,
        "sources": {
            "sha256": extraction.sha256 if extraction else None,
            "cells": [c.index for c in extraction.cells] if extraction else [],
            "load_errors": extraction.errors if extraction else [],
            "notes": extraction.notes if extraction else [],
            "violations": extraction.violations if extraction else [],
        },
        # the workers' limits and isolation (grader.sandbox): what held on this machine
        "environment": {**report_environment(hw), **({"sandbox": sandbox} if sandbox else {})},
        "graded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def totals(results: list[Result], error: str | None = None) -> dict:
    counts = Counter(r.status for r in results)
    return {
        "points": sum(r.points for r in results),
        "max_points": sum(r.max_points for r in results),
        # blocked criteria need hardware this machine lacks: they are left out, not scored zero
        "max_points_gradable": sum(r.max_points for r in results if r.status != "blocked"),
        **{s: counts.get(s, 0) for s in STATUSES},
        "exit_code": exit_code_of(results, error),
    }


def exit_code_of(results: list[Result], error: str | None = None) -> int:
    """0: all passed; 1: any failed, timed out or errored; 2: nothing failed but points were blocked.

    A blocked criterion worth no points (an optional comparison, e.g. next to vLLM) changes nothing: it
    cannot make a perfect submission's grade incomplete.
    """
    if error or any(r.status in ("failed", "timeout", "error") for r in results):
        return 1
    return 2 if any(r.status == "blocked" and r.max_points > 0 for r in results) else 0


def exit_code(reports: list[dict]) -> int:
    return max_exit_code([r["totals"]["exit_code"] for r in reports])


def learner_summary(learner: str, reports: list[dict], problems: list[str] = ()) -> dict:
    """One learner's labs: points per lab and their sum (a sum only ever adds one learner's own labs)."""
    return {
        "learner": learner,
        "labs": {
            r["lab"] or r["notebook"]: {
                "notebook": r["notebook"],
                "points": r["totals"]["points"],
                "max_points_gradable": r["totals"]["max_points_gradable"],
                "error": r["error"],
            }
            for r in reports
        },
        "points": sum(r["totals"]["points"] for r in reports),
        "max_points": sum(r["totals"]["max_points"] for r in reports),
        "max_points_gradable": sum(r["totals"]["max_points_gradable"] for r in reports),
        "problems": list(problems),  # what kept a lab of this learner from being graded
        "exit_code": 1 if problems else exit_code(reports) if reports else 0,
    }


def combined(reports: list[dict], learners: list[dict] | None = None, skipped: list[dict] = ()) -> dict:
    """One JSON document: the report itself for one notebook, else all of them, per learner.

    ``learners`` (``learner_summary`` dicts) says whose each notebook is: overall ``totals`` are given only
    when all the notebooks are one learner's, since adding different learners' points means nothing.
    """
    if len(reports) == 1 and not (learners and learners[0]["problems"]):
        return reports[0]
    learners = learners if learners is not None else [learner_summary("?", reports)]
    doc = {
        "schema": SCHEMA,
        "reports": reports,
        "exit_code": max_exit_code([exit_code(reports)] + [s["exit_code"] for s in learners]),
        "learners": learners,
        "skipped": list(skipped),
    }
    if len(learners) == 1:
        one = learners[0]
        doc["totals"] = {k: one[k] for k in ("points", "max_points", "max_points_gradable")}
    return doc


def max_exit_code(codes: list[int]) -> int:
    """The worst of several exit codes: 1 (something failed) over 2 (blocked) over 0."""
    return 1 if 1 in codes else 2 if 2 in codes else 0


def print_report(rep: dict, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # not a terminal (CI logs, pipes): rich would wrap at 80 columns; messages read better wider
    console = console or Console(width=None if sys.stdout.isatty() else 140)
    env = rep["environment"]
    title = f"{rep['lab'] or '?'}: {rep['notebook']}"
    caption = (
        f"{env['device_name']} [{env['device_class']}], torch {env['torch']}, triton {env['triton'] or '-'}"
        f"{' (interpreter)' if env['interpreter'] else ''}, seed {rep['seed']}"
    )
    if rep["error"]:
        console.print(f"[bold red]{escape(title)}[/]\n[red]{escape(rep['error'])}[/]")
        return
    table = Table(title=title, caption=caption, show_lines=True)
    for col in ("criterion", "kind", "status", "points", "time", "message"):
        table.add_column(col, overflow="fold", justify="right" if col in ("points", "time") else "left")
    for c in rep["criteria"]:
        table.add_row(
            c["id"],
            c["kind"],
            f"[{STYLE[c['status']]}]{c['status']}[/]",
            f"{c['points']:g}/{c['max_points']}",
            f"{c['seconds']:.1f}s",
            escape(c["message"]),
        )
    console.print(table)
    t = rep["totals"]
    blocked = f", {t['blocked']} blocked (not scored)" if t["blocked"] else ""
    console.print(
        f"[bold]{rep['lab']}: {t['points']:g}/{t['max_points_gradable']} points{blocked}[/]  "
        + "  ".join(f"{s}: {t[s]}" for s in STATUSES if t[s])
    )
