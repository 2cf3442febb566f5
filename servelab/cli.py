"""`servelab` command line: `doctor` (what this machine can do), `tour` (the main job), `serve` (an engine behind an
OpenAI-compatible server) and `bench` (a load generator for any OpenAI-compatible server).

A user's mistake (a model path, a device, an output file, a damaged checkpoint) ends in one line on stderr
saying what was wrong and what to do, exit code 1; argparse's usage errors exit 2. Anything else is a bug in
servelab and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from servelab.config import UnsupportedModelError
from servelab.device import DeviceError
from servelab.loader import ModelNotFoundError
from servelab.workloads import STANDARD_TRACES

console = Console()
errors = Console(stderr=True)


class UsageError(Exception):
    """A command-line choice that cannot work (e.g. an output file that cannot be written)."""


# errors whose message already says what was wrong and what to do: ModelNotFoundError, UnsupportedModelError and
# its CheckpointError, DeviceError, UsageError, and servelab's own checks of what it is given (ValueError)
USER_ERRORS = (UsageError, ModelNotFoundError, UnsupportedModelError, DeviceError, ValueError)


def writable_output(path: str | None) -> Path | None:
    """The --json file, checked before any work: its folder is created, and a file that cannot be written is an
    error now rather than after the whole run."""
    if path is None:
        return None
    out = Path(path).expanduser()
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a"):  # appends nothing: an existing file stays as it is until the results replace it
            pass
    except OSError as err:
        blocker = next((folder for folder in out.parents if folder.is_file()), None)
        why = f"{blocker} is a file, not a folder" if blocker else f"{err.strerror}: {err.filename}"
        raise UsageError(f"cannot write --json {path} ({why}): pass a file in a folder you can write to") from None
    if not existed:
        out.unlink()
    return out


def write_json(out: Path, data: dict) -> None:
    text = json.dumps(data, indent=1)  # serialize first: a failure leaves no half-written file
    try:
        out.write_text(text)
    except OSError as err:
        raise UsageError(f"cannot write --json {out} ({err.strerror})") from None
    console.print(f"results written to {out}")


def cmd_doctor(args) -> int:
    from servelab.device import describe, lab_support

    out = writable_output(args.json)
    info = describe(args.device)  # the device the labs will use: --device, else $SERVELAB_DEVICE, else auto
    table = Table(title="servelab doctor: this machine", show_header=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    console.print(table)
    labs = Table(title="what each lab can do here")
    labs.add_column("lab")
    labs.add_column("mode")
    support = lab_support(info)  # "not built yet" for a lab whose labs/<lab> folder does not exist yet
    for lab, mode in support.items():
        labs.add_row(lab, mode)
    console.print(labs)
    report = {"machine": info, "labs": support}
    if not args.no_ceilings:
        from dataclasses import asdict

        from servelab.ceilings import measure

        ceilings = measure(info["device"])  # a few seconds: what the labs' figures are compared against
        table = Table(title=f"ceilings measured on {info['device']}", show_header=False)
        for key, value in ceilings.rows():
            table.add_row(key, value)
        console.print(table)
        report["ceilings"] = asdict(ceilings)
    if out:
        write_json(out, report)
    return 0


def cmd_tour(args) -> int:
    from servelab.tour import run_tour

    out = writable_output(args.json)
    results = run_tour(model=args.model, draft=args.draft, device=args.device, quick=args.quick, console=console)
    if out:
        write_json(out, results)
    return 0


def cmd_serve(args) -> int:
    from servelab.serve.server import ServeConfig, serve

    cfg = ServeConfig(model=args.model, engine=args.engine, max_running=args.max_running,
                      max_step_tokens=args.max_step_tokens, max_len=args.max_len, num_blocks=args.num_blocks,
                      block_size=args.block_size, gamma=args.gamma, host=args.host, port=args.port,
                      device=args.device, served_model_name=args.served_model_name,
                      shutdown_timeout_s=args.shutdown_timeout, log_level=args.log_level)
    try:
        serve(cfg, announce=lambda line: console.print(escape(line), soft_wrap=True))
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly: the normal way to stop
        pass
    console.print("servelab serve: stopped")
    return 0


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be > 0 requests/s (inf: all at once), got {text}")
    return value


def cmd_bench(args) -> int:
    import httpx

    from servelab.bench.results import parse_goodput, plot_sweep
    from servelab.bench.run import BenchConfig, run, sweep
    from servelab.metrics import BenchmarkResult

    out = writable_output(args.json)
    cfg = BenchConfig(base_url=args.base_url, trace=args.trace, rate=args.rate, num_requests=args.num_requests,
                      duration_s=args.duration, scale=args.scale, model=args.model, tokenizer=args.tokenizer,
                      prompt_as=args.prompt_as, ignore_eos=args.ignore_eos, return_token_ids=args.save_token_ids,
                      max_concurrency=args.max_concurrency, slo=parse_goodput(args.goodput), seed=args.seed,
                      progress=not args.no_progress)
    try:
        if args.sweep:
            results = sweep(cfg, [_rate(r) for r in args.sweep.split(",")])
            table = Table(title=f"servelab bench sweep: {args.trace} against {args.base_url}")
            for col in ("rate (req/s)", "done", "req/s", "out tok/s", "median TTFT", "p99 TTFT",
                        "median TPOT", "p99 TPOT"):
                table.add_column(col, justify="right")
            for r in results:
                table.add_row(str(r["request_rate"]), str(r["completed"]),
                              *(f"{r.get(k, 0):.2f}" for k in ("request_throughput", "output_throughput",
                                                               "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
                                                               "p99_tpot_ms")))
            console.print(table)
            plot_sweep(results, args.plot)
            console.print(f"latency-throughput plot written to {args.plot}")
            if out:
                write_json(out, {"sweep": results})
            return 0 if all(r["completed"] for r in results) else 1
        result, summary = run(cfg)
    except (OSError, httpx.HTTPError) as err:  # before the first request: no server there, or not this API
        raise UsageError(f"cannot use {args.base_url} ({type(err).__name__}: {err}): is an OpenAI-compatible "
                         "server running there? (servelab serve, vllm serve, ...)") from None
    if summary is not None:
        console.print(BenchmarkResult.table(summary), markup=False, highlight=False)
    failed = [e for e in result["errors"] if e]
    if failed:
        errors.print(f"{len(failed)} of {len(result['errors'])} requests failed; first: {escape(failed[0])}")
    if "http_overhead_tpot_ms" in result:
        console.print(f"server-measured mean TPOT {result['server']['mean_tpot_ms']:.2f} ms; HTTP + SSE overhead "
                      f"{result['http_overhead_tpot_ms']:.2f} ms per output token and "
                      f"{result['http_overhead_ttft_ms']:.2f} ms per request (TTFT)")
    if out:
        write_json(out, result)
    return 0 if summary is not None and not failed else 1


def main(argv: list[str] | None = None) -> int:
    from servelab.serve.registry import engines_help

    parser = argparse.ArgumentParser(prog="servelab", description="Learn LLM serving systems by building them.")
    sub = parser.add_subparsers(dest="command", required=True)
    device_help = "auto | cpu | cuda (default: $SERVELAB_DEVICE, else auto)"
    doctor = sub.add_parser("doctor", help="what hardware, backends and versions this machine has, lab by lab")
    doctor.add_argument("--device", default=None, help=device_help)
    doctor.add_argument("--json", help="also write the report to this file")
    doctor.add_argument("--no-ceilings", action="store_true",
                        help="skip measuring copy bandwidth and matmul rate (a few seconds)")
    doctor.set_defaults(func=cmd_doctor)
    tour = sub.add_parser("tour", help="load the default models, generate, and print each lab's headline numbers")
    tour.add_argument("--model", help="target model: 'target' (shipped), a local HF dir or hub id ($SERVELAB_MODEL)")
    tour.add_argument("--draft", help="draft model: 'draft' (shipped), a local HF dir ($SERVELAB_DRAFT_MODEL)")
    tour.add_argument("--device", default=None, help=device_help)
    tour.add_argument("--quick", action="store_true", help="smaller sizes (CI)")
    tour.add_argument("--json", help="also write the results to this file")
    tour.set_defaults(func=cmd_tour)
    serve = sub.add_parser("serve", help="serve a model with a servelab engine behind an OpenAI-compatible API")
    serve.add_argument("--model", help="'target' (shipped), a local HF dir, or a preset ($SERVELAB_MODEL)")
    serve.add_argument("--engine", default="continuous", help=engines_help())
    serve.add_argument("--max-running", type=int, default=16, help="requests in the running batch (1: no batching)")
    serve.add_argument("--max-step-tokens", type=int, default=512, help="tokens one engine step may compute")
    serve.add_argument("--max-len", type=int, default=1024, help="tokens per KV-cache slot (prompt + max_tokens)")
    serve.add_argument("--num-blocks", type=int, help="--engine paged: KV blocks (default: the KV memory of "
                       "--max-running x --max-len tokens)")
    serve.add_argument("--block-size", type=int, help="--engine paged: tokens per KV block (default 8, lab 02's)")
    serve.add_argument("--gamma", type=int, help="--engine speculative: tokens drafted per round (default 4)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default=None, help=device_help)
    serve.add_argument("--served-model-name", help="the model's name in the API (default: the checkpoint's)")
    serve.add_argument("--shutdown-timeout", type=float, default=5.0,
                       help="seconds in-flight requests get to finish on shutdown before they are cancelled")
    serve.add_argument("--log-level", default="warning", help="uvicorn's log level")
    serve.set_defaults(func=cmd_serve)
    bench = sub.add_parser("bench", help="replay a standard trace against an OpenAI-compatible server; measure it")
    bench.add_argument("--base-url", default="http://127.0.0.1:8000")
    bench.add_argument("--trace", default="poisson", help="a standard trace: " + ", ".join(STANDARD_TRACES))
    bench.add_argument("--rate", type=_rate, default=float("inf"),
                       help="requests/s (Poisson; gamma for a bursty trace); inf: all at once (default)")
    count = bench.add_mutually_exclusive_group()
    count.add_argument("--num-requests", type=int, help="how many requests (the trace's, cycled; default: all)")
    count.add_argument("--duration", type=float, help="send requests for this many seconds")
    bench.add_argument("--scale", type=float, default=1.0, help="trace scale: < 1 fewer requests, shorter outputs")
    bench.add_argument("--model", help="the model name to send (default: the server's first in /v1/models)")
    bench.add_argument("--tokenizer", help="tokenizer for the prompts (default: the shipped model's)")
    bench.add_argument("--prompt-as", choices=("ids", "text"), default="ids",
                       help="send token ids (exact prompts; default) or text (a server with another tokenizer)")
    bench.add_argument("--ignore-eos", action="store_true",
                       help="ask the server to generate exactly max_tokens (vLLM/SGLang/servelab extension)")
    bench.add_argument("--save-token-ids", action="store_true",
                       help="ask for each token's id (return_token_ids) and write them to the JSON")
    bench.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    bench.add_argument("--goodput", nargs="+", metavar="METRIC:MS",
                       help="SLOs for goodput, as in vLLM: ttft:500 tpot:50 e2el:2000")
    bench.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    bench.add_argument("--sweep", help="comma-separated rates: one run each, a table and a latency-throughput plot")
    bench.add_argument("--plot", default="bench_sweep.png", help="where --sweep writes its plot")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--json", help="write the results (vLLM bench serve's field names) to this file")
    bench.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        message = " ".join(str(err).split())  # one line, however the message was built
        errors.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        errors.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
