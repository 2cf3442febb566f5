"""`servelab bench` end to end: trace -> schedule -> replay -> numbers, table, JSON; and rate sweeps."""
from __future__ import annotations

import asyncio
import datetime
import math
from dataclasses import dataclass

from servelab.bench.client import replay, schedule, server_metrics, server_model
from servelab.bench.results import vllm_result
from servelab.metrics import BenchmarkResult


@dataclass
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    trace: str = "poisson"
    rate: float = math.inf
    num_requests: int | None = None
    duration_s: float | None = None
    scale: float = 1.0  # standard_trace's scale: < 1 fewer requests and shorter outputs
    model: str | None = None  # as the server names it; default: the first of its /v1/models
    tokenizer: str | None = None  # where the prompts' token ids come from; default: the shipped model
    prompt_as: str = "ids"  # "ids" (exact prompts) or "text" (for a server with another tokenizer)
    ignore_eos: bool = False
    return_token_ids: bool = False
    max_concurrency: int | None = None
    slo: dict | None = None
    seed: int = 0
    progress: bool = True


def load_trace(cfg: BenchConfig):
    from servelab.loader import load_tokenizer
    from servelab.workloads import standard_trace

    return standard_trace(cfg.trace, encode=load_tokenizer(cfg.tokenizer), scale=cfg.scale)


def run(cfg: BenchConfig, trace=None) -> tuple[dict, BenchmarkResult | None]:
    """One benchmark at ``cfg.rate``: the vLLM-style result dict (with servelab's server-side numbers when
    the server is servelab serve) and the BenchmarkResult (None if no request succeeded)."""
    trace = trace if trace is not None else load_trace(cfg)
    plan = schedule(trace, cfg.rate, cfg.num_requests, cfg.duration_s, seed=cfg.seed)
    return asyncio.run(_run(cfg, trace, plan))


async def _run(cfg: BenchConfig, trace, plan) -> tuple[dict, BenchmarkResult | None]:
    model = cfg.model or await server_model(cfg.base_url)
    servelab_server = await server_metrics(cfg.base_url, reset=True) is not None
    outputs, duration = await replay(cfg.base_url, plan, model, cfg.prompt_as, cfg.ignore_eos, cfg.return_token_ids,
                                     cfg.max_concurrency, progress=cfg.progress)
    meta = {"date": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "openai",
            "endpoint": "/v1/completions", "base_url": cfg.base_url, "model_id": model,
            "tokenizer_id": cfg.tokenizer or "servelab-target", "trace": cfg.trace, "scale": cfg.scale,
            "num_prompts": len(plan), "request_rate": cfg.rate if math.isfinite(cfg.rate) else "inf",
            "burstiness": trace.params.get("arrivals", {}).get("burstiness", 1.0),
            "max_concurrency": cfg.max_concurrency, "ignore_eos": cfg.ignore_eos, "prompt_as": cfg.prompt_as}
    result, summary = vllm_result(outputs, duration, cfg.slo, meta)
    if servelab_server:
        server = await server_metrics(cfg.base_url)
        if server and server.get("summary"):
            result["server"] = {k: server[k] for k in ("engine", "max_running", "completed", "aborted",
                                                       "max_running_seen") if k in server}
            s = server["summary"]
            result["server"].update({k: s[k] for k in ("mean_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
                                                       "mean_itl_ms", "p99_ttft_ms") if k in s})
            if summary is not None:
                # what HTTP, JSON and SSE add: to each token (the client's TPOT minus the engine's own), and once
                # per request (the client's TTFT minus the server's, from the handler's submit to the first token)
                result["http_overhead_tpot_ms"] = summary.mean_tpot_ms - s["mean_tpot_ms"]
                result["http_overhead_ttft_ms"] = summary.mean_ttft_ms - s["mean_ttft_ms"]
    return result, summary


def sweep(cfg: BenchConfig, rates: list[float]) -> list[dict]:
    """One benchmark per rate, same trace; returns the result dicts."""
    trace = load_trace(cfg)
    out = []
    for rate in rates:
        cfg_r = BenchConfig(**{**cfg.__dict__, "rate": rate})
        result, _ = run(cfg_r, trace)
        out.append(result)
    return out
