"""Serving metrics with the same definitions as vLLM's `vllm bench serve`, so lab numbers compare directly.

Per request: TTFT = first token - arrival; E2E = finish - arrival; TPOT = (E2E - TTFT) / (output_len - 1)
(only for output_len > 1); ITL = every gap between consecutive token events, pooled over requests.
Reported latencies are in milliseconds, throughputs per second, percentiles by np.percentile (linear).
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass, field, fields

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2e")
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
_PCT_KEY = re.compile(r"^p\d+(\.\d+)?_(ttft|tpot|itl|e2e)_ms$")


@dataclass
class RequestTimeline:
    """When one request arrived and when each of its output tokens appeared (absolute seconds).

    If several tokens appear at once (speculative decoding), either repeat the time per token or give one
    time per chunk and set output_len to the token count, as vLLM's streaming client does.
    """

    request_id: int
    arrival_s: float
    token_times_s: list[float]
    prompt_len: int = 0
    output_len: int | None = None  # defaults to len(token_times_s)
    finish_s: float | None = None  # defaults to the last token time

    def __post_init__(self) -> None:
        rid, t = self.request_id, self.token_times_s
        if not t:
            raise ValueError(f"request {rid}: token_times_s is empty; only requests that produced tokens count")
        if t[0] < self.arrival_s:
            raise ValueError(f"request {rid}: first token at {t[0]} s is before its arrival at {self.arrival_s} s; "
                             "use the same clock for both")
        bad = next((i for i in range(1, len(t)) if t[i] < t[i - 1]), None)
        if bad is not None:
            raise ValueError(f"request {rid}: token times must not decrease, but token {bad} at {t[bad]} s "
                             f"comes after token {bad - 1} at {t[bad - 1]} s")
        if self.output_len is None:
            self.output_len = len(t)
        if self.output_len < len(t):
            raise ValueError(f"request {rid}: output_len={self.output_len} is less than the {len(t)} token times")
        if self.finish_s is None:
            self.finish_s = t[-1]
        if self.finish_s < t[-1]:
            raise ValueError(f"request {rid}: finish_s={self.finish_s} is before its last token at {t[-1]}")

    @property
    def ttft_s(self) -> float:
        return self.token_times_s[0] - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.output_len - 1) if self.output_len > 1 else None

    @property
    def itl_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in itertools.pairwise(t)]


@dataclass
class BenchmarkResult:
    completed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # requests/s
    output_throughput: float  # output tokens/s
    total_token_throughput: float  # (prompt + output) tokens/s
    mean_ttft_ms: float
    median_ttft_ms: float
    std_ttft_ms: float
    mean_tpot_ms: float
    median_tpot_ms: float
    std_tpot_ms: float
    mean_itl_ms: float
    median_itl_ms: float
    std_itl_ms: float
    mean_e2e_ms: float
    median_e2e_ms: float
    std_e2e_ms: float
    percentiles: dict[str, float] = field(default_factory=dict)  # "p99_ttft_ms" -> value
    goodput: float | None = None  # requests/s meeting every SLO; None when no SLO was given
    good_completed: int | None = None
    slo: dict[str, float] | None = None

    def __getattr__(self, name: str) -> float:
        # Makes result.p99_ttft_ms work like the flat keys in vLLM's result JSON.
        pct = self.__dict__.get("percentiles") or {}
        if name in pct:
            return pct[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (percentiles: {sorted(pct)})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("percentiles"))  # flat, like vLLM
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BenchmarkResult:
        names = {f.name for f in fields(cls)}
        pct = {k: v for k, v in d.items() if _PCT_KEY.match(k)}
        return cls(**{k: v for k, v in d.items() if k in names and k != "percentiles"}, percentiles=pct)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> BenchmarkResult:
        return cls.from_dict(json.loads(text))

    def table(self, title: str = "Serving Benchmark Result") -> str:
        rows = _rows(self)
        width = max(len(label) for label, _ in rows) + 2
        lines = [f"{f' {title} ':=^{width + 12}}"]
        for label, value in rows:
            lines.append(f"{label:<{width}}{_fmt(value):>12}" if label[0] != "-" else f"{label:-^{width + 12}}")
        lines.append("=" * (width + 12))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _rows(r: BenchmarkResult) -> list[tuple[str, float | None]]:
    """(label, value) pairs in display order; labels starting with '-' are section headers."""
    rows: list[tuple[str, float | None]] = [
        ("Successful requests", r.completed), ("Duration (s)", r.duration_s),
        ("Total input tokens", r.total_input_tokens), ("Total output tokens", r.total_output_tokens),
        ("Request throughput (req/s)", r.request_throughput), ("Output throughput (tok/s)", r.output_throughput),
        ("Total token throughput (tok/s)", r.total_token_throughput),
    ]
    if r.goodput is not None:
        rows.append(("Goodput (req/s)", r.goodput))
    names = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E latency"}
    for m in METRICS:
        rows.append((f"-{names[m]}-", None))
        rows += [(f"Mean {names[m]} (ms)", getattr(r, f"mean_{m}_ms")),
                 (f"Median {names[m]} (ms)", getattr(r, f"median_{m}_ms")),
                 (f"Std {names[m]} (ms)", getattr(r, f"std_{m}_ms"))]
        rows += [(f"{k.split('_')[0].upper()} {names[m]} (ms)", v)
                 for k, v in r.percentiles.items() if k.endswith(f"_{m}_ms")]
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:d}" if isinstance(v, int) else f"{v:.2f}"


def compare_table(results: dict[str, BenchmarkResult]) -> str:
    """Side-by-side table; with exactly two results a ratio column (second / first) is added."""
    if not results:
        raise ValueError("compare_table needs at least one result, got an empty dict")
    names = list(results)
    cols = [dict(_rows(r)) for r in results.values()]
    # Row labels from the fullest result, so a goodput row shows even if only one run had SLOs.
    labels = [label for label, _ in max((_rows(r) for r in results.values()), key=len)]
    ratio = len(names) == 2
    headers = names + ([f"{names[1]}/{names[0]}"] if ratio else [])
    lw = max(len(label) for label in labels) + 2
    cw = max(12, *(len(h) + 2 for h in headers))
    lines = [f"{'':<{lw}}" + "".join(f"{h:>{cw}}" for h in headers)]
    for label in labels:
        if label[0] == "-":
            lines.append(f"{label:-^{lw + cw * len(headers)}}")
            continue
        vals = [c.get(label) for c in cols]
        cells = [_fmt(v) for v in vals]
        if ratio:
            a, b = vals
            cells.append(f"{b / a:.2f}x" if a and b is not None else "")
        lines.append(f"{label:<{lw}}" + "".join(f"{c:>{cw}}" for c in cells))
    return "\n".join(lines)


def _stats(xs_s: list[float], percentiles: tuple[float, ...]) -> tuple[float, float, float, dict[str, float]]:
    # Like vLLM, an empty list (e.g. no request had 2+ tokens, so no TPOT) reports zeros.
    a = np.asarray(xs_s if xs_s else [0.0], dtype=float) * 1000.0
    pct = {_pct_name(p): float(np.percentile(a, p)) for p in percentiles}
    return float(np.mean(a)), float(np.median(a)), float(np.std(a)), pct


def _pct_name(p: float) -> str:
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def summarize(timelines: list[RequestTimeline], duration_s: float | None = None, slo: dict | None = None,
              percentiles: tuple[float, ...] = (50, 90, 99)) -> BenchmarkResult:
    """Aggregate per-request timelines into vLLM-style benchmark numbers."""
    if not timelines:
        raise ValueError("summarize needs at least one RequestTimeline, got none")
    for p in percentiles:
        if not 0 <= p <= 100:
            raise ValueError(f"percentiles must lie in [0, 100], got {p}")
    if duration_s is None:
        duration_s = max(t.finish_s for t in timelines) - min(t.arrival_s for t in timelines)
    if not duration_s > 0:
        raise ValueError(f"benchmark duration must be > 0 s, got {duration_s}; pass duration_s= explicitly")
    ttft = [t.ttft_s for t in timelines]
    e2e = [t.e2e_s for t in timelines]
    tpot = [t.tpot_s for t in timelines if t.tpot_s is not None]
    itl = [g for t in timelines for g in t.itl_s]
    n_in = sum(t.prompt_len for t in timelines)
    n_out = sum(t.output_len for t in timelines)

    stats, pct = {}, {}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        mean, median, std, ps = _stats(xs, percentiles)
        stats.update({f"mean_{name}_ms": mean, f"median_{name}_ms": median, f"std_{name}_ms": std})
        pct.update({f"{k}_{name}_ms": v for k, v in ps.items()})

    goodput = good = None
    if slo is not None:
        unknown = set(slo) - set(SLO_KEYS)
        if unknown:
            raise ValueError(f"unknown SLO keys {sorted(unknown)}; use {list(SLO_KEYS)} (milliseconds)")
        for k, v in slo.items():
            if not v > 0:
                raise ValueError(f"SLO {k} must be > 0 ms, got {v}")
        good = 0
        for t in timelines:
            # As in vLLM, a 1-token request counts as TPOT 0 for goodput.
            got = {"ttft_ms": t.ttft_s * 1e3, "tpot_ms": (t.tpot_s or 0.0) * 1e3, "e2e_ms": t.e2e_s * 1e3}
            good += all(got[k] <= v for k, v in slo.items())
        goodput = good / duration_s

    return BenchmarkResult(
        completed=len(timelines), duration_s=float(duration_s), total_input_tokens=n_in,
        total_output_tokens=n_out, request_throughput=len(timelines) / duration_s,
        output_throughput=n_out / duration_s, total_token_throughput=(n_in + n_out) / duration_s,
        **stats, percentiles=pct, goodput=goodput, good_completed=good, slo=dict(slo) if slo is not None else None,
    )
