"""End to end: every solution and learner notebook executes (nbval), and the grader grades every lab:
solutions pass (or are blocked by missing hardware), learner notebooks fail cleanly with a valid report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grader import labs

ROOT = Path(__file__).resolve().parents[1]
REAL_LABS = [
    lab for lab in labs.all_labs().values() if (ROOT / "solutions" / lab.id / lab.notebook).is_file()
]
IDS = [lab.id for lab in REAL_LABS]
ENV = dict(os.environ, SERVELAB_QUICK="1", MPLBACKEND="Agg")  # CI sizes; no display
# Executing a notebook proves that it runs; it grades no speed. OpenMP threads that spin while they wait for each
# other collapse when another process takes a core (lab 04's 2-thread colocated runs: 74 s became over 800 s
# beside one busy process), so these runs wait passively. The grader's speed criteria keep OpenMP's default.
NOTEBOOK_ENV = dict(ENV, OMP_WAIT_POLICY="PASSIVE")


@pytest.mark.slow
@pytest.mark.parametrize("lab", REAL_LABS, ids=IDS)
def test_notebooks_execute(lab):
    """The solution notebook runs clean; the learner one runs with only exercise/check/experiment cells raising."""
    paths = [str(ROOT / d / lab.id / lab.notebook) for d in ("solutions", "labs")]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--nbval-lax",
            "-q",
            "-p",
            "no:cacheprovider",
            "--nbval-cell-timeout=300",
            *paths,
        ],
        check=False,
        cwd=ROOT,
        env=NOTEBOOK_ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]


def grade(path: Path, tmp_path: Path) -> tuple[int, dict, str]:
    out = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, "-m", "grader", "check", str(path), "--device", "cpu", "--json", str(out)],
        cwd=ROOT,
        env=ENV,
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return res.returncode, json.loads(out.read_text()), res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("lab", REAL_LABS, ids=IDS)
def test_solution_passes_the_grader(lab, tmp_path):
    code, rep, log = grade(ROOT / "solutions" / lab.id, tmp_path)
    assert rep["lab"] == lab.id and len(rep["criteria"]) == len(lab.criteria)
    # a wall-clock ratio may miss narrowly on a busy CI machine: the grader then says "looks like noise",
    # which it only does when the deterministic figure of that run passes
    noisy = {c["id"] for c in rep["criteria"] if c["kind"] == "performance" and c["status"] == "failed"
             and c["metrics"].get("noise") and "looks like noise" in c["message"]}
    bad = {c["id"]: c["message"] for c in rep["criteria"]
           if c["status"] not in ("passed", "blocked") and c["id"] not in noisy}
    assert not bad, bad
    # optional 0-point criteria blocked here never decide the exit code; a blocked one worth points (lab 02's
    # GPU bandwidth) makes it 2: "nothing failed, but not everything could be graded here"
    blocked_points = any(c["status"] == "blocked" and c["max_points"] for c in rep["criteria"])
    assert code == (1 if noisy else 2 if blocked_points else 0), log


@pytest.mark.slow
@pytest.mark.parametrize("lab", REAL_LABS, ids=IDS)
def test_learner_notebook_fails_cleanly(lab, tmp_path):
    code, rep, log = grade(ROOT / "labs" / lab.id, tmp_path)
    assert code == 1, log
    assert rep["lab"] == lab.id and rep["error"] is None
    for c in rep["criteria"]:
        assert c["status"] in ("failed", "blocked"), (c["id"], c["status"], c["message"])
        if c["kind"] != "performance" and c["status"] == "failed":
            assert "not implemented yet" in c["message"]
