"""Grader paths a CPU machine never takes on its own, run here with fakes: lab 01's optional vLLM comparison
(CUDA + vllm faked), criteria that find out at run time that they are blocked, and what an optional
criterion may not do (gate the speed criteria, or make a perfect submission's exit code 2)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from grader import environment, labs, spec
from grader.report import totals
from grader.spec import Context, Lab, Learner, Outcome, Result, gate_failure, run_criterion
from servelab.engine import Completion, EngineRun
from servelab.loader import SHIPPED

VLLM = "vllm_side_by_side"
SPEED = ("continuous_step_ratio", "continuous_speedup")


@pytest.fixture
def lab01() -> Lab:
    return labs.get("01_batching")


@pytest.fixture
def fake_vllm(monkeypatch) -> types.SimpleNamespace:
    """A `vllm` module in sys.modules whose LLM records how it was built and what it served."""
    seen = types.SimpleNamespace(llm_kwargs=[], prompts=[], params=[])

    class SamplingParams:
        def __init__(self, temperature: float = 1.0, max_tokens: int = 16):
            self.temperature, self.max_tokens = temperature, max_tokens

    class LLM:
        def __init__(self, **kwargs):
            seen.llm_kwargs.append(kwargs)

        def generate(self, prompts, params):
            seen.prompts, seen.params = list(prompts), list(params)
            out = types.SimpleNamespace
            return [out(outputs=[out(token_ids=[7] * p.max_tokens)]) for p in params]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    vllm.inputs = types.ModuleType("vllm.inputs")
    vllm.inputs.TokensPrompt = dict  # vLLM's TokensPrompt is a TypedDict
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", vllm.inputs)
    monkeypatch.delenv("SERVELAB_MODEL", raising=False)
    return seen


def recording_engine(calls: list):
    """A learner's continuous_batching that records the model it was handed and serves 3 tokens a request."""

    def continuous_batching(model, requests, max_running, max_step_tokens, eos_id, clock, max_len=1024):
        calls.append({"device": model.device, "requests": len(requests), "max_running": max_running})
        done = {r.id: Completion(r.id, [1, 2, 3], [0.1, 0.2, 0.3], "length") for r in requests}
        return EngineRun("learner", done, steps=10, num_slots=max_running, seconds=0.5)

    return continuous_batching


def run_vllm_criterion(lab01: Lab, device: str, calls: list) -> Result:
    learner = Learner({"continuous_batching": recording_engine(calls), "__name__": "learner"})
    return run_criterion(lab01.get(VLLM), learner, Context(lab01.id, device=device, device_class=device))


def test_vllm_criterion_with_cuda_and_vllm_faked_calls_vllm_and_reports_both_rates(lab01, fake_vllm, monkeypatch):
    monkeypatch.setattr(environment, "vllm_missing", lambda device: None)  # "CUDA and vllm are here"
    calls: list = []
    res = run_vllm_criterion(lab01, "cpu", calls)
    assert res.status == "passed", res.message
    assert len(fake_vllm.llm_kwargs) == 1 and fake_vllm.llm_kwargs[0]["model"] == str(SHIPPED["target"])
    assert fake_vllm.llm_kwargs[0]["max_num_seqs"] == 8
    n = len(fake_vllm.prompts)
    assert n >= 100 and all(p["prompt_token_ids"] for p in fake_vllm.prompts)  # the skewed trace, token ids
    assert all(p.temperature == 0 for p in fake_vllm.params)  # greedy, like the learner's engine
    assert calls == [{"device": torch.device("cpu"), "requests": n, "max_running": 8}]  # the run's device
    assert res.metrics["learner_tokens_per_s"] == pytest.approx(3 * n / 0.5, rel=0.01)
    assert res.metrics["vllm_tokens_per_s"] > 0
    assert "vLLM" in res.message and "your engine" in res.message and "tokens/s" in res.message


def test_vllm_criterion_without_vllm_is_blocked_with_install_advice(lab01, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    calls: list = []
    res = run_vllm_criterion(lab01, "cuda", calls)  # on CPU: a cuda model load would be an `error`
    assert res.status == "blocked", res.message
    assert "pip install vllm" in res.message and "Hint" not in res.message
    assert (res.points, res.max_points) == (0, 0) and calls == []


def test_vllm_probe_says_what_is_missing(monkeypatch):
    assert "CUDA GPU" in environment.vllm_missing("cpu")
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert "not installed" in environment.vllm_missing("cuda")


def test_a_criterion_can_declare_itself_blocked_at_run_time():
    lab = Lab("t", "t", "t.ipynb", "t", ("f",))

    @lab.criterion("needs_thing", "correctness", 2)
    def needs_thing(learner, ctx) -> Outcome:
        raise spec.Blocked("needs the thing: `pip install thing`")

    res = run_criterion(lab.get("needs_thing"), Learner({}), Context("t"))
    assert (res.status, res.points, res.max_points) == ("blocked", 0, 2)
    assert res.message == "needs the thing: `pip install thing`"


def test_only_correctness_criteria_gate_the_speed_criteria(lab01):
    correctness = {c.id for c in lab01.criteria if c.kind == "correctness"}
    for cid in SPEED:
        crit = lab01.get(cid)
        assert set(lab01.gates(crit)) == correctness and VLLM not in lab01.gates(crit)
        done = {g: Result(g, "correctness", "passed", 1, 1, "") for g in correctness}
        done[VLLM] = Result(VLLM, "gpu", "error", 0, 0, "ImportError: cannot import name 'Blocked'")
        assert gate_failure(lab01, crit, done) is None  # an erroring optional comparison gates nothing
        done["left_pad_layout"] = Result("left_pad_layout", "correctness", "failed", 0, 1, "")
        assert "left_pad_layout (failed)" in gate_failure(lab01, crit, done)
    picked = [c.id for c in lab01.selection({"continuous_speedup"})]
    assert VLLM not in picked and set(picked) == correctness | {"continuous_speedup"}
    assert picked[-1] == "continuous_speedup"  # speed after what it waits for


def test_interpreter_criteria_gate_but_gpu_and_explicit_gates_are_honoured():
    lab = Lab("t", "t", "t.ipynb", "t", ("f",))
    for cid, kind in (("c", "correctness"), ("i", "interpreter"), ("g", "gpu"), ("m", "multi_gpu"),
                      ("p", "performance")):
        lab.criterion(cid, kind, 1)(lambda learner, ctx: Outcome(True, ""))
    lab.criterion("p2", "performance", 1, gate=("g",))(lambda learner, ctx: Outcome(True, ""))
    assert lab.gates(lab.get("p")) == ("c", "i")
    assert lab.gates(lab.get("p2")) == ("g",)
    assert lab.gates(lab.get("c")) == ()


@pytest.mark.parametrize("extra, code", [
    (Result("optional", "gpu", "blocked", 0, 0, "needs vllm"), 0),  # worth nothing: the grade is complete
    (Result("on_gpu", "gpu", "blocked", 0, 2, "needs a GPU"), 2),  # points this machine cannot grade
    (Result("optional", "gpu", "error", 0, 0, "crashed"), 1),
])
def test_exit_code_ignores_blocked_criteria_worth_no_points(extra, code):
    passed = [Result("a", "correctness", "passed", 3, 3, ""), Result("s", "performance", "passed", 1, 1, "")]
    t = totals(passed + [extra])
    assert t["exit_code"] == code
    assert (t["points"], t["max_points_gradable"]) == (4, 4)


def test_context_loads_the_model_on_the_runs_device(monkeypatch):
    import servelab

    loads = []
    monkeypatch.setattr(spec, "_CACHE", {})
    monkeypatch.setattr(servelab, "load_model", lambda name, device: loads.append((name, device)) or "model")
    assert Context("01_batching", device="cuda").model() == "model"
    assert loads == [(None, "cuda")]  # `--device cuda`: the learner's engine runs on the GPU model


@pytest.mark.gpu
def test_vllm_criterion_runs_the_learners_engine_on_the_gpu(lab01, fake_vllm, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(spec, "_CACHE", {})
    calls: list = []
    res = run_vllm_criterion(lab01, "cuda", calls)  # the real probe: CUDA is here, vllm is the fake
    assert res.status == "passed", res.message
    assert calls[0]["device"].type == "cuda"


def test_probe_refuses_an_unknown_device_instead_of_falling_back_to_cpu():
    """SERVELAB_DEVICE=tpu used to grade on the CPU without a word (inline checks read the variable)."""
    from grader.spec import UsageError

    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        environment.probe("tpu")
    assert environment.probe("CPU").device == "cpu"


def test_the_preset_speedup_runs_here_on_bench_tiny_and_is_blocked_without_a_bar(lab01):
    """Lab 01's GPU criterion on a model of real shape: on a GPU bench-1b, here bench-tiny through the same code."""
    import servelab.reference.batching as solution

    learner = Learner(vars(solution))
    crit = lab01.get("preset_speedup")
    res = run_criterion(crit, learner, Context(lab01.id, quick=True, threshold=1.2))
    assert res.status in ("passed", "failed") and "bench-tiny, skewed trace at 0.125 of its size (16 requests" in res.message, res.message
    assert res.metrics["static_steps"] > res.metrics["continuous_steps"] > 0 and len(res.metrics["ratios"]) == 2
    blocked = run_criterion(crit, learner, Context(lab01.id, device_class="unknown-gpu"))
    assert blocked.status == "blocked" and "no bar for device class 'unknown-gpu'" in blocked.message


def test_a_model_for_forking_code_stays_on_the_cpu_on_a_gpu_machine(monkeypatch):
    """Lab 04's criteria hand the workers' launcher a CPU model (``Context.model(device="cpu")``): the handle
    names that device, and a worker on CUDA loads it on the CPU, so it never initialises CUDA before it forks
    the GPU ranks. A handle naming a device the worker is not on is refused."""
    from grader.remote import Handles
    from grader.worker import Server

    ctx = Context("04_disaggregation", "cuda", "h200", True, 0, None)  # no GPU is touched: the model is on the CPU
    model = ctx.model(device="cpu")
    handle = Handles(None)(model)
    assert handle == {"$model": None, "device": "cpu"} and str(model.device) == "cpu"
    loaded = Server({}, "cuda").model(handle)
    assert str(loaded.device) == "cpu" and loaded is model  # the worker's own cache, keyed by device
    with pytest.raises(ValueError, match="a model on 'cuda' in a worker on 'cpu'"):
        Server({}, "cpu").model({"$model": None, "device": "cuda"})


def test_synchronize_never_initialises_cuda(monkeypatch):
    """A process that never used CUDA has nothing queued: synchronize must not initialise CUDA there (lab 04's
    workers fork GPU ranks after the grader's worker has synchronised). CUDA faked."""
    from servelab import device

    synced = []
    monkeypatch.setattr(device, "get_device", lambda d=None: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: synced.append(d))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    device.synchronize("cuda")
    assert synced == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    device.synchronize("cuda")
    assert synced == [torch.device("cuda")]
