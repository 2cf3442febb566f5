"""`--only <speed criterion>` says which correctness criteria it runs first, and reuses their passes from an
earlier run of the same graded code (grader/cache.py); failures always re-run; learner code never sees the
cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grader import cache, thresholds
from grader.environment import probe
from grader.runner import Options, grade_notebook
from grader.sandbox import ISOLATE_ENV

SPIN = ("def spin(n):\n    return n", ["graded"])


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(folder))
    monkeypatch.setitem(thresholds.THRESHOLDS["cpu"], "stub/mean_speed", 1.5)  # so mean_speed runs
    # learner code here reports its calls in files outside its worker's folder: without the read-only
    # filesystem the sandbox gives it (tested in test_grader_sandbox.py), as workers run on macOS
    monkeypatch.setenv(ISOLATE_ENV, "0")
    return folder


def counting_mean(calls, extra: str = "") -> tuple[str, list[str]]:
    """A correct mean() that appends a line to ``calls`` each time it runs (mean_values calls it 5 times)."""
    return (
        f"def mean(xs):\n    open({str(calls)!r}, 'a').write('x\\n')\n{extra}    return sum(xs) / len(xs)",
        ["graded"],
    )


def grade(nb, **kw) -> dict:
    return grade_notebook(nb, Options(device="cpu", **kw), probe("cpu"))


def by_id(rep: dict) -> dict[str, dict]:
    return {c["id"]: c for c in rep["criteria"]}


def ran(calls) -> int:
    return len(calls.read_text().splitlines()) if calls.exists() else 0


def test_only_a_speed_criterion_announces_its_gates_and_reuses_their_passes(make_notebook, tmp_path, capsys):
    calls = tmp_path / "calls.txt"
    nb = make_notebook([counting_mean(calls), SPIN])
    first = by_id(grade(nb, only=("mean_speed",)))
    notice = capsys.readouterr().err
    assert "--only mean_speed" in notice and "also runs mean_values, spin_stops first" in notice
    assert "--no-cache" in notice
    assert all(c["status"] == "passed" and "cached" not in c["message"] for c in first.values())
    assert ran(calls) == 6  # mean_values (5 calls) and mean_speed (1)

    second = by_id(grade(nb, only=("mean_speed",)))
    assert ran(calls) == 7  # only mean_speed ran again
    for cid in ("mean_values", "spin_stops"):
        c = second[cid]
        assert c["status"] == "passed" and "(cached from " in c["message"] and c["seconds"] == 0, c
        assert c["message"].startswith(first[cid]["message"]) and c["metrics"]["cached_from"]
    assert second["mean_speed"]["status"] == "passed" and "cached" not in second["mean_speed"]["message"]


def test_what_was_asked_for_and_runs_without_only_always_run(make_notebook, tmp_path):
    calls = tmp_path / "calls.txt"
    nb = make_notebook([counting_mean(calls), SPIN])
    grade(nb, only=("mean_speed",))
    before = ran(calls)
    rep = by_id(grade(nb, only=("mean_values", "mean_speed")))  # named in --only: runs
    assert "cached" not in rep["mean_values"]["message"] and "cached" in rep["spin_stops"]["message"]
    rep = by_id(grade(nb))  # no --only: a full grading run re-checks everything
    assert not any("cached" in c["message"] for c in rep.values())
    assert ran(calls) == before + 6 + 6


@pytest.mark.parametrize(
    "change",
    ["no_cache", "edited_code", "quick", "other_seed"],
)
def test_a_cached_pass_is_reused_only_for_the_same_code_and_settings(make_notebook, tmp_path, change):
    calls = tmp_path / "calls.txt"
    nb = make_notebook([counting_mean(calls), SPIN])
    grade(nb, only=("mean_speed",), quick=False, seed=1)
    before = ran(calls)
    kw: dict = {"only": ("mean_speed",), "quick": False}
    if change == "no_cache":
        kw["cache"] = False
    elif change == "edited_code":
        nb = make_notebook([counting_mean(calls, extra="    # a comment changes the graded code\n"), SPIN])
    elif change == "quick":
        kw["quick"] = True
    elif change == "other_seed":
        kw["seed"] = 2  # an explicit --seed replays those hidden cases: a pass on others does not count
    rep = by_id(grade(nb, **kw))
    assert "cached" not in rep["mean_values"]["message"]
    assert ran(calls) == before + 6


def test_failures_are_not_cached_and_a_failure_drops_an_earlier_pass(make_notebook, tmp_path, cache_dir):
    flag = tmp_path / "broken"
    flaky = (
        f"import os\n\ndef mean(xs):\n    return 0.0 if os.path.exists({str(flag)!r}) else sum(xs) / len(xs)",
        ["graded"],
    )
    nb = make_notebook([flaky, SPIN])
    grade(nb, only=("mean_speed",))
    assert len(list(cache_dir.glob("*.json"))) == 2  # mean_values and spin_stops passed
    flag.write_text("")
    rep = by_id(grade(nb, only=("mean_values",)))  # the same code now fails: the entry goes
    assert rep["mean_values"]["status"] == "failed" and len(list(cache_dir.glob("*.json"))) == 1
    rep = by_id(grade(nb, only=("mean_speed",)))
    assert rep["mean_values"]["status"] == "failed" and "cached" not in rep["mean_values"]["message"]
    assert rep["mean_speed"]["status"] == "failed" and "correctness must pass" in rep["mean_speed"]["message"]
    assert len(list(cache_dir.glob("*.json"))) == 1  # only spin_stops' pass


def test_only_the_parent_writes_the_cache_and_learner_code_is_not_told_where(make_notebook, tmp_path, cache_dir):
    seen = tmp_path / "seen.json"
    spy = (
        "import json, os\n\ndef mean(xs):\n"
        f"    open({str(seen)!r}, 'w').write(json.dumps(os.environ.get({cache.CACHE_ENV!r})))\n"
        "    return sum(xs) / len(xs)",
        ["graded"],
    )
    grade(make_notebook([spy, SPIN]), only=("mean_speed",))
    assert json.loads(seen.read_text()) is None
    entries = [json.loads(p.read_text()) for p in cache_dir.glob("*.json")]
    assert sorted(e["key"]["criterion"] for e in entries) == ["mean_values", "spin_stops"]
    assert all(e["result"]["status"] == "passed" and len(e["key"]["sources_sha256"]) == 64 for e in entries)


def test_an_unwritable_cache_never_fails_grading(make_notebook, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "file" / "cache"))
    rep = by_id(grade(make_notebook([counting_mean(tmp_path / "c.txt"), SPIN]), only=("mean_speed",)))
    assert all(c["status"] == "passed" for c in rep.values())
    assert "not writable" in capsys.readouterr().err


def test_cli_no_cache_flag(make_notebook, tmp_path):
    nb, out = str(make_notebook([counting_mean(tmp_path / "calls.txt"), SPIN])), tmp_path / "r.json"
    args = [sys.executable, "-m", "grader", "check", nb, "--device", "cpu", "--json", str(out),
            "--only", "mean_values", "mean_speed"]  # (no stub threshold in a fresh process: speed blocked)

    def spin_stops(*extra: str) -> tuple[str, str]:
        res = subprocess.run(args + list(extra), check=False, capture_output=True, text=True, timeout=120)
        assert res.returncode in (0, 2), res.stdout + res.stderr
        return by_id(json.loads(out.read_text()))["spin_stops"]["message"], res.stderr

    message, notice = spin_stops()
    assert "cached" not in message and "also runs spin_stops first" in notice
    assert "cached from" in spin_stops()[0]
    message, notice = spin_stops("--no-cache")
    assert "cached" not in message and "--no-cache: each of them runs again" in notice
