"""`python -m grader` as a user runs it: exit codes (a usage error has its own), a --json path checked
before grading, and `list` printing whole descriptions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grader import labs
from grader.cli import EXIT_USAGE

ROOT = Path(__file__).resolve().parents[1]
GOOD = [
    ("def mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)", ["graded"]),
    ("def spin(n: int) -> int:\n    return n", ["graded"]),
]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVELAB_GRADER_CACHE", str(tmp_path / "cache"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grader", *args], check=False, capture_output=True, text=True, timeout=120
    )


def test_a_perfect_cpu_submission_exits_0_though_a_0_point_optional_criterion_is_blocked(make_notebook):
    nb = make_notebook(GOOD)
    res = run_cli("check", str(nb), "--device", "cpu", "--only", "mean_values", "spin_stops", "mean_side_by_side")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "blocked" in res.stdout  # reported, just not deciding the exit code
    res = run_cli("check", str(nb), "--device", "cpu")  # mean_on_gpu is worth 2 points: incomplete grade
    assert res.returncode == 2, res.stdout + res.stderr


def test_lab01s_optional_vllm_comparison_blocked_on_cpu_exits_0():
    lab = labs.get("01_batching")
    nb = ROOT / "solutions" / lab.id / lab.notebook
    assert lab.get("vllm_side_by_side").points == 0
    res = run_cli("check", str(nb), "--device", "cpu", "--only", "vllm_side_by_side", "--json", "-")
    doc = json.loads(res.stdout)
    assert [c["status"] for c in doc["criteria"]] == ["blocked"]
    assert res.returncode == 0 and doc["totals"]["exit_code"] == 0, res.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("check", "--bogus", "x.ipynb"),  # unknown option
        ("check", "x.ipynb", "--device", "tpu"),  # bad choice
        ("check", "x.ipynb", "--seed", "seven"),  # bad value
        ("check",),  # missing PATH
        (),  # missing command
        ("check", "/no/such/notebook/folder"),  # nothing to grade
    ],
)
def test_usage_errors_exit_64_not_2(args):
    res = run_cli(*args)
    assert res.returncode == EXIT_USAGE == 64, res.stderr
    assert "error:" in res.stderr and "Traceback" not in res.stderr


def test_help_lists_every_exit_code():
    for args in (("--help",), ("check", "--help")):
        res = run_cli(*args)
        assert res.returncode == 0
        codes = re.findall(r"^  (\d+) ", res.stdout.split("exit codes")[1], flags=re.M)
        assert codes == ["0", "1", "2", "64"], res.stdout
    readme = (ROOT / "grader" / "README.md").read_text(encoding="utf-8")
    assert all(f"`{c}`" in readme for c in ("0", "1", "2", "64")), "grader/README.md must document them"


@pytest.mark.parametrize("where", ["under_a_file", "a_folder"])
def test_unwritable_json_path_fails_at_once_with_one_line(make_notebook, tmp_path, where):
    nb = make_notebook(GOOD)
    (tmp_path / "plain.txt").write_text("not a folder")
    out = tmp_path / "plain.txt" / "r.json" if where == "under_a_file" else tmp_path
    t0 = time.monotonic()
    res = run_cli("check", str(nb), "--device", "cpu", "--json", str(out))
    assert res.returncode == EXIT_USAGE, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"--json {out}" in res.stderr
    assert "plain.txt is a file" in res.stderr if where == "under_a_file" else "is a folder" in res.stderr
    assert "mean_values" not in res.stdout and time.monotonic() - t0 < 60  # checked before grading


def test_json_path_parents_are_created(make_notebook, tmp_path):
    out = tmp_path / "new" / "deeper" / "r.json"
    res = run_cli("check", str(make_notebook(GOOD)), "--device", "cpu", "--only", "mean_values", "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["totals"]["passed"] == 1


def test_list_prints_each_description_whole_and_wrapped():
    res = run_cli("list")
    assert res.returncode == 0, res.stderr
    assert all(len(line) <= 100 for line in res.stdout.splitlines() if line.startswith("      "))
    flat = " ".join(res.stdout.split())
    for lab in labs.all_labs().values():
        for c in lab.criteria:
            assert c.description and f"{c.points:>2} pts {c.description}" in flat, c.id
    assert "whose first paragraph runs over two lines." in flat  # the stub's two-line first paragraph
    assert "A second paragraph" not in flat
