"""The grader never crashes and never loses a result: each broken-notebook case becomes a per-criterion
status with a clear message, the rest of the report still comes out, and exit codes say what happened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from grader import thresholds
from grader.environment import probe
from grader.runner import Options, grade_notebook

GOOD_MEAN = (
    "import math\n\ndef mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)\n\nprint(mean([1.0]))"
)
GOOD_SPIN = "def spin(n: int) -> int:\n    return n"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVELAB_GRADER_CACHE", str(tmp_path / "cache"))  # not ~/.cache: tests stay apart


def grade(path, **kw) -> dict:
    return grade_notebook(path, Options(device="cpu", **kw), probe("cpu"))


def statuses(report: dict) -> dict[str, str]:
    return {c["id"]: c["status"] for c in report["criteria"]}


def message(report: dict, cid: str) -> str:
    return next(c["message"] for c in report["criteria"] if c["id"] == cid)


def test_good_notebook_passes_and_blocks_what_needs_hardware(make_notebook):
    rep = grade(
        make_notebook([(GOOD_MEAN, ["graded"]), (GOOD_SPIN, ["graded"]), ("check('mean')", ["check"])])
    )
    assert statuses(rep) == {
        "mean_values": "passed",
        "spin_stops": "passed",
        "mean_on_gpu": "blocked",
        "mean_side_by_side": "blocked",
        "mean_speed": "blocked",
    }
    assert "CUDA GPU" in message(rep, "mean_on_gpu") and "thresholds.py" in message(rep, "mean_speed")
    t = rep["totals"]
    assert (t["points"], t["max_points"], t["max_points_gradable"], t["exit_code"]) == (4, 7, 4, 2)
    assert rep["sources"]["cells"] == [0, 1] and len(rep["sources"]["sha256"]) == 64
    env = rep["environment"]
    assert env["device_class"] == "cpu" and env["python"] and env["torch"] and "interpreter" in env
    json.dumps(rep)  # the report is plain JSON


def test_performance_counts_only_after_correctness(make_notebook, monkeypatch):
    monkeypatch.setitem(thresholds.THRESHOLDS["cpu"], "stub/mean_speed", 1.5)
    good = grade(make_notebook([(GOOD_MEAN, ["graded"]), (GOOD_SPIN, ["graded"])]))
    speed = next(c for c in good["criteria"] if c["id"] == "mean_speed")
    assert (
        speed["status"] == "passed"
        and speed["metrics"]["threshold"] == 1.5
        and speed["metrics"]["speedup"] == 2.0
    )
    bad = grade(
        make_notebook(
            [("def mean(xs):\n    return 0.5", ["graded"]), (GOOD_SPIN, ["graded"])], name="b.ipynb"
        )
    )
    assert statuses(bad)["mean_speed"] == "failed"
    assert "correctness must pass" in message(bad, "mean_speed") and "mean_values (failed)" in message(
        bad, "mean_speed"
    )
    only = grade(
        make_notebook([("def mean(xs):\n    return 0.5", ["graded"])], name="c.ipynb"), only=("mean_speed",)
    )
    assert statuses(only)["mean_speed"] == "failed"  # --only brings the gating criteria along


@pytest.mark.parametrize(
    "mean_src, status, words",
    [
        ("def mean(xs):\n    return str(sum(xs))", "failed", ["list 0", "returned str", "expected float"]),
        ("def mean(xs):\n    return float('nan')", "failed", ["returned NaN"]),
        (
            "def mean(xs):\n    return sum(xs) / 0",
            "error",
            ["ZeroDivisionError", "notebook cell 0", "line 2"],
        ),
        (  # a library's generated __init__ ("<string>") is not the learner's code: the learner's call is
            "from grader_stub_lab import Sample\n\ndef mean(xs):\n    return Sample(float('inf')).value",
            "error",
            ["ValueError", "raised in mean, notebook cell 0 line 4: `return Sample(float('inf')).value`"],
        ),
        (  # no frame of the learner's: the library rejected what mean returned; say which exercise
            "def mean(xs):\n    return float('inf')",
            "error",
            ["must be finite", "grader_stub_lab.py line", "(__post_init__), not in your code",
             "while grading `mean`"],
        ),
        (
            "def mean(xs):\n    raise NotImplementedError('average the values')",
            "failed",
            ["not implemented yet", "average the values"],
        ),
        ("def average(xs):\n    return 0.0", "error", ["`mean` is not defined", "average", "graded"]),
        ("def mean(xs)\n    return 0.0", "error", ["syntax error", "cell 0"]),
        ("import no_such_module_xyz\n\ndef mean(xs):\n    return sum(xs) / len(xs)", "passed", []),
        ("mean = 3", "error", ["not a function"]),
        ("def mean(xs):\n    import sys\n    sys.exit(3)", "error", ["SystemExit"]),
        ("def mean(xs):\n    import os\n    os._exit(7)", "error", ["died", "exit code 7"]),
    ],
)
def test_broken_learner_code_is_reported_per_criterion(make_notebook, mean_src, status, words):
    rep = grade(make_notebook([(mean_src, ["graded"]), (GOOD_SPIN, ["graded"])]))
    got = statuses(rep)
    assert got["mean_values"] == status, message(rep, "mean_values")
    assert got["spin_stops"] == "passed"  # the other exercise is graded as usual
    for w in words:
        assert w in message(rep, "mean_values")


def test_error_names_the_learners_innermost_function_and_its_cell(make_notebook):
    helper = "def _total(xs):\n    return sum(xs) / 0"
    mean = "def mean(xs):\n    return _total(xs) / len(xs)"
    rep = grade(
        make_notebook([("print('hi')", []), (helper, ["graded"]), (mean, ["graded"]), (GOOD_SPIN, ["graded"])])
    )
    assert message(rep, "mean_values").endswith(
        "(raised in _total, notebook cell 1 line 2: `return sum(xs) / 0`)"
    ), message(rep, "mean_values")


def test_failed_import_is_listed_when_function_missing(make_notebook):
    rep = grade(
        make_notebook(
            [
                ("import no_such_module_xyz\nfrom statistics import fmean as mean\n", ["graded"]),
                ("def spin(n):\n    return n", ["graded"]),
            ]
        )
    )
    assert statuses(rep)["mean_values"] == "passed"  # one failing import does not hide what follows it
    rep = grade(
        make_notebook(
            [("from no_such_module_xyz import mean", ["graded"]), (GOOD_SPIN, ["graded"])], name="c.ipynb"
        )
    )
    assert "ModuleNotFoundError" in message(rep, "mean_values")


def test_untagged_cells_are_found_and_experiments_skipped(make_notebook):
    rep = grade(
        make_notebook(
            [
                ("while True:\n    pass", []),
                (GOOD_MEAN, []),
                ("spin = lambda n: n", ["graded"]),
                ("while True: pass", ["experiment"]),
            ]
        )
    )
    assert statuses(rep)["mean_values"] == "passed"
    assert any("not tagged" in n for n in rep["sources"]["notes"])


def test_invalid_notebook_json(tmp_path):
    path = tmp_path / "stub" / "stub.ipynb"
    path.parent.mkdir()
    path.write_text('{"cells": [', encoding="utf-8")
    rep = grade(path)
    assert rep["lab"] == "stub"  # found from the folder name, since the metadata is unreadable
    assert set(statuses(rep).values()) <= {"error", "blocked"} and statuses(rep)["mean_values"] == "error"
    assert "not valid notebook JSON" in message(rep, "mean_values")
    assert rep["totals"]["exit_code"] == 1


def test_unknown_lab_and_unknown_criterion(make_notebook):
    rep = grade(make_notebook([(GOOD_MEAN, ["graded"])], name="mystery.ipynb", lab=None))
    assert rep["lab"] is None and "cannot tell which lab" in rep["error"] and rep["totals"]["exit_code"] == 1
    rep = grade(make_notebook([(GOOD_MEAN, ["graded"])]), only=("nope",))
    assert "no criteria ['nope']" in rep["error"] and rep["totals"]["exit_code"] == 1


def test_timeout_kills_the_whole_process_group(make_notebook):
    # the worker cannot write outside its folder, so the child is found by its unique command line
    naptime = f"300.{os.getpid()}{time.time_ns() % 10**6}"
    spin = (
        "import subprocess\n\ndef spin(n):\n"
        f"    child = subprocess.Popen(['sleep', {naptime!r}])\n"
        "    while True:\n        pass"
    )
    t0 = time.time()
    rep = grade(
        make_notebook([(GOOD_MEAN, ["graded"]), (spin, ["graded"])]), only=("spin_stops", "mean_values")
    )
    assert time.time() - t0 < 30
    assert statuses(rep) == {"mean_values": "passed", "spin_stops": "timeout"}  # so the child was started
    assert "did not finish within 4 s" in message(rep, "spin_stops")
    assert "while running `spin` (notebook cell 1 line 5)" in message(rep, "spin_stops")
    for _ in range(50):  # SIGKILL is asynchronous; the zombie is reaped by init
        if not _sleepers(naptime):
            break
        time.sleep(0.1)
    assert not _sleepers(naptime), "the learner's child process survived the timeout"


def _sleepers(naptime: str) -> list[int]:
    """Live processes running `sleep <naptime>`."""
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"sleep", naptime.encode()] and _alive(pid):
            found.append(pid)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grader", *args], check=False, capture_output=True, text=True, timeout=120
    )


def test_cli_exit_codes_and_json(make_notebook, tmp_path):
    nb = make_notebook([(GOOD_MEAN, ["graded"]), (GOOD_SPIN, ["graded"])])
    out = tmp_path / "r.json"
    res = run_cli(
        "check", str(nb), "--device", "cpu", "--json", str(out), "--only", "mean_values", "spin_stops"
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(out.read_text())["totals"]["passed"] == 2 and "mean_values" in res.stdout
    res = run_cli(
        "check", str(nb), "--device", "cpu", "--json", str(out), "--only", "mean_values", "mean_on_gpu"
    )
    assert res.returncode == 2, res.stdout + res.stderr
    broken = make_notebook([("def mean(xs):\n    return 0.0", ["graded"])], name="broken.ipynb")
    res = run_cli("check", str(broken), "--json", "-", "--device", "cpu", "--seed", "7")
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    assert doc["seed"] == 7 and doc["totals"]["failed"] >= 1 and doc["totals"]["error"] == 1  # spin missing


def test_cli_grades_a_folder(make_notebook, tmp_path):
    folder = tmp_path / "sub"
    make_notebook([(GOOD_MEAN, ["graded"]), (GOOD_SPIN, ["graded"])], name="a.ipynb", folder=folder)
    make_notebook(
        [("def mean(xs):\n    return 1.0", ["graded"]), (GOOD_SPIN, ["graded"])],
        name="b.ipynb",
        folder=folder,
    )
    out = tmp_path / "all.json"
    res = run_cli("check", str(folder), "--device", "cpu", "--json", str(out), "--only", "mean_values")
    doc = json.loads(out.read_text())
    assert res.returncode == 1 and doc["exit_code"] == 1
    assert [r["criteria"][0]["status"] for r in doc["reports"]] == ["passed", "failed"]


def test_cli_list_names_every_lab():
    res = run_cli("list")
    assert res.returncode == 0 and "00_warmup" in res.stdout and "kv_cache_speedup" in res.stdout
