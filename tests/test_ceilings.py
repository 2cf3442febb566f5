"""The ceilings `servelab doctor` measures (copy bandwidth, matmul rate): the same code on a CPU as on a GPU."""
from __future__ import annotations

import torch

from servelab import ceilings, device


def test_ceilings_are_measured_and_positive():
    c = ceilings.measure("cpu")
    assert c.device == "cpu" and c.matmul_dtype == "float32"
    assert 1e8 < c.copy_bytes_per_s < 1e13 and 1e8 < c.matmul_flops_per_s < 1e15  # physically possible on a CPU
    rows = dict(c.rows())
    assert "GB/s" in rows["copy bandwidth"] and "FLOP/s" in rows["matmul rate (float32)"]
    fast = ceilings.Ceilings("cuda:0", 4.2e12, 7.5e14, "bfloat16")
    assert dict(fast.rows()) == {"copy bandwidth": "4,200 GB/s (read + write, device to device)",
                                 "matmul rate (bfloat16)": "750.0 TFLOP/s"}


def test_explicit_sizes_and_the_gpu_dtype_run_here():
    assert ceilings.copy_bandwidth("cpu", megabytes=4, repeats=3) > 0
    assert ceilings.matmul_rate("cpu", size=64, dtype=torch.bfloat16, repeats=3) > 0  # the GPU's serving dtype


def test_describe_reports_the_compute_capability_of_a_gpu(monkeypatch):
    """The CUDA branch of describe(), with the probe faked: the card's name and compute capability."""
    assert device.describe("cpu")["compute_capability"] is None
    monkeypatch.setattr(device, "device_choice", lambda request=None: (torch.device("cuda", 0), "faked"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    info = device.describe("cuda")
    assert info["device_name"] == "NVIDIA H200" and info["compute_capability"] == "9.0" and info["device_class"] == "h200"
