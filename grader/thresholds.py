"""The one table of performance thresholds: minimum speedup per criterion, keyed by device class.

A device class missing from the table (e.g. "unknown-gpu") blocks the performance criteria instead of
grading them against a number nobody measured. Keys are "<lab>/<criterion id>".

Where the numbers come from:
- cpu: measured with the solution notebooks on a 2-core cloud VM (Intel Xeon) with 1 torch thread, while a
  training job loaded both cores; each threshold is about half the median the solution reached, so a
  correct, sensible implementation passes on a slower or busier laptop.
- h100 / h200 / a100 / l4: the 5.4M-parameter default model is kernel-launch bound on any GPU. Measured on
  one H200 (2026-11-30, torch 2.11, after the per-step metadata rework): a decode step is ~126 kernels and
  2.4 ms of host time, and recomputing the whole sequence costs the same launches as one cached token, so
  cached/recompute was 0.98x, 1.00x and 0.95x at prompts of 32, 256 and 1,024 tokens (0.93x in the grader).
  The cache's saving is graded deterministically by `one_token_per_step` (forward tokens); on a GPU
  `kv_cache_speedup` only asks the cached decode not to be clearly slower (0.8x). A benchmark-sized model
  (the GPU tier) is where the GPU shows the cache's speedup. Batching's wall ratio approaches the step
  ratio on a launch-bound GPU (H200, one pair, before the rework: 3.11x for 2.75x fewer steps).
"""

from __future__ import annotations

THRESHOLDS: dict[str, dict[str, float]] = {
    "cpu": {
        "00_warmup/kv_cache_speedup": 1.5,  # solution, shipped target: 2.9-3.2x (prompt 32, 64 new tokens)
        "01_batching/continuous_step_ratio": 2.0,  # deterministic; the solution takes 4402 / 1599 = 2.75x
        # half the skewed trace (64 requests); solution: see the closing note of issue #8 for the measured pairs.
        # Wrong engines land far below (per-request forwards: 0.6x), a busy machine a little below the solution
        "01_batching/continuous_speedup": 1.5,
        # deterministic: used / reserved KV token-steps (under 4% waste, the vLLM paper's figure); solution: see below
        "02_paged_attention/paged_kv_efficiency": 0.96,
        "02_paged_attention/paged_concurrency": 3.0,  # sequences at once in lab 01's KV memory, over its 8 slots
        "02_paged_attention/paged_throughput": 1.0,  # the paged engine must not be slower; solution: see below
        # deterministic: prompt tokens computed without / with the prefix cache, shared system prompt (4.7-5.7x)
        "02_paged_attention/prefix_cache_saves_prefill": 3.0,
        # lab 03, shipped pair, batch 1, 1 thread (issue #13's bars in brackets):
        "03_speculative/tokens_per_forward": 2.5,  # deterministic; the solution: 3.56 at gamma 4 [2.5]
        # the solution: 0.92-1.19x at gamma 1-4 over about 20 runs of 7-9 pairs (2026-11-30), median about 1.07x. Below
        # the bar because in-loop c is 0.45-0.6 here (per-op overhead and the shared 4096-token head make a
        # 2-layer draft cost half a 6-layer target step) and v 1.15-1.9; the formula predicts exactly this, and
        # its 15% band is what grades the loop on a CPU. This bar only catches a loop that loses clearly (a draft
        # run without its cache: 0.36x); the deterministic figure is tokens_per_forward
        "03_speculative/draft_speedup": 0.9,  # [1.15]
        # code that re-emits its prompt, the prompts chosen from 3x as many by how well the target re-emits them
        # (speed_prompts); the solution: 1.54-2.02x over 6 runs with 4 seeds (2026-11-30) [1.5]
        "03_speculative/lookup_speedup": 1.5,
        # lab 04, mixed trace, p99 TPOT colocated (1 process, 2 threads) / 1P + 1D (2 processes, 1 thread each)
        "04_disaggregation/disagg_tpot": 2.0,  # issue #10's bar; the solution: see the closing note of #10
        # a tolerance, not a speedup: the largest error of the simulated median TTFT or TPOT against a real 1P + 1D
        # run calibrated on itself (issue #10 asks ~15%); the solution: both within 15% in 24 of 47 runs, within 20%
        # in 32 (lab 04's README), so 20% with the first of up to 4 runs counting
        "04_disaggregation/simulate_validates": 0.20,
    },
    **{gpu: {
        "00_warmup/kv_cache_speedup": 0.8,  # launch-bound at this model size: see above
        "01_batching/continuous_step_ratio": 2.0,  # a step count: the same on every device
        # launch-bound: a step costs about the same at any batch size, so the wall-clock ratio approaches
        # the step ratio (2.75x on the skewed trace with 8 slots; H200: 3.11x, one pair). The ">= 4x on an
        # H100" of issue #4 needs a larger model or more slots.
        "01_batching/continuous_speedup": 1.5,
        # bench-1b (1.1B, random weights), where batching pays as on a real model: issue #14's goal, not yet
        # measured (scripts/check_gpu.py grades it)
        "01_batching/preset_speedup": 2.5,
        "02_paged_attention/paged_kv_efficiency": 0.96,  # counts: the same on every device
        "02_paged_attention/paged_concurrency": 3.0,
        "02_paged_attention/paged_throughput": 1.0,  # not measured on a GPU yet: the CPU bar
        "02_paged_attention/prefix_cache_saves_prefill": 3.0,  # a token count
        "03_speculative/tokens_per_forward": 2.5,  # a count: the same on every device
    } for gpu in ("h100", "h200", "a100", "l4")},
}


DEVICE_CLASSES = ("cpu", "l4", "a100", "h100", "h200", "unknown-gpu")  # the columns of `python -m grader thresholds`

# Where each device class's numbers come from (issue #14): a measured run, or what they are carried from.
# A class that is not here has no numbers: its performance criteria are blocked, never failed.
SOURCES: dict[str, str] = {
    "cpu": "measured with the solution notebooks on a 2-core Intel Xeon cloud VM, 1 torch thread, 2026-11-29/30; "
           "each line of grader/thresholds.py names its run",
    "h200": "measured on one H200, 2026-11-30 (torch 2.11.0+cu130, after the per-step metadata rework; "
            "scripts/check_gpu.py): labs 00 and 01; a second run graded lab 00 4/4 (0.96x, bar 0.8x). Lab 02's bars are counts (the same on every device) except "
            "paged_throughput, the CPU bar, not yet measured on a GPU. Lab 03's tokens per forward is a count; its "
            "wall-clock ratios and lab 04's are not measured (blocked)",
    "h100": "not measured: the H200's bars, carried over because the shipped 5.4M model is bound by the host "
            "(Python, launches) on any of these cards, not by the GPU",
    "a100": "not measured: the H200's bars (see h100)",
    "l4": "not measured: the H200's bars (see h100)",
}


def table() -> list[tuple[str, dict[str, float | None]]]:
    """Every performance criterion of every lab with its bar per device class (None: blocked there)."""
    from grader.labs import all_labs

    rows = []
    for lab in all_labs().values():
        for crit in lab.criteria:
            if crit.kind == "performance":
                rows.append((f"{lab.id}/{crit.id}", {d: threshold(d, lab.id, crit.id) for d in DEVICE_CLASSES}))
    return rows


def threshold(device_class: str, lab: str, criterion: str) -> float | None:
    """The speedup to reach, or None when this device class has no measured number (-> blocked)."""
    return THRESHOLDS.get(device_class, {}).get(f"{lab}/{criterion}")
