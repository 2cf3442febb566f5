"""Honest timing: a clock that waits for the GPU, and paired A/B benchmarks that cancel drift.

Timing two variants one after the other (all baseline runs, then all candidate runs) lets anything that
changes over time (CPU frequency, a background job, caches warming) masquerade as a speedup. Here the two
run in alternating pairs (B C, C B, B C, ...) and the speedup is the median of per-pair ratios.
"""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from typing_extensions import Self  # typing.Self needs Python 3.11


def _cuda_device(device: Any) -> Any:
    """The torch.device to time on if it is a CUDA one, else None (CPU wall clock)."""
    if device is None:
        return None
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    if not torch.cuda.is_available():
        raise ValueError(f"cannot time on {dev}: this machine has no CUDA GPU; pass device='cpu' or None")
    return dev


def _sync_if_cuda_in_use() -> None:
    # device=None still waits for a GPU that this process has used, so queued kernels are not missed.
    torch = sys.modules.get("torch")
    # is_initialized only: is_available() would initialise the CUDA driver, and forked ranks (lab 04)
    # could not use the GPU after that
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class timer:
    """Context manager measuring elapsed seconds: perf_counter on CPU, CUDA events (+ sync) on a GPU."""

    def __init__(self, device: Any = None) -> None:
        self.device = _cuda_device(device)
        self.elapsed_s: float | None = None

    def __enter__(self) -> Self:
        if self.device is not None:
            import torch

            torch.cuda.synchronize(self.device)  # earlier queued work is not ours
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record(torch.cuda.current_stream(self.device))
        else:
            _sync_if_cuda_in_use()
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device is not None:
            import torch

            self._end.record(torch.cuda.current_stream(self.device))
            self._end.synchronize()
            self.elapsed_s = self._start.elapsed_time(self._end) / 1000.0  # events report ms
        else:
            _sync_if_cuda_in_use()
            self.elapsed_s = time.perf_counter() - self._t0

    def start(self) -> Self:
        """Clock style: t = timer().start(); ...; seconds = t.stop()."""
        return self.__enter__()

    def stop(self) -> float:
        self.__exit__(None, None, None)
        return self.elapsed_s


def time_call(fn: Callable[[], Any], device: Any = None) -> float:
    """Seconds one call of fn takes."""
    with timer(device) as t:
        fn()
    return t.elapsed_s


@dataclass
class PairedResult:
    baseline_s: list[float]
    candidate_s: list[float]
    baseline_name: str = "baseline"
    candidate_name: str = "candidate"

    @property
    def ratios(self) -> list[float]:
        """baseline / candidate for each pair: > 1 means the candidate was faster in that pair."""
        return [b / c if c > 0 else float("inf") for b, c in zip(self.baseline_s, self.candidate_s)]

    @property
    def speedup(self) -> float:
        return statistics.median(self.ratios)

    def to_dict(self) -> dict:
        return {
            "baseline_name": self.baseline_name, "candidate_name": self.candidate_name,
            "baseline_s": list(self.baseline_s), "candidate_s": list(self.candidate_s),
            "ratios": self.ratios, "speedup": self.speedup,
            "baseline_median_s": statistics.median(self.baseline_s),
            "candidate_median_s": statistics.median(self.candidate_s),
        }

    def __str__(self) -> str:
        r = self.ratios
        return (f"{self.candidate_name} vs {self.baseline_name}: {self.speedup:.2f}x speedup "
                f"(median of {len(r)} paired ratios, range {min(r):.2f}-{max(r):.2f}; "
                f"{self.baseline_name} {statistics.median(self.baseline_s) * 1e3:.2f} ms, "
                f"{self.candidate_name} {statistics.median(self.candidate_s) * 1e3:.2f} ms median)")


def paired_benchmark(baseline: Callable[[], Any], candidate: Callable[[], Any], repeats: int = 5, warmup: int = 1,
                     device: Any = None, progress: bool = False, baseline_name: str = "baseline",
                     candidate_name: str = "candidate") -> PairedResult:
    """Time baseline and candidate in alternating pairs (B C, C B, ...); speedup = median baseline/candidate."""
    if not (callable(baseline) and callable(candidate)):
        raise TypeError("baseline and candidate must be zero-argument callables, e.g. lambda: run(model, trace)")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):  # compile, allocate, fill caches: none of that is the steady state we compare
        baseline()
        candidate()
    pairs: Any = range(repeats)
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc=f"{baseline_name} vs {candidate_name}", unit="pair")
    base, cand = [], []
    for i in pairs:
        if i % 2 == 0:
            base.append(time_call(baseline, device))
            cand.append(time_call(candidate, device))
        else:
            cand.append(time_call(candidate, device))
            base.append(time_call(baseline, device))
    return PairedResult(base, cand, baseline_name, candidate_name)
