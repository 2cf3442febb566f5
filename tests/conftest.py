"""Shared test setup: CI-sized runs, and the grader's stub lab registered for grader tests."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# Set before any test runs so subprocesses (grader workers, notebook kernels) inherit them.
os.environ.setdefault("SERVELAB_QUICK", "1")  # notebooks and hidden cases at CI size
os.environ["SERVELAB_GRADER_LABS"] = "grader_stub_lab"  # tests/grader_stub_lab.py: a model-free lab
# the grader's cache of passed correctness results: one fresh folder per test session, never ~/.cache
os.environ.setdefault("SERVELAB_GRADER_CACHE", tempfile.mkdtemp(prefix="servelab-grader-cache-"))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), str(TESTS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture
def make_notebook(tmp_path):
    """make_notebook([(source, tags), ...], name="stub.ipynb", lab="stub") -> path of a new notebook."""
    import nbformat

    def make(
        cells: list[tuple[str, list[str]]],
        name: str = "stub.ipynb",
        lab: str | None = "stub",
        folder: Path | None = None,
    ) -> Path:
        nb = nbformat.v4.new_notebook()
        if lab:
            nb.metadata["servelab"] = {"lab": lab}
        for src, tags in cells:
            cell = nbformat.v4.new_code_cell(src)
            if tags:
                cell.metadata["tags"] = tags
            nb.cells.append(cell)
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, path)
        return path

    return make
