"""The trusted harness (issue #12): criteria run in the grader's process, the learner's code in a worker that
only answers with data. These tests switch the integrity rules OFF, so the hostile code really runs, and show
that it still cannot forge a grade, patch the grader's clock or import this lab's answers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from grader import channel, integrity, labs, remote
from grader.codec import CodecError, Decoder, Encoder
from grader.environment import probe
from grader.runner import Options, grade_notebook
from grader.spec import GRADER_DIR, Stopped

REPO = GRADER_DIR.parent
GOOD_SPIN = "def spin(n):\n    return n"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVELAB_GRADER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def no_rules(monkeypatch):
    """The AST integrity rules off: what they would reject now runs in the worker."""
    monkeypatch.setattr(integrity, "check", lambda cells, forbidden=(): [])


def grade(path: Path, only=("mean_values", "spin_stops"), **kw) -> dict:
    return grade_notebook(path, Options(device="cpu", only=tuple(only), **kw), probe("cpu"))


def result(report: dict, cid: str) -> dict:
    return next(c for c in report["criteria"] if c["id"] == cid)


# ----------------------------------------------------------------------------- forgeries that now run
FORGE_RUN_CRITERION = """
def mean(xs):
    raise NotImplementedError('not done')

import sys
for m in list(sys.modules.values()):  # every copy of run_criterion the worker can reach
    if hasattr(m, 'run_criterion'):
        m.run_criterion = lambda crit, learner, ctx: sys.modules['grader.spec'].Result(
            crit.id, crit.kind, 'passed', crit.points, crit.points, 'looks great')
setattr(__import__('__main__'), 'run_criterion', sys.modules.get('grader.spec'))
"""


def test_replacing_run_criterion_in_the_worker_changes_nothing(make_notebook, no_rules):
    rep = grade(make_notebook([(FORGE_RUN_CRITERION, ["graded"]), (GOOD_SPIN, ["graded"])]))
    got = result(rep, "mean_values")
    assert got["status"] == "failed" and got["points"] == 0, got
    assert "not implemented yet" in got["message"], got["message"]
    assert result(rep, "spin_stops")["status"] == "passed"


FORGE_PIPE = """
def mean(xs):
    import json, os, struct, sys
    forged = json.dumps({"value": 0.0, "status": "passed", "points": 3, "message": "forged"}).encode()
    for fd in sys.argv[2:]:  # every pipe the worker was given: a framed message, then an old-style result
        if fd.isdigit():
            for data in (struct.pack(">Q", len(forged)) + forged, forged):
                try:
                    os.write(int(fd), data)
                except OSError:
                    pass
    os._exit(0)
"""

GARBLE_PIPE = """
def mean(xs):
    import os, sys
    os.write(int(sys.argv[3]), b"garbage, not a message")
    return sum(xs) / len(xs)
"""


@pytest.mark.parametrize("src, status, words", [(FORGE_PIPE, ("failed", "error"), ""),
                                                (GARBLE_PIPE, ("error",), "not the grader's")])
def test_writes_to_the_grader_pipes_forge_nothing(make_notebook, no_rules, src, status, words):
    rep = grade(make_notebook([(src, ["graded"]), (GOOD_SPIN, ["graded"])]))
    got = result(rep, "mean_values")
    assert got["status"] in status and got["points"] == 0, got
    assert words in got["message"] and "forged" not in got["message"], got["message"]
    assert result(rep, "spin_stops")["status"] == "passed"  # the next worker is not affected


TIMER_PATCH = """
import time

def mean(xs):
    time.perf_counter = lambda: 0.0  # the worker's clock, not the grader's
    time.monotonic = lambda: 0.0
    time.sleep(0.25)
    return sum(xs) / len(xs)
"""


def test_a_patched_timer_in_the_worker_does_not_reach_the_grader_clock(make_notebook, no_rules, monkeypatch):
    from grader import thresholds

    monkeypatch.setitem(thresholds.THRESHOLDS["cpu"], "stub/mean_speed", 1.5)
    rep = grade(make_notebook([(TIMER_PATCH, ["graded"]), (GOOD_SPIN, ["graded"])]), only=("mean_speed",))
    got = result(rep, "mean_speed")
    assert got["status"] == "passed", got
    assert got["metrics"]["seconds"] >= 0.25, got["metrics"]  # the harness timed the real sleep


# ----------------------------------------------------------------------------- this lab's answers
LAB00 = REPO / "labs" / "00_warmup" / "warmup.ipynb"
IMPORT_AT_RUN_TIME = """
import importlib

def greedy_decode(model, prompt_ids, max_new_tokens, eos_id=None):
    ref = importlib.import_module("servelab.refer" + "ence.war" + "mup")
    return ref.greedy_decode(model, prompt_ids, max_new_tokens, eos_id)
"""
READ_THE_FILE = """
import servelab

def greedy_decode(model, prompt_ids, max_new_tokens, eos_id=None):
    import pathlib
    src = (pathlib.Path(servelab.__file__).parent / "reference" / "warmup.py").read_text()
    ns = {}
    exec(src, ns)
    return ns["greedy_decode"](model, prompt_ids, max_new_tokens, eos_id)
"""


@pytest.mark.slow
@pytest.mark.parametrize("src, words", [(IMPORT_AT_RUN_TIME, "may not import `servelab.reference.warmup`"),
                                        (READ_THE_FILE, "KeyError: 'greedy_decode'")])
def test_this_labs_reference_is_out_of_reach_at_run_time(make_notebook, no_rules, src, words):
    rep = grade(make_notebook([(src, ["graded"])], name="warmup.ipynb", lab="00_warmup"),
                only=("matches_reference",), quick=True)
    got = result(rep, "matches_reference")
    if "KeyError" in words and not rep["environment"]["sandbox"]["filesystem"].startswith("isolated"):
        pytest.skip(f"this machine cannot hide files: {rep['environment']['sandbox']['filesystem']}")
    assert got["status"] == "error" and got["points"] == 0, got
    assert words in got["message"], got["message"]


# ----------------------------------------------------------------------------- the worker, directly
def start_worker(src: str, timeout: float = 30.0) -> remote.Worker:
    spec = {"lab": "stub", "device": "cpu", "uses_servelab": False, "cells": [{"index": 0, "text": src}],
            "errors": [], "forbidden": ["grader.labs", "solutions"], "hide": [],
            "limits": {"memory": None, "cpu": 120, "file": 1 << 20, "isolate": False}}
    return remote.Worker(spec, timeout, 1 << 20, dict(os.environ, PYTHONPATH=str(REPO)))


OBJECTS = """
class Tally:
    def __init__(self, start):
        self.total = start

    def add(self, n):
        if n < 0:
            raise ValueError(f"cannot add {n}")
        self.total += n
        return self

class MyError(KeyError):
    pass

def boom():
    raise MyError("no such block")

def loop():
    while True:
        pass
"""


def test_remote_objects_methods_and_exceptions():
    worker = start_worker(OBJECTS, timeout=20)
    try:
        learner = remote.RemoteLearner(worker)
        tally = learner.fn("Tally")(3)
        assert isinstance(tally, remote.RemoteObject) and "Tally" in repr(tally)
        assert type(tally).__name__ == "Tally"  # what a criterion's "returned Tally; expected ..." names
        tally.add(4)
        assert tally.total == 7  # the state lives in the worker
        with pytest.raises(ValueError, match="cannot add -1") as err:  # a learner ValueError is a ValueError here
            tally.add(-1)
        assert err.value.remote_frames[-1].name == "add"
        with pytest.raises(KeyError) as err:  # a learner subclass keeps its name and built-in base
            learner.fn("boom")()
        assert type(err.value).__name__ == "MyError" and str(err.value) == "'no such block'"
        with pytest.raises(Exception, match="not defined by the notebook's graded cells.*Tally"):
            learner.fn("missing")
    finally:
        worker.close()


def test_a_call_past_the_deadline_names_where_it_was_stopped():
    worker = start_worker(OBJECTS, timeout=3)
    t0 = time.monotonic()
    try:
        with pytest.raises(Stopped) as err:
            remote.RemoteLearner(worker).fn("loop")()
    finally:
        worker.close()
    assert err.value.status == "timeout" and err.value.stopped_in == "loop", err.value.message
    assert "notebook cell 0 line" in err.value.message and time.monotonic() - t0 < 10


# ----------------------------------------------------------------------------- codec and channel
def test_codec_round_trip():
    from servelab.engine import Completion, EngineRun

    run = EngineRun("mine", {3: Completion(3, [1, 2], [0.01, 0.02], "length")}, steps=2, num_slots=1)
    value = {"run": run, "t": (1, 2.5, None), "s": {4, 5}, "x": torch.randn(2, 3).to(torch.bfloat16),
             "empty": torch.zeros(0, 4, dtype=torch.int64), "nan": float("nan"), "dtype": torch.bfloat16}
    back = Decoder()(Encoder()(value))
    assert type(back["run"]) is EngineRun and back["run"].completions[3].tokens == [1, 2]
    assert back["run"].slot_utilization == run.slot_utilization
    assert back["t"] == (1, 2.5, None) and back["s"] == {4, 5} and back["nan"] != back["nan"]
    assert back["x"].dtype == torch.bfloat16 and torch.equal(back["x"], value["x"])
    assert back["empty"].shape == (0, 4) and back["dtype"] is torch.bfloat16


@pytest.mark.parametrize("data, words", [
    ({"$record": "Completion", "fields": {"request_id": "3"}}, "should be a int"),
    ({"$record": "Completion", "fields": {"request_id": 1, "evil": 2}}, "has no fields"),
    ({"$record": "Popen", "fields": {}}, "unknown record type"),
    ({"$tensor": ["float32", [2, 2], "AAAA"]}, "does not fit"),
    ({"$tensor": ["os.system", [1], ""]}, "not a tensor"),
    ({"$dtype": "Tensor"}, "not a torch dtype"),
    ({"$pickle": "gASV"}, "unknown tag"),
])
def test_codec_rejects_what_it_does_not_know(data, words):
    with pytest.raises(CodecError, match=words):
        Decoder()(data)


def test_channel_rejects_oversized_and_non_json_messages():
    for payload, words in ((b"\xff" * 8 + b"x", "over the"), (b"\x00" * 7 + b"\x03abc", "not a message"),
                           (b"\x00" * 7 + b"\x02[]", "not a message")):
        r, w = os.pipe()
        os.write(w, payload)
        os.close(w)
        with pytest.raises(channel.ChannelError, match=words):
            channel.recv(r, time.monotonic() + 2)
        os.close(r)


def test_the_grader_criteria_run_in_the_harness_process():
    """The worker gets the lab's id and the graded cells, never the criteria: grader/labs is hidden from it."""
    from grader.runner import hidden_paths

    forbidden = integrity.forbidden_modules(labs.get("01_batching"), labs.all_labs())
    hidden = hidden_paths(forbidden)
    assert str(GRADER_DIR / "labs") in hidden and any(p.endswith("reference/batching.py") for p in hidden)
    assert not any(p.endswith("reference/warmup.py") for p in hidden)  # an earlier lab's reference stays


def test_a_function_that_writes_into_its_arguments_sends_them_back():
    from grader.spec import call_in_place

    src = "def fill(out, value):\n    out.fill_(value)\n    return None\n"
    worker = start_worker(src)
    try:
        buf = torch.full((2, 3), float("nan"))
        value, (after, _) = call_in_place(remote.RemoteLearner(worker).fn("fill"), buf, 4.0)
    finally:
        worker.close()
    assert value is None and torch.equal(after, torch.full((2, 3), 4.0))
    assert buf.isnan().all()  # the harness's own tensor is untouched: only the worker's copy was written
    local = {}
    exec(src, local)
    value, (after, _) = call_in_place(local["fill"], buf, 2.0)
    assert after is buf and torch.equal(buf, torch.full((2, 3), 2.0))


def test_learner_code_cannot_signal_the_grader(make_notebook, no_rules):
    """The worker's PID namespace: the grader's process (here, this test's) is out of the learner's reach."""
    src = f"""
import os, signal

def mean(xs):
    for pid in (os.getppid(), {os.getpid()}):
        if pid > 1:
            os.kill(pid, signal.SIGTERM)
    return sum(xs) / len(xs)
"""
    rep = grade(make_notebook([(src, ["graded"]), (GOOD_SPIN, ["graded"])]))
    said = rep["environment"]["sandbox"].get("processes", "")
    if not said.startswith("isolated"):
        pytest.skip(f"this machine gives no PID namespace: {said}")
    got = result(rep, "mean_values")
    assert got["status"] == "error" and "ProcessLookupError" in got["message"], got  # and this process lives on
