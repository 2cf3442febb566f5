"""One criterion in its own process: ``python -m grader.worker SPEC.json RESULT_FD MARKER_FD`` (key on stdin).

Started by ``grader.runner``, which kills this process's whole group on timeout, so nothing the learner's
code starts survives it. In this order, before any learner code runs:

1. read the result key from stdin (``grader.channel``): the result can only be sent sealed with it;
2. enter the sandbox (``grader.sandbox.isolate``): namespaces and rlimits. ``unshare`` needs a process with a
   single thread, so this comes before anything (torch) starts threads;
3. install the "where is it stuck" handlers: on SIGUSR1 (the parent's timeout) and SIGXCPU (the CPU limit)
   the worker writes the innermost learner function running to MARKER_FD, so the grader can name it and skip
   later criteria that need it (see ``grader.runner``);
4. load the learner's code, run the criterion, send the sealed result to RESULT_FD.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path
from types import FrameType

from grader.channel import Sealer, read_key, write_all
from grader.sandbox import MEMORY_SIGNS, human, isolate
from grader.spec import Context, Learner, Result, run_criterion

MAX_MESSAGE = 20_000  # characters of a result's message (a learner's exception text can be any size)


def main(argv: list[str]) -> None:
    spec_path, result_fd, marker_fd = argv[0], int(argv[1]), int(argv[2])
    sealer = Sealer(read_key(0))
    for fd in (result_fd, marker_fd):
        os.set_inheritable(fd, False)  # programs the learner's code starts do not get them
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    sandbox: dict[str, str] = {}
    try:
        sandbox = isolate(Path.cwd(), spec["limits"])
        report_where_stopped(marker_fd)
        result = run(spec)
        result = with_memory_reason(result, spec["limits"].get("memory"))
    except BaseException as err:  # noqa: BLE001 - report grader failures instead of dying silently
        result = Result(
            spec["criterion"],
            "correctness",
            "error",
            0,
            0,
            f"grader error: {type(err).__name__}: {err}\n{traceback.format_exc(limit=-3)}",
        )
        result = with_memory_reason(result, spec["limits"].get("memory"))
    if len(result.message) > MAX_MESSAGE:
        result.message = result.message[: MAX_MESSAGE // 2] + " [...] " + result.message[-MAX_MESSAGE // 2 :]
    payload = json.dumps({"result": result.to_json(), "sandbox": sandbox}, default=str).encode()
    write_all(result_fd, sealer.seal(payload))


def run(spec: dict) -> Result:
    from grader import labs
    from grader.notebook import GradedCell, execute

    lab = labs.get(spec["lab"])
    crit = lab.get(spec["criterion"])
    if lab.uses_servelab:
        import servelab  # noqa: F401 - configures Triton (interpreter on CPU) before learner code imports it
    cells = [GradedCell(c["index"], c["text"]) for c in spec["cells"]]
    namespace, errors = execute(cells, module_name=f"learner_{lab.id}")
    learner = Learner(namespace, spec["errors"] + errors)
    ctx = Context(lab.id, spec["device"], spec["device_class"], spec["quick"], spec["seed"], spec["threshold"])
    return run_criterion(crit, learner, ctx)


def with_memory_reason(result: Result, memory: int | None) -> Result:
    """An error that is an allocation refused by the memory limit says so."""
    if memory and result.status == "error" and any(s in result.message for s in MEMORY_SIGNS):
        result.message = f"memory limit of {human(memory)} reached: {result.message}"
    return result


def report_where_stopped(marker_fd: int) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        if where := learner_frame(frame):
            try:
                os.write(marker_fd, where.encode())
            except OSError:
                pass
        if signum == signal.SIGXCPU:  # then end as the CPU limit would have ended it
            signal.signal(signal.SIGXCPU, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGXCPU)

    signal.signal(signal.SIGUSR1, handler)
    signal.signal(signal.SIGXCPU, handler)


def learner_frame(frame: FrameType | None) -> str | None:
    """'qualname<TAB>cell<TAB>line\\n' of the innermost frame of the learner's graded code, else None."""
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith("<notebook cell "):
            cell = code.co_filename.strip("<>").removeprefix("notebook cell ")
            return f"{getattr(code, 'co_qualname', code.co_name)}\t{cell}\t{frame.f_lineno}\n"
        frame = frame.f_back
    return None


if __name__ == "__main__":
    main(sys.argv[1:4])
