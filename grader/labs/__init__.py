"""The lab registry: every ``grader/labs/lab*.py`` module that defines ``LAB``.

A new lab plugs in by adding ``grader/labs/labNN_name.py`` with ``LAB = Lab(...)`` and its criteria;
nothing else in the grader changes. Extra lab modules (tests' stub lab) can be named, comma-separated,
in ``$SERVELAB_GRADER_LABS``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

from grader.spec import Lab

EXTRA_ENV = "SERVELAB_GRADER_LABS"


def all_labs() -> dict[str, Lab]:
    names = [f"grader.labs.{m.name}" for m in pkgutil.iter_modules(__path__) if m.name.startswith("lab")]
    names += [n.strip() for n in os.environ.get(EXTRA_ENV, "").split(",") if n.strip()]
    labs: dict[str, Lab] = {}
    for name in names:
        lab = importlib.import_module(name).LAB
        if lab.id in labs:
            raise ValueError(f"two lab modules declare lab {lab.id!r}")
        labs[lab.id] = lab
    return dict(sorted(labs.items()))


def get(lab_id: str) -> Lab:
    labs = all_labs()
    if lab_id not in labs:
        raise KeyError(f"unknown lab {lab_id!r}; known labs: {', '.join(labs)}")
    return labs[lab_id]


def for_notebook(path: Path, nb: dict | None) -> Lab | None:
    """Which lab a notebook belongs to: its metadata, else its folder name, else its file name."""
    labs = all_labs()
    meta = (nb or {}).get("metadata", {}).get("servelab", {}).get("lab") if isinstance(nb, dict) else None
    if meta in labs:
        return labs[meta]
    if path.parent.name in labs:
        return labs[path.parent.name]
    return next((lab for lab in labs.values() if lab.notebook == path.name), None)
