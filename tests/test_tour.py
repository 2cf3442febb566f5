"""The README's main job runs end to end and reports every section's numbers."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_tour_quick(tmp_path):
    out = tmp_path / "tour.json"
    res = subprocess.run([sys.executable, "-m", "servelab.cli", "tour", "--quick", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, COLUMNS="120"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"models", "generation", "draft_acceptance", "batching"} <= results.keys()
    assert results["generation"]["target"]["tokens"] > 0
    assert 0.0 <= results["draft_acceptance"]["alpha"] <= 1.0
    assert results["batching"]["steps_ratio"] > 1.0
    assert "headline numbers" in res.stdout


def test_doctor_runs():
    res = subprocess.run([sys.executable, "-m", "servelab.cli", "doctor"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "02_paged_attention" in res.stdout


def test_cli_reports_bad_model_cleanly():
    res = subprocess.run([sys.executable, "-m", "servelab.cli", "tour", "--model", "/no/such/dir"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "not found" in res.stdout
