import math

import pytest

from servelab.metrics import BenchmarkResult, RequestTimeline, compare_table, summarize


def two_requests():
    # r0: arrives 0.0, tokens 0.1 0.2 0.4 -> TTFT 100 ms, E2E 400, TPOT (400-100)/2 = 150, ITL 100, 200
    # r1: arrives 0.5, tokens 0.8 1.0     -> TTFT 300 ms, E2E 500, TPOT 200/1 = 200,      ITL 200
    return [RequestTimeline(0, 0.0, [0.1, 0.2, 0.4], prompt_len=10),
            RequestTimeline(1, 0.5, [0.8, 1.0], prompt_len=20)]


def test_hand_computed_numbers():
    r = summarize(two_requests())
    assert r.completed == 2 and r.duration_s == pytest.approx(1.0)
    assert (r.total_input_tokens, r.total_output_tokens) == (30, 5)
    assert r.request_throughput == pytest.approx(2.0)
    assert r.output_throughput == pytest.approx(5.0)
    assert r.total_token_throughput == pytest.approx(35.0)
    assert (r.mean_ttft_ms, r.median_ttft_ms, r.std_ttft_ms) == pytest.approx((200, 200, 100))
    assert r.p90_ttft_ms == pytest.approx(280) and r.p99_ttft_ms == pytest.approx(298)  # linear interpolation
    assert (r.mean_tpot_ms, r.median_tpot_ms, r.std_tpot_ms) == pytest.approx((175, 175, 25))
    assert r.mean_itl_ms == pytest.approx(500 / 3) and r.median_itl_ms == pytest.approx(200)
    assert r.std_itl_ms == pytest.approx(math.sqrt(20000 / 9))
    assert r.p50_itl_ms == pytest.approx(200) and r.p90_itl_ms == pytest.approx(200)
    assert (r.mean_e2e_ms, r.p50_e2e_ms) == pytest.approx((450, 450))
    assert r.goodput is None


def test_goodput():
    tl = two_requests()
    assert summarize(tl, slo={"ttft_ms": 200}).goodput == pytest.approx(1.0)
    assert summarize(tl, slo={"ttft_ms": 301, "tpot_ms": 201, "e2e_ms": 501}).good_completed == 2
    assert summarize(tl, slo={"ttft_ms": 1000, "tpot_ms": 160}).goodput == pytest.approx(1.0)
    assert summarize(tl, slo={"e2e_ms": 100}).goodput == 0.0
    assert summarize(tl, duration_s=2.0, slo={"ttft_ms": 200}).goodput == pytest.approx(0.5)


def test_single_token_requests_have_no_tpot_but_count_for_goodput():
    tl = [RequestTimeline(0, 0.0, [0.05]), RequestTimeline(1, 0.0, [0.1])]
    r = summarize(tl, slo={"tpot_ms": 1})
    assert r.mean_tpot_ms == 0.0 and r.mean_itl_ms == 0.0  # vLLM reports 0 when undefined
    assert r.good_completed == 2


def test_chunked_tokens_use_output_len_for_tpot():
    # 5 tokens in 2 chunks (speculative decoding): ITL per chunk, TPOT per token
    t = RequestTimeline(0, 0.0, [0.1, 0.5], output_len=5, finish_s=0.5)
    assert t.tpot_s == pytest.approx(0.1) and t.itl_s == pytest.approx([0.4])


def test_duration_override_and_finish_after_last_token():
    tl = [RequestTimeline(0, 1.0, [1.5, 2.0], prompt_len=4, finish_s=3.0)]
    r = summarize(tl, duration_s=4.0)
    assert r.mean_e2e_ms == pytest.approx(2000) and r.mean_tpot_ms == pytest.approx(1500)
    assert r.request_throughput == pytest.approx(0.25) and r.total_token_throughput == pytest.approx(1.5)


def test_json_round_trip_and_dict():
    r = summarize(two_requests(), slo={"ttft_ms": 200}, percentiles=(50, 99.9))
    back = BenchmarkResult.from_json(r.to_json())
    assert back == r
    d = r.to_dict()
    assert "p99.9_ttft_ms" in d and "percentiles" not in d and d["goodput"] == pytest.approx(1.0)
    assert back.percentiles["p99.9_ttft_ms"] == d["p99.9_ttft_ms"]


def test_tables():
    a = summarize(two_requests())
    b = summarize(two_requests(), duration_s=2.0)
    text = a.table()
    assert "Mean TTFT (ms)" in text and "P99 E2E latency (ms)" in text and "200.00" in text
    lines = compare_table({"static": a, "continuous": b}).splitlines()
    assert "continuous/static" in lines[0]
    row = next(line for line in lines if line.startswith("Request throughput"))
    assert row.split()[-3:] == ["2.00", "1.00", "0.50x"]
    assert len({len(line) for line in lines}) == 1  # aligned
    assert "/" not in compare_table({"a": a, "b": b, "c": b}).splitlines()[0]


def test_unknown_percentile_attribute():
    with pytest.raises(AttributeError, match="p95_ttft_ms"):
        _ = summarize(two_requests()).p95_ttft_ms


@pytest.mark.parametrize("make, match", [
    (lambda: RequestTimeline(0, 0.0, [0.2, 0.1]), "must not decrease"),
    (lambda: RequestTimeline(0, 1.0, [0.5, 1.1]), "before its arrival"),
    (lambda: RequestTimeline(0, 0.0, []), "empty"),
    (lambda: RequestTimeline(0, 0.0, [0.1, 0.2], output_len=1), "output_len"),
    (lambda: RequestTimeline(0, 0.0, [0.1, 0.2], finish_s=0.15), "finish_s"),
    (lambda: summarize([]), "at least one"),
    (lambda: summarize(two_requests(), slo={"itl_ms": 5}), "unknown SLO"),
    (lambda: summarize(two_requests(), slo={"ttft_ms": 0}), "> 0"),
    (lambda: summarize([RequestTimeline(0, 0.0, [0.0])]), "duration"),
    (lambda: compare_table({}), "empty"),
])
def test_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
