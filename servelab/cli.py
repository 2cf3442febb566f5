"""`servelab` command line: `doctor` (what this machine can do) and `tour` (the main job).

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


def main(argv: list[str] | None = None) -> int:
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
