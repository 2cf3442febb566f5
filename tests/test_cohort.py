"""`python -m grader cohort` and folder discovery: every learner is a CSV row with the right points, every
entry not graded is listed with its reason, results are saved as learners finish and a rerun resumes.

The cohort uses the model-free stub lab (tests/grader_stub_lab.py), so a run takes seconds; one case
checks discovery on the real lab notebooks without grading them.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grader.cli import EXIT_USAGE, main
from grader import labs
from grader.discovery import discover

ROOT = Path(__file__).resolve().parents[1]
GOOD_MEAN = ("def mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)", ["graded"])
BAD_MEAN = ("def mean(xs):\n    return 0.0", ["graded"])
SYNTAX_MEAN = ("def mean(xs)\n    return 0.0", ["graded"])
SPIN = ("def spin(n: int) -> int:\n    return n", ["graded"])
# the stub lab: mean_values 3 points, spin_stops 1, and three criteria blocked on a CPU (gpu, gpu 0 pts,
# speed)
CRITERIA = ["mean_values", "spin_stops", "mean_on_gpu", "mean_side_by_side", "mean_speed"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVELAB_GRADER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def cohort(tmp_path, make_notebook) -> Path:
    """Every layout and every kind of entry the grader must account for."""
    root = tmp_path / "cohort"
    make_notebook([GOOD_MEAN, SPIN], folder=root / "alice" / "stub")  # learner folder, lab folder inside
    make_notebook(
        [BAD_MEAN, SPIN], name="stub-checkpoint.ipynb", folder=root / "alice" / ".ipynb_checkpoints"
    )
    make_notebook([BAD_MEAN, SPIN], folder=root / "bob")  # a failing mean
    make_notebook([SYNTAX_MEAN, SPIN], name="lab.ipynb", folder=root / "carol" / "work")  # syntax error
    (root / "dave").mkdir()  # a learner who handed in no notebook
    (root / "dave" / "notes.txt").write_text("forgot to upload\n")
    make_notebook([GOOD_MEAN, SPIN], name="erin.ipynb", folder=root)  # one notebook per learner
    make_notebook([("x = 1", [])], name="notes.ipynb", lab=None, folder=root / "frank")  # not a lab notebook
    make_notebook([BAD_MEAN, SPIN], name="stub.ipynb", folder=root)  # a stray copy of the lab at the root
    make_notebook([GOOD_MEAN, SPIN], folder=root / ".hidden")
    (root / "README.txt").write_text("submissions, downloaded today\n")
    return root


def run_cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grader", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_csv(path: Path) -> tuple[list[str], dict[str, dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = {r["learner"]: r for r in reader}
        return list(reader.fieldnames or []), rows


def test_cohort_grades_every_learner_and_lists_every_skip(cohort, tmp_path):
    out, reports = tmp_path / "out" / "grades.csv", tmp_path / "out" / "reports"
    res = run_cli("cohort", cohort, "--out", out, "--jobs", "2", "--json-dir", reports, "--device", "cpu")
    assert res.returncode == 1, res.stdout + res.stderr  # bob failed, carol errored, dave and frank missing
    assert "Traceback" not in res.stderr

    columns, rows = read_csv(out)
    assert list(rows) == ["alice", "bob", "carol", "dave", "erin", "frank"]  # every learner, sorted
    assert columns[:3] == ["learner", "stub points", "stub max"]
    assert [c for c in columns if c.startswith("stub/")] == [f"stub/{c}" for c in CRITERIA]
    assert {"passed", "failed", "timeout", "error", "blocked", "missing", "errors"} <= set(columns)

    def cells(name: str, *cols: str) -> list[str]:
        return [rows[name][c] for c in cols]

    pts = ("stub points", "stub max", "stub/mean_values", "stub/spin_stops", "stub/mean_on_gpu")
    assert cells("alice", *pts) == ["4", "4", "3", "1", "blocked"]  # blocked is not a zero
    assert cells("alice", "passed", "blocked", "missing", "errors") == ["2", "3", "", ""]
    assert cells("alice", "notebooks") == ["alice/stub/stub.ipynb"]  # not the checkpoint copy
    assert cells("bob", *pts[:4], "failed") == ["1", "4", "0", "1", "1"]
    assert cells("carol", *pts[:4], "error") == ["1", "4", "0", "1", "1"]
    assert cells("erin", *pts[:4]) == ["4", "4", "3", "1"]
    for name in ("dave", "frank"):  # nothing to grade: empty cells, the lab noted missing, the reason said
        assert cells(name, "stub points", "stub/mean_values", "missing") == ["", "", "stub"]
    assert "no notebook in this folder" in rows["dave"]["errors"]
    assert "no lab notebook" in rows["frank"]["errors"] and "notes.ipynb" in rows["frank"]["errors"]

    summary = json.loads((out.parent / "grades.summary.json").read_text())
    skipped = {s["path"]: s["reason"] for s in summary["skipped"]}
    assert "belongs to no learner" in skipped["stub.ipynb"]
    assert "hidden" in skipped[".hidden"]
    assert "autosave" in skipped[str(Path("alice/.ipynb_checkpoints"))]
    assert "not a lab notebook" in skipped[str(Path("frank/notes.ipynb"))]
    assert "no lab notebook" in skipped["dave"]
    assert "not a notebook" in skipped["README.txt"]
    for path in skipped:  # ... and each is said on stdout too
        assert f"  {path}: " in res.stdout
    assert summary["counts"] == {
        "learners": 6,
        "saved": 6,
        "graded": 6,
        "resumed": 0,
        "skipped": len(skipped),
    }
    assert summary["finished"] and summary["exit_code"] == 1

    docs = {p.stem: json.loads(p.read_text()) for p in reports.glob("*.json")}
    assert sorted(docs) == list(rows)
    assert [r["notebook"] for r in docs["alice"]["reports"]] == [
        str(cohort / "alice" / "stub" / "stub.ipynb")
    ]
    assert docs["carol"]["reports"][0]["criteria"][0]["status"] == "error"
    assert "syntax error" in docs["carol"]["reports"][0]["criteria"][0]["message"]
    assert docs["dave"]["reports"] == [] and docs["dave"]["missing"] == ["stub"]


def test_rerun_resumes_and_fresh_regrades(cohort, tmp_path, make_notebook):
    out = tmp_path / "grades.csv"
    args = ("cohort", cohort, "--out", out, "--jobs", "2", "--device", "cpu", "--only", "mean_values")
    first = run_cli(*args)
    assert first.returncode == 1, first.stdout + first.stderr
    summary = out.with_name("grades.summary.json")
    graded_at = json.loads(summary.read_text())["learners"]["alice"]["row"]["graded_at"]

    again = run_cli(*args)
    assert "resumed: 6 learners already graded" in again.stdout, again.stdout
    doc = json.loads(summary.read_text())
    assert doc["counts"]["graded"] == 0 and doc["counts"]["resumed"] == 6
    assert doc["learners"]["alice"]["row"]["graded_at"] == graded_at
    assert again.returncode == 1
    assert list(read_csv(out)[1]) == ["alice", "bob", "carol", "dave", "erin", "frank"]

    make_notebook([GOOD_MEAN, SPIN], folder=cohort / "bob")  # bob hands in a fix: only bob is regraded
    fixed = run_cli(*args)
    assert "resumed: 5 learners already graded" in fixed.stdout, fixed.stdout
    assert json.loads(summary.read_text())["counts"]["graded"] == 1
    assert read_csv(out)[1]["bob"]["stub/mean_values"] == "3"

    fresh = run_cli(*args, "--fresh")
    assert "resumed" not in fresh.stdout and json.loads(summary.read_text())["counts"]["graded"] == 6


def test_gradescope_results_for_one_submission(tmp_path, make_notebook):
    sub = tmp_path / "submission"  # as Gradescope unpacks an upload: the lab's notebook, no learner folder
    make_notebook([BAD_MEAN, SPIN], folder=sub)
    results = tmp_path / "results" / "results.json"
    res = run_cli("cohort", sub, "--out", tmp_path / "g.csv", "--gradescope", results, "--device", "cpu")
    assert res.returncode == 1, res.stdout + res.stderr
    doc = json.loads(results.read_text())
    assert (
        doc["score"] == 1 and isinstance(doc["execution_time"], int) and "stub: 1/4 points" in doc["output"]
    )
    tests = {t["name"].split(" (")[0]: t for t in doc["tests"]}
    mean = tests["stub / mean_values"]
    assert (mean["score"], mean["max_score"], mean["status"]) == (0, 3, "failed") and "list 0" in mean[
        "output"
    ]
    assert (tests["stub / spin_stops"]["score"], tests["stub / spin_stops"]["status"]) == (1, "passed")
    gpu = tests["stub / mean_on_gpu"]  # blocked: worth 0 of 0 here, the reason given, not a failure
    assert (
        (gpu["score"], gpu["max_score"]) == (0, 0) and "status" not in gpu and "not a zero" in gpu["output"]
    )
    assert all({"name", "score", "max_score", "output"} <= set(t) for t in doc["tests"])


def test_usage_errors_exit_64(cohort, tmp_path, capsys):
    out = tmp_path / "g.csv"
    cases = [
        (("cohort", cohort, "--out", out, "--gradescope", tmp_path / "r.json"), "holds 6 learners"),
        (("cohort", cohort, "--out", out, "--jobs", "0"), "--jobs 0"),
        (("cohort", tmp_path / "nope", "--out", out), "no such folder"),
        (("cohort", cohort / "dave", "--out", out), "nothing to grade"),
        (("cohort", cohort, "--out", cohort / "alice"), "is a folder"),
        (("cohort", cohort, "--out", out, "--only", "nope"), "no lab of this cohort (stub) has ['nope']"),
        (("cohort", cohort), "--out"),
    ]
    for args, words in cases:  # in-process: these stop before grading anything
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        err = capsys.readouterr().err
        assert code == EXIT_USAGE, (args, err)
        assert words in err and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_check_on_a_cohort_reports_per_learner_never_one_sum(cohort, tmp_path):
    report = tmp_path / "r.json"
    res = run_cli("check", cohort, "--device", "cpu", "--only", "mean_values", "--json", report)
    doc = json.loads(report.read_text())
    assert "totals" not in doc, "a sum over different learners' points means nothing"
    learners = {s["learner"]: s for s in doc["learners"]}
    assert sorted(learners) == ["alice", "bob", "carol", "dave", "erin", "frank"]
    assert (learners["alice"]["points"], learners["bob"]["points"]) == (3, 0)
    assert learners["dave"]["problems"] and res.returncode == 1
    assert (
        "no combined total" in res.stdout
        and "skipped" in res.stderr
        and "belongs to no learner" in res.stderr
    )

    one = run_cli("check", cohort / "alice", "--device", "cpu", "--only", "mean_values", "--json", "-")
    assert one.returncode == 0, one.stderr  # alice/stub/stub.ipynb: a learner's folder, lab folder inside
    assert json.loads(one.stdout)["totals"]["points"] == 3
    assert "alice/.ipynb_checkpoints" in one.stderr.replace("\\", "/")


def test_discovery_of_the_real_labs(tmp_path):
    """Real lab notebooks (not graded here): the layouts instructors receive."""
    root = tmp_path / "cohort"
    warmup, batching = (
        ROOT / "labs" / "00_warmup" / "warmup.ipynb",
        ROOT / "labs" / "01_batching" / "batching.ipynb",
    )
    for dest, src in [
        ("alice/01_batching/batching.ipynb", batching),  # student folder, lab folder inside
        ("alice/00_warmup/warmup.ipynb", warmup),
        ("bob/Downloads/servelab/labs/01_batching/batching.ipynb", batching),  # 4 folders down: too deep
        ("carol/warmup.ipynb", warmup),
        ("carol/warmup-Copy1.ipynb", warmup),  # Jupyter's duplicate: the lab's own name wins
        ("batching.ipynb", batching),  # stray at the root
    ]:
        (root / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / dest)
    found = discover(root)
    assert found.layout == "cohort"
    got = {
        s.learner: {f.lab: f.path.relative_to(root).as_posix() for f in s.notebooks} for s in found.learners
    }
    assert got == {
        "alice": {
            "00_warmup": "alice/00_warmup/warmup.ipynb",
            "01_batching": "alice/01_batching/batching.ipynb",
        },
        "bob": {},
        "carol": {"00_warmup": "carol/warmup.ipynb"},
    }
    reasons = {Path(s.path).relative_to(root).as_posix(): s.reason for s in found.skipped}
    assert "belongs to no learner" in reasons["batching.ipynb"]
    assert "more than 3 folders" in reasons["bob/Downloads/servelab/labs/01_batching/batching.ipynb"]
    assert "matches better" in reasons["carol/warmup-Copy1.ipynb"]
    assert discover(ROOT / "labs").layout == "one submission"  # a folder of lab folders is one learner's
    assert [p.relative_to(ROOT).as_posix() for p in discover(ROOT / "labs").notebooks()] == [
        f"labs/{lab.id}/{lab.notebook}" for lab in labs.all_labs().values() if (ROOT / "labs" / lab.id).is_dir()
    ]


def test_one_notebook_per_learner_and_ties(tmp_path, make_notebook):
    flat = tmp_path / "flat"
    for name in ("zoe", "yann", "xia"):
        make_notebook([GOOD_MEAN, SPIN], name=f"{name}.ipynb", folder=flat)
    make_notebook([("x = 1", [])], name="scratch.ipynb", lab=None, folder=flat)
    found = discover(flat)
    assert [s.learner for s in found.learners] == ["xia", "yann", "zoe"]
    assert [Path(s.path).name for s in found.skipped] == ["scratch.ipynb"]

    twice = tmp_path / "twice"
    make_notebook([GOOD_MEAN, SPIN], folder=twice / "ann" / "a")
    make_notebook([BAD_MEAN, SPIN], folder=twice / "ann" / "b")
    make_notebook([GOOD_MEAN, SPIN], folder=twice / "ben")
    (ann, ben) = discover(twice).learners
    assert ann.notebooks == [] and "2 notebooks could be lab stub's" in ann.problems[0]  # never a guess
    assert len(ben.notebooks) == 1


def test_ctrl_c_saves_the_learners_in_progress_and_a_rerun_grades_the_rest(tmp_path, make_notebook):
    cohort, marks = tmp_path / "cohort", tmp_path / "marks"
    marks.mkdir()
    for name in ("ann", "ben", "cid"):  # spin() never returns: each learner takes spin_stops' 4 s timeout
        spin = f"def spin(n):\n    open({str(marks / name)!r}, 'w').close()\n    while True:\n        pass"
        make_notebook([GOOD_MEAN, (spin, ["graded"])], folder=cohort / name)
    out = tmp_path / "grades.csv"
    args = [sys.executable, "-m", "grader", "cohort", str(cohort), "--out", str(out), "--jobs", "2"]
    proc = subprocess.Popen(
        [*args, "--device", "cpu"],
        # the marks are written outside the workers' sandbox, which is read-only with isolation on
        env={**os.environ, "SERVELAB_GRADER_ISOLATE": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal, not ignored
    )
    deadline = time.time() + 60
    while not any(marks.iterdir()) and time.time() < deadline:  # a learner's code is running: Ctrl-C now
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr
    saved = list(read_csv(out)[1])
    assert 1 <= len(saved) < 3, saved  # the learners in progress were finished and saved, the rest were not
    assert not json.loads(out.with_name("grades.summary.json").read_text())["finished"]

    rerun = run_cli("cohort", cohort, "--out", out, "--jobs", "2", "--device", "cpu")
    assert f"resumed: {len(saved)} learners already graded" in rerun.stdout, rerun.stdout
    assert list(read_csv(out)[1]) == ["ann", "ben", "cid"]
    assert {r["stub/spin_stops"] for r in read_csv(out)[1].values()} == {"0"}
