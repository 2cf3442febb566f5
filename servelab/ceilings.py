"""The two ceilings every lab's figures are measured against, on this device, in a few seconds.

- **Copy bandwidth**: bytes per second a device-to-device copy moves (read + write counted once each, as
  ``nvidia-smi``-style bandwidth tests and vLLM's kernel benchmarks count them). A batch-1 decode step reads
  every weight once: weight bytes / this bandwidth is its time limit (``servelab.roofline``).
- **Matmul rate**: FLOP/s of a large square matmul in the serving dtype (bf16 on a GPU): the limit of a
  compute-bound prefill.

Both run the same code on a CPU (smaller sizes, float32 matmul), so the path is tested where CI runs.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from servelab.device import get_device, preferred_dtype
from servelab.timing import time_call


@dataclass
class Ceilings:
    device: str
    copy_bytes_per_s: float  # read + write of a device-to-device copy
    matmul_flops_per_s: float
    matmul_dtype: str

    def rows(self) -> list[tuple[str, str]]:
        where = "device to device" if self.device.startswith("cuda") else "in memory"
        return [("copy bandwidth", f"{self.copy_bytes_per_s / 1e9:,.0f} GB/s (read + write, {where})"),
                (f"matmul rate ({self.matmul_dtype})", f"{self.matmul_flops_per_s / 1e12:,.1f} TFLOP/s"
                 if self.matmul_flops_per_s >= 1e12 else f"{self.matmul_flops_per_s / 1e9:,.0f} GFLOP/s")]


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocation, kernel selection
    return statistics.median(time_call(fn, device) for _ in range(repeats))


def copy_bandwidth(device: str | torch.device | None = None, megabytes: int | None = None, repeats: int = 10) -> float:
    """Bytes per second of ``dst.copy_(src)`` between two buffers on ``device`` (read + write). Default size:
    1 GiB on a GPU (far past its caches), 64 MiB on a CPU."""
    dev = get_device(device)
    n = (megabytes or (1024 if dev.type == "cuda" else 64)) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    return 2 * n / _median_seconds(lambda: dst.copy_(src), dev, repeats)


def matmul_rate(device: str | torch.device | None = None, size: int | None = None, dtype: torch.dtype | None = None,
                repeats: int = 10) -> float:
    """FLOP/s of a ``size`` x ``size`` matmul on ``device`` in ``dtype`` (default: the serving dtype, bf16 on a
    GPU, float32 on a CPU). Default size: 8192 on a GPU, 512 on a CPU."""
    dev = get_device(device)
    dtype = dtype or preferred_dtype(dev)
    n = size or (8192 if dev.type == "cuda" else 512)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dev, dtype)
    b = torch.randn(n, n, generator=gen).to(dev, dtype)
    return 2 * n**3 / _median_seconds(lambda: a @ b, dev, repeats)


def measure(device: str | torch.device | None = None) -> Ceilings:
    dev = get_device(device)
    dtype = preferred_dtype(dev)
    return Ceilings(str(dev), copy_bandwidth(dev), matmul_rate(dev, dtype=dtype), str(dtype).removeprefix("torch."))
