"""``python -m grader cohort DIR --out grades.csv``: grade every learner of a folder, one CSV row each.

Learners are found by ``grader.discovery`` (a folder per learner, or one notebook per learner); every entry
it does not grade is listed with the reason. Each learner's notebooks go through the same per-criterion
subprocess grader as ``check`` (``runner.grade_notebook``); ``--jobs N`` grades N learners at once, from
threads that only wait for those subprocesses. As each learner finishes, their CSV row is appended, their
JSON report written (``--json-dir``) and the summary ``<out>.summary.json`` rewritten (atomically), so an
interrupted run resumes: a learner whose notebooks (sha256) and settings match the summary is not regraded.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from grader import gradescope, labs, report
from grader.discovery import Discovery, Submission, discover
from grader.environment import Hardware, probe
from grader.runner import Options, grade_notebook
from grader.spec import Lab, UsageError, quick_mode

SCHEMA = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
PROG = "python -m grader cohort"


@dataclass
class Plan:
    """One learner to grade (or resume) and what their result depends on."""

    sub: Submission
    fingerprint: dict  # notebooks (relative path -> sha256), problems, settings


@dataclass
class Layout:
    """The CSV's columns, the same for every row of a run: labs in id order, criteria in run order."""

    labs: list[Lab]
    criteria: dict[str, list[str]]  # lab id -> criterion ids graded

    def columns(self) -> list[str]:
        cols = ["learner"]
        for lab in self.labs:
            cols += [f"{lab.id} points", f"{lab.id} max"]
        cols += [*report.STATUSES, "missing", "errors"]
        for lab in self.labs:
            cols += [f"{lab.id}/{c}" for c in self.criteria[lab.id]]
        return cols + ["notebooks", "graded_at"]


def run(args) -> int:
    from grader.cli import EXIT_USAGE, ensure_writable

    t0 = time.perf_counter()
    try:
        if args.jobs < 1:
            raise UsageError(f"--jobs {args.jobs}: give 1 or more learners to grade at once")
        ensure_writable(args.out, "--out")
        summary_path = summary_file(args.out)
        ensure_writable(summary_path, "--out (its summary)")
        if args.gradescope:
            ensure_writable(args.gradescope, "--gradescope")
        if args.json_dir and args.json_dir.exists() and not args.json_dir.is_dir():
            raise UsageError(
                f"--json-dir {args.json_dir} is a file; name a folder for one JSON file per learner"
            )
        if not args.dir.exists():
            raise UsageError(f"{args.dir}: no such folder or notebook")
        hw = probe(args.device)
        outputs = [args.out, summary_path] + [p for p in (args.json_dir, args.gradescope) if p]
        found = discover(args.dir, exclude=outputs)
        layout, only_by_lab = plan_layout(found, tuple(args.only))
        if args.gradescope and len(found.learners) != 1:
            names = ", ".join(s.learner for s in found.learners[:8]) + (
                " ..." if len(found.learners) > 8 else ""
            )
            raise UsageError(
                f"--gradescope writes one submission's results, but {args.dir} holds {len(found.learners)} "
                f"learners ({names}); point it at one learner's folder or notebook"
            )
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    quick = quick_mode() if args.quick is None else args.quick
    settings = {
        "device_class": hw.device_class,
        "quick": quick,
        "only": sorted(args.only),
        "seed": args.seed,
        "timeout_scale": args.timeout_scale,
    }
    root = args.dir
    plans = [Plan(s, fingerprint(s, root, settings)) for s in found.learners]
    store = Store(args.out, summary_path, args.json_dir, layout, root, found, settings)
    kept = {} if args.fresh else store.resumable(plans, need_reports=bool(args.gradescope))
    todo = [p for p in plans if p.sub.learner not in kept]

    print_plan(root, found, len(plans))
    if kept:
        print(
            f"resumed: {len(kept)} learners already graded (same notebooks, same settings); grading "
            f"{len(todo)} (--fresh regrades all)"
        )
    store.start(kept)
    opts = {
        lab_id: Options(args.device, only, quick, args.seed, args.timeout_scale, args.cache)
        for lab_id, only in only_by_lab.items()
    }
    interrupted = grade_all(todo, opts, hw, args.jobs, store, root)
    store.finish(interrupted)
    if args.gradescope and not interrupted:
        (learner,) = found.learners
        doc = store.learner_doc(learner.learner)
        gradescope.write(args.gradescope, doc, time.perf_counter() - t0)
    where = f", {args.json_dir}/ (one JSON per learner)" if args.json_dir else ""
    where += f", {args.gradescope}" if args.gradescope else ""
    print(f"wrote {args.out} ({len(store.records)} learners), {summary_path}{where}")
    if interrupted:
        print(
            f"interrupted: rerun the same command to grade the {len(plans) - len(store.records)} learners "
            "left",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return report.max_exit_code([r["exit_code"] for r in store.records.values()])


def summary_file(out: Path) -> Path:
    """``grades.csv`` -> ``grades.summary.json``, next to it."""
    return out.with_name(out.stem + ".summary.json")


def plan_layout(found: Discovery, only: tuple[str, ...]) -> tuple[Layout, dict[str | None, tuple[str, ...]]]:
    """The labs the cohort submitted (and, with --only, that have those criteria), each with its criteria,
    and the --only IDs to pass for each lab. An --only ID no lab of the cohort has is a usage error."""
    registry = labs.all_labs()
    present = sorted(
        {f.lab for s in found.learners for f in s.notebooks if f.lab}
        | {lab for s in found.learners for lab in s.ambiguous}
    )
    chosen: list[Lab] = []
    only_by_lab: dict[str | None, tuple[str, ...]] = {None: ()}  # a notebook of no known lab: its error
    for lab_id in present:
        lab = registry[lab_id]
        mine = tuple(c for c in only if any(k.id == c for k in lab.criteria))
        if only and not mine:
            continue
        chosen.append(lab)
        only_by_lab[lab_id] = mine
    if only:
        known = {c.id for lab in (registry[i] for i in present) for c in lab.criteria}
        unknown = [c for c in only if c not in known]
        if unknown:
            raise UsageError(
                f"--only: no lab of this cohort ({', '.join(present)}) has {unknown}; "
                "`python -m grader list` shows every lab's criteria"
            )
    criteria = {
        lab.id: [c.id for c in (lab.selection(set(only_by_lab[lab.id])) if only else lab.ordered())]
        for lab in chosen
    }
    return Layout(chosen, criteria), only_by_lab


def fingerprint(sub: Submission, root: Path, settings: dict) -> dict:
    return {
        "notebooks": {rel(f.path, root): sha256(f.path) for f in sub.notebooks},
        "problems": list(sub.problems),
        "settings": settings,
    }


def sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def rel(path: Path | str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root)) if root.is_dir() else Path(path).name
    except ValueError:
        return str(path)


def print_plan(root: Path, found: Discovery, n: int) -> None:
    kinds = Counter("folder" if s.root.is_dir() else "notebook" for s in found.learners)
    how = " and ".join(
        f"{k} {what}"
        for what, k in (
            ("learner folders", kinds["folder"]),
            ("notebooks, one per learner", kinds["notebook"]),
        )
        if k
    )
    print(f"cohort {root}: {n} learners ({how if found.layout == 'cohort' else found.layout})")
    if kinds["folder"] and kinds["notebook"]:
        print(
            "  note: learner folders and learner notebooks side by side; each notebook at the root is graded "
            "as its own learner (named after the file): move a stray one out if it is nobody's"
        )
    if found.skipped:
        print(f"skipped {len(found.skipped)} entries:")
        for s in found.skipped:
            print(f"  {rel(s.path, root)}: {s.reason}")


def grade_all(todo: list[Plan], opts: dict, hw: Hardware, jobs: int, store: Store, root: Path) -> bool:
    """Grade learners ``jobs`` at a time, saving each as it finishes. True if interrupted by Ctrl-C."""
    from tqdm import tqdm

    if not todo:
        return False
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="learner")
    bar = tqdm(
        total=len(todo), unit="learner", desc="grading", file=sys.stderr, disable=None, dynamic_ncols=True
    )
    pending: dict[Future, Plan] = {pool.submit(grade_learner, p.sub, opts, hw): p for p in todo}
    interrupted = False
    try:
        while pending:
            try:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                if interrupted:
                    bar.close()
                    print(
                        "stopped now; the learners in progress are lost (their criteria end by their time "
                        "limits)",
                        file=sys.stderr,
                    )
                    os._exit(EXIT_INTERRUPTED)
                interrupted = True
                for fut in list(pending):
                    if fut.cancel():
                        del pending[fut]
                bar.write(
                    f"interrupted: finishing the {len(pending)} learners in progress and saving them "
                    "(Ctrl-C again to stop at once)",
                    file=sys.stderr,
                )
                continue
            for fut in done:
                plan = pending.pop(fut)
                reports, crash = fut.result()
                rec = store.save(plan, reports, crash)
                bar.write(result_line(rec))
                bar.update()
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
    return interrupted


def grade_learner(sub: Submission, opts: dict, hw: Hardware) -> tuple[list[dict], str | None]:
    """The learner's reports, one per notebook of a lab being graded; a crash of the grader itself is
    returned as text (the learner gets an `errors` cell), never raised: the cohort goes on."""
    reports = []
    try:
        for f in sub.notebooks:
            if f.lab in opts:
                reports.append(grade_notebook(f.path, opts[f.lab], hw))
    except Exception as err:  # noqa: BLE001 - a grader bug must cost one learner, not the run
        return reports, f"the grader failed on {sub.learner}: {type(err).__name__}: {err}"
    return reports, None


def result_line(rec: dict) -> str:
    row = rec["row"]
    parts = []
    for lab_id in rec["labs"]:
        pts, mx = row.get(f"{lab_id} points", ""), row.get(f"{lab_id} max", "")
        missing = lab_id in row.get("missing", "").split()
        parts.append(
            f"{lab_id} {pts}/{mx}" if pts != "" else f"{lab_id} {'missing' if missing else 'not graded'}"
        )
    counts = " ".join(f"{s} {row[s]}" for s in report.STATUSES if row.get(s))
    err = f"  ({row['errors']})" if row.get("errors") else ""
    return f"{row['learner']}: {', '.join(parts) or 'nothing graded'}  [{counts or 'no criteria run'}]{err}"


class Store:
    """The run's outputs: the CSV, the summary JSON (the state a rerun resumes from) and the JSON folder."""

    def __init__(
        self,
        out: Path,
        summary: Path,
        json_dir: Path | None,
        layout: Layout,
        root: Path,
        found: Discovery,
        settings: dict,
    ):
        self.out, self.summary, self.json_dir, self.layout, self.root = out, summary, json_dir, layout, root
        self.columns = layout.columns()
        self.found, self.settings = found, settings
        self.records: dict[str, dict] = {}
        self._docs: dict[str, dict] = {}
        self.counts = {"graded": 0, "resumed": 0}

    # -- resume ------------------------------------------------------------------------------------------
    def resumable(self, plans: list[Plan], need_reports: bool) -> dict[str, dict]:
        """The earlier run's records of learners whose notebooks, settings and columns are unchanged."""
        try:
            old = json.loads(self.summary.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(old, dict) or old.get("schema") != SCHEMA:
            return {}
        if old.get("columns") != self.columns:
            print(
                f"not resuming: {self.summary} has other columns (the cohort's labs or --only changed); "
                "grading every learner again"
            )
            return {}
        kept = {}
        for plan in plans:
            rec = old.get("learners", {}).get(plan.sub.learner)
            if not rec or rec.get("crashed") or rec.get("fingerprint") != plan.fingerprint:
                continue
            if (self.json_dir or need_reports) and not self._has_doc(plan.sub.learner, plan.fingerprint):
                continue
            kept[plan.sub.learner] = rec
        return kept

    def _has_doc(self, learner: str, fp: dict) -> bool:
        try:
            return self.learner_doc(learner).get("fingerprint") == fp
        except (OSError, ValueError, KeyError):
            return False

    def learner_doc(self, learner: str) -> dict:
        """The learner's document: graded in this run, else read back from --json-dir (KeyError: neither)."""
        if learner in self._docs:
            return self._docs[learner]
        if self.json_dir is None:
            raise KeyError(learner)
        return json.loads((self.json_dir / f"{learner}.json").read_text(encoding="utf-8"))

    # -- writing -----------------------------------------------------------------------------------------
    def start(self, kept: dict[str, dict]) -> None:
        self.records = dict(kept)
        self.counts["resumed"] = len(kept)
        if self.json_dir:
            self.json_dir.mkdir(parents=True, exist_ok=True)
        self._write_csv()
        self._write_summary(finished=False)

    def save(self, plan: Plan, reports: list[dict], crash: str | None) -> dict:
        """Record one learner: JSON file, CSV row (one append), summary. Returns the record."""
        sub = plan.sub
        problems = list(sub.problems) + ([crash] if crash else [])
        row, missing = self._row(sub, reports, problems)
        summary = report.learner_summary(sub.learner, reports, problems)
        exit_code = 1 if missing else summary["exit_code"]
        rec = {
            "fingerprint": plan.fingerprint,
            "row": row,
            "labs": [lab.id for lab in self.layout.labs],
            "exit_code": exit_code,
            "crashed": crash is not None,  # a grader failure: graded again on a rerun
        }
        doc = {
            "schema": SCHEMA,
            "learner": sub.learner,
            "fingerprint": plan.fingerprint,
            "summary": summary,
            "missing": missing,
            "skipped": [vars(s) for s in sub.skipped],
            "reports": reports,
        }
        self._docs[sub.learner] = doc
        if self.json_dir:
            atomic_write(self.json_dir / f"{sub.learner}.json", json.dumps(doc, indent=2) + "\n")
        self.records[sub.learner] = rec
        self.counts["graded"] += 1
        with open(self.out, "a", encoding="utf-8", newline="") as f:
            f.write(csv_text([row], self.columns))  # one write: a row is never half there
            f.flush()
            os.fsync(f.fileno())
        self._write_summary(finished=False)
        return rec

    def finish(self, interrupted: bool) -> None:
        self._write_csv()  # sorted by learner now that everyone is in
        self._write_summary(finished=not interrupted)

    def _row(self, sub: Submission, reports: list[dict], problems: list[str]) -> tuple[dict, list[str]]:
        row: dict = {c: "" for c in self.columns}
        row["learner"] = sub.learner
        errors = list(problems)
        counts: Counter = Counter()
        by_lab = {}
        for r in reports:
            if r["lab"] is None:
                errors.append(r["error"])
            else:
                by_lab[r["lab"]] = r
        missing = [lab.id for lab in self.layout.labs if lab.id not in by_lab and lab.id not in sub.ambiguous]
        for lab in self.layout.labs:
            r = by_lab.get(lab.id)
            if r is None:
                continue
            if r["error"]:
                errors.append(f"{lab.id}: {r['error']}")
            t = r["totals"]
            row[f"{lab.id} points"], row[f"{lab.id} max"] = num(t["points"]), num(t["max_points_gradable"])
            for c in r["criteria"]:
                col = f"{lab.id}/{c['id']}"
                if col in row:
                    row[col] = "blocked" if c["status"] == "blocked" else num(c["points"])
                counts[c["status"]] += 1
        for s in report.STATUSES:
            row[s] = counts[s]
        row["missing"] = " ".join(missing)
        row["errors"] = " | ".join(e.replace("\n", " ") for e in errors)
        row["notebooks"] = " ".join(rel(f.path, self.root) for f in sub.notebooks)
        row["graded_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return row, missing

    def _write_csv(self) -> None:
        rows = [self.records[k]["row"] for k in sorted(self.records, key=str.casefold)]
        atomic_write(self.out, csv_text([dict(zip(self.columns, self.columns))] + rows, self.columns))

    def _write_summary(self, finished: bool) -> None:
        doc = {
            "schema": SCHEMA,
            "cohort": str(self.root),
            "layout": self.found.layout,
            "settings": self.settings,
            "finished": finished,
            "counts": {
                "learners": len(self.found.learners),
                "saved": len(self.records),
                **self.counts,
                "skipped": len(self.found.skipped),
            },
            "exit_code": report.max_exit_code([r["exit_code"] for r in self.records.values()]),
            "skipped": [{"path": rel(s.path, self.root), "reason": s.reason} for s in self.found.skipped],
            "columns": self.columns,
            "learners": {k: self.records[k] for k in sorted(self.records, key=str.casefold)},
        }
        atomic_write(self.summary, json.dumps(doc, indent=2) + "\n")


def num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else round(float(x), 3)


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writerows(rows)
    return buf.getvalue()


def atomic_write(path: Path, text: str) -> None:
    """Write a temporary file next to ``path`` and rename it over: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
