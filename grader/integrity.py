"""Integrity rules for graded code, checked on its syntax tree before any of it runs.

A graded cell defines things; the grader runs them. Code that instead changes the grader, the libraries it
measures with, or borrows the answer fails every criterion of the notebook with a message naming the cell
and the line. The rules (README: "Integrity rules"):

1. Top level of a graded cell (what runs when the cells load, before any criterion): imports, ``def``,
   ``class`` and assignments to plain names. Values, decorators, default values, annotations and class
   bases may use literals, names, operators, comprehensions, lambdas and calls of imported or builtin
   functions, but not: the builtins that run code or reach into other namespaces (``setattr``, ``exec``,
   ``__import__``, ``globals``, ``open``, ... see ``TOP_LEVEL_BUILTINS``), the modules that reach into the
   interpreter or the OS (``sys``, ``os``, ``importlib``, ``gc``, ``ctypes``, ... ``TOP_LEVEL_MODULES``),
   dunder attributes (``x.__dict__``), or a call of the graded cells' own functions or classes (that would
   run learner code before grading starts). A class body holds defs, assignments and a docstring only.
2. Inside functions (any depth): no assignment or ``del`` on an attribute or item of an imported module or
   object (``time.perf_counter = ...``, ``torch.Tensor.x = ...``, ``os.environ[k] = ...``), no
   ``setattr``/``delattr``/``__setattr__`` on one, no ``.__dict__`` of one.
3. Anywhere: no import of this lab's reference module or a later lab's (``servelab.reference.<module>``), the
   grader or the solutions, whether by ``import``, by an attribute chain (``servelab.reference.batching``),
   or by naming the module in a string (``__import__('servelab.reference.batching')``,
   ``importlib.import_module(...)``, ``sys.modules[...]``). Earlier labs' references stay allowed.

These are static checks: code that builds a module name at run time, or reaches the same objects through
``getattr`` chains inside a function, is not caught. The grader's real defence is the harness
(``grader.remote``: criteria, timing and results live in a process the learner's code cannot reach) and the
worker's sandbox (``grader.worker``: forbidden imports refused at run time, answer files hidden).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from grader.spec import Lab

ALWAYS_FORBIDDEN = ("grader", "solutions")
TOP_LEVEL_BUILTINS = frozenset(
    {"setattr", "delattr", "getattr", "exec", "eval", "compile", "__import__", "globals", "vars", "locals",
     "open", "breakpoint", "input", "memoryview"}
)
TOP_LEVEL_MODULES = frozenset(
    {"sys", "os", "importlib", "builtins", "gc", "ctypes", "inspect", "types", "operator", "pickle", "marshal",
     "copyreg", "subprocess", "runpy", "code", "codeop", "pdb", "signal", "threading", "multiprocessing",
     "shutil", "io", "pathlib", "socket", "atexit", "weakref", "tempfile", "unittest", "grader", "solutions"}
)
ALLOWED_DUNDERS = frozenset({"__name__", "__doc__", "__qualname__", "__all__", "__slots__"})
MUTATORS = ("setattr", "delattr")
CLASS_BODY = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign, ast.Pass)


@dataclass(frozen=True)
class Violation:
    cell: int
    line: int
    what: str

    def __str__(self) -> str:
        return f"cell {self.cell} line {self.line}: {self.what}"


def forbidden_modules(lab: Lab, all_labs: Mapping[str, Lab]) -> tuple[str, ...]:
    """The grader, the solutions, and the reference modules of ``lab`` and of every later lab."""
    refs = [other.module for other in all_labs.values() if other.id >= lab.id]
    return ALWAYS_FORBIDDEN + tuple(f"servelab.reference.{m}" for m in sorted(set(refs)))


def check(cells: Iterable[tuple[int, ast.Module]], forbidden: tuple[str, ...] = ALWAYS_FORBIDDEN) -> list[Violation]:
    """Every rule a notebook's graded cells break, in cell and line order."""
    cells = list(cells)
    imports: dict[str, str] = {}  # name bound by an import anywhere in the graded code -> module or object
    defined: set[str] = set()  # functions and classes the graded cells define at their top level
    for _, tree in cells:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imports.update(_bindings(node))
        defined |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    found: list[Violation] = []
    for index, tree in cells:
        checker = _Checker(index, forbidden, imports, defined)
        for stmt in tree.body:
            checker.top_level(stmt)
        checker.everywhere(tree)
        found += [v for v in checker.found if v not in found]
    return sorted(found, key=lambda v: (v.cell, v.line))  # stable: a line's top-level rule comes first


def _bindings(node: ast.Import | ast.ImportFrom) -> dict[str, str]:
    if isinstance(node, ast.Import):
        return {(a.asname or a.name.split(".")[0]): (a.name if a.asname else a.name.split(".")[0]) for a in node.names}
    base = "." * node.level + (node.module or "")
    return {(a.asname or a.name): f"{base}.{a.name}" for a in node.names if a.name != "*"}


def _names(module: str, forbidden: tuple[str, ...]) -> str | None:
    """The forbidden module that ``module`` is or lies inside, else None."""
    return next((f for f in forbidden if module == f or module.startswith(f + ".")), None)


def _dotted(node: ast.expr) -> list[str] | None:
    """['a', 'b', 'c'] for the expression a.b.c, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _root(node: ast.expr) -> str | None:
    """The name an attribute/item chain starts from: `time` of time.perf_counter, `os` of os.environ['X']."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__") and name not in ALLOWED_DUNDERS


class _Checker:
    def __init__(self, cell: int, forbidden: tuple[str, ...], imports: dict[str, str], defined: set[str]):
        self.cell, self.forbidden, self.imports, self.defined = cell, forbidden, imports, defined
        self.found: list[Violation] = []

    def flag(self, node: ast.AST, what: str) -> None:
        self.found.append(Violation(self.cell, getattr(node, "lineno", 0), what))

    # ------------------------------------------------------------------ rule 3: forbidden modules, anywhere
    def everywhere(self, tree: ast.Module) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self._forbidden(node, a.name, "imports")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if not self._forbidden(node, node.module, "imports"):
                    for a in node.names:
                        self._forbidden(node, f"{node.module}.{a.name}", "imports")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                self._forbidden(node, node.value, "names")
            elif isinstance(node, ast.Attribute) and (parts := _dotted(node)):
                origin = self.imports.get(parts[0])
                if origin:
                    self._forbidden(node, ".".join([origin, *parts[1:]]), "uses")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                self._function_body(node)

    def _forbidden(self, node: ast.AST, module: str, verb: str) -> bool:
        hit = _names(module, self.forbidden)
        if hit is None:
            return False
        what = (
            "the grader" if hit == "grader" else "the solutions" if hit == "solutions" else
            f"`{hit}`, the reference solution of this lab or a later one"
        )
        self.flag(node, f"{verb} {what} (`{module}`): graded code must be your own; earlier labs' "
                        "servelab.reference modules are allowed")
        return True

    # ------------------------------------------------------------------ rule 2: inside functions
    def _function_body(self, fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        local = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
        body = fn.body if isinstance(fn.body, list) else [fn.body]
        for node in (n for stmt in body for n in ast.walk(stmt)):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id not in self.imports:
                local.add(node.id)

        def imported(expr: ast.expr) -> str | None:
            root = _root(expr)
            return root if root in self.imports and root not in local else None

        for node in (n for stmt in body for n in ast.walk(stmt)):
            targets: list[ast.expr] = []
            if isinstance(node, (ast.Assign, ast.Delete)):
                targets = list(node.targets)
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            changed = (x for t in targets for x in ast.walk(t) if isinstance(x, (ast.Attribute, ast.Subscript)))
            for x in changed:
                if isinstance(x.ctx, (ast.Store, ast.Del)) and (root := imported(x)):
                    self.flag(x, f"changes `{ast.unparse(x)}`, part of the imported `{self.imports[root]}`: "
                                 "graded code may not change modules or classes it imports")
                    break
            if isinstance(node, ast.Call) and node.args:
                name = node.func.id if isinstance(node.func, ast.Name) else None
                dunder = isinstance(node.func, ast.Attribute) and node.func.attr in ("__setattr__", "__delattr__")
                obj = node.args[0]
                if (name in MUTATORS or dunder) and (root := imported(obj)):
                    self.flag(node, f"calls {ast.unparse(node.func)} on `{ast.unparse(obj)}`, part of the imported "
                                    f"`{self.imports[root]}`: graded code may not change modules it imports")
            if isinstance(node, ast.Attribute) and node.attr == "__dict__" and (root := imported(node.value)):
                self.flag(node, f"reaches into `{ast.unparse(node)}` of the imported `{self.imports[root]}`")

    # ------------------------------------------------------------------ rule 1: the top level
    def top_level(self, stmt: ast.stmt, owner: str = "") -> None:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self._decorators(stmt)
            args = stmt.args
            for e in [*args.defaults, *(d for d in args.kw_defaults if d is not None)]:
                self.expression(e)
            for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if a is not None and a.annotation is not None:
                    self.expression(a.annotation)
            if stmt.returns is not None:
                self.expression(stmt.returns)
        elif isinstance(stmt, ast.ClassDef):
            self._decorators(stmt)
            for e in [*stmt.bases, *(k.value for k in stmt.keywords)]:
                self.expression(e)
            for i, s in enumerate(stmt.body):
                docstring = i == 0 and isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                if not docstring and not isinstance(s, CLASS_BODY):
                    self.flag(s, f"class {stmt.name}: a graded class body may hold defs, assignments and a "
                                 "docstring only (the rest runs when the cell loads)")
                elif not docstring:
                    self.top_level(s, owner=stmt.name)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for t in targets:
                self._target(t, owner)
            if isinstance(stmt, ast.AnnAssign):
                self.expression(stmt.annotation)
            if stmt.value is not None:
                self.expression(stmt.value)

    def _target(self, t: ast.expr, owner: str) -> None:
        if isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                self._target(e, owner)
        elif isinstance(t, ast.Starred):
            self._target(t.value, owner)
        elif not isinstance(t, ast.Name):
            where = f"in class {owner}" if owner else "at the top level"
            self.flag(t, f"assigns to `{ast.unparse(t)}` {where}: graded cells may bind names, not change "
                         "other modules or objects")

    def _decorators(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        for d in node.decorator_list:
            root = _root(d.func if isinstance(d, ast.Call) else d)
            if root in self.defined:
                self.flag(d, f"decorates `{node.name}` with `{root}`, defined in the graded cells: that runs your "
                             "code when the cell loads")
            self.expression(d)

    def expression(self, expr: ast.expr) -> None:
        """An expression evaluated when the cells load (lambda bodies included: they are usually called there)."""
        for node in ast.walk(expr):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                origin = self.imports.get(node.id, "")
                module = origin.split(".")[0]
                if node.id in TOP_LEVEL_BUILTINS and node.id not in self.imports and node.id not in self.defined:
                    self.flag(node, f"uses `{node.id}` at the top level of a graded cell, where only definitions "
                                    "belong; use it inside a function if you need it")
                elif _is_dunder(node.id):
                    self.flag(node, f"uses `{node.id}` at the top level of a graded cell")
                elif module in TOP_LEVEL_MODULES:
                    self.flag(node, f"uses `{node.id}` (module `{module}`) at the top level of a graded cell, where "
                                    "only definitions belong; use it inside a function if you need it")
            elif isinstance(node, ast.Attribute) and _is_dunder(node.attr):
                self.flag(node, f"uses `.{node.attr}` at the top level of a graded cell")
            elif isinstance(node, ast.Call):
                callee = _root(node.func)
                handed = [a for a in [*node.args, *(k.value for k in node.keywords)]
                          if isinstance(a, ast.Name) and a.id in self.defined]
                if callee in self.defined:
                    self.flag(node, f"calls `{callee}`, defined in the graded cells, at the top level: graded "
                                    "cells may define code but not run it")
                elif handed:
                    self.flag(node, f"hands `{handed[0].id}`, defined in the graded cells, to a call at the top "
                                    "level: graded cells may define code but not run it")
