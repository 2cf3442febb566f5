"""An async streaming client: requests sent at their arrival times, each token timed as its SSE chunk lands.

Timing follows `vllm bench serve`: a request's clock starts just before it is sent; TTFT is its first chunk
with a choice; ITLs are the gaps between such chunks; its latency ends at ``[DONE]``; its output length is the
server's ``usage.completion_tokens`` when the server reports it (``stream_options.include_usage``), else the
number of chunks.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from servelab.workloads import Arrivals, Request, Trace


@dataclass
class RequestOutput:
    request_id: int
    prompt_len: int
    success: bool = False
    start_s: float = 0.0  # perf_counter when sent
    ttft_s: float = 0.0
    latency_s: float = 0.0
    chunk_times_s: list[float] = field(default_factory=list)  # absolute perf_counter of each chunk
    output_tokens: int = 0
    generated_text: str = ""
    token_ids: list[int] = field(default_factory=list)  # only when the server returns them (return_token_ids)
    error: str = ""

    @property
    def itl_s(self) -> list[float]:
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:])]


@dataclass
class BenchRequest:
    request: Request
    send_at_s: float  # seconds after the benchmark starts


def schedule(trace: Trace, rate: float, num_requests: int | None = None, duration_s: float | None = None,
             burstiness: float | None = None, seed: int = 0) -> list[BenchRequest]:
    """The trace's prompts and output lengths (cycled if more requests are asked for), sent at new arrival times:
    Poisson at ``rate`` requests/s (gamma with the trace's burstiness for a bursty trace); rate inf = all at once.
    ``duration_s`` keeps the requests that arrive within it."""
    shape = burstiness if burstiness is not None else trace.params.get("arrivals", {}).get("burstiness", 1.0)
    if duration_s is not None:
        if not duration_s > 0:
            raise ValueError(f"--duration must be > 0 s, got {duration_s}")
        if not np.isfinite(rate):
            raise ValueError("--duration needs a finite --rate (with rate inf every request is sent at once)")
        n = int(rate * duration_s * 1.5 + 20 * np.sqrt(rate * duration_s) + 10)
    else:
        n = num_requests or len(trace)
    if n < 1:
        raise ValueError(f"--num-requests must be >= 1, got {n}")
    if np.isfinite(rate):
        kind = "poisson" if shape == 1.0 else "gamma"
        times = Arrivals(kind, rate, shape).sample(np.random.default_rng(seed), n)
    elif rate == float("inf"):
        times = [0.0] * n
    else:
        raise ValueError(f"--rate must be > 0 (inf: all at once), got {rate}")
    out = [BenchRequest(trace.requests[i % len(trace)], t) for i, t in enumerate(times)]
    return [b for b in out if duration_s is None or b.send_at_s <= duration_s]


def payload(req: Request, model: str, prompt_as: str, ignore_eos: bool, return_token_ids: bool,
            temperature: float = 0.0) -> dict:
    if prompt_as == "text" and not req.prompt_text:
        raise ValueError("--prompt-as text needs prompts with text: the tokenizer could not decode the trace")
    body = {"model": model, "prompt": req.prompt_text if prompt_as == "text" else req.prompt_ids,
            "max_tokens": req.max_new_tokens, "temperature": temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:  # an extension (vLLM, SGLang, servelab); only sent when asked for
        body["ignore_eos"] = True
    if return_token_ids:
        body["return_token_ids"] = True
    return body


async def send(client: httpx.AsyncClient, url: str, body: dict, out: RequestOutput) -> RequestOutput:
    out.start_s = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:500]}"
                return out
            chunks = usage = 0
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                msg = json.loads(data)
                if "error" in msg:
                    out.error = f"server error mid-stream: {msg['error']}"
                    return out
                if msg.get("choices"):
                    choice = msg["choices"][0]
                    out.chunk_times_s.append(now)
                    out.generated_text += choice.get("text") or ""
                    out.token_ids += choice.get("token_ids") or []
                    chunks += 1
                if msg.get("usage"):
                    usage = msg["usage"].get("completion_tokens") or 0
            out.latency_s = time.perf_counter() - out.start_s
            if not out.chunk_times_s:
                out.error = "the stream ended without a token"
                return out
            out.ttft_s = out.chunk_times_s[0] - out.start_s
            out.output_tokens = usage or chunks
            out.success = True
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as err:
        out.error = f"{type(err).__name__}: {err}"
    return out


async def replay(base_url: str, requests: list[BenchRequest], model: str, prompt_as: str = "ids",
                 ignore_eos: bool = False, return_token_ids: bool = False, max_concurrency: int | None = None,
                 timeout_s: float = 600.0, progress: bool = True) -> tuple[list[RequestOutput], float]:
    """Send every request at its time; returns the outputs (in request order) and the benchmark duration."""
    from tqdm.auto import tqdm

    url = base_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), disable=not progress, unit="req", desc="servelab bench")

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s)) as client:
        t0 = time.perf_counter()

        async def one(i: int, b: BenchRequest) -> RequestOutput:
            await asyncio.sleep(max(0.0, t0 + b.send_at_s - time.perf_counter()))
            body = payload(b.request, model, prompt_as, ignore_eos, return_token_ids)
            out = RequestOutput(i, b.request.prompt_len)
            if gate is None:
                await send(client, url, body, out)
            else:
                async with gate:
                    await send(client, url, body, out)
            bar.update(1)
            return out

        outputs = await asyncio.gather(*(one(i, b) for i, b in enumerate(requests)))
        duration = time.perf_counter() - t0
    bar.close()
    return list(outputs), duration


async def server_model(base_url: str) -> str:
    """The first model a server lists at /v1/models (what vLLM and SGLang serve under)."""
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(base_url.rstrip("/") + "/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]


async def server_metrics(base_url: str, reset: bool = False) -> dict | None:
    """servelab serve's own /metrics (server-side timings); None for a server that has no such JSON endpoint
    (vLLM's and SGLang's /metrics are Prometheus text)."""
    async with httpx.AsyncClient(timeout=30) as client:
        try:
            if reset:
                r = await client.post(base_url.rstrip("/") + "/metrics/reset")
                return {"reset": True} if r.status_code == 200 else None
            r = await client.get(base_url.rstrip("/") + "/metrics")
            if r.status_code == 200 and r.headers.get("content-type", "").startswith("application/json"):
                data = r.json()
                return data if data.get("servelab") else None
        except (httpx.HTTPError, ValueError):
            return None
    return None
