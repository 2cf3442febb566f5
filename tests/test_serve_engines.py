"""`servelab serve --engine paged | speculative`: lab 02's and lab 03's engines step by step, and a stream whose
client leaves before its first byte.

Greedy tokens must equal plain greedy decoding exactly, whatever else runs (requests arriving mid-run, paged
preemption, speculative rounds); an abort gives back what the request held.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch

from serve_helpers import serve
from servelab.loader import load_model, load_tokenizer
from servelab.reference.warmup import greedy_decode
from servelab.serve.app import ServerInfo, build_app
from servelab.serve.engines import ContinuousBatchingEngine, EngineRequest
from servelab.serve.loop import EngineLoop
from servelab.serve.registry import ENGINES, engines_help, make_engine
from servelab.workloads import standard_trace

EOS = 0  # the shipped model's eos_token_id


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model()


@pytest.fixture(scope="module")
def reqs():
    return standard_trace("uniform", encode=load_tokenizer(), scale=0.5).requests[:8]  # prompts 24-38, outputs 11-53


@pytest.fixture(scope="module")
def greedy(model, reqs):
    return {r.id: greedy_decode(model, r.prompt_ids, r.max_new_tokens, EOS) for r in reqs}


def drive(engine, reqs, every: int = 2, temperature: float = 0.0) -> dict[int, list[int]]:
    """Add one request every ``every`` steps (arrivals during a run) and step until all are done."""
    got: dict[int, list[int]] = {r.id: [] for r in reqs}
    pending, steps, finished = list(reqs), 0, set()
    while pending or engine.has_work:
        if pending and steps % every == 0:
            r = pending.pop(0)
            engine.add(r if isinstance(r, EngineRequest) else
                       EngineRequest(r.id, r.prompt_ids, r.max_new_tokens, temperature, seed=r.id))
        for ev in engine.step() if engine.has_work else []:
            assert ev.request_id not in finished, f"a token for request {ev.request_id} after its last"
            got[ev.request_id].append(ev.token)
            if ev.finish_reason:
                finished.add(ev.request_id)
        steps += 1
    return got


# --- paged (lab 02) -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_blocks, block_size", [(None, 8), (24, 4)])
def test_paged_engine_gives_plain_greedy_tokens(model, reqs, greedy, num_blocks, block_size):
    """Default size (the continuous engine's KV memory), and a cache so small that sequences get preempted
    and re-prefilled with the tokens they had: the tokens are plain greedy decoding's either way."""
    engine = make_engine("paged", model, {"num_blocks": num_blocks, "block_size": block_size}, max_running=4,
                         max_step_tokens=128, eos_id=EOS, max_len=1024)
    assert drive(engine, reqs) == greedy
    stats = engine.stats()
    assert stats["free_blocks"] == stats["num_blocks"] == (num_blocks or 4 * 1024 // 8) and not engine.running
    assert (stats["preemptions"] > 0) == (num_blocks == 24), stats  # the small cache did preempt
    assert stats["backend"] == "torch"  # paged_backend() on a CPU


def test_paged_engine_on_the_lab_kernels(model, monkeypatch):
    """The backend paged_backend() picks on CUDA, the lab's Triton kernels, here in Triton's interpreter."""
    monkeypatch.setenv("SERVELAB_PAGED_BACKEND", "triton")
    engine = make_engine("paged", model, {"num_blocks": 16, "block_size": 4}, max_running=2, eos_id=None)
    assert engine.backend == "triton"
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    reqs = [EngineRequest(i, p, 6) for i, p in enumerate(prompts)]  # 5 + 6 tokens: three blocks of 4
    assert drive(engine, reqs) == {i: greedy_decode(model, p, 6) for i, p in enumerate(prompts)}


def test_paged_abort_gives_the_blocks_back(model, reqs):
    engine = make_engine("paged", model, {"num_blocks": 64, "block_size": 4}, max_running=2, eos_id=EOS)
    for r in reqs[:3]:
        engine.add(EngineRequest(r.id, r.prompt_ids, r.max_new_tokens))
    engine.step()
    engine.step()
    held = {rid: len(engine.blocks.block_table(rid)) for rid in engine.running}
    assert len(held) == 2 and engine.num_waiting == 1 and engine.blocks.num_free_blocks == 64 - sum(held.values())
    first = reqs[0].id
    assert engine.abort(first) and engine.blocks.num_free_blocks == 64 - held[reqs[1].id]
    assert engine.abort(reqs[2].id) and not engine.abort(reqs[2].id)  # the waiting one: it held nothing
    while engine.has_work:
        engine.step()
    assert engine.blocks.num_free_blocks == 64 and not engine.blocks.tables


def test_paged_refuses_a_request_that_could_never_fit_and_samples_reproducibly(model, reqs, greedy):
    engine = make_engine("paged", model, {"num_blocks": 4, "block_size": 4}, eos_id=EOS)
    with pytest.raises(ValueError, match=r"needs up to 5 KV blocks of 4 tokens but the cache has 4.*--num-blocks"):
        engine.check(EngineRequest(1, [5] * 10, 11))
    engine.check(EngineRequest(1, [5] * 10, 7))  # 16 tokens at its longest: fits
    big = make_engine("paged", model, {"num_blocks": 64, "block_size": 4}, max_running=4, eos_id=EOS)
    a, b = drive(big, reqs[:3], temperature=1.0), drive(big, reqs[:3], temperature=1.0)
    assert a == b != {r.id: greedy[r.id] for r in reqs[:3]}  # seeded per request (seed=r.id in drive)


# --- speculative (lab 03) --------------------------------------------------------------------------------------

def test_speculative_engine_gives_plain_greedy_tokens_and_reports_acceptance(model, reqs, greedy):
    engine = make_engine("speculative", model, {"gamma": 3}, max_running=16, eos_id=EOS, max_len=1024)
    assert drive(engine, reqs) == greedy
    s = engine.stats()
    assert s["gamma"] == 3 and s["draft"] == "servelab-draft" and s["rounds"] == engine.steps
    assert 0.3 < s["acceptance_rate"] <= 1 and 1.5 < s["tokens_per_target_forward"] <= 4
    assert s["tokens_per_target_forward"] == round(sum(map(len, greedy.values())) / s["rounds"], 3)
    assert engine.max_running == 1


def test_speculative_sampling_is_seeded_and_abort_drops_the_request(model, reqs, greedy):
    engine = make_engine("speculative", model, eos_id=EOS)
    assert engine.gamma == 4
    a, b = drive(engine, reqs[:3], temperature=1.0), drive(engine, reqs[:3], temperature=1.0)
    assert a == b != {r.id: greedy[r.id] for r in reqs[:3]}  # same seeds, same tokens; sampled, not greedy
    near_greedy = drive(engine, reqs[:3], temperature=1e-4)  # p and q one-hot: the lossless rule keeps argmax
    assert near_greedy == {r.id: greedy[r.id] for r in reqs[:3]}
    for r in reqs[:3]:
        engine.add(EngineRequest(r.id, r.prompt_ids, r.max_new_tokens))
    first = engine.step()
    assert {e.request_id for e in first} == {reqs[0].id} and len(first) >= 1
    assert engine.abort(reqs[0].id) and engine.abort(reqs[2].id) and not engine.abort(reqs[0].id)
    got = []
    while engine.has_work:
        got += engine.step()
    assert {e.request_id for e in got} == {reqs[1].id} and [e.token for e in got] == greedy[reqs[1].id]


def test_the_registry_names_every_engine_and_refuses_what_does_not_apply(model):
    assert list(ENGINES) == ["continuous", "paged", "speculative"]
    assert all(name in engines_help() for name in ENGINES) and "notebook.ipynb" in engines_help()
    with pytest.raises(ValueError, match="unknown --engine 'fast': use one of continuous, paged, speculative"):
        make_engine("fast", model)
    with pytest.raises(ValueError, match="--num-blocks does not apply to --engine speculative.*--engine paged"):
        make_engine("speculative", model, {"num_blocks": 8})
    with pytest.raises(ValueError, match=r"--gamma \(tokens drafted per round\) must be an int >= 1, got 0"):
        make_engine("speculative", model, {"gamma": 0})


# --- a stream whose client is gone before its first byte -------------------------------------------------------

def test_a_stream_cancelled_before_its_generator_starts_is_still_aborted(model):
    """The client goes away while the response's headers are being sent (uvicorn's ``send`` waits there when
    the socket's write buffer is full): Starlette cancels the response before it ever iterates its generator,
    so no code inside the generator runs. The request must still be aborted, not decode its 1,000 tokens on
    the only slot."""
    engine = ContinuousBatchingEngine(model, max_running=1, eos_id=EOS)
    loop = EngineLoop(engine).start()
    app = build_app(loop, ServerInfo("servelab-target", "continuous", None, None, {}))
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():  # the request, then (once the headers are on their way) the client is gone
        if messages:
            return messages.pop(0)
        while not sent:
            await asyncio.sleep(0.001)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message["type"])
        if message["type"] == "http.response.start":
            await asyncio.sleep(0.5)  # a full write buffer: uvicorn's send awaits flow.drain() here

    try:
        asyncio.run(app(scope, receive, send))
        assert sent == ["http.response.start"]  # cancelled while sending the headers: no token was sent
        deadline = time.monotonic() + 5
        while (engine.has_work or loop.stats.aborted == 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.stats.aborted == 1 and not engine.has_work and loop.steps < 500, \
            (loop.stats.aborted, loop.steps)
    finally:
        loop.stop()


# --- over HTTP: `servelab serve --engine paged | speculative` ---------------------------------------------------

async def _complete_all(url: str, reqs) -> list[dict]:
    async with httpx.AsyncClient(timeout=60) as client:
        rs = await asyncio.gather(*[client.post(url + "/v1/completions", json={
            "prompt": r.prompt_ids, "max_tokens": r.max_new_tokens, "temperature": 0, "return_token_ids": True})
            for r in reqs])
    return [r.json() for r in rs]


@pytest.mark.parametrize("args", [("--engine", "paged", "--num-blocks", "40", "--block-size", "4"),
                                  ("--engine", "speculative", "--gamma", "3")], ids=["paged", "speculative"])
def test_served_by_name_over_http_gives_plain_greedy_tokens(args, reqs, greedy):
    with serve("--max-running", "4", *args) as s:
        out = asyncio.run(_complete_all(s.url, reqs))
        assert [o["choices"][0]["token_ids"] for o in out] == [greedy[r.id] for r in reqs]
        m = httpx.get(s.url + "/metrics").json()
        assert m["engine"] == args[1] and m["completed"] == len(reqs) and m["running"] == m["waiting"] == 0
        stats = m["engine_stats"]
        if args[1] == "paged":
            assert stats["free_blocks"] == stats["num_blocks"] == 40 and stats["preemptions"] > 0, stats
            too_big = httpx.post(s.url + "/v1/completions", json={"prompt": [5] * 100, "max_tokens": 100})
            assert too_big.status_code == 400 and "--num-blocks" in too_big.json()["error"]["message"]
        else:
            assert m["max_running"] == 1 and stats["acceptance_rate"] > 0.3, m
            assert stats["tokens_per_target_forward"] > 1.5
        assert httpx.get(s.url + "/health").json()["engine"] == args[1]
