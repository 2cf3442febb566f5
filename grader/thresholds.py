"""The one table of performance thresholds: minimum speedup per criterion, keyed by device class.

A device class missing from the table (e.g. "unknown-gpu") blocks the performance criteria instead of
grading them against a number nobody measured. Keys are "<lab>/<criterion id>".

Where the numbers come from:
- cpu: measured with the solution notebooks on a 2-core cloud VM (Intel Xeon) with 1 torch thread, while a
  training job loaded both cores; each threshold is about half the median the solution reached, so a
  correct, sensible implementation passes on a slower or busier laptop.
- h100 / h200 / a100 / l4: not measured yet (no GPU in CI). The 5.4M-parameter default model is
  kernel-launch bound on any GPU, so recomputing 100 tokens costs about as much as computing 1 and the
  KV cache barely helps there; the GPU entries only ask the cached decode not to be slower. Replace them
  with half of a measured solution median when a GPU run is available.
"""

from __future__ import annotations

THRESHOLDS: dict[str, dict[str, float]] = {
    "cpu": {
        "00_warmup/kv_cache_speedup": 1.5,  # solution, shipped target: 2.9-3.2x (prompt 32, 64 new tokens)
        "01_batching/continuous_step_ratio": 2.0,  # deterministic; the solution takes 4402 / 1599 = 2.75x
        "01_batching/continuous_speedup": 2.0,  # issue #4's bar for the 2-core CPU; solution 2.26-2.43x per pair
    },
    **{gpu: {
        "00_warmup/kv_cache_speedup": 1.0,
        "01_batching/continuous_step_ratio": 2.0,  # a step count: the same on every device
        # Not measured on a GPU yet. The default model is launch-bound there, so a step costs about the
        # same at any batch size and the wall-clock ratio approaches the step ratio (2.75x on the skewed
        # trace with 8 slots): the ">= 4x on an H100" of issue #4 needs a larger model or more slots.
        "01_batching/continuous_speedup": 2.0,
    } for gpu in ("h100", "h200", "a100", "l4")},
}


def threshold(device_class: str, lab: str, criterion: str) -> float | None:
    """The speedup to reach, or None when this device class has no measured number (-> blocked)."""
    return THRESHOLDS.get(device_class, {}).get(f"{lab}/{criterion}")
