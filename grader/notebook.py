"""Read lab notebooks and pull out the code the grader runs.

Conventions (cell tags, set in Jupyter via View > Cell Toolbar > Tags):
- ``graded``: a code cell whose definitions the grader runs: the exercise functions and the imports and
  helpers they need. Only top-level imports, ``def``/``class`` and assignments are kept; calls, prints
  and plots in such a cell are skipped, so experiments there cannot slow or break grading.
- ``check``: the one-line ``check("<exercise>")`` cell after an exercise.
- ``experiment``: a cell that runs the learner's code (it raises in the learner notebook until the
  exercise is done, so the release tags it ``raises-exception`` there, like check cells).
- ``solution``: a whole cell that only the solution notebook keeps (an answer); inside a graded cell,
  ``### BEGIN SOLUTION: <what to do>`` ... ``### END SOLUTION`` marks the lines the release replaces.
"""

from __future__ import annotations

import ast
import hashlib
import json
import linecache
from dataclasses import dataclass, field
from pathlib import Path

from grader import integrity

GRADED, CHECK, EXPERIMENT, SOLUTION = "graded", "check", "experiment", "solution"
KEEP_NODES = (
    ast.Import,
    ast.ImportFrom,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Assign,
    ast.AnnAssign,
)


class NotebookError(ValueError):
    """The file is not a notebook the grader can read."""


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotebookError(f"{path}: no such notebook") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NotebookError(
            f"{path} is not valid notebook JSON ({err}); was it saved completely? "
            "Restore it from a checkpoint or re-download it."
        ) from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise NotebookError(f"{path} is JSON but not a Jupyter notebook (no 'cells' list)")
    return nb


def source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def tags(cell: dict) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def lab_id(nb: dict) -> str | None:
    return nb.get("metadata", {}).get("servelab", {}).get("lab")


def blank_magics(text: str) -> str:
    """IPython-only lines (%magic, !shell) become blank lines, keeping line numbers for tracebacks."""
    return "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in text.split("\n"))


@dataclass
class GradedCell:
    index: int  # position in the notebook (0-based), as Jupyter counts cells
    text: str  # the kept top-level statements; dropped lines are blank so line numbers match the cell

    @property
    def filename(self) -> str:
        return f"<notebook cell {self.index}>"


@dataclass
class Extraction:
    cells: list[GradedCell] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # cells that could not be parsed
    notes: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # integrity rules broken (grader.integrity)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for c in self.cells:
            h.update(f"{c.index}\0{c.text}\0".encode())
        return h.hexdigest()

    def reach(self) -> dict[str, set[str]]:
        """Each top-level function or class of the graded code -> the others it uses by name, directly or
        through one another (``static_batching -> {left_pad, _helper}``). What a criterion whose exercise
        is ``f`` may end up running: ``{f} | reach()[f]``."""
        trees = [ast.parse(c.text) for c in self.cells]
        tops = {
            n.name: n
            for t in trees
            for n in t.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        }
        uses = {
            name: {x.id for x in ast.walk(node) if isinstance(x, ast.Name) and x.id in tops and x.id != name}
            for name, node in tops.items()
        }
        out: dict[str, set[str]] = {}
        for name in tops:
            seen, todo = set(), [name]
            while todo:
                for used in uses[todo.pop()] - seen:
                    seen.add(used)
                    todo.append(used)
            out[name] = seen - {name}
        return out

    def compact_source(self) -> str:
        """The graded code as one module: kept statements only, PEP 8 spacing around defs and classes."""
        out: list[str] = []
        prev_block = False
        for cell in self.cells:
            lines = cell.text.split("\n")
            for first, last, block in kept_spans(cell.text):
                if out:
                    out.append("\n\n\n" if block or prev_block else "\n")
                out.append("\n".join(ln.rstrip() for ln in lines[first - 1 : last]))
                prev_block = block
        return "".join(out) + "\n"


def kept_spans(text: str) -> list[tuple[int, int, bool]]:
    """(first line, last line, is def/class) of each top-level statement the grader keeps."""
    spans = []
    for node in ast.parse(text).body:
        if isinstance(node, KEEP_NODES):
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            spans.append(
                (
                    first,
                    node.end_lineno,
                    isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)),
                )
            )
    return spans


def filter_top_level(text: str) -> str:
    """Keep imports, defs, classes and assignments of a cell; blank out every other top-level line."""
    text = blank_magics(text)
    lines = text.split("\n")
    keep = [False] * len(lines)
    for first, last, _ in kept_spans(text):  # SyntaxError goes to the caller, which reports the cell
        for i in range(first - 1, last):
            keep[i] = True
    return "\n".join(ln if k else "" for ln, k in zip(lines, keep))


def defined_names(text: str) -> set[str]:
    try:
        tree = ast.parse(blank_magics(text))
    except SyntaxError:
        return set()
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def extract(
    nb: dict, functions: tuple[str, ...] = (), forbidden: tuple[str, ...] = integrity.ALWAYS_FORBIDDEN
) -> Extraction:
    """The graded code of a notebook: its ``graded`` cells, plus (leniently) any other code cell that
    defines a graded function the tagged cells do not, e.g. when a learner rewrote it in a new cell.

    The kept code is checked against the integrity rules (``grader.integrity``; ``forbidden``: the modules
    graded code may not import): ``violations`` lists what it breaks, by cell and line."""
    code = [(i, c) for i, c in enumerate(nb["cells"]) if c.get("cell_type") == "code"]
    chosen = [i for i, c in code if GRADED in tags(c)]
    found = set().union(*(defined_names(source(nb["cells"][i])) for i in chosen)) if chosen else set()
    for name in functions:
        if name not in found:
            extra = [i for i, c in code if i not in chosen and name in defined_names(source(c))]
            if extra:
                chosen.append(extra[-1])
                found |= defined_names(source(nb["cells"][extra[-1]]))
    out = Extraction()
    for i in sorted(chosen):
        if GRADED not in tags(nb["cells"][i]):
            out.notes.append(f"cell {i} is not tagged `graded` but defines a graded function; it was used")
        try:
            out.cells.append(GradedCell(i, filter_top_level(source(nb["cells"][i]))))
        except SyntaxError as err:
            out.errors.append(syntax_error(i, err))
    out.violations = [
        str(v) for v in integrity.check(((c.index, ast.parse(c.text)) for c in out.cells), forbidden)
    ]
    return out


def syntax_error(cell: int, err: SyntaxError) -> str:
    """'cell 3 has a syntax error at line 2: expected ':' (`def mean(xs)`)'."""
    code = f" (`{err.text.strip()}`)" if err.text and err.text.strip() else ""
    return f"cell {cell} has a syntax error at line {err.lineno}: {err.msg}{code}"


def execute(cells: list[GradedCell], module_name: str = "learner") -> tuple[dict, list[str]]:
    """Run graded cells statement by statement into a fresh module namespace.

    A statement that fails (e.g. an import of a missing package) is recorded and skipped, so one bad
    line does not hide the functions defined after it.
    """
    import sys
    import types

    module = types.ModuleType(module_name)
    sys.modules[module_name] = module  # dataclasses and pickling look classes up by module name
    ns = module.__dict__
    errors: list[str] = []
    for cell in cells:
        linecache.cache[cell.filename] = (len(cell.text), None, cell.text.splitlines(True), cell.filename)
        try:
            tree = ast.parse(cell.text, cell.filename)
        except SyntaxError as err:
            errors.append(syntax_error(cell.index, err))
            continue
        for node in tree.body:
            try:
                exec(compile(ast.Module([node], []), cell.filename, "exec"), ns)  # noqa: S102
            except Exception as err:  # noqa: BLE001
                errors.append(f"cell {cell.index} line {node.lineno}: {type(err).__name__}: {err}")
    return ns, errors


def signatures(nb: dict, names: tuple[str, ...]) -> dict[str, str]:
    """`name -> "(args) -> returns"` for each graded function defined at the top of a code cell; for a graded
    class, its public methods' signatures."""
    out: dict[str, str] = {}
    for cell in nb["cells"]:
        if cell.get("cell_type") != "code":
            continue
        try:
            tree = ast.parse(blank_magics(source(cell)))
        except SyntaxError:
            continue
        for n in tree.body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name in names:
                ret = f" -> {ast.unparse(n.returns)}" if n.returns else ""
                out[n.name] = f"({ast.unparse(n.args)}){ret}"
            elif isinstance(n, ast.ClassDef) and n.name in names:
                methods = [m for m in n.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))
                           and (m.name == "__init__" or not m.name.startswith("_"))]
                out[n.name] = "; ".join(f"{m.name}({ast.unparse(m.args)})" for m in methods)
    return out
