"""Which notebooks to grade, and whose they are: every entry of a folder is either graded or listed as
skipped with the reason. Nothing is dropped silently.

Rules (grader/INSTRUCTORS.md explains them to instructors):

- A notebook path is one submission; its learner id is the file name without ``.ipynb``.
- A folder is looked at entry by entry (hidden entries, ``.ipynb_checkpoints``, ``__MACOSX`` and
  ``__pycache__`` are skipped, with the reason):
  - a *lab folder* (named like ``01_batching``: two digits and ``_``) or a notebook with a lab's own file
    name (``batching.ipynb``) is part of one learner's submission;
  - any other folder holding notebooks is a *learner folder* (learner id = folder name);
  - any other lab notebook is a *learner notebook* (one notebook per learner, learner id = file stem).
- If there is at least one learner folder or learner notebook, the folder is a **cohort**: each of them is
  one learner; a lab folder or lab-named notebook at its root belongs to no learner and is skipped (a stray
  copy of the lab); a folder without any notebook is a learner with nothing to grade (said so).
- Otherwise the folder is **one submission** (e.g. ``labs/``, ``labs/01_batching``, or a learner's own
  folder); its learner id is the folder's name.
- Inside a submission, notebooks are looked for up to MAX_DEPTH folders down. Each is matched to a lab by its
  metadata, its folder name or its file name (``grader.labs.for_notebook``); a notebook that names no lab is
  skipped. When a learner has several notebooks of one lab, the best match is graded (metadata, then the
  lab's file name, then the lab's folder name) and the others are skipped; a tie is a problem to fix, and
  none of the tied notebooks is graded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from grader import labs, notebook
from grader.spec import UsageError

MAX_DEPTH = 3  # folders below a learner's folder: alice/servelab/labs/01_batching/batching.ipynb is too deep
LAB_FOLDER = re.compile(r"^\d\d_")
SYSTEM_FOLDERS = {
    ".ipynb_checkpoints": "Jupyter's autosave copies, not the submission",
    "__MACOSX": "macOS zip metadata, not a submission",
    "__pycache__": "Python's bytecode cache",
}


@dataclass
class Skipped:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Found:
    """A notebook to grade and the lab it belongs to (None: the lab could not be told; the report says so)."""

    lab: str | None
    path: Path


@dataclass
class Submission:
    """One learner: the notebooks to grade (at most one per lab) and what stopped others from being graded."""

    learner: str
    root: Path
    notebooks: list[Found] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # a lab that could not be graded, or nothing at all
    skipped: list[Skipped] = field(default_factory=list)  # this learner's entries that were not graded
    ambiguous: list[str] = field(default_factory=list)  # labs with several equally likely notebooks

    @property
    def has_lab_notebooks(self) -> bool:
        return bool(self.notebooks or self.ambiguous)


@dataclass
class Discovery:
    layout: str  # "notebook" | "one submission" | "cohort"
    learners: list[Submission]
    skipped: list[Skipped]  # every skipped entry, the learners' own included

    def notebooks(self) -> list[Path]:
        return [f.path for s in self.learners for f in s.notebooks]


def discover(path: Path, exclude: Iterable[Path] = ()) -> Discovery:
    """The learners under ``path`` and their notebooks; a UsageError when there is nothing to grade."""
    if path.is_file() or (path.suffix == ".ipynb" and not path.is_dir()):
        if not path.exists():
            raise UsageError(f"{path}: no such notebook")
        nb, _ = _load(path)
        lab = labs.for_notebook(path, nb)
        sub = Submission(path.stem, path, [Found(lab.id if lab else None, path)])
        return Discovery("notebook", [sub], [])
    if not path.is_dir():
        raise UsageError(f"{path}: no such notebook or folder")

    excluded = {p.resolve() for p in exclude}
    skipped: list[Skipped] = []  # root entries skipped whatever the layout
    files: list[Skipped] = []  # root files that are no notebook: listed when each root entry is a learner
    lab_entries: list[Path] = []
    folders: list[Submission] = []
    lone: list[Submission] = []
    lab_files = {lab.notebook for lab in labs.all_labs().values()}
    for entry in sorted(path.iterdir(), key=lambda p: p.name.casefold()):
        if entry.resolve() in excluded:
            skipped.append(Skipped(str(entry), "the grader's own output"))
        elif why := _hidden(entry):
            skipped.append(Skipped(str(entry), why))
        elif entry.is_dir():
            if _is_lab_folder(entry.name):
                lab_entries.append(entry)
            else:
                folders.append(_scan(entry.name, entry, excluded))
        elif entry.suffix != ".ipynb":
            files.append(Skipped(str(entry), "not a notebook or a folder"))
        elif entry.name in lab_files:
            lab_entries.append(entry)
        else:
            lone.append(_single(entry))

    if any(s.has_lab_notebooks for s in folders + lone):
        return _cohort(skipped + files, lab_entries, folders, lone)
    if lab_entries:
        sub = _scan(path.resolve().name or str(path), path, excluded)
        listed = {s.path for s in skipped}
        skipped += [s for s in sub.skipped if s.path not in listed]
        return Discovery("one submission", [sub], skipped)
    skipped += files
    for sub in folders + lone:
        skipped += sub.skipped or [
            Skipped(str(sub.root), f"no notebook here (up to {MAX_DEPTH} folders down)")
        ]
    listing = "".join(f"\n  skipped {s}" for s in skipped)
    raise UsageError(
        f"{path}: no lab notebooks here or up to {MAX_DEPTH} folders down; nothing to grade"
        + (listing or " (the folder is empty)")
    )


def _cohort(
    skipped: list[Skipped], lab_entries: list[Path], folders: list[Submission], lone: list[Submission]
) -> Discovery:
    """Each folder and each lab notebook at the root is one learner; lab entries at the root are strays."""
    for entry in lab_entries:
        what = "lab folder" if entry.is_dir() else "lab's own notebook"
        skipped.append(
            Skipped(
                str(entry),
                f"a {what} at the cohort's root, next to learner folders: it belongs to no learner. Move it "
                f"into its learner's folder (or name the notebook <learner>.ipynb) and grade again",
            )
        )
    learners: list[Submission] = []
    for sub in folders:
        if not sub.notebooks and not sub.problems:  # a learner whose folder has nothing we can grade
            names = ", ".join(str(Path(s.path).relative_to(sub.root)) for s in sub.skipped)
            sub.problems.append(
                f"no lab notebook in this folder (skipped: {names}; see the skipped list)"
                if names
                else f"no notebook in this folder (up to {MAX_DEPTH} folders down)"
            )
            skipped.append(Skipped(str(sub.root), "no lab notebook to grade in this learner's folder"))
        learners.append(sub)
    names = {s.learner for s in folders}
    for sub in lone:
        if sub.learner in names:
            skipped.append(
                Skipped(
                    str(sub.root), f"learner {sub.learner!r} also has a folder; move this notebook into it"
                )
            )
        elif sub.notebooks or sub.problems:
            learners.append(sub)
        else:
            skipped.extend(sub.skipped)
            sub.skipped = []
    for sub in learners:
        skipped.extend(sub.skipped)
    learners.sort(key=lambda s: s.learner.casefold())
    return Discovery("cohort", learners, skipped)


def _single(path: Path) -> Submission:
    """A notebook at a cohort's root: one learner's only notebook, or a skipped non-lab notebook."""
    sub = Submission(path.stem, path)
    _assign(sub, [path])
    return sub


def _scan(learner: str, root: Path, excluded: set[Path]) -> Submission:
    """Every notebook of one learner's folder, matched to labs; the rest listed as skipped."""
    sub = Submission(learner, root)
    candidates: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        for d in sorted(dirnames):
            p = here / d
            if p.resolve() in excluded:
                sub.skipped.append(Skipped(str(p), "the grader's own output"))
                dirnames.remove(d)
            elif why := _hidden(p):
                if _any_ipynb(p):  # a hidden folder without notebooks is not worth a line
                    sub.skipped.append(Skipped(str(p), why))
                dirnames.remove(d)
        dirnames.sort()
        for f in sorted(filenames):
            if not f.endswith(".ipynb"):
                continue
            p = here / f
            if p.resolve() in excluded:
                continue
            if f.startswith("."):
                sub.skipped.append(Skipped(str(p), "a hidden file"))
            elif depth > MAX_DEPTH:
                sub.skipped.append(
                    Skipped(str(p), f"more than {MAX_DEPTH} folders below {root}; move it up and grade again")
                )
            else:
                candidates.append(p)
    _assign(sub, candidates)
    return sub


def _assign(sub: Submission, candidates: list[Path]) -> None:
    """Match candidates to labs; keep the best notebook per lab, skip the rest (a tie is a problem)."""

    def show(p: Path) -> str:  # messages name a notebook inside the learner's folder by its place there
        return str(p.relative_to(sub.root)) if sub.root.is_dir() else p.name

    by_lab: dict[str, list[tuple[tuple[bool, bool, bool], Path]]] = {}
    for p in candidates:
        nb, error = _load(p)
        lab = labs.for_notebook(p, nb)
        if lab is None:
            if error:  # unreadable and unnamed: a submission we cannot even place
                sub.problems.append(error)
                sub.skipped.append(
                    Skipped(str(p), "unreadable, and neither its folder nor its name names a lab")
                )
            else:
                sub.skipped.append(
                    Skipped(
                        str(p),
                        "not a lab notebook: no servelab.lab metadata, and neither its folder nor its file "
                        f"name names a lab ({', '.join(labs.all_labs())})",
                    )
                )
            continue
        meta = _meta_lab(nb) == lab.id
        by_lab.setdefault(lab.id, []).append(((meta, p.name == lab.notebook, p.parent.name == lab.id), p))
    for lab_id in sorted(by_lab):
        ranked = sorted(by_lab[lab_id], key=lambda sp: sp[0], reverse=True)
        best_score, best = ranked[0]
        ties = [p for s, p in ranked if s == best_score]
        if len(ties) > 1:
            sub.ambiguous.append(lab_id)
            names = ", ".join(show(p) for p in ties)
            sub.problems.append(
                f"{len(ties)} notebooks could be lab {lab_id}'s: {names}; keep one (or rename the others) "
                "and grade again"
            )
            for p in ties:
                sub.skipped.append(
                    Skipped(str(p), f"one of {len(ties)} equally likely notebooks of lab {lab_id}")
                )
            rest = [p for s, p in ranked if s != best_score]
        else:
            sub.notebooks.append(Found(lab_id, best))
            rest = [p for _, p in ranked[1:]]
        for p in rest:
            sub.skipped.append(
                Skipped(
                    str(p), f"another notebook of lab {lab_id} matches better and is graded: {show(best)}"
                )
            )


def _load(path: Path) -> tuple[dict | None, str | None]:
    try:
        return notebook.load(path), None
    except notebook.NotebookError as err:
        return None, str(err)
    except OSError as err:
        return None, f"{path}: cannot be read ({err.strerror or err})"


def _meta_lab(nb: dict | None) -> str | None:
    meta = (nb or {}).get("metadata", {})
    lab = meta.get("servelab", {}) if isinstance(meta, dict) else {}
    return lab.get("lab") if isinstance(lab, dict) else None


def _hidden(p: Path) -> str | None:
    if p.name in SYSTEM_FOLDERS and p.is_dir():
        return SYSTEM_FOLDERS[p.name]
    if p.name.startswith("."):
        return "a hidden folder" if p.is_dir() else "a hidden file"
    return None


def _is_lab_folder(name: str) -> bool:
    return name in labs.all_labs() or bool(LAB_FOLDER.match(name))


def _any_ipynb(folder: Path) -> bool:
    return any(True for _ in folder.rglob("*.ipynb"))
