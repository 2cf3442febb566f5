"""One source of truth: labs/ and servelab/reference/ are generated from solutions/ and must match it."""

from __future__ import annotations

import importlib
import inspect

import nbformat
import pytest

from grader import labs, notebook
from grader.release import RAISES, ROOT, ReleaseError, learner_notebook, release, stub_solutions

REAL_LABS = [
    lab for lab in labs.all_labs().values() if (ROOT / "solutions" / lab.id / lab.notebook).is_file()
]
IDS = [lab.id for lab in REAL_LABS]


def test_there_is_at_least_the_warmup_lab():
    assert "00_warmup" in IDS


def test_generated_files_are_up_to_date():
    stale = release(ROOT, write=False)
    assert not stale, (
        f"out of date with solutions/: {[str(p.relative_to(ROOT)) for p in stale]}; "
        "run `python -m grader release` and commit the result"
    )


@pytest.mark.parametrize("lab", REAL_LABS, ids=IDS)
def test_graded_signatures_match_between_solution_and_learner(lab):
    sol = notebook.signatures(notebook.load(ROOT / "solutions" / lab.id / lab.notebook), lab.functions)
    learner = notebook.signatures(notebook.load(ROOT / "labs" / lab.id / lab.notebook), lab.functions)
    assert set(sol) == set(lab.functions), f"solution notebook lacks {set(lab.functions) - set(sol)}"
    assert learner == sol


@pytest.mark.parametrize("lab", REAL_LABS, ids=IDS)
def test_reference_module_matches_the_solution(lab):
    module = importlib.import_module(f"servelab.reference.{lab.module}")
    sol = notebook.signatures(notebook.load(ROOT / "solutions" / lab.id / lab.notebook), lab.functions)
    for name in lab.functions:
        fn = getattr(module, name)
        assert fn.__doc__ and "NotImplementedError" not in inspect.getsource(fn)
        assert name in sol


@pytest.mark.parametrize("lab", REAL_LABS, ids=IDS)
def test_learner_notebook_hides_the_solution(lab):
    sol = notebook.load(ROOT / "solutions" / lab.id / lab.notebook)
    learner = notebook.load(ROOT / "labs" / lab.id / lab.notebook)
    assert learner["metadata"]["servelab"]["role"] == "learner"
    hidden = []
    for cell in sol["cells"]:
        lines = notebook.source(cell).split("\n")
        inside = False
        for ln in lines:
            if ln.strip().startswith("### END SOLUTION"):
                inside = False
            # a signature inside a region (a helper subclass overriding a method) is no solution content
            if inside and len(ln.strip()) > 12 and not ln.strip().startswith(("def ", "class ", "@")):
                hidden.append(ln.strip())
            if ln.strip().startswith("### BEGIN SOLUTION"):
                inside = True
    text = "\n".join(notebook.source(c) for c in learner["cells"])
    assert hidden, "the solution notebook marks no solution lines"
    leaked = [ln for ln in hidden if ln in text]
    assert not leaked, f"solution lines in the learner notebook: {leaked[:3]}"
    for cell in learner["cells"]:
        tags = notebook.tags(cell)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            if {"check", "experiment"} & set(tags) or "NotImplementedError" in notebook.source(cell):
                assert RAISES in tags


@pytest.mark.parametrize("lab", REAL_LABS, ids=IDS)
def test_lab_readme(lab):
    readme = (ROOT / "labs" / lab.id / "README.md").read_text(encoding="utf-8").lower()
    for section in ("learning goals", "prerequisites", "time", "cpu", "gpu", "check", "grade"):
        assert section in readme, f"labs/{lab.id}/README.md should cover {section!r}"


def test_stub_solutions():
    src = (
        'def f(x):\n    """Doc."""\n    ### BEGIN SOLUTION: add one to x\n    y = x + 1\n    return y\n'
        "    ### END SOLUTION\n"
    )
    out, n = stub_solutions(src, "cell")
    assert n == 1
    assert out == (
        'def f(x):\n    """Doc."""\n    # TODO: add one to x\n'
        "    raise NotImplementedError('add one to x')\n"
    )
    with pytest.raises(ReleaseError, match="never closed"):
        stub_solutions("### BEGIN SOLUTION\nx = 1\n", "cell")
    with pytest.raises(ReleaseError, match="without a BEGIN"):
        stub_solutions("x = 1\n### END SOLUTION\n", "cell")


def test_learner_notebook_transform():
    nb = nbformat.v4.new_notebook()
    graded = nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION")
    graded.metadata["tags"] = ["graded"]
    graded.outputs = [nbformat.v4.new_output("stream", text="hi")]
    graded.execution_count = 3
    chk = nbformat.v4.new_code_cell("check('f')")
    chk.metadata["tags"] = ["check"]
    answer = nbformat.v4.new_markdown_cell("The answer is 42.")
    answer.metadata["tags"] = ["solution"]
    nb.cells = [graded, chk, answer]
    lab = labs.get("stub")
    out = learner_notebook(nb, lab, "solutions/stub/stub.ipynb")
    assert "NotImplementedError" in out.cells[0].source and "return 1" not in out.cells[0].source
    assert out.cells[0].outputs == [] and out.cells[0].execution_count is None
    assert out.cells[1].metadata["tags"] == ["check", RAISES]
    assert "42" not in out.cells[2].source
    assert out.metadata["servelab"] == {
        "lab": "stub",
        "role": "learner",
        "generated_from": "solutions/stub/stub.ipynb",
    }
    bad = nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")
    nb.cells = [bad]
    with pytest.raises(ReleaseError, match="not tagged `graded`"):
        learner_notebook(nb, lab, "x.ipynb")
