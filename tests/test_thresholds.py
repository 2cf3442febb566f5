"""The threshold table (issue #14): every device class says where its numbers come from; what has no number
is blocked with a reason, on this CPU every GPU criterion too."""
from __future__ import annotations

import subprocess
import sys

from grader import labs, thresholds
from grader.environment import Hardware, blocked_reason


def test_every_device_class_with_numbers_has_a_source():
    assert set(thresholds.THRESHOLDS) == set(thresholds.SOURCES)
    assert set(thresholds.THRESHOLDS) <= set(thresholds.DEVICE_CLASSES)
    for device_class, source in thresholds.SOURCES.items():
        assert "measured" in source and len(source) >= 30, device_class  # a run, or what it was carried from


def test_the_table_covers_every_performance_criterion_and_blocks_unknown_gpus():
    rows = dict(thresholds.table())
    perf = {f"{lab.id}/{c.id}" for lab in labs.all_labs().values() for c in lab.criteria if c.kind == "performance"}
    assert set(rows) == perf
    assert all(bars["cpu"] is not None for name, bars in rows.items() if name[0].isdigit())  # every lab's, on a CPU
    assert all(bars["unknown-gpu"] is None for bars in rows.values())
    assert rows["03_speculative/tokens_per_forward"]["h200"] == 2.5  # a count: the same everywhere


def test_every_gpu_criterion_is_blocked_here_with_its_reason():
    cpu = Hardware("cpu", "cpu", "a 2-core CPU", 0, "interpreter")
    unknown = Hardware("cuda", "unknown-gpu", "NVIDIA Mystery", 1, "compiled")
    for lab in labs.all_labs().values():
        for crit in lab.criteria:
            if crit.kind == "gpu":
                assert "needs a CUDA GPU" in blocked_reason(lab, crit, cpu), crit.id
            if crit.kind == "performance":
                reason = blocked_reason(lab, crit, unknown)
                assert "no performance threshold for device class 'unknown-gpu'" in reason, crit.id


def test_the_cli_prints_the_table_and_the_sources():
    res = subprocess.run([sys.executable, "-m", "grader", "thresholds"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("criterion") and "03_speculative/draft_speedup" in res.stdout
    assert "h200: measured on one H200" in res.stdout and "unknown-gpu: no numbers" in res.stdout
