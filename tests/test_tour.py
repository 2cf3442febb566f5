"""The README's main job runs end to end and reports every section's numbers."""
import io
import json
import os
import statistics
import subprocess
import sys

import pytest
from rich.console import Console

from servelab import device, load_model, load_tokenizer, tour


@pytest.mark.slow
def test_tour_quick(tmp_path):
    out = tmp_path / "tour.json"
    res = subprocess.run([sys.executable, "-m", "servelab.cli", "tour", "--quick", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, COLUMNS="120"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"models", "generation", "draft_acceptance", "batching"} <= results.keys()
    assert results["generation"]["target"]["tokens"] > 0
    roof = results["roofline"]  # eager and CUDA graphs (replayed eagerly on a CPU) against weight bytes / bandwidth
    assert roof["roofline_tokens_per_s"] > 0 and all(len(r) == 2 and min(r) > 0 for r in roof["runs"].values())
    assert "target decode vs its roofline" in res.stdout
    assert 0.0 <= results["draft_acceptance"]["alpha"] <= 1.0
    batching = results["batching"]
    assert batching["steps_ratio"] > 1.0
    # the speedup is the median of alternating pairs, and the headline says how many and each ratio
    assert batching["pairs"] == len(batching["ratios"]) == tour.BATCHING_PAIRS >= 3
    assert batching["speedup"] == pytest.approx(statistics.median(batching["ratios"]), abs=1e-3)
    (headline,) = batching["headline"].values()
    assert f"median of {tour.BATCHING_PAIRS} pairs: " in headline
    assert all(f"{r:.2f}" in headline for r in batching["ratios"])
    assert "headline numbers" in res.stdout and "median of" in res.stdout
    paging = results["paging"]  # lab 02: deterministic counts on a virtual clock
    assert paging["paged_waste"] < 0.04 < paging["contiguous_waste"], paging
    assert paging["paged_max_running"] >= 3 * paging["contiguous_max_running"], paging
    assert "lab 02: paged KV cache" in res.stdout
    spec = results["speculative"]  # lab 03: tokens per target forward is a count; the speedup is shown as measured
    assert spec["tokens_per_target_forward"] > 2.0 and len(spec["ratios"]) == tour.SPEC_PAIRS, spec
    assert "lab 03: speculative decoding" in res.stdout
    # lab 04: one run each. The split's mean TPOT is 3-5x lower; its p99 (the headline, usually 7-20x lower) is one
    # request's, which a single stall of the shared 2-core VM can lift past the colocated one
    disagg = results["disaggregation"]
    assert disagg["disaggregated"]["mean_tpot_ms"] < disagg["colocated"]["mean_tpot_ms"], disagg
    assert "lab 04: prefill/decode split" in res.stdout


def test_doctor_runs():
    env = {k: v for k, v in os.environ.items() if k != device.DEVICE_ENV}
    res = subprocess.run([sys.executable, "-m", "servelab.cli", "doctor"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert res.returncode == 0, res.stderr
    assert "02_paged_attention" in res.stdout
    assert "auto (no $SERVELAB_DEVICE)" in res.stdout  # which device the labs will use, and why
    if not (device.LABS_DIR / "02_paged_attention").is_dir():
        assert "not built yet" in res.stdout


def test_cli_reports_bad_model_cleanly():
    res = subprocess.run([sys.executable, "-m", "servelab.cli", "tour", "--model", "/no/such/dir"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "not found" in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1, res.stderr  # one line, however wide the terminal


@pytest.fixture(scope="module")
def models():
    return {"target": load_model("target"), "draft": load_model("draft"), "tokenizer": load_tokenizer("target")}


def render(section, models: dict, **ctx) -> tuple[dict, str]:
    console = Console(width=80, file=io.StringIO())
    result = section(models | {"console": console} | ctx)
    return result, console.file.getvalue()


def test_models_table_shows_full_names_at_80_columns(models, monkeypatch):
    _, text = render(tour.section_models, models)
    assert "servelab-target" in text and "servelab-draft" in text
    monkeypatch.setattr(models["target"], "name", "SmolLM2-360M-Instruct")  # a hub checkpoint's, via --model
    _, text = render(tour.section_models, models)
    assert "SmolLM2-360M-Instruct" in text


def test_generation_shows_every_prompt_it_decodes(models):
    result, text = render(tour.section_generate, models, new_tokens=4)
    completions = result["target"]["completions"]
    assert len(completions) == len(tour.PROMPTS) == text.count("target, greedy")
    for prompt, completion in zip(tour.PROMPTS, completions):
        assert prompt.splitlines()[0] in text and completion.strip() in text
