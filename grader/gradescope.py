"""One learner's grading as Gradescope's autograder ``results.json``.

Gradescope's format (autograder specification): a top-level ``score`` (it overrides the sum of the tests),
``execution_time`` (seconds), ``output`` (text shown above the tests), ``extra_data``, and ``tests``: a
list of ``{"name", "number", "score", "max_score", "status" ("passed"/"failed"), "output"}``. Gradescope
computes the percentage against the points the instructor set for the assignment, not from ``max_score``.

A ``blocked`` criterion (this machine lacks its hardware or a threshold) is not a zero: it is listed worth
0 of 0 points with the reason, so it neither costs nor earns the learner anything here.
"""

from __future__ import annotations

import json
from pathlib import Path


def results(doc: dict, seconds: float) -> dict:
    """``doc``: a learner's document as ``grader.cohort`` writes it (summary, reports, missing)."""
    tests: list[dict] = []
    lines: list[str] = []
    for problem in doc["summary"]["problems"]:
        tests.append(_test("submission: not graded", 0, 0, "failed", problem))
    for i, rep in enumerate(doc["reports"], 1):
        lab = rep["lab"] or Path(rep["notebook"]).name
        if rep["error"]:
            tests.append(_test(f"{lab}: not graded", 0, 0, "failed", rep["error"], f"{i}"))
        for j, c in enumerate(rep["criteria"], 1):
            name = f"{lab} / {c['id']} ({c['kind']})"
            if c["status"] == "blocked":
                out = f"blocked, not scored here (this is not a zero): {c['message']}"
                tests.append(_test(name + " - blocked, not scored", 0, 0, None, out, f"{i}.{j}"))
            else:
                out = f"{c['status']}: {c['message']}"
                status = "passed" if c["status"] == "passed" else "failed"
                tests.append(_test(name, c["points"], c["max_points"], status, out, f"{i}.{j}"))
        t = rep["totals"]
        blocked = f", {t['blocked']} blocked (not scored)" if t["blocked"] else ""
        lines.append(f"{lab}: {t['points']:g}/{t['max_points_gradable']} points{blocked}")
    lines += [f"{lab}: no notebook found for this lab" for lab in doc.get("missing", [])]
    summary = doc["summary"]
    return {
        "score": summary["points"],
        "execution_time": round(seconds),
        "output": "\n".join(lines) or "nothing was graded",
        "tests": tests,
        "extra_data": {
            "learner": doc["learner"],
            "max_points_gradable": summary["max_points_gradable"],
            "max_points": summary["max_points"],
            "exit_code": summary["exit_code"],
        },
    }


def write(path: Path, doc: dict, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results(doc, seconds), indent=2) + "\n", encoding="utf-8")


def _test(
    name: str, score: float, max_score: float, status: str | None, output: str, number: str = "0"
) -> dict:
    t = {"name": name, "number": number, "score": score, "max_score": max_score, "output": output}
    if status:
        t["status"] = status
    return t
