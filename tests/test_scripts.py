"""The measurement scripts run here too: the GPU check on the CPU, the before/after decode comparison."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_check_gpu_measures_decode_on_the_cpu(tmp_path):
    res = run("scripts/check_gpu.py", "--device", "cpu", "--skip-grader", "--skip-tour", "--json", str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "decode, batch 1, shipped target:" in res.stdout and "bar" not in res.stdout  # no GPU bar on a CPU
    assert '"tokens_per_s"' in (tmp_path / "r.json").read_text()


@pytest.mark.slow
def test_ab_decode_compares_against_a_commit():
    res = run("scripts/ab_decode.py", "HEAD", "--pairs", "2", "--new-tokens", "8")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "new/old" in res.stdout and "median of 2 alternating pairs" in res.stdout
