"""Lab 04's launcher: run one function per rank, each in its own process, connected by a Link, and
collect what every rank returned, or why it did not.

Processes are forked, not spawned: the rank functions are written in a notebook (module ``__main__``, or
the grader's learner module), which a spawned process could not import to unpickle them; a forked child
simply has them. The price: a forked child cannot use CUDA once its parent has initialised it, so the
parent must not touch the GPU before launching (``run_ranks`` checks).

Nothing outlives ``run_ranks``: a rank still running at the deadline, or a few seconds after its peer
failed (it is likely blocked on a receive that will never complete), is killed, and every rank is reaped.
"""
from __future__ import annotations

import os
import pickle
import signal
import socket
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from servelab import device
from servelab.device import DeviceError
from servelab.disagg.link import Link

MAX_RANKS = 3  # 2 workers, or a tensor-parallel pair and its peer (lab 04's stretch)
GRACE_S = 3.0  # how long a rank may outlive a failed peer before it is killed
EXIT_S = 3.0  # how long a rank that has reported its result may take to exit
_QUIET = (Path(torch.__file__).parent, Path(__file__).parent)  # frames to skip when pointing at the error


@dataclass
class RankContext:
    rank: int  # 0 .. world_size-1
    world_size: int
    device: torch.device  # this rank's device (servelab.device.rank_devices)
    link: Link | None  # to the other rank when world_size == 2, else None
    deadline: float  # time.monotonic() by which the whole run must end
    links: dict[int, Link] = field(default_factory=dict)  # peer rank -> Link, to every other rank


@dataclass
class RankResult:
    rank: int
    name: str  # "prefill", "decode", "colocated", ... (given by the caller)
    ok: bool
    value: Any = None  # what the rank's function returned
    error: str = ""  # one paragraph: which rank, what happened
    exitcode: int | None = None
    seconds: float = 0.0  # from the rank's start to its result (or to its end, without one)
    traceback: str = ""  # the full traceback, when the rank raised


def run_ranks(fns: Sequence[Callable[[RankContext], Any]], names: Sequence[str] | None = None,
              timeout_s: float = 120, threads_per_rank: int = 1, last: int | None = None) -> list[RankResult]:
    """Run ``fns[r](ctx)`` in rank r's own forked process (1 to MAX_RANKS ranks) and return one RankResult
    per rank. Each rank gets a Link to every other (``ctx.links``; with two ranks also ``ctx.link``). Values
    must be picklable; tensors come back on the CPU. Never raises for a rank's failure: that is in its
    RankResult. ``last``: the rank that ends the run (the decode worker): once it has ended, the others get
    GRACE_S to end too, like after a failure."""
    world_size = len(fns)
    if not 1 <= world_size <= MAX_RANKS:
        raise ValueError(f"run_ranks runs 1 to {MAX_RANKS} ranks, got {world_size} functions")
    names = [f"rank{r}" for r in range(world_size)] if names is None else list(names)
    if len(names) != world_size:
        raise ValueError(f"{len(names)} names for {world_size} ranks")
    _check_fork_safe()
    mp = get_context("fork")
    start = time.monotonic()
    deadline = start + timeout_s
    ranks: list[_Rank] = []
    with tempfile.TemporaryDirectory(prefix="servelab-ranks-") as tmp:
        store = os.path.join(tmp, "store")  # rendezvous in a file: no port to pick, works without a network
        try:
            for r, (fn, name) in enumerate(zip(fns, names)):
                reader, writer = mp.Pipe(duplex=False)
                args = (r, world_size, fn, store, writer, deadline, threads_per_rank)
                proc = mp.Process(target=_rank_main, args=args, name=f"servelab-{name}")
                with warnings.catch_warnings():  # Python 3.12+ warns about forking a threaded process
                    warnings.simplefilter("ignore", DeprecationWarning)
                    proc.start()
                ranks.append(_Rank(r, name, proc, reader, start))
                writer.close()  # the child holds the only writer: its death reads as end of file here
            _supervise(ranks, deadline, timeout_s, last)
        finally:  # also on KeyboardInterrupt (a notebook's interrupt button)
            for rk in ranks:
                rk.kill("")
    return [rk.result() for rk in ranks]


def raise_not_implemented(results: list[RankResult]) -> None:
    """Re-raise a rank's NotImplementedError here: an exercise not written yet is not a transfer failure."""
    for res in results:
        if not res.ok and " raised NotImplementedError" in res.error:
            raise NotImplementedError(res.error)


def _check_fork_safe() -> None:
    # CPU ranks never touch CUDA, so they may be forked from a process that has
    if device.cuda_initialized() and device.get_device().type == "cuda":
        raise DeviceError(
            "run_ranks forks one process per rank, and a forked process cannot use CUDA once its parent has "
            "initialised it; this process already has (a model or tensor was put on the GPU, or something "
            "called torch.cuda.is_available() or asked for the GPU's name, before launching). Restart the "
            "kernel, and create models and GPU tensors inside the rank functions (on ctx.device), never in "
            "the notebook before run_ranks; use servelab.device.cuda_available() to ask whether there is a GPU."
        )


# ----------------------------------------------------------------------------- inside a rank
def _rank_main(rank: int, world_size: int, fn: Callable[[RankContext], Any], store: str, conn: Connection,
               deadline: float, threads: int) -> None:
    start = time.monotonic()
    ok, value, error, tb = False, None, "", ""
    try:
        torch.set_num_threads(threads)
        devices = device.rank_devices(world_size)
        dev = devices[rank]
        link, links = None, {}
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world_size > 1:
            # both ranks are on this machine: loopback always works, even in a namespace with no network
            os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = _loopback()
            dist.init_process_group(device.ranks_backend(devices), init_method=f"file://{store}", rank=rank,
                                    world_size=world_size, timeout=timedelta(seconds=max(deadline - start, 1.0)))
            links = {peer: Link(peer=peer, device=dev) for peer in range(world_size) if peer != rank}
            link = links[1 - rank] if world_size == 2 else None
        out = fn(RankContext(rank, world_size, dev, link, deadline, links))
        value = _dumps(out)  # before flush: a value that cannot be pickled is this rank's error
        ok = True
        for peer_link in links.values():
            peer_link.flush()  # what the rank sent must reach the peer before the process group goes
    except BaseException as err:  # SystemExit and KeyboardInterrupt too: the parent reports them
        ok, error, tb = False, _explain(err), traceback.format_exc()
        if value is not None:  # the function returned; only the flush failed. The value is kept.
            error = f"returned, but not everything it sent was received ({type(err).__name__}: {err})"
    try:
        conn.send_bytes(pickle.dumps((ok, value, error, tb, time.monotonic() - start)))
        conn.close()
    except OSError:
        pass  # the parent is gone: nobody to report to
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass  # the result is sent; the process ends next either way


def _dumps(value: Any) -> bytes:
    """Pickle a rank's value with tensors moved to the CPU: unpickling a CUDA tensor in the parent would
    initialise CUDA there, and the next run_ranks could not fork."""
    import io

    class HostPickler(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
                return obj.cpu().__reduce_ex__(pickle.HIGHEST_PROTOCOL)
            return NotImplemented

    buf = io.BytesIO()
    try:
        HostPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    except Exception as err:
        raise TypeError(f"the rank's return value cannot be sent back to the notebook: {err}") from err
    return buf.getvalue()


def _explain(err: BaseException) -> str:
    """'raised ValueError: boom (File "lab.py", line 12, in decode: x = ...)': the last frame in the rank's
    own code, not in torch or this package (the full traceback is in RankResult.traceback)."""
    frames = traceback.extract_tb(err.__traceback__)
    own = [f for f in frames if not any(Path(f.filename).is_relative_to(q) for q in _QUIET)]
    where = ""
    if own:
        f = own[-1]
        where = f' (File "{f.filename}", line {f.lineno}, in {f.name}' + (f": {f.line})" if f.line else ")")
    return f"raised {type(err).__name__}: {err}{where}"


def _loopback() -> str:
    names = {name for _, name in socket.if_nameindex()}
    return next((n for n in ("lo", "lo0") if n in names), "lo")


# ----------------------------------------------------------------------------- in the parent
@dataclass
class _Rank:
    rank: int
    name: str
    proc: BaseProcess
    conn: Connection
    start: float
    record: tuple | None = None  # (ok, pickled value, error, traceback, seconds) as the rank sent it
    reported_at: float | None = None
    ended_at: float | None = None
    stopped: str = ""  # why the parent killed it, when it did

    @property
    def label(self) -> str:
        return f"rank {self.rank} ({self.name})"

    @property
    def alive(self) -> bool:
        return self.ended_at is None

    @property
    def failed(self) -> bool:
        if self.record is not None:
            return not self.record[0]
        return not self.alive  # ended without a result

    def read(self) -> None:
        """Take the rank's result from the pipe, if it is there (a rank that died mid-write sent none)."""
        if self.conn.closed or self.record is not None:
            return
        try:
            if self.conn.poll():
                self.record = pickle.loads(self.conn.recv_bytes())
                self.reported_at = time.monotonic()
        except (EOFError, OSError, pickle.UnpicklingError):
            self.conn.close()

    def reap(self) -> None:
        self.proc.join()
        self.ended_at = time.monotonic()
        self.read()  # a result written just before the end is still in the pipe
        self.conn.close()

    def kill(self, why: str) -> None:
        if not self.alive:
            return
        if self.record is None and not self.stopped:
            self.stopped = why
        self.proc.kill()
        self.reap()

    def result(self) -> RankResult:
        exitcode = self.proc.exitcode
        if self.record is not None:
            ok, value, error, tb, seconds = self.record
            if value is not None:
                try:
                    value = pickle.loads(value)
                except Exception as err:
                    ok, value = False, None
                    error = f"returned a value that cannot be unpickled in the notebook: {err!r}"
            error = f"{self.label} {error}" if error else ""
            return RankResult(self.rank, self.name, ok, value, error, exitcode, seconds, tb)
        seconds = (self.ended_at or time.monotonic()) - self.start
        why = self.stopped or _death(exitcode)
        return RankResult(self.rank, self.name, False, None, f"{self.label} {why}", exitcode, seconds)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        sig = -exitcode
        try:
            name = f" ({signal.Signals(sig).name})"
        except ValueError:
            name = ""
        hint = (": gloo aborts a rank that receives a message larger than its tensor; check the shapes the "
                "header announces" if sig == signal.SIGABRT else "")
        return f"was killed by signal {sig}{name} before returning a result{hint}"
    return f"exited with code {exitcode} before returning a result"


def _supervise(ranks: list[_Rank], deadline: float, timeout_s: float, last: int | None = None) -> None:
    """Wait for every rank to end, killing those that run past the deadline, outlive a failed peer by
    GRACE_S, or linger EXIT_S after reporting."""
    grace_until = None
    while any(rk.alive for rk in ranks):
        now = time.monotonic()
        ended = last is not None and not ranks[last].alive
        if grace_until is None and (ended or any(rk.failed for rk in ranks)):
            grace_until = now + GRACE_S
        for rk in ranks:
            if not rk.alive:
                continue
            if now >= deadline:
                rk.kill(f"did not finish within {timeout_s:g} s and was killed")
            elif rk.reported_at is not None and now >= rk.reported_at + EXIT_S:
                rk.kill("")  # it has reported; only its exit hangs
            elif grace_until is not None and now >= grace_until and rk.record is None:
                peers = [o.label for o in ranks if o.failed and o is not rk]
                after = f"{', '.join(peers)} failed" if peers else f"{ranks[last].label} ended"
                rk.kill(f"was killed {GRACE_S:g} s after {after}, still running (probably waiting "
                        "for a message that will never come)")
        alive = [rk for rk in ranks if rk.alive]
        if not alive:
            break
        wakeups = [deadline] + [rk.reported_at + EXIT_S for rk in alive if rk.reported_at is not None]
        if grace_until is not None:
            wakeups.append(grace_until)
        waitables = [rk.proc.sentinel for rk in alive] + [rk.conn for rk in alive if not rk.conn.closed
                                                          and rk.record is None]
        ready = wait(waitables, timeout=max(min(wakeups) - time.monotonic(), 0.0) + 0.001)
        for rk in alive:
            if rk.conn in ready:
                rk.read()
            if rk.proc.sentinel in ready:
                rk.reap()
