"""Lab 03's criteria through the real grader: each runs in the harness against the solution notebook's graded
code in a sandboxed worker (``grader.runner.run_worker``), with the draft, the probes that record logits, the
negated and other-vocabulary drafts and the generators crossing the pipe as handles. A planted bug goes in a
notebook built on the fly from the reference module's code."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import torch

from grader import integrity, labs, notebook
from grader.environment import probe
from grader.remote import Handles
from grader.runner import run_worker

ROOT = Path(__file__).resolve().parents[1]
LAB = labs.get("03_speculative")
SOLUTION = ROOT / "solutions" / LAB.id / LAB.notebook
REFERENCE_SOURCE = ROOT / "servelab" / "reference" / "speculative.py"  # the solution's graded cells, released


def lab03_notebook(source: str, path: Path) -> Path:
    """A minimal lab 03 notebook: one graded cell holding ``source``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["servelab"] = {"lab": LAB.id}
    nb.cells = [nbformat.v4.new_markdown_cell("# Lab 03 (test notebook)"),
                nbformat.v4.new_code_cell(source, metadata={"tags": ["graded"]})]
    path.write_text(nbformat.writes(nb), encoding="utf-8")
    return path


def extraction(source: str, tmp_path: Path) -> notebook.Extraction:
    nb = notebook.load(lab03_notebook(source, tmp_path / "speculative.ipynb"))
    ext = notebook.extract(nb, LAB.functions, forbidden=integrity.forbidden_modules(LAB, labs.all_labs()))
    assert not ext.errors and not ext.violations, (ext.errors, ext.violations)
    return ext


@pytest.fixture(scope="module")
def solution_extraction():
    ext = notebook.extract(notebook.load(SOLUTION), LAB.functions,
                           forbidden=integrity.forbidden_modules(LAB, labs.all_labs()))
    assert not ext.errors and not ext.violations and len(ext.cells) == len(LAB.functions)
    return ext


WORKER_CRITERIA = ["greedy_identical", "caches_consistent", "bookkeeping", "sampling_hand_made",
                   "sampling_real_models", "bad_inputs", "lookup_proposals", "lookup_identical", "formula"]


@pytest.mark.slow
@pytest.mark.parametrize("criterion", WORKER_CRITERIA)
def test_solution_passes_through_the_worker(solution_extraction, criterion):
    run = run_worker(LAB, LAB.get(criterion), solution_extraction, probe("cpu"), quick=True, seed=21)
    assert run.result.status == "passed", run.result.message


@pytest.mark.slow
def test_tokens_per_forward_through_the_worker(solution_extraction, monkeypatch):
    import grader.runner

    monkeypatch.setattr(grader.runner, "threshold", lambda device_class, lab_id, crit_id: 2.5)
    run = run_worker(LAB, LAB.get("tokens_per_forward"), solution_extraction, probe("cpu"), quick=True, seed=21)
    assert run.result.status == "passed", run.result.message
    assert run.result.metrics["speedup"] >= 2.5


@pytest.mark.slow
def test_stale_draft_cache_fails_through_the_worker(tmp_path):
    """A loop that forgets the draft's catch-up token after an all-accepted round (its cache never gets that
    position) passes the token checks but fails caches_consistent: the logits the worker's probes recorded
    differ from a fresh forward the harness computes."""
    src = REFERENCE_SOURCE.read_text(encoding="utf-8")
    planted = src.replace("drafted, new = [], seq[d_len:]", "drafted, new = [], seq[d_len:][-1:]", 1)
    assert planted != src
    run = run_worker(LAB, LAB.get("caches_consistent"), extraction(planted, tmp_path), probe("cpu"), quick=True,
                     seed=21)
    assert run.result.status == "failed", run.result.message
    assert "differ" in run.result.message or "never fed" in run.result.message


# ----------------------------------------------------------------------------- the handles, without a worker
class FakeWorker:
    def _garbled(self, what):
        return AssertionError(what)


def test_generator_state_crosses_both_ways():
    from grader.worker import state

    g = torch.Generator().manual_seed(3)
    handles = Handles(FakeWorker())
    h = handles(g)
    assert h["$generator"] == 0
    w = torch.Generator()
    from grader.codec import _decode_tensor

    w.set_state(_decode_tensor(h["state"]["$tensor"]))
    torch.rand(5, generator=w)  # the worker draws
    handles.apply({"0": state(w)})
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=w))


def test_recorded_forwards_are_validated():
    from grader.probes import RecordingModel
    from grader.worker import state

    class Tiny:
        config = type("C", (), {"vocab_size": 5})()

        def __call__(self, ids, positions=None, cache=None):
            return torch.randn(*ids.shape, 5)

    harness, worker = RecordingModel(Tiny(), logits=True), RecordingModel(Tiny(), logits=True)
    handles = Handles(FakeWorker())
    handles._add(harness)
    worker(torch.tensor([[1, 2, 3]]))
    worker(torch.tensor([[4]]), torch.tensor([[3]]))
    good = {"0": state(worker)}
    handles.apply(good)
    assert [f.ids for f in harness.forwards] == [[[1, 2, 3]], [[4]]]
    assert harness.forwards[1].logits.dtype == torch.float16 and harness.forwards[1].logits.shape == (1, 1, 5)
    for forge in (lambda s: s["forwards"].pop(),  # fewer forwards than calls
                  lambda s: s["forwards"][1].__setitem__(0, s["forwards"][0][0]),  # a number twice
                  lambda s: s["forwards"][0].__setitem__(1, [[1, 2]]),  # ids of another shape
                  lambda s: s["forwards"][0].__setitem__(2, None),  # logits missing
                  lambda s: s["forwards"][0].__setitem__(1, [[1, 2, True]])):  # a bool for a token
        bad = {"0": state(worker)}
        forge(bad["0"])
        with pytest.raises(AssertionError, match="malformed"):
            handles.apply(bad)
    wrong_vocab = RecordingModel(type("T", (), {"__call__": lambda self, i, p=None, c=None: torch.zeros(1, 1, 6)})(),
                                 logits=True)
    wrong_vocab(torch.tensor([[1]]))
    with pytest.raises(AssertionError, match="float16"):
        handles.apply({"0": state(wrong_vocab)})


def test_a_probe_passed_to_two_calls_keeps_both_records():
    """The worker builds a fresh probe for every call; the harness's probe adds each call's record to what it
    holds. (It once kept only the last call's: a timed run over two prompts then counted one prompt's forwards,
    and lab 03's prompt lookup looked 15x costlier to propose than it is.)"""
    from grader.probes import CountingModel, RecordingModel
    from grader.worker import state

    class Tiny:
        config = type("C", (), {"vocab_size": 5})()

        def __call__(self, ids, positions=None, cache=None):
            return torch.randn(*ids.shape, 5)

    counting, recording = CountingModel(Tiny()), RecordingModel(Tiny())
    for call in ([[1, 2]], [[3]]):  # two learner calls, each seen by fresh worker-side probes
        handles = Handles(FakeWorker())
        handles._add(counting), handles._add(recording)
        w_counting, w_recording = CountingModel(Tiny()), RecordingModel(Tiny())
        w_counting(torch.tensor(call)), w_recording(torch.tensor(call))
        handles.apply({"0": state(w_counting), "1": state(w_recording)})
    assert [c.tokens for c in counting.calls] == [2, 1] and [c.tokens for c in recording.calls] == [2, 1]
    assert [f.ids for f in recording.forwards] == [[[1, 2]], [[3]]]


def test_wrappers_cross_as_handles_and_refuse_unknown_models():
    from grader.codec import CodecError
    from grader.probes import CountingModel, NegatedModel, OtherVocabModel
    from grader.spec import DRAFT, Context

    ctx = Context(LAB.id)
    draft = ctx.model(DRAFT)
    handles = Handles(FakeWorker())
    assert handles(NegatedModel(draft)) == {"$wrap": "negated", "model": {"$model": DRAFT, "device": "cpu"}}
    assert handles(OtherVocabModel(draft, 7))["extra"] == 7
    assert handles(CountingModel(NegatedModel(draft)))["model"]["$wrap"] == "negated"
    with pytest.raises(CodecError):
        handles(CountingModel(object()))
    with pytest.raises(ValueError):
        OtherVocabModel(draft, 10**6)
