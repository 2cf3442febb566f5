"""The learner's side of grading: ``python -m grader.worker SPEC.json IN_FD OUT_FD MARKER_FD``.

Started by ``grader.remote.Worker`` for one criterion, in a fresh process group the harness kills when the
criterion ends, so nothing the learner's code starts survives it. In this order:

1. enter the sandbox (``grader.sandbox.isolate``): namespaces, rlimits, this lab's answers hidden. ``unshare``
   needs a process with a single thread, so this comes before anything (torch) starts threads; with a PID
   namespace, fork once: the child (the namespace's PID 1) does the rest, the parent waits;
2. refuse imports of the lab's own reference, the grader's criteria and the solutions;
3. install the "where is it stuck" handlers: on SIGUSR1 (the harness's timeout) and SIGXCPU (the CPU limit)
   write the innermost learner function running to MARKER_FD, so the grader can name it and skip later
   criteria that need it;
4. run the graded cells, send what they define, then answer calls (``grader.codec`` data) until told to
   exit. The worker decides nothing: whatever it sends, the harness checks.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from types import FrameType

from grader import channel
from grader.codec import Decoder, Encoder
from grader.sandbox import isolate


def main(argv: list[str]) -> None:
    spec_path, in_fd, out_fd, marker_fd = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    for fd in (in_fd, out_fd, marker_fd):
        os.set_inheritable(fd, False)  # programs the learner's code starts do not get them
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    sandbox = isolate(Path.cwd(), spec["limits"], hide=spec.get("hide", []))
    if sandbox.get("processes", "").startswith("isolated"):
        run_as_pid_namespace_init((in_fd, out_fd, marker_fd))  # returns only in the child
    report_where_stopped(marker_fd)
    from grader import probes  # noqa: F401 - what the worker itself needs from the grader, before the ban
    from grader.notebook import GradedCell, execute

    if spec.get("uses_servelab"):
        import servelab  # noqa: F401 - configures Triton (interpreter on CPU) before learner code imports it
        import torch

        if spec["device"] == "cpu":  # criteria time small-batch decodes: one thread is faster and steadier
            torch.set_num_threads(int(os.environ.get("SERVELAB_GRADER_THREADS", "1")))
    sys.meta_path.insert(0, ForbiddenImports(spec.get("forbidden", [])))
    cells = [GradedCell(c["index"], c["text"]) for c in spec["cells"]]
    namespace, errors = execute(cells, module_name=f"learner_{spec['lab']}")
    channel.send(out_fd, {"listing": listing(namespace), "errors": spec["errors"] + errors, "sandbox": sandbox})
    server = Server(namespace, spec["device"])
    while True:
        try:
            message = channel.recv(in_fd)
        except channel.ChannelClosed:
            return
        if message.get("op") == "exit":
            return
        channel.send(out_fd, server.answer(message))


def listing(ns: dict) -> dict:
    """What the graded cells define: public names (callable or not) and the functions defined in them."""
    own = ns.get("__name__")
    public = {k: v for k, v in ns.items() if not k.startswith("_")}
    return {
        "names": {k: {"callable": callable(v), "type": type(v).__name__} for k, v in list(public.items())[:1000]},
        "defined": sorted(k for k, v in public.items() if callable(v) and getattr(v, "__module__", None) == own),
    }


class Server:
    """Answers the harness: calls of the learner's functions (or of objects they returned), attribute reads."""

    def __init__(self, namespace: dict, device: str):
        self.ns, self.device, self.refs = namespace, device, {}

    def answer(self, message: dict) -> dict:
        if message.get("op") in ("bench", "go", "show"):
            return self.bench(message)
        made: dict[str, object] = {}  # the grader objects built for this call, by handle number
        try:
            if message.get("op") == "attr":
                value = getattr(self.refs[message["ref"]], message["name"])
            else:
                target = message["target"]
                fn = self.ns[target["fn"]] if "fn" in target else self.refs[target["ref"]]
                decode = Decoder({"$model": self.model, "$ref": lambda d: self.refs[d["$ref"]],
                                  "$probe": lambda d: self.probe(d, made, decode),
                                  "$clock": lambda d: self.clock(d, made),
                                  "$wrap": lambda d: self.wrap(d, decode),
                                  "$generator": lambda d: self.generator(d, made)})
                args, kwargs = decode(message["args"]), decode(message["kwargs"])
                value = fn(*args, **kwargs)
                self.synchronize()  # the harness times the whole call: the GPU's work is part of it
            reply = {"value": Encoder(ref=self.ref)(value)}
            if message.get("echo"):  # the arguments as the call left them (in-place kernels)
                reply["args"] = Encoder(ref=self.ref)(args)
        except BaseException as err:  # noqa: BLE001 - the learner's exception is the answer
            reply = {"raised": describe(err)}
        reply["state"] = {k: state(obj) for k, obj in made.items()}
        return reply

    def bench(self, message: dict) -> dict:
        """Kernel timing the harness measures (``grader.remote.RemoteFunction.bench``): "bench" builds the
        problem here from its recipe (no GB of tensors on the pipe) and warms up; "go" runs the calls and
        synchronises (the harness times go -> reply); "show" sends back the outputs the harness picks."""
        try:
            if message["op"] == "bench":
                from servelab.paged.bench import build_problem

                self.problem = build_problem(message["recipe"], self.device)
                self.fn, self.kwargs = self.ns[message["fn"]], message.get("kwargs", {})
                self.outputs = []
                self.fn(*self.problem.args(0), **self.kwargs)  # compile and warm up, not timed
                self.synchronize()
            elif message["op"] == "go":
                self.outputs = [self.fn(*self.problem.args(i), **self.kwargs) for i in range(self.problem.repeat)]
                self.synchronize()
            else:
                return {"value": Encoder()([self.outputs[i] for i in message["indices"]])}
            return {"value": None}
        except BaseException as err:  # noqa: BLE001
            return {"raised": describe(err)}

    def model(self, d: dict):
        import torch

        from grader.spec import Context

        dtype = d.get("dtype")
        if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        device = d.get("device", self.device)  # the harness's: its own, or "cpu" for code that forks GPU ranks
        if device not in ("cpu", self.device):
            raise ValueError(f"a model on {device!r} in a worker on {self.device!r}")
        return Context("", self.device).model(d["$model"], getattr(torch, dtype) if dtype else None, device)

    def probe(self, d: dict, made: dict, decode: Decoder):
        from grader.probes import CountingModel, RecordingModel

        model = decode(d["model"])
        if d.get("record"):
            probe = RecordingModel(model, logits=bool(d.get("logits")))
        else:
            probe = CountingModel(model)
        made[str(d["$probe"])] = probe
        return probe

    def wrap(self, d: dict, decode: Decoder):
        from grader.probes import NegatedModel, OtherVocabModel

        if d["$wrap"] == "negated":
            return NegatedModel(decode(d["model"]))
        if d["$wrap"] == "vocab":
            return OtherVocabModel(decode(d["model"]), d["extra"])
        raise ValueError(f"unknown model wrapper {d['$wrap']!r}")

    def generator(self, d: dict, made: dict):
        import torch

        from grader.codec import _decode_tensor

        device = d["device"] if d["device"] == "cpu" or torch.cuda.is_available() else "cpu"
        gen = torch.Generator(device=device)
        gen.set_state(_decode_tensor(d["state"]["$tensor"]).cpu())
        made[str(d["$generator"])] = gen
        return gen

    def clock(self, d: dict, made: dict):
        from grader.probes import CountingClock
        from servelab.engine import StepClock, WallClock

        if d["kind"] == "wall":
            clock = WallClock()
        elif d["kind"] == "counting":
            clock = CountingClock(d["step_s"])
            clock.clock.t, clock.steps, clock.marks = d["t"], d["steps"], [int(m) for m in d.get("marks", [])]
            if clock.marks:  # a clock used before: number this call's forwards and steps after its marks
                import itertools

                from grader import probes

                probes._FORWARDS = itertools.count(max(next(probes._FORWARDS), clock.marks[-1] + 1))
        else:
            clock = StepClock(d["step_s"])
            clock.t = d["t"]
        made[str(d["$clock"])] = clock
        return clock

    def ref(self, obj) -> dict:
        self.refs[len(self.refs)] = obj
        return {"$ref": len(self.refs) - 1, "type": type(obj).__name__, "callable": callable(obj)}

    def synchronize(self) -> None:
        if self.device != "cpu" and "torch" in sys.modules:
            from servelab.device import synchronize

            synchronize(self.device)


def state(obj) -> dict:
    from grader.codec import _encode_tensor
    from grader.probes import CountingClock, CountingModel, RecordingModel

    if isinstance(obj, CountingModel):
        out = {"calls": [[c.tokens, c.batch, c.cached, c.seconds, c.positions] for c in obj.calls]}
        if isinstance(obj, RecordingModel):
            out["forwards"] = [[f.seq, f.ids, None if f.logits is None else _encode_tensor(f.logits)]
                               for f in obj.forwards]
        return out
    if isinstance(obj, CountingClock):
        return {"t": obj.clock.t, "steps": obj.steps, "marks": obj.marks}
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Generator):
        return {"generator": _encode_tensor(obj.get_state())}
    return {"t": getattr(obj, "t", 0.0)}


def describe(err: BaseException) -> dict:
    """An exception as data: its type, nearest built-in base, message and frames."""
    base = next((c.__name__ for c in type(err).__mro__ if c.__module__ == "builtins"), "Exception")
    try:
        message = str(err)
    except BaseException:  # noqa: BLE001 - a learner exception whose __str__ raises
        message = f"<{type(err).__name__} whose message cannot be printed>"
    frames = [[f.filename, f.lineno, f.name, f.line] for f in traceback.extract_tb(err.__traceback__)]
    return {"type": type(err).__name__, "base": base, "message": message[:20_000], "frames": frames[-50:]}


class ForbiddenImports(importlib.abc.MetaPathFinder):
    """Refuses to import this lab's reference module, the grader's criteria and the solutions, however the
    import is spelled (``importlib``, ``__import__``); the sandbox also hides their files."""

    def __init__(self, names: list[str]):
        self.names = tuple(names)

    def find_spec(self, fullname, path, target=None):
        if any(fullname == n or fullname.startswith(n + ".") for n in self.names):
            raise ImportError(f"graded code may not import `{fullname}`: it holds this lab's answers or its "
                              "grading (see grader/README.md, 'Integrity rules')")
        return None


def run_as_pid_namespace_init(fds: tuple[int, ...]) -> None:
    """Fork: the child, PID 1 of the new PID namespace, returns and runs everything (it sees no process
    outside, so it cannot signal the grader). This process only forwards the grader's SIGUSR1 and ends as
    the child ended, so the grader sees the same exit codes and signals as without the namespace."""
    pid = os.fork()
    if pid == 0:
        return
    for fd in fds:
        os.close(fd)  # the pipes are the child's: the grader sees their end when the child ends
    signal.signal(signal.SIGUSR1, lambda signum, frame: os.kill(pid, signal.SIGUSR1))
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
    elif os.WEXITSTATUS(status) == 128 + signal.SIGXCPU:  # PID 1 cannot die of its own SIGXCPU: it exits so
        sig = signal.SIGXCPU
    else:
        os._exit(os.WEXITSTATUS(status))
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)


def report_where_stopped(marker_fd: int) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        if where := learner_frame(frame):
            try:
                os.write(marker_fd, where.encode())
            except OSError:
                pass
        if signum == signal.SIGXCPU:  # then end as the CPU limit would have ended it
            if os.getpid() == 1:  # a PID namespace's init ignores its own default-action signals
                os._exit(128 + signal.SIGXCPU)
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
    main(sys.argv[1:5])
