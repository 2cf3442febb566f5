"""The measurement scripts run here too: the GPU check on the CPU, the before/after decode comparison."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def load_check_gpu():
    """scripts/check_gpu.py as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_gpu", ROOT / "scripts" / "check_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_check_gpu_measures_decode_on_the_cpu(tmp_path):
    res = run("scripts/check_gpu.py", "--device", "cpu", "--labs", "00_warmup", "--skip-tour", "--json",
              str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"))
    report = json.loads((tmp_path / "r.json").read_text())
    graded = report["grader"]["00_warmup"]["kv_cache_speedup"]["status"]  # through the CLI; its time may be noisy
    assert graded in ("passed", "failed") and res.returncode == (0 if graded == "passed" else 1), res.stdout + res.stderr
    assert "decode, batch 1, shipped target:" in res.stdout and "bar 500" not in res.stdout  # no GPU bar on a CPU
    assert report["decode"]["tokens_per_s"] > 0 and report["ceilings"]["copy_bytes_per_s"] > 0
    roof = report["roofline"]
    assert roof["model"] == "bench-tiny" and roof["weight_bytes"] > 8e7 and roof["graphs_speedup"] > 0
    assert all(roof[k]["fraction_of_roofline"] > 0 and len(roof[k]["runs"]) == 3 for k in ("eager", "cuda_graphs"))
    table = (tmp_path / "r.md").read_text()
    assert table == report["table"] and table.startswith("| check (cpu) |") and "of the roofline" in table
    assert "| decode, bench-tiny, batch 1, cuda graphs |" in table and "| CUDA graphs / eager |" in table
    assert res.stdout.rstrip().endswith("CHECKS PASSED" if graded == "passed" else "SOME CHECKS FAILED")
    lines = res.stdout.rstrip().splitlines()
    assert lines[-3] == table.rstrip().splitlines()[-1] and not lines[-2]  # the table comes last, then the verdict
    assert "| 00_warmup/kv_cache_speedup |" in table


def test_check_gpu_dry_run_lists_every_step_and_runs_nothing():
    res = run("scripts/check_gpu.py", "--dry-run", "--device", "cpu")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "would run on cpu:" and "grade 04_disaggregation: simulate_validates, disagg_tpot, multi_gpu_nccl" in res.stdout
    assert lines[-1].endswith("tour: `servelab tour` runs to the end on this device") and "tokens/s =" not in res.stdout
    bad = run("scripts/check_gpu.py", "--dry-run", "--labs", "05_nope")
    assert bad.returncode == 2 and "no lab ['05_nope']" in bad.stderr


def test_check_gpu_plans_the_gpu_steps(monkeypatch):
    """The CUDA plan, built here: lab 02's kernels at GPU sizes first, every lab's gpu criteria, bench-1b."""
    import argparse

    check_gpu = load_check_gpu()
    plan = check_gpu.grading_plan("cuda")
    assert plan["02_paged_attention"][:4] == check_gpu.GPU_CORRECTNESS["02_paged_attention"] and "split_kv_bandwidth" in plan["02_paged_attention"]
    assert "gpu_hf_pair" in plan["03_speculative"] and "multi_gpu_nccl" in plan["04_disaggregation"]
    assert "store_kv_matches" not in check_gpu.grading_plan("cpu")["02_paged_attention"]
    assert plan["04_disaggregation"][0] == "disagg_identical"  # two workers sharing one card
    assert list(check_gpu.grading_plan("cuda", ["03_speculative", "01_batching"])) == ["03_speculative", "01_batching"]
    listed = dict(check_gpu.steps("cuda", argparse.Namespace(skip_grader=False, skip_tour=True, labs=["01_batching"])))
    assert "bar >= 500" in listed["decode"] and listed["roofline"].startswith("bench-1b")
    assert "CUDA graphs" in listed["roofline"] and "bar with graphs >= 60%" in listed["roofline"]
    assert "vllm_side_by_side" in listed["grade 01_batching"] and "tour" not in listed


@pytest.mark.slow
def test_ab_decode_compares_against_a_commit():
    res = run("scripts/ab_decode.py", "HEAD", "--pairs", "2", "--new-tokens", "8")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "new/old" in res.stdout and "median of 2 alternating pairs" in res.stdout


def _quickstart_dry_run(tmp_path, python: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """scripts/quickstart.sh --dry-run in an empty copy of the repo layout (no .venv yet), with ``python``."""
    import os
    import shutil

    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "quickstart.sh", tmp_path / "scripts")
    return subprocess.run(["bash", "scripts/quickstart.sh", "--dry-run", "--vllm"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHON": python, **(env or {})})


def test_quickstart_on_a_cuda_machine_keeps_its_torch(tmp_path):
    """The GPU branch, with the probe faked: a Python whose torch reports CUDA gets a venv that sees the system
    site-packages (its CUDA torch and compiled Triton) and no CPU torch download; vLLM only when asked."""
    shim = tmp_path / "cuda-python"
    shim.write_text(f"#!/bin/sh\ncase \"$*\" in *torch.cuda.is_available*) exit 0 ;; esac\nexec {sys.executable} \"$@\"\n")
    shim.chmod(0o755)
    (tmp_path / "repo").mkdir()
    res = _quickstart_dry_run(tmp_path / "repo", str(shim))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "gpu mode" in res.stdout and f"would run: {shim} -m venv --system-site-packages .venv" in res.stdout
    assert "torch==" not in res.stdout and "install -e .[dev,gpu]" in res.stdout


def test_quickstart_on_a_cpu_machine_installs_the_cpu_torch(tmp_path):
    res = _quickstart_dry_run(tmp_path, sys.executable, {"SERVELAB_SETUP": "cpu"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cpu mode" in res.stdout and "-m venv .venv" in res.stdout and "--system-site-packages" not in res.stdout
    assert "install torch==2.13.0" in res.stdout and "would run: .venv/bin/servelab tour" in res.stdout


def test_graphs_vs_eager_check_runs_here():
    """check_gpu's correctness probe of the graphed path (its first real use is on a GPU): on this CPU both paths
    stay on the no-cache forward's tokens, within float rounding."""
    got = load_check_gpu().graphs_vs_eager("cpu", new_tokens=12)
    assert set(got) == {"eager", "cuda_graphs", "cuda_graphs_math_sdpa"}
    for v in got.values():
        assert v["tokens_equal_reference"] and v["max_abs_logit_diff"] < 1e-3, got
