"""The engines `servelab serve --engine` knows by name, and a learner's own from a notebook.

Each name maps to a builder called as ``build(model, max_running=, max_step_tokens=, eos_id=, max_len=,
**options)``; ``options`` are the engine's own settings (``--num-blocks``, ``--gamma``, ...). Later labs'
engines are imported only when asked for: the paged one imports Triton, the speculative one loads a draft.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from servelab.serve.engines import ContinuousBatchingEngine, StepEngine


def _lazy(module: str, cls: str) -> Callable[..., StepEngine]:
    def build(model, **kw) -> StepEngine:
        return getattr(importlib.import_module(module), cls)(model, **kw)
    return build


@dataclass(frozen=True)
class EngineKind:
    build: Callable[..., StepEngine]
    about: str  # one line for --help
    options: tuple[str, ...] = ()  # the engine's own settings: any other one given is an error, not ignored


ENGINES: dict[str, EngineKind] = {
    "continuous": EngineKind(ContinuousBatchingEngine, "lab 01's continuous batching (the default)"),
    "paged": EngineKind(_lazy("servelab.serve.paged", "PagedEngine"),
                        "lab 02's paged KV cache (--num-blocks, --block-size; preempts when blocks run out)",
                        ("num_blocks", "block_size")),
    "speculative": EngineKind(_lazy("servelab.serve.speculative", "SpeculativeEngine"),
                              "lab 03's speculative decoding with the draft model ($SERVELAB_DRAFT_MODEL), one "
                              "request at a time (--gamma)", ("gamma",)),
}


def engines_help() -> str:
    return "; ".join(f"{name}: {kind.about}" for name, kind in ENGINES.items()) + \
        "; or path/to/notebook.ipynb[:ClassName] (your own step engine)"


def make_engine(spec: str, model, options: dict | None = None, **kw) -> StepEngine:
    """``spec``: an engine name (``ENGINES``), or ``path/to/notebook.ipynb[:ClassName]`` for a learner's own.
    ``options``: engine-specific settings, None meaning "the engine's default"."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    known = ENGINES.get(spec)
    allowed = known.options if known else ()
    for key in options:
        if key not in allowed:
            takes = [n for n, k in ENGINES.items() if key in k.options]
            raise ValueError(f"--{key.replace('_', '-')} does not apply to --engine {spec}: it is a setting of "
                             f"--engine {' or '.join(takes) or '?'}")
    if known:
        return known.build(model, **kw, **options)
    path, _, cls_name = spec.partition(":") if ".ipynb" in spec else (spec, "", "")
    if not path.endswith(".ipynb"):
        raise ValueError(f"unknown --engine {spec!r}: use one of {', '.join(ENGINES)} or "
                         "path/to/notebook.ipynb:ClassName")
    return notebook_engine(Path(path), cls_name or None)(model, **kw)


def notebook_engine(path: Path, cls_name: str | None = None) -> type:
    """The step-engine class a notebook defines, run the way the grader runs a notebook's code: only its
    top-level imports, definitions and assignments (its ``graded`` cells, plus any cell defining ``cls_name``)."""
    from grader import notebook as nb_tools

    nb = nb_tools.load(path)
    extraction = nb_tools.extract(nb, (cls_name,) if cls_name else (), forbidden=())
    if extraction.errors:
        raise ValueError(f"{path}: " + "; ".join(extraction.errors))
    cells = extraction.cells
    if cls_name is None:  # no class named: every code cell, and the one step engine among them
        cells = [nb_tools.GradedCell(i, nb_tools.filter_top_level(nb_tools.source(c)))
                 for i, c in enumerate(nb["cells"]) if c.get("cell_type") == "code"]
    ns, errors = nb_tools.execute(cells, module_name=f"servelab_engine_{path.stem}")
    classes = {k: v for k, v in ns.items() if isinstance(v, type) and all(
        callable(getattr(v, m, None)) for m in ("check", "add", "step", "abort")) and hasattr(v, "has_work")}
    if cls_name is not None:
        if cls_name not in ns:
            raise ValueError(f"{path} defines no {cls_name} at the top of a code cell" +
                             (f" (errors: {'; '.join(errors)})" if errors else ""))
        if cls_name not in classes:
            raise ValueError(f"{path}: {cls_name} is not a step engine: it needs check, add, step, abort and has_work")
        return classes[cls_name]
    own = [c for c in classes.values() if c.__module__ == f"servelab_engine_{path.stem}"]
    if len(own) != 1:
        raise ValueError(f"{path} defines {len(own)} step-engine classes ({', '.join(c.__name__ for c in own) or 'none'})"
                         f": name one with --engine {path}:ClassName")
    return own[0]
