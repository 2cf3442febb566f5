"""One criterion in its own process: ``python -m grader.worker SPEC.json RESULT.json``.

The parent (grader.runner) kills this process's whole group on timeout, so nothing the learner's code
starts survives. Whatever happens here, the worker tries to leave a RESULT.json behind.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from grader.spec import Context, Learner, Result, run_criterion


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    try:
        from grader import labs
        from grader.notebook import GradedCell, execute

        lab = labs.get(spec["lab"])
        crit = lab.get(spec["criterion"])
        if lab.uses_servelab:
            import servelab  # noqa: F401 - configures Triton (interpreter on CPU) before learner code imports it
        cells = [GradedCell(c["index"], c["text"]) for c in spec["cells"]]
        namespace, errors = execute(cells, module_name=f"learner_{lab.id}")
        learner = Learner(namespace, spec["errors"] + errors)
        ctx = Context(
            lab.id, spec["device"], spec["device_class"], spec["quick"], spec["seed"], spec["threshold"]
        )
        result = run_criterion(crit, learner, ctx)
    except BaseException as err:  # noqa: BLE001 - report grader failures instead of dying silently
        result = Result(
            spec["criterion"],
            "correctness",
            "error",
            0,
            0,
            f"grader error: {type(err).__name__}: {err}\n{traceback.format_exc(limit=-3)}",
        )
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result.to_json(), f, default=str)


if __name__ == "__main__":
    main(*sys.argv[1:3])
