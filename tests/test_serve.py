"""`servelab serve` + `servelab bench`: the server as a subprocess on a free port, the bench as a user runs it.

Greedy tokens through HTTP must equal the in-process engine's exactly; bad requests get a 400 and never disturb
the others; a client that hangs up frees its slot; Ctrl-C ends in-flight streams cleanly.
"""
from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest
import torch

from serve_helpers import serve
from servelab import cli
from servelab.engine import StepClock
from servelab.loader import load_model, load_tokenizer
from servelab.reference.batching import continuous_batching
from servelab.reference.warmup import greedy_decode
from servelab.serve.engines import ContinuousBatchingEngine, EngineRequest
from servelab.serve.registry import make_engine
from servelab.serve.protocol import ApiError, parse_completion
from servelab.workloads import standard_trace

EOS = 0  # the shipped model's eos_token_id


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model()


@pytest.fixture(scope="module")
def trace():
    return standard_trace("uniform", encode=load_tokenizer(), scale=0.5)  # 32 requests, outputs 8-64 tokens


@pytest.fixture(scope="module")
def server():
    with serve("--max-running", "16") as s:
        yield s


# --- in process: the request parser and the step engine ---------------------------------------------------

def parse(body) -> object:
    return parse_completion(json.dumps(body).encode() if not isinstance(body, bytes) else body,
                            lambda s: [1, 2, 3], "servelab-target")


def test_parse_accepts_token_ids_text_and_a_batch_of_one():
    p = parse({"prompt": [5, 6], "max_tokens": 3, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}, "n": 1, "echo": False})
    assert (p.prompt_ids, p.max_tokens, p.temperature, p.stream, p.include_usage) == ([5, 6], 3, 0.0, True, True)
    assert parse({"prompt": "hi"}).prompt_ids == [1, 2, 3] and parse({"prompt": ["hi"]}).prompt_ids == [1, 2, 3]
    assert parse({"prompt": [[7]]}).prompt_ids == [7]
    assert parse({"prompt": [1]}).temperature == 1.0  # OpenAI's default


@pytest.mark.parametrize("body, param, says", [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    ({"prompt": [1], "frobnicate": 1}, "frobnicate", "unknown field"),
    ({"prompt": ""}, "prompt", "empty prompt"),
    ({"prompt": []}, "prompt", "empty prompt"),
    ({}, "prompt", "required"),
    ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"prompt": [1], "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"prompt": [1], "max_tokens": "5"}, "max_tokens", "integer"),
    ({"prompt": [1], "temperature": -1}, "temperature", "[0, 2]"),
    ({"prompt": [1], "n": 3}, "n", "not supported"),
    ({"prompt": [1], "stop": ["\n"]}, "stop", "EOS"),
    ({"prompt": [1], "stream": "yes"}, "stream", "true or false"),
])
def test_parse_refuses_a_bad_request_naming_the_field(body, param, says):
    with pytest.raises(ApiError) as err:
        parse(body)
    assert err.value.status == 400 and err.value.param == param and says in err.value.message
    assert set(err.value.body()["error"]) == {"message", "type", "param", "code"}


def test_parse_says_which_model_it_serves():
    with pytest.raises(ApiError) as err:
        parse({"prompt": [1], "model": "gpt-4"})
    assert err.value.status == 404 and "servelab-target" in err.value.message


def test_step_engine_follows_the_lab01_reference_token_for_token(model, trace):
    """All at once, the step engine's tokens equal the reference continuous_batching's; requests that join a
    running batch later get the same tokens as well (decoding is per request, whoever else runs)."""
    reqs = trace.requests[:12]
    ref = continuous_batching(model, reqs, max_running=4, max_step_tokens=128, eos_id=EOS, clock=StepClock())
    engine = ContinuousBatchingEngine(model, max_running=4, max_step_tokens=128, eos_id=EOS, max_len=1024)
    got: dict[int, list[int]] = {r.id: [] for r in reqs}
    pending = list(reqs)
    steps = 0
    while pending or engine.has_work:
        if pending and steps % 3 == 0:  # one new request every third step: arrivals during a run
            r = pending.pop(0)
            engine.add(EngineRequest(r.id, r.prompt_ids, r.max_new_tokens, temperature=0.0))
        for ev in engine.step() if engine.has_work else []:
            got[ev.request_id].append(ev.token)
        steps += 1
    assert got == {r.id: ref.completions[r.id].tokens for r in reqs}
    assert engine.max_running == 4 and not engine.running and sorted(engine.free) == [0, 1, 2, 3]


def test_step_engine_samples_reproducibly_and_aborts(model, trace):
    engine = ContinuousBatchingEngine(model, max_running=2, eos_id=None)
    r = trace.requests[0]

    def sample(seed):
        engine.add(EngineRequest(1, r.prompt_ids, 12, temperature=1.0, seed=seed))
        out = []
        while engine.has_work:
            out += [e.token for e in engine.step()]
        return out

    assert sample(3) == sample(3) != sample(4)
    engine.add(EngineRequest(7, r.prompt_ids, 50, temperature=0.0))
    engine.add(EngineRequest(8, r.prompt_ids, 50, temperature=0.0))
    engine.add(EngineRequest(9, r.prompt_ids, 50, temperature=0.0))  # waits: 2 slots
    engine.step()
    assert engine.abort(7) and engine.abort(9) and not engine.abort(9)
    assert [e.request_id for e in engine.step()] == [8]


def test_a_notebook_step_engine_is_served_by_path(model, make_notebook, trace):
    nb = make_notebook([("from servelab.serve.engines import ContinuousBatchingEngine\n"
                         "class MyEngine(ContinuousBatchingEngine):\n    name = 'mine'\n", ["graded"]),
                        ("print('experiments are not run')\nraise SystemExit", [])])
    engine = make_engine(f"{nb}:MyEngine", model, max_running=2, eos_id=EOS)
    assert type(engine).__name__ == "MyEngine" and engine.name == "mine"
    assert type(make_engine(str(nb), model, eos_id=EOS)).__name__ == "MyEngine"  # the only step engine it defines
    with pytest.raises(ValueError, match="defines no Missing"):
        make_engine(f"{nb}:Missing", model)
    with pytest.raises(ValueError, match="--gamma does not apply to --engine continuous.*speculative"):
        make_engine("continuous", model, {"gamma": 2})
    with pytest.raises(ValueError, match="unknown --engine 'fastest': use one of continuous, paged, speculative"):
        make_engine("fastest", model)


# --- over HTTP -----------------------------------------------------------------------------------------------

def test_bench_against_the_server_gives_the_in_process_tokens_and_consistent_metrics(server, model, trace, tmp_path,
                                                                                       capsys):
    """40 requests at once (>= 32 in flight, 16 running, the rest waiting): every one completes with exactly the
    tokens of the in-process lab 01 engine, and the client's numbers agree with the server's own."""
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--base-url", server.url, "--trace", "uniform", "--scale", "0.5", "--num-requests", "40",
                     "--save-token-ids", "--no-progress", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    res = json.loads(out.read_text())
    assert res["completed"] == 40 and res["failed"] == 0 and not any(res["errors"])
    assert res["max_concurrent_requests"] >= 32 and res["server"]["max_running_seen"] == 16
    reqs = [trace.requests[i % len(trace)] for i in range(40)]
    ref = continuous_batching(model, trace.requests, max_running=16, max_step_tokens=512, eos_id=EOS,
                              clock=StepClock())
    assert res["output_token_ids"] == [ref.completions[r.id].tokens for r in reqs]
    assert res["output_token_ids"][:3] == [greedy_decode(model, r.prompt_ids, r.max_new_tokens, EOS) for r in reqs[:3]]
    assert res["output_lens"] == [len(ref.completions[r.id].tokens) for r in reqs]
    assert res["input_lens"] == [r.prompt_len for r in reqs]
    assert res["total_output_tokens"] == sum(res["output_lens"])
    # the client sees every token later than the engine made it, and about as far apart
    srv = res["server"]
    assert srv["completed"] == 40 and res["mean_ttft_ms"] >= srv["mean_ttft_ms"]
    assert abs(res["mean_tpot_ms"] - srv["mean_tpot_ms"]) <= 0.5 * srv["mean_tpot_ms"] + 2
    for key in ("duration", "request_throughput", "output_throughput", "p99_ttft_ms", "median_tpot_ms",
                "mean_itl_ms", "p99_e2el_ms", "ttfts", "itls", "generated_texts"):
        assert key in res, key
    assert "Successful requests" in printed and "HTTP + SSE overhead" in printed


async def _post(client, url, body):
    return await client.post(url + "/v1/completions", content=body if isinstance(body, bytes) else json.dumps(body))


def test_bad_requests_get_a_400_with_a_message_and_the_server_keeps_serving(server):
    bad = [b'{"prompt": [1, 2', {"prompt": [1, 2], "max_tokens": 4, "bogus": True},
           {"prompt": [1, 2], "max_tokens": 10**9}, {"prompt": ""}, {"prompt": [1, 4096]},
           {"prompt": [1] * 1100, "max_tokens": 1}]

    async def go():
        async with httpx.AsyncClient(timeout=60) as client:
            good = {"prompt": [5, 6, 7], "max_tokens": 20, "temperature": 0}
            return await asyncio.gather(*[_post(client, server.url, b) for b in bad], _post(client, server.url, good))

    *errs, ok = asyncio.run(go())
    for body, r in zip(bad, errs):
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and len(err["message"]) > 10, err
    assert "max_tokens" in errs[2].json()["error"]["message"] and errs[2].json()["error"]["param"] == "max_tokens"
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_openai_shapes(server, model):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == "servelab-target"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0,
                                                          "return_token_ids": True}, timeout=60).json()
    assert r["object"] == "text_completion" and r["choices"][0]["finish_reason"] in ("stop", "length")
    assert r["choices"][0]["token_ids"] == greedy_decode(model, [5, 6, 7], 8, EOS)
    assert r["usage"] == {"prompt_tokens": 3, "completion_tokens": len(r["choices"][0]["token_ids"]),
                          "total_tokens": 3 + len(r["choices"][0]["token_ids"])}
    text = httpx.post(server.url + "/v1/completions", json={"prompt": "The cat", "max_tokens": 5, "seed": 1},
                      timeout=60).json()
    assert text["usage"]["completion_tokens"] >= 1 and isinstance(text["choices"][0]["text"], str)


def test_a_cancelled_stream_frees_its_slot_and_ctrl_c_ends_streams_cleanly():
    with serve("--max-running", "1", "--shutdown-timeout", "1") as s:
        long = {"prompt": [5, 6, 7], "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=long, timeout=60) as r:
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data:")
                if chunks == 3:
                    break  # hang up after 3 tokens; 997 would take seconds more on the one slot
        t0 = time.perf_counter()
        nxt = httpx.post(s.url + "/v1/completions", json={"prompt": [8, 9], "max_tokens": 4, "temperature": 0},
                         timeout=60)
        waited = time.perf_counter() - t0
        assert nxt.status_code == 200 and nxt.json()["usage"]["completion_tokens"] >= 1
        m = httpx.get(s.url + "/metrics").json()
        assert m["aborted"] == 1 and m["running"] == 0 and m["waiting"] == 0, m
        assert waited < 3, f"the next request waited {waited:.1f} s: the hung-up stream kept its slot"

        # Ctrl-C with a stream in flight: it ends (cancelled: an error event and [DONE]) and the server exits 0.
        # Exactly one Ctrl-C: a second one is uvicorn's force quit, which cuts open streams by design.
        with httpx.stream("POST", s.url + "/v1/completions", json=long, timeout=60) as r:
            lines, interrupted = [], False
            for line in r.iter_lines():
                lines += [line] if line else []
                if len(lines) == 4 and not interrupted:
                    t0, interrupted = time.perf_counter(), True
                    s.proc.send_signal(signal.SIGINT)
            assert lines[-1] == "data: [DONE]" and "shutting down" in lines[-2], lines[-2:]
        assert 4 < len(lines) < 1000 and time.perf_counter() - t0 < 10
        assert s.proc.wait(20) == 0


def test_bench_sweep_by_duration_writes_a_plot_and_every_rate(server, tmp_path, capsys):
    plot, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    code = cli.main(["bench", "--base-url", server.url, "--trace", "bursty", "--scale", "0.25", "--duration", "1",
                     "--sweep", "8,16", "--plot", str(plot), "--goodput", "ttft:2000", "--no-progress",
                     "--json", str(out)])
    assert code == 0, capsys.readouterr()
    runs = json.loads(out.read_text())["sweep"]
    assert [r["request_rate"] for r in runs] == [8.0, 16.0] and plot.stat().st_size > 10_000
    for r in runs:  # about rate x 1 s of gamma arrivals each, all completed, goodput counted
        assert 1 <= r["completed"] == r["num_prompts"] <= 3 * r["request_rate"] and r["request_goodput"] > 0
        assert r["burstiness"] == 0.5


def test_bench_says_when_no_server_answers(capsys):
    from serve_helpers import free_port

    code = cli.main(["bench", "--base-url", f"http://127.0.0.1:{free_port()}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "is an OpenAI-compatible server running there?" in err
