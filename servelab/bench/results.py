"""Client timings -> servelab.metrics numbers -> a result dict named like `vllm bench serve`'s result file.

servelab.metrics says ``duration_s`` and ``*_e2e_ms`` where vLLM's JSON says ``duration`` and ``*_e2el_ms``;
this module writes vLLM's names (so tools that read vLLM result files read these) and keeps servelab's
BenchmarkResult for the table.
"""
from __future__ import annotations

import re

from servelab.bench.client import RequestOutput
from servelab.metrics import BenchmarkResult, RequestTimeline, summarize

PERCENTILES = (50, 90, 95, 99)


def timelines(outputs: list[RequestOutput]) -> list[RequestTimeline]:
    return [RequestTimeline(o.request_id, o.start_s, list(o.chunk_times_s), prompt_len=o.prompt_len,
                            output_len=max(o.output_tokens, len(o.chunk_times_s)), finish_s=o.start_s + o.latency_s)
            for o in outputs if o.success]


def parse_goodput(specs: list[str] | None) -> dict[str, float] | None:
    """vLLM's ``--goodput ttft:500 tpot:50 e2el:2000`` (milliseconds) -> servelab SLO keys."""
    if not specs:
        return None
    names = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2el": "e2e_ms", "e2e": "e2e_ms"}
    slo = {}
    for spec in specs:
        key, _, value = spec.partition(":")
        if key not in names:
            raise ValueError(f"--goodput {spec}: the metric must be one of ttft, tpot, e2el (as in vLLM), e.g. ttft:500")
        try:
            slo[names[key]] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {spec}: the value must be milliseconds, e.g. {key}:500") from None
    return slo


def _vllm_name(key: str) -> str:
    return re.sub(r"_e2e_ms$", "_e2el_ms", key)


def vllm_result(outputs: list[RequestOutput], duration_s: float, slo: dict | None = None,
                meta: dict | None = None) -> tuple[dict, BenchmarkResult | None]:
    """(the result dict, BenchmarkResult) for ``outputs``; the BenchmarkResult is None when nothing succeeded."""
    ok = timelines(outputs)
    summary = summarize(ok, duration_s=duration_s, slo=slo, percentiles=PERCENTILES) if ok else None
    res: dict = dict(meta or {})
    res.update({"duration": duration_s, "completed": len(ok), "failed": len(outputs) - len(ok)})
    if summary is not None:
        d = summary.to_dict()
        for key in ("total_input_tokens", "total_output_tokens", "request_throughput", "output_throughput",
                    "total_token_throughput"):
            res[key] = d[key]
        res["request_goodput"] = d["goodput"]
        res.update({_vllm_name(k): v for k, v in d.items() if k.endswith("_ms") and k.split("_")[0] != "slo"})
        res["max_concurrent_requests"] = max_concurrency(outputs)
    res.update({
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": [o.output_tokens if o.success else 0 for o in outputs],
        "ttfts": [o.ttft_s if o.success else 0.0 for o in outputs],
        "itls": [o.itl_s if o.success else [] for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
    })
    if any(o.token_ids for o in outputs):
        res["output_token_ids"] = [o.token_ids for o in outputs]
    return res, summary


def max_concurrency(outputs: list[RequestOutput]) -> int:
    """Most requests in flight at once, as the client saw them."""
    edges = sorted([(o.start_s, 1) for o in outputs if o.success] +
                   [(o.start_s + o.latency_s, -1) for o in outputs if o.success], key=lambda e: (e[0], e[1]))
    now = most = 0
    for _, d in edges:
        now += d
        most = max(most, now)
    return most


def plot_sweep(results: list[dict], path: str, title: str = "servelab bench: latency vs throughput") -> None:
    """Latency against achieved throughput, one point per request rate of the sweep (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.get("completed")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["output_throughput"] for r in done]
    for ax, (metric, label) in zip(axes, (("ttft", "TTFT"), ("tpot", "TPOT"))):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            ax.plot(x, [r[f"{stat}_{metric}_ms"] for r in done], style, label=f"{stat} {label}")
        for r in done:
            ax.annotate(f"{r['request_rate']:g}/s", (r["output_throughput"], r[f"p99_{metric}_ms"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(f"{label} (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
