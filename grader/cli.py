"""``python -m grader check PATH``, ``python -m grader cohort DIR``, ``python -m grader release`` and
``python -m grader list``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from pathlib import Path

EXIT_USAGE = 64  # EX_USAGE (sysexits.h): the command line was wrong; nothing was graded
EXIT_CODES = f"""\
exit codes of `check`:
  0   every criterion passed (a blocked criterion worth 0 points, e.g. an optional comparison, does not
      count)
  1   a criterion failed, timed out or errored, or a notebook could not be graded (unreadable, unknown
      lab, an --only ID the lab does not have)
  2   nothing failed, but criteria worth points were blocked: this machine lacks their hardware or a
      performance threshold
  {EXIT_USAGE}  usage error, nothing graded: a bad option or value, no such notebook or folder, --device
      cuda without a GPU, a --json path that cannot be written
`cohort` exits the same way over all its learners (1 also when a learner's lab is missing or could not be
graded), and 130 when interrupted (Ctrl-C; rerun the same command to resume).
`release --check` exits 1 when labs/ or servelab/reference/ is out of date."""


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error, which is also `check`'s "blocked" code: use EX_USAGE instead."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(
        prog="python -m grader",
        description="servelab's notebook grader",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)  # subcommand parsers are _Parser too

    chk = sub.add_parser(
        "check",
        help="grade a lab notebook, a lab folder, or a folder of lab folders",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chk.add_argument("path", type=Path)
    chk.add_argument("--json", type=Path, metavar="OUT", help="write the JSON report here ('-' for stdout)")
    chk.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    chk.add_argument(
        "--only",
        nargs="+",
        default=(),
        metavar="ID",
        help="run only these criteria (and the correctness criteria a speed criterion counts only after)",
    )
    chk.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="with --only: re-run the correctness criteria it brings along even if this same graded code "
        "passed them before ($SERVELAB_GRADER_CACHE, default ~/.cache/servelab-grader)",
    )
    chk.add_argument(
        "--quick", action="store_true", default=None, help="fewer hidden cases (also $SERVELAB_QUICK=1)"
    )
    chk.add_argument("--seed", type=int, help="replay the hidden cases of an earlier report")
    chk.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every criterion's time limit")

    coh = sub.add_parser(
        "cohort",
        help="grade a folder of learners' submissions: one CSV row per learner",
        description="Grade every learner under DIR: a folder per learner (lab folders or notebooks inside),\n"
        "or one notebook per learner (learner id = file name). Every entry not graded is listed with the\n"
        "reason. Rows are saved as each learner finishes; a rerun with the same --out resumes.\n"
        "The instructors' guide: grader/INSTRUCTORS.md.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    coh.add_argument("dir", type=Path, metavar="DIR")
    coh.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="CSV",
        help="the gradebook, one row per learner (a summary, with what was skipped, goes next to it: "
        "<name>.summary.json)",
    )
    coh.add_argument("--jobs", type=int, default=1, metavar="N", help="grade N learners at once (default 1)")
    coh.add_argument("--json-dir", type=Path, metavar="D", help="write each learner's JSON report here")
    coh.add_argument(
        "--gradescope",
        type=Path,
        metavar="F",
        help="write Gradescope's results.json for the one learner in DIR",
    )
    coh.add_argument("--fresh", action="store_true", help="regrade every learner, even those already graded")
    coh.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    coh.add_argument(
        "--only",
        nargs="+",
        default=(),
        metavar="ID",
        help="grade only these criteria (and the correctness criteria speed counts after); labs without any "
        "of them are left out",
    )
    coh.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="with --only: re-run the correctness criteria it brings along",
    )
    coh.add_argument(
        "--quick", action="store_true", default=None, help="fewer hidden cases (also $SERVELAB_QUICK=1)"
    )
    coh.add_argument("--seed", type=int, help="the same hidden cases for every learner")
    coh.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every criterion's time limit")

    rel = sub.add_parser("release", help="generate labs/ and servelab/reference/ from solutions/")
    rel.add_argument(
        "--check", action="store_true", help="only report what is out of date (exit 1 if anything)"
    )
    rel.add_argument("--root", type=Path, default=None, help="repository root (default: this checkout)")

    sub.add_parser("list", help="list labs and their criteria")
    sub.add_parser("thresholds", help="every speed threshold per device class, and where each class's come from")
    args = ap.parse_args(argv)

    if args.cmd == "check":
        return check(args)
    if args.cmd == "cohort":
        from grader.cohort import run

        return run(args)
    if args.cmd == "release":
        from grader.release import ROOT, release

        stale = release(args.root or ROOT, write=not args.check)
        for p in stale:
            print(("out of date: " if args.check else "wrote: ") + str(p))
        if args.check and stale:
            print("run `python -m grader release` and commit the result", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "thresholds":
        list_thresholds()
        return 0
    list_labs()
    return 0


def list_thresholds() -> None:
    """The threshold table: a row per performance criterion, a column per device class ("-": blocked there),
    then each class's provenance."""
    from grader.thresholds import DEVICE_CLASSES, SOURCES, table

    rows = table()
    width = max(len(name) for name, _ in rows)
    print(f"{'criterion':<{width}}  " + "  ".join(f"{d:>11}" for d in DEVICE_CLASSES))
    for name, bars in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{'-' if bars[d] is None else bars[d]:>11}" for d in DEVICE_CLASSES))
    print("\n-: no measured number for that device class, so the criterion is blocked there (not failed).")
    for d in DEVICE_CLASSES:
        print(textwrap.fill(f"{d}: {SOURCES.get(d, 'no numbers: every performance criterion is blocked')}", 100,
                            subsequent_indent="    "))


def list_labs() -> None:
    """Each lab, then each criterion on one line with its description wrapped beneath it."""
    from grader.labs import all_labs

    width = min(100, shutil.get_terminal_size((100, 24)).columns)
    for lab in all_labs().values():
        print(f"{lab.id}  {lab.title}  ({lab.notebook}; graded: {', '.join(lab.functions)})")
        for c in lab.ordered():
            print(f"  {c.id:<24} {c.kind:<12} {c.points:>2} pts")
            if c.description:
                print(textwrap.fill(c.description, width, initial_indent=" " * 6, subsequent_indent=" " * 6))


def check(args) -> int:
    from grader import report
    from grader.discovery import discover
    from grader.environment import probe
    from grader.runner import Options, grade_notebook
    from grader.spec import UsageError

    to_stdout = args.json is not None and str(args.json) == "-"
    to_file = args.json is not None and not to_stdout
    try:
        if to_file:
            ensure_writable(args.json)  # before grading, not after minutes of it
        opts = Options(args.device, tuple(args.only), args.quick, args.seed, args.timeout_scale, args.cache)
        hw = probe(opts.device)
        found = discover(args.path, exclude=[args.json] if to_file else [])
    except UsageError as err:
        print(f"python -m grader check: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    for s in found.skipped:
        print(f"skipped {s}", file=sys.stderr)
    for sub in found.learners:
        for problem in sub.problems:
            print(f"not graded ({sub.learner}): {problem}", file=sys.stderr)
    per_learner = [(sub, [grade_notebook(f.path, opts, hw) for f in sub.notebooks]) for sub in found.learners]
    reports = [r for _, reps in per_learner for r in reps]
    learners = [report.learner_summary(sub.learner, reps, sub.problems) for sub, reps in per_learner]
    doc = report.combined(reports, learners, [vars(s) for s in found.skipped])
    if to_stdout:
        print(json.dumps(doc, indent=2))
    else:
        for rep in reports:
            report.print_report(rep)
        if len(learners) > 1:
            print_learner_totals(learners)
        elif len(reports) > 1:  # one learner's labs: their sum is that learner's total
            one = learners[0]
            total = f"{one['points']:g}/{one['max_points_gradable']}"
            print(f"{one['learner']}: {total} points over {len(reports)} labs")
        if to_file:
            try:
                args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            except OSError as err:
                print(f"python -m grader check: error: --json {args.json}: {err}", file=sys.stderr)
                return EXIT_USAGE
    return report.max_exit_code([report.exit_code(reports)] + [s["exit_code"] for s in learners])


def print_learner_totals(learners: list[dict]) -> None:
    """Several learners' notebooks: a total per learner, never one sum over all of them."""
    print(
        f"\n{len(learners)} learners (no combined total: it would add different learners' points; for a "
        "gradebook use `python -m grader cohort DIR --out grades.csv`):"
    )
    for s in learners:
        labs = ", ".join(f"{lab} {v['points']:g}/{v['max_points_gradable']}" for lab, v in s["labs"].items())
        extra = f"  not graded: {'; '.join(s['problems'])}" if s["problems"] else ""
        print(f"  {s['learner']}: {labs or 'no lab graded'}{extra}")


def ensure_writable(path: Path, flag: str = "--json") -> None:
    """Create ``path``'s missing parent folders and make sure a file can be written there, or raise a
    UsageError that says why not. Leaves no file behind."""
    from grader.spec import UsageError

    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; name a file, e.g. {flag} {path / 'report.json'}")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
        if not existed:
            path.unlink()
    except OSError as err:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else err.strerror or str(err)
        raise UsageError(f"{flag} {path}: cannot write there ({why}); choose another path") from None
