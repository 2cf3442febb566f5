"""Lab 02's grading paths that a CPU run does not take on its own: the GPU bandwidth criteria (timed by the
harness around calls in the learner's worker) run here on tiny shapes with the CUDA-only parts faked."""
from __future__ import annotations

import pytest

import servelab.reference.paged as solution
from grader import integrity, labs, notebook
from grader.environment import probe
from grader.labs import lab02_paged as lab02
from grader.runner import run_worker
from grader.spec import GRADER_DIR, Context, Learner, run_criterion

SOLUTION = GRADER_DIR.parent / "solutions" / "02_paged_attention" / "paged_attention.ipynb"
GPU_CRITERIA = ["paged_decode_bandwidth", "split_kv_bandwidth"]


@pytest.fixture
def tiny_gpu_problem(monkeypatch):
    """The GPU criteria's shapes shrunk to what the interpreter runs in seconds, and a copy bandwidth of
    1 byte/s (this CPU has no device-to-device copy to measure), so every share of it passes."""
    from servelab.paged import bench

    monkeypatch.setattr(lab02, "GPU_HEADS", dict(num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                                                  dtype="bfloat16"))
    monkeypatch.setattr(lab02, "GPU_SHAPES", {"paged_decode": (2, 40), "paged_decode_split": (2, 70), "long": (1, 90)})
    monkeypatch.setattr(lab02, "_sdpa_per_call", lambda problem, device: 1e9)  # timed for real on a GPU only
    monkeypatch.setattr(lab02, "GPU_REPEAT", 4)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: 1.0)


@pytest.mark.parametrize("criterion", GPU_CRITERIA)
def test_gpu_bandwidth_criterion_in_process(tiny_gpu_problem, criterion):
    res = run_criterion(lab02.LAB.get(criterion), Learner(vars(solution)), Context("02_paged_attention", seed=1))
    assert res.status == "passed", res.message
    assert res.metrics["us_per_call"] > 0 and "timed call" not in res.message


@pytest.mark.slow
def test_gpu_bandwidth_criterion_through_the_worker(tiny_gpu_problem):
    """The problem is built in the learner's worker from its recipe; the harness times the calls and checks
    three of the timed outputs against its own copy of the problem."""
    lab = labs.get("02_paged_attention")
    ext = notebook.extract(notebook.load(SOLUTION), lab.functions,
                           forbidden=integrity.forbidden_modules(lab, labs.all_labs()))
    run = run_worker(lab, lab.get("paged_decode_bandwidth"), ext, probe("cpu"), quick=True, seed=2)
    assert run.result.status == "passed", run.result.message


def test_a_wrong_timed_output_fails_the_bandwidth_criterion(tiny_gpu_problem):
    wrong = dict(vars(solution))
    wrong["paged_decode"] = lambda q, *rest, **kw: solution.paged_decode(q * 0.5, *rest, **kw)  # fast and wrong
    res = run_criterion(lab02.LAB.get("paged_decode_bandwidth"), Learner(wrong), Context("02_paged_attention", seed=1))
    assert res.status == "failed" and "timed call" in res.message, res.message


def test_the_sdpa_baseline_runs_and_agrees_with_the_reference():
    """The GPU criteria's PyTorch baseline, on a tiny CPU problem: it runs, and it computes the same attention."""
    import torch
    import torch.nn.functional as F

    from servelab.paged.bench import build_problem, sdpa_inputs
    from servelab.paged.reference import paged_decode_reference

    recipe = dict(num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype="float32", batch=2, context=40,
                  seed=3, repeat=2)
    problem = build_problem(recipe, "cpu")
    assert lab02._sdpa_per_call(problem, "cpu") > 0
    _, k, v = sdpa_inputs(problem.q[1], problem.k_cache, problem.v_cache, problem.block_tables, 40)
    got = F.scaled_dot_product_attention(problem.q[1][:, :, None], k, v, scale=problem.scale, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(got, paged_decode_reference(*problem.args(1)), atol=1e-5, rtol=1e-5)
