import time

import pytest

from servelab.timing import PairedResult, paired_benchmark, time_call, timer


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_timer_context_and_clock():
    with timer() as t:
        busy(0.003)
    assert 0.003 <= t.elapsed_s < 0.5
    c = timer("cpu").start()
    busy(0.002)
    assert 0.002 <= c.stop() < 0.5
    assert time_call(lambda: busy(0.002)) >= 0.002


def test_speedup_direction_and_alternating_order():
    calls = []

    def slow():
        calls.append("B")
        busy(0.006)

    def fast():
        calls.append("C")
        busy(0.002)

    res = paired_benchmark(slow, fast, repeats=4, warmup=1)
    assert calls == ["B", "C"] + ["B", "C", "C", "B", "B", "C", "C", "B"]
    assert len(res.baseline_s) == len(res.candidate_s) == len(res.ratios) == 4
    assert res.speedup > 1.5
    assert paired_benchmark(fast, slow, repeats=3, warmup=0).speedup < 0.7


def test_paired_result_numbers_and_text():
    r = PairedResult([0.4, 0.6, 0.3], [0.2, 0.2, 0.3], candidate_name="paged")
    assert r.ratios == pytest.approx([2.0, 3.0, 1.0]) and r.speedup == pytest.approx(2.0)
    d = r.to_dict()
    assert d["speedup"] == pytest.approx(2.0) and d["baseline_median_s"] == pytest.approx(0.4)
    assert str(r).startswith("paged vs baseline: 2.00x speedup (median of 3 paired ratios")


def test_progress_bar_runs():
    assert len(paired_benchmark(lambda: None, lambda: None, repeats=2, progress=True).ratios) == 2


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"repeats": 0}, ValueError, "repeats"), ({"warmup": -1}, ValueError, "warmup"),
    ({"baseline": 3}, TypeError, "callables"),
])
def test_bad_arguments(kwargs, exc, match):
    args = {"baseline": lambda: None, "candidate": lambda: None, **kwargs}
    with pytest.raises(exc, match=match):
        paired_benchmark(**args)


def test_cuda_without_gpu_is_a_clear_error():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        timer("cuda")


@pytest.mark.gpu
def test_cuda_events_time_gpu_work():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.randn(2048, 2048, device="cuda")
    with timer("cuda") as t:
        for _ in range(20):
            x = x @ x / 2048**0.5
    wall = time_call(lambda: x @ x)  # device=None still syncs a GPU already in use
    assert t.elapsed_s > 0 and wall > 0
    res = paired_benchmark(lambda: x @ x, lambda: x[:1024] @ x, repeats=4, device="cuda")
    assert res.speedup > 1.2
