"""``python -m grader check PATH`` and ``python -m grader release``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grader", description="servelab's notebook grader")
    sub = ap.add_subparsers(dest="cmd", required=True)

    chk = sub.add_parser("check", help="grade a lab notebook, a lab folder, or a folder of lab folders")
    chk.add_argument("path", type=Path)
    chk.add_argument("--json", type=Path, metavar="OUT", help="write the JSON report here ('-' for stdout)")
    chk.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    chk.add_argument("--only", nargs="+", default=(), metavar="ID", help="run only these criteria")
    chk.add_argument(
        "--quick", action="store_true", default=None, help="fewer hidden cases (also $SERVELAB_QUICK=1)"
    )
    chk.add_argument("--seed", type=int, help="replay the hidden cases of an earlier report")
    chk.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every criterion's time limit")

    rel = sub.add_parser("release", help="generate labs/ and servelab/reference/ from solutions/")
    rel.add_argument(
        "--check", action="store_true", help="only report what is out of date (exit 1 if anything)"
    )
    rel.add_argument("--root", type=Path, default=None, help="repository root (default: this checkout)")

    sub.add_parser("list", help="list labs and their criteria")
    args = ap.parse_args(argv)

    if args.cmd == "check":
        return check(args)
    if args.cmd == "release":
        from grader.release import ROOT, release

        stale = release(args.root or ROOT, write=not args.check)
        for p in stale:
            print(("out of date: " if args.check else "wrote: ") + str(p))
        if args.check and stale:
            print("run `python -m grader release` and commit the result", file=sys.stderr)
            return 1
        return 0
    from grader.labs import all_labs

    for lab in all_labs().values():
        print(f"{lab.id}  {lab.title}  ({lab.notebook}; graded: {', '.join(lab.functions)})")
        for c in lab.ordered():
            print(f"  {c.id:<24} {c.kind:<12} {c.points:>2} pts  {c.description}")
    return 0


def check(args) -> int:
    from grader import report
    from grader.runner import Options, grade

    opts = Options(args.device, tuple(args.only), args.quick, args.seed, args.timeout_scale)
    reports = grade(args.path, opts)
    doc = report.combined(reports)
    if args.json and str(args.json) == "-":
        print(json.dumps(doc, indent=2))
    else:
        for rep in reports:
            report.print_report(rep)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return report.exit_code(reports)
