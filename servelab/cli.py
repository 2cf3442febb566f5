"""`servelab` command line: `doctor` (what this machine can do) and `tour` (the main job)."""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

console = Console()


def cmd_doctor(args) -> int:
    from servelab.device import describe, lab_support

    info = describe()
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "labs": support}, f, indent=1)
    return 0


def cmd_tour(args) -> int:
    from servelab.tour import run_tour

    results = run_tour(model=args.model, draft=args.draft, device=args.device, quick=args.quick, console=console)
    if args.json:
        json.dump(results, open(args.json, "w"), indent=1)
        console.print(f"results written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="servelab", description="Learn LLM serving systems by building them.")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="what hardware, backends and versions this machine has, lab by lab")
    doctor.add_argument("--json", help="also write the report to this file")
    doctor.set_defaults(func=cmd_doctor)
    tour = sub.add_parser("tour", help="load the default models, generate, and print each lab's headline numbers")
    tour.add_argument("--model", help="target model: 'target' (shipped), a local HF dir or hub id ($SERVELAB_MODEL)")
    tour.add_argument("--draft", help="draft model: 'draft' (shipped), a local HF dir ($SERVELAB_DRAFT_MODEL)")
    tour.add_argument("--device", default=None, help="auto | cpu | cuda ($SERVELAB_DEVICE)")
    tour.add_argument("--quick", action="store_true", help="smaller sizes (CI)")
    tour.add_argument("--json", help="also write the results to this file")
    tour.set_defaults(func=cmd_tour)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # our errors already say what to do
        console.print(f"[bold red]error:[/] {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
