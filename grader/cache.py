"""Passed correctness results kept between grading runs, so ``--only <speed criterion>`` need not re-run the
correctness criteria the speed criterion counts only after.

A cached pass is reused only for a criterion that runs as such a gate (one not named in ``--only``), and
only when everything that decides it is unchanged: the lab and criterion, the notebook's graded code (the
sha256 the extraction computes), the grader's code for that lab, the device class and quick mode (and, with
``--seed``, the seed). Only ``correctness`` and ``interpreter`` passes are kept; any other outcome removes
the entry, so a failure always re-runs. Entries are written by the parent grader process only, never by a
worker (which runs the learner's code): workers are not even told where the cache is.

Folder: ``$SERVELAB_GRADER_CACHE``, else ``$XDG_CACHE_HOME/servelab-grader``, else
``~/.cache/servelab-grader``. One small JSON file per entry; delete the folder to forget them all.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from grader.spec import GATING_KINDS, GRADER_DIR, Criterion, Result

CACHE_ENV = "SERVELAB_GRADER_CACHE"
SCHEMA = 1


def cache_dir() -> Path:
    if folder := os.environ.get(CACHE_ENV):
        return Path(folder)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "servelab-grader"


@dataclass(frozen=True)
class Key:
    """Everything a cached pass depends on."""

    lab: str
    criterion: str
    sources_sha256: str  # the notebook's graded code (notebook.Extraction.sha256)
    grader_sha256: str  # the criterion's module and the shared check helpers
    device_class: str
    quick: bool

    def path(self) -> Path:
        name = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return cache_dir() / f"{name}.json"


def key(lab_id: str, crit: Criterion, sources_sha256: str, device_class: str, quick: bool) -> Key:
    return Key(lab_id, crit.id, sources_sha256, _grader_sha256(crit), device_class, quick)


def cacheable(crit: Criterion) -> bool:
    return crit.kind in GATING_KINDS


def load(k: Key, seed: int | None = None) -> Result | None:
    """The cached pass for ``k`` (its message ends "(cached from <time>)"), else None. With ``seed`` (an
    explicit --seed) only a pass on those same hidden cases counts."""
    try:
        doc = json.loads(k.path().read_text(encoding="utf-8"))
        if doc.get("schema") != SCHEMA or doc.get("key") != asdict(k):
            return None
        res = Result(**doc["result"])
        saved = datetime.fromisoformat(doc["saved_at"])
    except (OSError, ValueError, TypeError, KeyError):  # missing, half-written or foreign: a miss
        return None
    if res.status != "passed" or (seed is not None and res.metrics.get("seed") != seed):
        return None
    when = saved.astimezone().strftime("%Y-%m-%d %H:%M")
    res.message += f" (cached from {when}; --no-cache re-runs it)"
    res.metrics["cached_from"] = doc["saved_at"]
    res.seconds = 0.0
    return res


def store(k: Key, res: Result) -> None:
    """Keep a pass of a correctness criterion; drop the entry on any other outcome. Never fails grading:
    a cache that cannot be written is reported once on stderr and skipped."""
    path = k.path()
    try:
        if res.status != "passed":
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "schema": SCHEMA,
            "key": asdict(k),
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "result": res.to_json(),
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, default=str)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old entry or the new one
    except OSError as err:
        _warn_once(f"grader cache {path.parent} is not writable ({err}); results are not cached")


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        print(msg, file=sys.stderr)


def _grader_sha256(crit: Criterion) -> str:
    """The grader code behind a criterion: its module (e.g. grader/labs/lab01_batching.py) and the
    shared helpers, so a changed check never reuses a pass of the old one."""
    h = hashlib.sha256()
    files = [inspect.getsourcefile(crit.run), GRADER_DIR / "checks.py", GRADER_DIR / "probes.py"]
    for f in files:
        try:
            h.update(Path(f).read_bytes() if f else b"")
        except OSError:
            h.update(b"?")
    return h.hexdigest()
