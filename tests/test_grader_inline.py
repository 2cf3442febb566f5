"""Inline check(): the grader's criteria, run on a notebook's own namespace."""

from __future__ import annotations

import linecache
import os

import pytest

from grader.environment import probe
from grader.inline import CheckFailed, check


def ns(src: str) -> dict:
    namespace = {"__name__": "__main__"}
    exec(src, namespace)  # noqa: S102
    return namespace


def test_passing_check_prints_and_returns_results(capsys):
    results = check("mean", namespace=ns("def mean(xs):\n    return sum(xs) / len(xs)"), speed=True)
    on_gpu = probe(os.environ.get("SERVELAB_DEVICE", "auto")).device == "cuda"  # what check() runs on
    assert {r.id: r.status for r in results} == {
        "mean_values": "passed",
        "mean_on_gpu": "passed" if on_gpu else "blocked",
        "mean_side_by_side": "passed" if on_gpu else "blocked",
        "mean_speed": "blocked",  # no threshold for the stub lab on any device class
    }
    out = capsys.readouterr().out
    assert "mean_values" in out and "passed" in out and "blocked" in out


def test_speed_false_runs_correctness_only_and_says_so(capsys, monkeypatch):
    good = ns("def mean(xs):\n    return sum(xs) / len(xs)")
    ids = {r.id for r in check("mean", namespace=good, speed=False)}
    assert "mean_values" in ids and "mean_speed" not in ids
    assert "speed=False: speed criteria not run: mean_speed" in capsys.readouterr().out
    monkeypatch.setenv("SERVELAB_QUICK", "1")  # CI: the grader's own run times the speed criteria
    assert "mean_speed" not in {r.id for r in check("mean", namespace=good)}
    assert "quick mode" in capsys.readouterr().out
    monkeypatch.setenv("SERVELAB_QUICK", "0")
    assert "mean_speed" in {r.id for r in check("mean", namespace=good)}


def test_failing_check_raises_with_the_input_that_went_wrong(capsys):
    with pytest.raises(CheckFailed, match="mean_values"):
        check("mean", namespace=ns("def mean(xs):\n    return xs[0] + 1.0"))
    out = capsys.readouterr().out
    assert "list 0" in out and "expected" in out and "Hint: sum(xs) / len(xs)" in out


def test_a_noisy_speed_miss_warns_and_the_notebook_goes_on(capsys, monkeypatch):
    """A wall-clock miss whose deterministic figure passed (speed_verdict's "looks like noise") must not stop a
    full-mode notebook at its check cell; a plain speed miss still does."""
    import grader.inline as inline
    from grader.spec import Result

    real = inline._run_with_limit

    def timed(noise: bool):
        def run(crit, learner, ctx):
            if crit.kind != "performance":
                return real(crit, learner, ctx)
            return Result(crit.id, crit.kind, "failed", 0, crit.points, "0.9x is below the 1.2x threshold",
                          {"noise": True} if noise else {})
        return run

    monkeypatch.setattr(inline, "blocked_reason", lambda lab, crit, hw: None)
    good = ns("def mean(xs):\n    return sum(xs) / len(xs)")
    monkeypatch.setattr(inline, "_run_with_limit", timed(noise=True))
    results = check("mean", namespace=good, speed=True)
    assert {r.id: r.status for r in results}["mean_speed"] == "failed"  # reported as it is, never as passed
    assert "⚠️ mean_speed: a busy machine" in capsys.readouterr().out
    monkeypatch.setattr(inline, "_run_with_limit", timed(noise=False))
    with pytest.raises(CheckFailed, match="mean_speed"):
        check("mean", namespace=good, speed=True)


def test_check_uses_the_callers_globals():
    global mean

    def mean(xs):
        return sum(xs) / len(xs)

    assert check("mean_values")[0].status == "passed"


def test_inline_timeout(capsys):
    with pytest.raises(CheckFailed):
        check("spin", namespace=ns("def spin(n):\n    while True:\n        pass"))
    assert "did not finish within 4 s" in capsys.readouterr().out


def test_unknown_name():
    with pytest.raises(KeyError, match="no exercise or criterion named 'nope'"):
        check("nope", namespace={})


def test_check_returns_results_with_a_one_line_repr():
    results = check("mean", namespace=ns("def mean(xs):\n    return sum(xs) / len(xs)"))
    assert isinstance(results, list) and results[0].id == "mean_values"  # still the Results, as a list
    assert repr(results).startswith("CheckResults(1 passed") and "Result(" not in repr(results)
    from IPython.lib.pretty import pretty

    assert pretty(results) == repr(results)  # what Jupyter echoes after the check cell's printed lines


def test_error_names_the_jupyter_cell_line_not_the_library_it_called(capsys):
    cell = "/tmp/ipykernel_4242/2718281828.py"  # how ipykernel names a cell's code
    src = "from grader_stub_lab import Sample\n\ndef mean(xs):\n    return Sample(float('inf')).value\n"
    linecache.cache[cell] = (len(src), None, src.splitlines(True), cell)
    namespace = {"__name__": "__main__"}
    exec(compile(src, cell, "exec"), namespace)  # noqa: S102
    with pytest.raises(CheckFailed):
        check("mean_values", namespace=namespace)
    out = capsys.readouterr().out  # not the dataclass's generated __init__ ("<string>") or __post_init__
    assert "(raised in mean, your notebook cell line 4: `return Sample(float('inf')).value`)" in out, out


@pytest.mark.slow
def test_check_cell_in_a_real_kernel_names_the_cell_and_echoes_one_line(tmp_path):
    """Through Jupyter: the error names the cell as Jupyter does (In[2]); the check cell's value is short."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    for src in (
        "from grader.inline import check",
        "def mean(xs):\n    return sum(xs) / 0",
        "check('mean_values')",
        "def mean(xs):\n    return sum(xs) / len(xs)",
        "check('mean_values')",
    ):
        nb.cells.append(nbformat.v4.new_code_cell(src))
    NotebookClient(nb, timeout=120, allow_errors=True, resources={"metadata": {"path": str(tmp_path)}}).execute()
    failed = "".join(o.get("text", "") for o in nb.cells[2].outputs if o["output_type"] == "stream")
    assert "(raised in mean, notebook cell In[2] line 2: `return sum(xs) / 0`)" in failed, failed
    echoed = [o["data"]["text/plain"] for o in nb.cells[4].outputs if o["output_type"] == "execute_result"]
    assert echoed == ["CheckResults(1 passed)"]


def test_check_warns_about_what_the_grader_will_reject(capsys, tmp_path):
    """A graded function that patches the timer passes inline, but the CLI grader rejects it: say so here."""
    import types

    clock = types.ModuleType("clock")  # a stand-in for `time`: the function really runs, so patch a harmless one
    clock.perf_counter = lambda: 1.0
    src = "def mean(xs):\n    clock.perf_counter = lambda: 0.0\n    return sum(xs) / len(xs)\n"
    path = tmp_path / "cell.py"
    path.write_text(src)
    namespace = {"__name__": "__main__", "clock": clock}
    exec(compile(src, str(path), "exec"), namespace)  # a real file, so inspect finds the source as in Jupyter
    check("mean", namespace=namespace, speed=False)
    out = capsys.readouterr().out
    assert "the grader will reject this notebook" in out and "perf_counter" in out
    check("mean", namespace=ns("def mean(xs):\n    return sum(xs) / len(xs)"), speed=False)
    assert "reject" not in capsys.readouterr().out
