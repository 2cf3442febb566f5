"""The harness side of grading: the learner's code runs in a worker process; everything else runs here.

A criterion runs in the grader's own process (the harness). ``RemoteLearner.fn(name)`` hands it a proxy:
calling the proxy sends the arguments to the worker (``grader.worker``), which runs the learner's function
in its sandbox and sends back only data (``grader.codec``). So the learner's code never runs where the
verdict is decided, the time is measured or the result is written: it cannot patch the criterion, the
grader's clock or the report. What the worker sends is checked like any learner output.

What still comes from the worker, and so is only as honest as the learner: what the grader's probes there
record (forward calls a ``CountingModel`` saw, a clock's steps). Criteria treat them as claims to check
against what they compute themselves (token counts against the trace, steps against token times).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from grader import channel
from grader.codec import CodecError, Decoder, Encoder
from grader.sandbox import MEMORY_SIGNS, CappedOutput, human, worker_env
from grader.spec import Fail, GradingError, Stopped, missing_function


class Worker:
    """One learner worker: started at once (it loads while the criterion prepares), stopped by ``close``.

    Every answer is awaited until the criterion's deadline; past it, the worker is asked where the learner's
    code is (SIGUSR1, answered on the marker pipe), then its whole process group is killed."""

    def __init__(self, spec: dict, timeout: float, output_cap: int, env: dict[str, str]):
        self.timeout, self.limits = timeout, spec["limits"]
        self.deadline = time.monotonic() + timeout
        self.tmp = Path(tempfile.mkdtemp(prefix="grader-"))
        work = self.tmp / "work"
        (work / "tmp").mkdir(parents=True)
        (self.tmp / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        to_r, self.to_w = os.pipe()
        self.from_r, from_w = os.pipe()
        self.marker_r, marker_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "grader.worker", str(self.tmp / "spec.json"), str(to_r), str(from_w),
                 str(marker_w)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=work,
                env=worker_env(env, work), start_new_session=True, pass_fds=(to_r, from_w, marker_w),
            )
        except BaseException:
            for fd in (self.to_w, self.from_r, self.marker_r):
                os.close(fd)
            raise
        finally:
            for fd in (to_r, from_w, marker_w):
                os.close(fd)
        self.output = CappedOutput(self.proc.stdout, output_cap)
        self._ready: dict | None = None
        self.stopped_in: str | None = None  # 'qualname<TAB>cell<TAB>line' of a stopped learner function

    # ------------------------------------------------------------------ talking
    def ready(self) -> dict:
        """The worker's first message: what the graded cells define, which failed to load, the sandbox."""
        if self._ready is None:
            self._ready = self._receive()
            if not isinstance(self._ready.get("listing"), dict):
                raise self._garbled("its first message has no listing of the graded code")
        return self._ready

    def request(self, message: dict) -> dict:
        self.ready()
        try:
            channel.send(self.to_w, message)
        except OSError:  # BrokenPipe: the worker is gone
            raise self._died() from None
        return self._receive()

    def _receive(self) -> dict:
        try:
            return channel.recv(self.from_r, self.deadline)
        except channel.ChannelTimeout:
            raise self._timed_out() from None
        except channel.ChannelClosed:
            raise self._died() from None
        except channel.ChannelError as err:
            raise self._garbled(str(err)) from None

    # ------------------------------------------------------------------ endings
    def _timed_out(self) -> Stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGUSR1)  # "where are you?": answered on the marker pipe
        self.stopped_in = _read_marker(self.marker_r, wait=1.0)
        self.kill()
        return Stopped("timeout", f"did not finish within {self.timeout:.0f} s and was stopped{self.where()} (an "
                       "endless loop, or a decode that never stops?)", self.qualname())

    def _died(self) -> Stopped:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # it closed the pipe but lives on: end it
            self.kill()
            code = self.proc.returncode
        if code == -signal.SIGXCPU:
            self.stopped_in = _read_marker(self.marker_r, wait=0)
        self.kill()
        status, message = self._ending(code)
        return Stopped(status, message, self.qualname())

    def _garbled(self, what: str) -> Stopped:
        self.kill()
        return Stopped("error", f"the worker's pipe carried data that is not the grader's ({what}): did code "
                       "it ran write to the grader's pipe? Nothing from it was used")

    def _ending(self, code: int) -> tuple[str, str]:
        self.output.join(timeout=5)
        tail = self.output.text()[-1500:]
        ends = f"; its output ends with:\n{tail}" if tail.strip() else "; it printed nothing"
        where, memory = self.where(), self.limits.get("memory")
        if code == -signal.SIGXCPU:
            return "timeout", f"CPU time limit of {self.limits['cpu']} s reached and the worker was stopped{where}"
        if memory and any(s in tail for s in MEMORY_SIGNS):
            return "error", f"memory limit of {human(memory)} reached and the worker died{ends}"
        if code == -signal.SIGKILL:
            return "error", (f"the worker was killed (SIGKILL){where}: its CPU time limit's hard stop, or the "
                             f"system's out-of-memory killer{ends}")
        if code == 0:
            return "error", f"the worker exited (exit code 0) in the middle of a call: code it ran ended the " \
                            f"process (os._exit? sys.exit?){where}{ends}"
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        return "error", f"the worker process died ({how}) in the middle of a call{where}{ends}"

    def where(self) -> str:
        """' while running `left_pad` (notebook cell 11 line 7)'."""
        if not self.stopped_in:
            return ""
        qualname, cell, line = (self.stopped_in.split("\t") + ["", ""])[:3]
        return f" while running `{qualname}` (notebook cell {cell} line {line})"

    def qualname(self) -> str | None:
        return self.stopped_in.split("\t")[0] if self.stopped_in else None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            channel.send(self.to_w, {"op": "exit"})
        self.kill()
        self.output.join(timeout=5)
        for fd in (self.to_w, self.from_r, self.marker_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _read_marker(fd: int, wait: float) -> str | None:
    """The worker's last 'qualname<TAB>cell<TAB>line' line on the marker pipe, waiting up to ``wait`` s."""
    import select

    data, deadline = b"", time.monotonic() + wait
    while select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        if data.endswith(b"\n"):
            break
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else None


# ----------------------------------------------------------------------------- the learner, remotely
class RemoteLearner:
    """``Learner`` for criteria run in the harness: ``fn(name)`` is a proxy to the worker's function."""

    def __init__(self, worker: Worker):
        self.worker = worker

    @property
    def load_errors(self) -> list[str]:
        return list(self.worker.ready().get("errors", []))

    def fn(self, name: str) -> RemoteFunction:
        ready = self.worker.ready()
        info = ready["listing"].get("names", {}).get(name)
        if info is None:
            raise GradingError(missing_function(name, list(ready["listing"].get("defined", [])), self.load_errors))
        if not info.get("callable"):
            raise GradingError(f"`{name}` is a {info.get('type')}, not a function")
        return RemoteFunction(self.worker, {"fn": name}, name)


class RemoteFunction:
    def __init__(self, worker: Worker, target: dict, name: str):
        self.worker, self.target, self.__name__ = worker, target, name

    def __call__(self, *args, **kwargs):
        return self.call(args, kwargs, echo=False)[0]

    def call(self, args: tuple, kwargs: dict, echo: bool) -> tuple:
        """(value, args after the call): ``echo`` brings back the arguments as the call left them, for
        functions that write into their arguments (a kernel's output buffer, a cache)."""
        handles = Handles(self.worker)
        encode = Encoder(handle=handles)
        reply = self.worker.request({"op": "call", "target": self.target, "args": encode(list(args)),
                                     "kwargs": encode(kwargs), "echo": echo})
        handles.apply(reply.get("state"))
        value = self.worker_value(self.worker, reply, self.__name__)
        if not echo:
            return value, args
        after = self.worker_value(self.worker, {"value": reply.get("args")}, self.__name__)
        if not isinstance(after, list) or len(after) != len(args):
            raise self.worker._garbled("the arguments sent back do not match the call")
        return value, tuple(after)

    def bench(self, recipe: dict, kwargs: dict, indices: list[int]) -> tuple[float, list]:
        """(seconds for ``recipe['repeat']`` calls, the outputs of calls ``indices``): the problem is built in
        the worker from ``recipe`` (``servelab.paged.bench.build_problem``), each call gets its own query, and
        the time is this process's clock around the worker's calls and its device synchronisation."""
        for message in ({"op": "bench", "fn": self.__name__, "recipe": recipe, "kwargs": kwargs}, {"op": "go"}):
            t0 = time.perf_counter()
            reply = self.worker.request(message)
            seconds = time.perf_counter() - t0
            self.worker_value(self.worker, reply, self.__name__)
        shown = self.worker_value(self.worker, self.worker.request({"op": "show", "indices": indices}), self.__name__)
        return seconds, shown

    @staticmethod
    def worker_value(worker: Worker, reply: dict, name: str):
        if "raised" in reply:
            raise remote_exception(reply["raised"])
        try:
            return Decoder({"$ref": lambda d: remote_object(worker, d)})(reply.get("value"))
        except (CodecError, KeyError, TypeError, ValueError) as err:
            raise Fail(f"`{name}` returned a value the grader cannot use: {err}") from None

    def __repr__(self) -> str:
        return f"<learner function {self.__name__} in the worker>"


class RemoteObject:
    """An object the learner's code returned that is not data (an instance of the learner's class): it stays
    in the worker; attribute reads and calls go there."""

    def __init__(self, worker: Worker, data: dict):
        self._worker, self._ref = worker, int(data["$ref"])
        self._type = str(data.get("type", "object"))[:200]

    def __call__(self, *args, **kwargs):
        return RemoteFunction(self._worker, {"ref": self._ref}, self._type)(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_worker", "_ref", "_type"):
            raise AttributeError(name)
        reply = self._worker.request({"op": "attr", "ref": self._ref, "name": name})
        return RemoteFunction.worker_value(self._worker, reply, f"{self._type}.{name}")

    def __repr__(self) -> str:
        return f"<{self._type} in the learner's worker>"


def remote_object(worker: Worker, data: dict) -> RemoteObject:
    """A RemoteObject whose class carries the learner's type name, so a criterion's "returned {type}" message
    names what the learner's code really returned (a generator, their own class), not "RemoteObject"."""
    name = "".join(ch for ch in str(data.get("type", "object"))[:80] if ch.isalnum() or ch == "_") or "object"
    cls = type(name, (RemoteObject,), {"__module__": "learner"})
    return cls(worker, data)


class Handles:
    """The grader objects passed to one call (the model, probes, clocks), numbered: the worker builds its own
    copies, and their state comes back after the call into the objects here."""

    def __init__(self, worker: Worker):
        self.worker, self.objects = worker, {}

    def __call__(self, x) -> dict | None:
        from grader.probes import CountingClock, CountingModel, NegatedModel, OtherVocabModel, RecordingModel

        if isinstance(x, RemoteObject):
            return {"$ref": x._ref}
        engine, model = sys.modules.get("servelab.engine"), sys.modules.get("servelab.model")
        torch = sys.modules.get("torch")
        if model is not None and isinstance(x, model.CausalLM):
            return model_handle(x)
        if isinstance(x, RecordingModel):
            return {"$probe": self._add(x), "model": self.model(x.model), "record": True, "logits": bool(x.logits)}
        if isinstance(x, CountingModel):
            return {"$probe": self._add(x), "model": self.model(x.model)}
        if isinstance(x, NegatedModel):
            return {"$wrap": "negated", "model": self.model(x.model)}
        if isinstance(x, OtherVocabModel):
            return {"$wrap": "vocab", "extra": x.extra, "model": self.model(x.model)}
        if isinstance(x, CountingClock):
            return {"$clock": self._add(x), "kind": "counting", "step_s": x.clock.step_s, "t": x.clock.t,
                    "steps": x.steps, "marks": list(x.marks)}
        if engine is not None and isinstance(x, engine.StepClock):
            return {"$clock": self._add(x), "kind": "step", "step_s": x.step_s, "t": x.t}
        if engine is not None and isinstance(x, engine.WallClock):
            return {"$clock": self._add(x), "kind": "wall"}
        if torch is not None and isinstance(x, torch.Generator):
            from grader.codec import _encode_tensor

            return {"$generator": self._add(x), "device": x.device.type, "state": _encode_tensor(x.get_state())}
        return None

    def model(self, x) -> dict:
        """The handle of a model a probe or wrapper wraps: one the worker can build, or a CodecError."""
        h = self(x)
        if not (isinstance(h, dict) and any(k in h for k in ("$model", "$probe", "$wrap"))):
            raise CodecError(f"a grader probe wraps a {type(x).__name__}, which cannot be passed to a worker")
        return h

    def _add(self, x) -> int:
        self.objects[len(self.objects)] = x
        return len(self.objects) - 1

    def apply(self, state) -> None:
        """Copy the worker's state of each handle into the harness's object, checking every field."""
        from grader.probes import Call, CountingClock, CountingModel, RecordingModel

        if not self.objects:
            return
        torch = sys.modules.get("torch")
        seqs: set[int] = set()
        try:
            for key, obj in self.objects.items():
                s = state[str(key)]
                if isinstance(obj, CountingModel):
                    calls = [Call(_int(c[0]), _int(c[1]), bool(c[2]), float(c[3]),
                                  [[_int(p) for p in row] for row in c[4]]) for c in s["calls"]]
                    # the worker's probe starts empty each call: what it saw comes after what this one holds
                    if isinstance(obj, RecordingModel):
                        obj.forwards = obj.forwards + _forwards(obj, calls, s["forwards"], seqs)
                    obj.calls = obj.calls + calls
                elif isinstance(obj, CountingClock):
                    obj.steps, obj.clock.t = _int(s["steps"]), float(s["t"])
                    marks = [_int(m) for m in s.get("marks", [])]
                    if len(marks) != obj.steps or any(b <= a for a, b in zip(marks, marks[1:])):
                        raise ValueError(f"{len(marks)} step marks for {obj.steps} steps, or not increasing")
                    obj.marks = marks
                elif torch is not None and isinstance(obj, torch.Generator):
                    _set_generator(obj, s["generator"])
                elif hasattr(obj, "t"):
                    obj.t = float(s["t"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            raise self.worker._garbled(f"the state of the grader's probes and clocks is malformed: {err!r}") \
                from None


def _forwards(probe, calls: list, data: list, seqs: set[int]) -> list:
    """A RecordingModel's forwards as the worker sent them, each checked against its Call: one per call, the
    ids of the call's shape, logits (if kept) float16 of [batch, tokens, vocab], numbers unique in the call."""
    from grader.codec import _decode_tensor
    from grader.probes import Forward

    if not isinstance(data, list) or len(data) != len(calls):
        raise ValueError(f"{len(data) if isinstance(data, list) else data!r} forwards recorded for {len(calls)} calls")
    vocab = getattr(getattr(probe, "config", None), "vocab_size", None)
    out = []
    for call, f in zip(calls, data):
        seq, ids, logits = f
        seq = _int(seq)
        if seq in seqs:
            raise ValueError(f"forward number {seq} recorded twice")
        seqs.add(seq)
        ids = [[_int(t) for t in row] for row in ids]
        if len(ids) != call.batch or any(len(row) != call.tokens for row in ids):
            raise ValueError(f"input ids of a forward do not have the shape {call.batch} x {call.tokens} of its call")
        if probe.logits:
            t = _decode_tensor(logits["$tensor"])
            want = (call.batch, call.tokens, vocab if isinstance(vocab, int) else t.shape[-1])
            if str(t.dtype) != "torch.float16" or tuple(t.shape) != want:
                raise ValueError(f"logits of {t.dtype} {tuple(t.shape)}; expected float16 {want}")
            logits = t
        elif logits is not None:
            raise ValueError("logits recorded by a probe that keeps none")
        out.append(Forward(seq, ids, logits))
    return out


def _set_generator(gen, data) -> None:
    """The worker's generator state after the call into the harness's generator (same size, bytes)."""
    from grader.codec import _decode_tensor

    t = _decode_tensor(data["$tensor"]).cpu()
    before = gen.get_state()
    if t.dtype != before.dtype or t.shape != before.shape:
        raise ValueError(f"a generator state of {t.dtype} {tuple(t.shape)}; expected {before.dtype} "
                         f"{tuple(before.shape)}")
    gen.set_state(t)  # raises RuntimeError for a state that is not one


def _int(x) -> int:
    if not isinstance(x, int) or isinstance(x, bool):
        raise TypeError(f"{x!r} is not an int")
    return x


def model_handle(model) -> dict:
    """What the worker needs to load ``model`` too: the name, device and (where one was named) dtype it was
    loaded under through ``Context.model``."""
    key = _model_key(model)  # ("model", name, device[, dtype])
    return {"$model": key[1], **({"dtype": key[3]} if len(key) > 3 else {}), "device": key[2]}


def _model_key(model) -> tuple:
    from grader.spec import _CACHE

    for key, value in _CACHE.items():
        if value is model and key[0] == "model":
            return key
    raise CodecError("a model the grader did not load through Context.model() cannot be passed to a worker")


# ----------------------------------------------------------------------------- exceptions
def remote_exception(d: dict) -> Exception:
    """An exception raised by the learner's code in the worker, rebuilt as a class with the same name whose
    nearest built-in base is the original's (so `except ValueError` still catches a ValueError subclass).
    Its ``remote_frames`` say where it was raised (``grader.spec._where`` reads them)."""
    name = str(d.get("type", "Exception"))[:100]
    message = str(d.get("message", ""))[:20_000]
    base = getattr(builtins, str(d.get("base", "")), None)
    if not (isinstance(base, type) and issubclass(base, Exception)):
        base = Exception
    cls = type(name, (base,), {"__str__": lambda self: message, "__init__": Exception.__init__,
                               "__module__": "builtins" if name == base.__name__ else "learner"})
    err = cls(message)
    frames = []
    for f in d.get("frames", [])[-50:]:
        with contextlib.suppress(TypeError, ValueError, IndexError):
            frames.append(traceback.FrameSummary(str(f[0]), int(f[1]), str(f[2]), lookup_line=False,
                                                 line=str(f[3] or "")))
    err.remote_frames = frames
    return err
