"""A hostile or broken submission cannot forge a grade, escape its worker's limits, or cost every criterion its
full time limit (issue #12). Each case is a stub-lab notebook graded end to end, as the CLI grades one."""

from __future__ import annotations

import ast
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from grader import integrity, labs, notebook
from grader.environment import probe
from grader.runner import Options, grade_notebook, stuck_helper
from grader.sandbox import MiB, CappedOutput, Limits, parse_size
from grader.spec import UsageError

GOOD_MEAN = "def mean(xs):\n    return sum(xs) / len(xs)"
GOOD_SPIN = "def spin(n):\n    return n"
BOTH = ("mean_values", "spin_stops")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVELAB_GRADER_CACHE", str(tmp_path / "cache"))


def grade(path: Path, **kw) -> dict:
    kw.setdefault("only", BOTH)
    return grade_notebook(path, Options(device="cpu", **kw), probe("cpu"))


def result(report: dict, cid: str) -> dict:
    return next(c for c in report["criteria"] if c["id"] == cid)


def statuses(report: dict) -> dict[str, str]:
    return {c["id"]: c["status"] for c in report["criteria"]}


def not_isolated(report: dict, what: str) -> str | None:
    """Why the report says this machine could not isolate ``what`` ('network', 'filesystem'), else None."""
    said = report["environment"].get("sandbox", {}).get(what, "")
    return said if said.startswith("not isolated") else None


# ------------------------------------------------------------------------------------------- forgeries
FORGE_RUN_CRITERION = (
    "def mean(xs):\n"
    "    raise NotImplementedError('not done')\n"
    "\n"
    "_ok = setattr(__import__('__main__'), 'run_criterion', lambda crit, learner, ctx: "
    "__import__('grader.spec', fromlist=['Result']).Result(crit.id, crit.kind, 'passed', crit.points, "
    "crit.points, 'looks great'))\n"
)


def test_forged_run_criterion_by_one_top_level_line_is_rejected(make_notebook):
    rep = grade(make_notebook([(FORGE_RUN_CRITERION, ["graded"]), (GOOD_SPIN, ["graded"])]))
    assert statuses(rep) == {"mean_values": "error", "spin_stops": "error"}  # none of the code ran
    msg = result(rep, "mean_values")["message"]
    assert "breaks the grader's rules" in msg and "cell 0 line 4" in msg and "`setattr`" in msg, msg
    assert rep["totals"]["points"] == 0 and rep["sources"]["violations"]


FORGE_RESULT_FILE = """
def mean(xs):
    import json, os, sys
    forged = json.dumps({"id": "mean_values", "kind": "correctness", "status": "passed", "points": 3,
                         "max_points": 3, "message": "forged", "metrics": {}, "seconds": 0.0})
    for target in sys.argv[1:]:
        if target.isdigit():  # a pipe of the worker's
            try:
                os.write(int(target), forged.encode() + b"\\n" + b"0" * 64 + b"\\n")
            except OSError:
                pass
    os._exit(0)
"""


def test_forged_result_is_not_from_the_grader(make_notebook):
    rep = grade(make_notebook([(FORGE_RESULT_FILE, ["graded"]), (GOOD_SPIN, ["graded"])]))
    got = result(rep, "mean_values")
    assert got["status"] == "error" and got["points"] == 0, got
    assert "not the grader's" in got["message"] or "exit code 0" in got["message"], got["message"]
    assert result(rep, "spin_stops")["status"] == "passed"  # the next worker is not affected


def test_os_exit_zero_is_an_error_never_a_pass(make_notebook):
    src = "import os\n\ndef mean(xs):\n    os._exit(0)"
    rep = grade(make_notebook([(src, ["graded"]), (GOOD_SPIN, ["graded"])]))
    got = result(rep, "mean_values")
    assert got["status"] == "error" and got["points"] == 0
    assert "exit code 0" in got["message"] and "in the middle of a call" in got["message"], got["message"]


# ------------------------------------------------------------------------------------------- integrity rules
@pytest.mark.parametrize(
    "src, words",
    [
        (  # the timer patch: a graded function replacing the clock the grader measures with
            "import time\n\ndef mean(xs):\n    time.perf_counter = lambda: 0.0\n    return sum(xs) / len(xs)",
            ["cell 0 line 4", "`time.perf_counter`", "imported `time`"],
        ),
        (  # importing the grader from graded code
            "def mean(xs):\n    from grader.checks import token_list\n    return sum(xs) / len(xs)",
            ["cell 0 line 2", "imports the grader", "`grader.checks`"],
        ),
        (  # a top-level assignment into another module
            "import math\nmath.fsum = sum\n\ndef mean(xs):\n    return sum(xs) / len(xs)",
            ["cell 0 line 2", "assigns to `math.fsum` at the top level"],
        ),
        (  # top-level code that runs the learner's own function while the cells load
            "def _patch():\n    return 1\n\n_x = _patch()\n\ndef mean(xs):\n    return sum(xs) / len(xs)",
            ["cell 0 line 4", "calls `_patch`"],
        ),
    ],
)
def test_integrity_rules_fail_every_criterion(make_notebook, src, words):
    rep = grade(make_notebook([(src, ["graded"]), (GOOD_SPIN, ["graded"])]))
    assert statuses(rep) == {"mean_values": "error", "spin_stops": "error"}
    for w in words:
        assert w in result(rep, "mean_values")["message"], result(rep, "mean_values")["message"]


def _violations(src: str, lab_id: str) -> list[str]:
    every = labs.all_labs()
    forbidden = integrity.forbidden_modules(every[lab_id], every)
    return [str(v) for v in integrity.check([(7, ast.parse(src))], forbidden)]


@pytest.mark.parametrize(
    "src",
    [
        "def continuous_batching(*a):\n    from servelab.reference.batching import continuous_batching as c\n    return c(*a)",
        "def left_pad(p, pad_id=0):\n    return __import__('servelab.reference.batching').reference.batching.left_pad(p)",
        "import importlib\n\ndef left_pad(p, pad_id=0):\n    return importlib.import_module('servelab.reference.batching').left_pad(p)",
        "import servelab\n\ndef left_pad(p, pad_id=0):\n    return servelab.reference.batching.left_pad(p)",
        "from servelab.reference import batching\n\ndef left_pad(p, pad_id=0):\n    return batching.left_pad(p)",
        "import servelab.reference.batching as ref",
        "def left_pad(p, pad_id=0):\n    import sys\n    return sys.modules['servelab.reference.batching'].left_pad(p)",
        "from solutions import answers",
    ],
)
def test_this_labs_reference_is_rejected_anywhere(src):
    found = _violations(src, "01_batching")
    assert found and all(v.startswith("cell 7 line ") for v in found), found
    assert "graded code must be your own" in found[0]


def test_earlier_labs_reference_stays_allowed_later_ones_do_not():
    use_warmup = "from servelab.reference.warmup import greedy_decode\n\ndef generate_one(*a):\n    return greedy_decode(*a)"
    assert _violations(use_warmup, "01_batching") == []
    assert _violations(use_warmup, "00_warmup")  # lab 00's own reference
    assert _violations("from servelab.reference.batching import left_pad", "00_warmup")  # a later lab's


def test_the_one_line_forgery_and_friends_are_named():
    found = _violations(FORGE_RUN_CRITERION, "01_batching")
    assert found[0].startswith("cell 7 line 4: uses `setattr`") and all(v.startswith("cell 7 line 4") for v in found)
    assert any("uses `__import__`" in v for v in found) and any("names the grader" in v for v in found), found
    for src, word in [
        ("import torch\n\ndef f():\n    torch.Tensor.x = 1", "`torch.Tensor.x`"),
        ("import time\n\ndef f():\n    setattr(time, 'perf_counter', f)", "calls setattr on `time`"),
        ("import os\n\ndef f():\n    os.environ['X'] = '1'", "`os.environ['X']`"),
        ("from servelab.engine import EngineRun\n\ndef f():\n    EngineRun.__eq__ = lambda a, b: True", "`EngineRun.__eq__`"),
        ("import sys\n_m = sys.modules", "module `sys`"),
        ("_g = (lambda: 0).__globals__", "`.__globals__`"),
        ("class A:\n    print('hi')", "class A: a graded class body"),
        ("def deco(f):\n    return f\n\n@deco\ndef g():\n    pass", "decorates `g` with `deco`"),
    ]:
        found = _violations(src, "01_batching")
        assert any(word in v for v in found), (src, found)


def test_ordinary_graded_code_is_allowed():
    src = """
from collections import deque
from dataclasses import dataclass, field
import functools
import torch

EOS = 2
SIZES = tuple(range(4))
PAD = -1 if EOS else 0

@dataclass
class Slot:
    \"\"\"A running request.\"\"\"
    tokens: list[int] = field(default_factory=list)
    done: bool = False

    def step(self, model) -> int:
        self.tokens.append(EOS)
        return len(self.tokens)

@torch.no_grad()
def decode(model, ids: list[int], slot: Slot | None = None) -> list[int]:
    queue = deque(ids)
    setattr(slot, "done", True)
    os = {"time": 1}
    os["time"] = 2
    return list(queue)

@functools.lru_cache(maxsize=None)
def table(n: int = len(SIZES)) -> tuple[int, ...]:
    return tuple(i * i for i in range(n))
"""
    assert _violations(src, "01_batching") == []


def test_the_shipped_notebooks_break_no_rule():
    every = labs.all_labs()
    root = Path(__file__).resolve().parents[1]
    for lab in (every["00_warmup"], every["01_batching"]):
        for folder in ("solutions", "labs"):
            nb = notebook.load(root / folder / lab.id / lab.notebook)
            ext = notebook.extract(nb, lab.functions, integrity.forbidden_modules(lab, every))
            assert ext.violations == [], (folder, lab.id, ext.violations)


def test_syntax_error_names_the_cell_line_and_code(make_notebook):
    rep = grade(make_notebook([("x = 1\n\ndef mean(xs)\n    return 0.0", ["graded"]), (GOOD_SPIN, ["graded"])]))
    assert statuses(rep) == {"mean_values": "error", "spin_stops": "passed"}
    msg = result(rep, "mean_values")["message"]
    assert "cell 0 has a syntax error at line 3" in msg and "(`def mean(xs)`)" in msg, msg


# ------------------------------------------------------------------------------------------- limits
ENDLESS_HELPER = (
    "def spin(n):\n"
    "    while True:\n"
    "        pass\n"
    "\n"
    "def mean(xs):\n"
    "    spin(1)\n"
    "    return sum(xs) / len(xs)\n"
)


def test_endless_loop_in_a_shared_helper_fails_fast(make_notebook):
    t0 = time.perf_counter()
    rep = grade(make_notebook([(ENDLESS_HELPER, ["graded"])]), timeout_scale=0.05)  # mean_values: 6 s
    took = time.perf_counter() - t0
    first, second = result(rep, "mean_values"), result(rep, "spin_stops")
    assert first["status"] == "timeout" and "while running `spin` (notebook cell 0 line " in first["message"]
    assert first["metrics"]["stopped_in"] == "spin"
    assert second["status"] == "timeout" and second["seconds"] == 0, second
    assert second["message"].startswith("not run: `spin` timed out in mean_values"), second["message"]
    assert took < 6 + 4, took  # one time limit, not two


def test_a_stuck_helper_skips_the_exercises_that_reach_it():
    src = (
        "import torch\n\ndef left_pad(prompts, pad_id=0):\n    while True:\n        pass\n\n"
        "def _batch(reqs):\n    return left_pad([r.prompt_ids for r in reqs])\n\n"
        "def static_batching(model, requests, *a):\n    return _batch(requests)\n\n"
        "def generate_one(model, request, *a):\n    return None\n"
    )
    nb = {"cells": [{"cell_type": "code", "source": src, "metadata": {"tags": ["graded"]}}]}
    reach = notebook.extract(nb).reach()
    assert reach["static_batching"] == {"_batch", "left_pad"} and reach["generate_one"] == set()
    lab = labs.get("01_batching")
    stuck = {"left_pad": ("left_pad", "left_pad_layout")}
    assert stuck_helper(lab.get("static_matches_alone"), reach, stuck) == (
        "not run: `left_pad` timed out in left_pad_layout (`static_batching` calls it); fix that first, then "
        "grade again"
    )
    assert stuck_helper(lab.get("generate_one_matches"), reach, stuck) is None


def test_cpu_time_limit(make_notebook):
    src = "def spin(n):\n    while True:\n        pass"
    rep = grade(make_notebook([(GOOD_MEAN, ["graded"]), (src, ["graded"])]), limits=Limits(cpu_seconds=1))
    got = result(rep, "spin_stops")  # wall-clock limit 4 s: the CPU limit stops it first
    assert got["status"] == "timeout" and got["seconds"] < 3.5, got
    assert "CPU time limit of 1 s reached" in got["message"] and "while running `spin`" in got["message"]
    assert result(rep, "mean_values")["status"] == "passed"


def test_memory_bomb_ends_at_the_memory_limit(make_notebook):
    bomb = (  # stops by itself at 2 GB, so that a grader without a limit passes it instead of hurting the machine
        "def mean(xs):\n    hoard = []\n    while len(hoard) < 200:\n        hoard.append(bytearray(10**7))\n"
        "    return sum(xs) / len(xs)"
    )
    t0 = time.perf_counter()
    rep = grade(make_notebook([(bomb, ["graded"]), (GOOD_SPIN, ["graded"])]), limits=Limits(memory_bytes=512 * MiB))
    got = result(rep, "mean_values")
    assert got["status"] == "error" and "memory limit of 512 MiB reached" in got["message"], got
    assert "MemoryError" in got["message"] and time.perf_counter() - t0 < 15
    assert result(rep, "spin_stops")["status"] == "passed"  # the run goes on
    assert rep["environment"]["sandbox"]["memory"].startswith("512 MiB")


def test_memory_limit_is_skipped_on_cuda_and_set_by_env(monkeypatch):
    assert Limits().memory_for("cuda") is None and Limits().memory_for("cpu") == 6 << 30
    assert "CUDA" in Limits().describe("cuda")["memory"]
    assert parse_size("6G") == 6 << 30 and parse_size("512M") == 512 * MiB and parse_size("none") is None
    monkeypatch.setenv("SERVELAB_GRADER_MEMORY", "3G")
    assert Options().limits.memory_bytes == 3 << 30
    monkeypatch.setenv("SERVELAB_GRADER_MEMORY", "lots")
    with pytest.raises(UsageError, match="not a size: 'lots'"):
        Limits.from_env()


def test_output_flood_is_capped_and_never_hits_the_disk(make_notebook, tmp_path, monkeypatch):
    flood = "def mean(xs):\n    for _ in range(10):\n        print('x' * 10**6)\n    return sum(xs) / len(xs)"
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where the grader's worker folders (and logs) go
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            size = 0
            try:
                for p in temp.rglob("*"):
                    try:
                        size += p.stat().st_size if p.is_file() else 0
                    except OSError:
                        pass
            except OSError:  # a worker folder removed while walking it
                pass
            peak[0] = max(peak[0], size)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        rep = grade(make_notebook([(flood, ["graded"]), (GOOD_SPIN, ["graded"])]))  # 5 calls: 50 MB printed
    finally:
        stop.set()
        watcher.join()
    got = result(rep, "mean_values")
    assert got["status"] == "passed", got  # the criterion still gets its own status
    assert "output over 2 MiB: truncated" in got["message"] and got["metrics"]["output_bytes"] > 50 * 10**6
    assert peak[0] < 2 * MiB, f"{peak[0]} bytes on disk while the worker printed"


def test_capped_output_keeps_head_and_tail():
    r, w = os.pipe()
    sink = CappedOutput(os.fdopen(r, "rb"), cap=1000)
    os.write(w, b"HEAD" + b"." * 5000 + b"TAIL")
    os.close(w)
    sink.join(timeout=5)
    text = sink.text()
    assert text.startswith("HEAD") and text.endswith("TAIL") and sink.dropped == 5008 - 1000
    assert "of output dropped" in text and len(text) < 1100


def test_file_writes_outside_the_worker_folder_change_nothing(make_notebook, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("original\n")
    writer = f"""
import os

def mean(xs):
    for path in [{str(outside)!r}, {str(tmp_path / 'stub.ipynb')!r}, {str(tmp_path / 'new.txt')!r}]:
        try:
            with open(path, "a") as f:
                f.write("changed by the learner\\n")
        except OSError:
            pass
    with open("inside.txt", "w") as f:  # its own folder (cwd) is writable
        f.write("mine")
    assert open(os.path.join(os.environ["HOME"], "inside.txt")).read() == "mine"
    assert os.environ["TMPDIR"].startswith(os.getcwd())
    return sum(xs) / len(xs)
"""
    nb_path = make_notebook([(writer, ["graded"]), (GOOD_SPIN, ["graded"])])
    before = nb_path.read_bytes()
    rep = grade(nb_path)
    if why := not_isolated(rep, "filesystem"):
        pytest.skip(f"this machine cannot isolate files: {why}")
    assert result(rep, "mean_values")["status"] == "passed", result(rep, "mean_values")
    assert outside.read_text() == "original\n" and nb_path.read_bytes() == before
    assert not (tmp_path / "new.txt").exists()


def test_no_network(make_notebook):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.1)
        port = server.getsockname()[1]
        caller = (
            "import socket\n\ndef mean(xs):\n    try:\n"
            f"        socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
            "        return -1.0\n    except OSError:\n        return sum(xs) / len(xs)"
        )
        rep = grade(make_notebook([(caller, ["graded"]), (GOOD_SPIN, ["graded"])]))
        if why := not_isolated(rep, "network"):
            pytest.skip(f"this machine cannot isolate the network: {why}")
        assert result(rep, "mean_values")["status"] == "passed", result(rep, "mean_values")
        with pytest.raises(TimeoutError):
            server.accept()  # nobody reached the grader's machine


def test_report_says_what_the_sandbox_holds(make_notebook):
    rep = grade(make_notebook([(GOOD_MEAN, ["graded"]), (GOOD_SPIN, ["graded"])]))
    box = rep["environment"]["sandbox"]
    assert set(box) == {"memory", "cpu", "output", "files", "network", "filesystem", "processes"}
    assert box["memory"].startswith("6 GiB") and json.dumps(box)
    assert all(box[k].startswith(("isolated", "not isolated")) for k in ("network", "filesystem", "processes"))


# ------------------------------------------------------------------------------- a GPU that refuses namespaces
def test_cuda_probe_says_why_the_namespaces_refuse_cuda():
    """The probe enters the namespaces as a worker does, then runs its check: here a stand-in for what one H200
    under gVisor answered, and one that works."""
    from grader.sandbox import cuda_refused_in_sandbox

    why = cuda_refused_in_sandbox("raise RuntimeError('CUDA error 304: OS call failed or operation not supported')")
    assert why == "RuntimeError: CUDA error 304: OS call failed or operation not supported"
    assert cuda_refused_in_sandbox("import os\nassert os.getcwd()") is None
    assert cuda_refused_in_sandbox("import os\nassert os.getcwd()", gpu_safe=True) is None


def test_cuda_isolation_takes_the_strongest_sandbox_cuda_survives(monkeypatch):
    """Every namespace where CUDA works in them; else the GPU-safe ones; else none (the probe faked)."""
    from grader import sandbox

    for full, safe, want in ((None, None, (True, None)), ("error 304", None, ("gpu", "error 304")),
                             ("error 304", "error 304 again", (False, "error 304"))):
        monkeypatch.setattr(sandbox, "cuda_refused_in_sandbox", lambda gpu_safe=False, f=full, g=safe: g if gpu_safe else f)
        sandbox.cuda_isolation.cache_clear()
        assert sandbox.cuda_isolation() == want
    sandbox.cuda_isolation.cache_clear()


@pytest.mark.parametrize("mode", ["gpu", False])
def test_a_gpu_that_refuses_namespaces_grades_in_what_it_allows_and_says_so(make_notebook, monkeypatch, mode):
    """On CUDA, where the probe says CUDA fails in the full sandbox, workers run in the namespaces it survives
    (network isolated, answers hidden, files writable, no PID namespace), or in none; every criterion is still
    graded and the report says why. Where CUDA works in them, nothing changes. The probe is faked here."""
    from grader import sandbox
    from grader.environment import Hardware

    path = make_notebook([(GOOD_MEAN, ["graded"]), (GOOD_SPIN, ["graded"])])
    gpu = Hardware("cuda", "h200", "NVIDIA H200 (faked)", 1, "compiled")
    monkeypatch.setattr(sandbox, "cuda_isolation", lambda: (mode, "CUDA error 304 (faked)"))
    rep = grade_notebook(path, Options(device="cuda", only=BOTH), gpu)
    assert statuses(rep) == {"mean_values": "passed", "spin_stops": "passed"}
    box = rep["environment"]["sandbox"]
    assert all("CUDA error 304 (faked)" in box[k] for k in ("filesystem", "processes")), box
    if mode == "gpu" and not_isolated(grade(path), "network") is None:  # where this kernel allows namespaces
        assert box["network"].startswith("isolated") and "hidden" in box["filesystem"]
        assert box["filesystem"].startswith("not isolated: writable") and box["processes"].startswith("not isolated")
    elif mode is False:
        assert all(box[k].startswith("not isolated: CUDA does not start") for k in ("network", "filesystem"))
    # what a worker mounted stays in its own namespace: the grader still sees this lab's answers
    assert ".hidden" not in Path("/proc/self/mountinfo").read_text() and labs.all_labs()
    assert (Path(labs.__file__).parent / "lab00_warmup.py").stat().st_size > 0
    monkeypatch.setattr(sandbox, "cuda_isolation", lambda: (True, None))
    box = grade_notebook(path, Options(device="cuda", only=BOTH), gpu)["environment"]["sandbox"]
    assert "CUDA" not in box["network"] + box["filesystem"]
