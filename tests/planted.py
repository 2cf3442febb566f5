"""Plant a bug into a reference solution: its source with (old, new) edits, loaded as the learner's code."""
from __future__ import annotations

import inspect
import linecache
import types

from grader.spec import Learner


def planted(module: types.ModuleType, *edits: tuple[str, str]) -> Learner:
    src = inspect.getsource(module)
    for old, new in edits:
        assert src.count(old) == 1, f"the planted bug no longer applies to the solution: {old!r}"
        src = src.replace(old, new)
    code = types.ModuleType("planted")
    name = f"<planted {module.__name__}>"
    linecache.cache[name] = (len(src), None, src.splitlines(True), name)  # Triton's jit reads the source back
    exec(compile(src, name, "exec"), code.__dict__)
    return Learner(code.__dict__)


def assert_fails(lab, module: types.ModuleType, name: str, edits, criterion: str, words: str, seed: int = 3) -> None:
    """The bug ``name`` (``edits`` planted into ``module``) fails ``criterion`` of ``lab``, saying ``words``."""
    from grader.spec import Context, run_criterion

    res = run_criterion(lab.get(criterion), planted(module, *edits), Context(lab.id, quick=True, seed=seed))
    assert res.status == "failed", f"{name}: {criterion} {res.status}: {res.message}"
    assert words in res.message, f"{name}: {res.message}"
