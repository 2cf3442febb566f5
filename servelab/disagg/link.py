"""Lab 04's channel between two ranks: small int64 headers and payload tensors over torch.distributed.

A message is one header (``HEADER_FIELDS``) followed by the payload tensors it announces. Point-to-point
messages between two ranks arrive in the order they were sent, so payloads need no ids; but the receiver
must post a header receive only when the next message IS a header. NCCL ignores tags, so a header receive
posted early would swallow the next payload tensor. Hence ``poll_header`` keeps at most one header receive
posted, and ``recv_into`` refuses to run while one is outstanding. Gloo does match tags (headers and
payloads use distinct ones), so on gloo that check is what catches the mistake a GPU run would hit.

What gloo (torch 2.13) does, found by trying it:
- A point-to-point Work is marked complete only inside its ``wait()``: ``is_completed()`` stays False
  after the data has arrived, and ``get_future()`` is not implemented. So on gloo a background thread per
  link (``_Waiter``) waits on the asynchronous sends and header receives, in the order they were posted,
  and ``poll_header`` / ``Handle.is_completed`` read what it found.
- ``Work.wait(timeout=...)`` honours the timeout, and a wait whose peer process died fails at once
  ("Connection closed by peer"). But after a timed-out wait gloo closes the connection to the peer: every
  later transfer fails. ``recv_into`` waits that way (after its TransferTimeout the link is unusable: end
  the rank); a timed-out ``wait_header`` or ``Handle.wait`` only stops waiting, its transfer stays posted.
- Tags are matched: a receive posted for one tag is not completed by a message sent with another.
- A send completes only once the peer has posted the matching receive (a rendezvous, even for 16 bytes).
- A receive into a larger tensor than was sent succeeds and leaves the rest untouched; into a smaller one
  it aborts the receiving process (SIGABRT). The header is where the receiver learns the shapes.
"""
from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from servelab.device import pinned_memory_available

HEADER_FIELDS = ("kind", "request_id", "num_tokens", "max_new_tokens", "first_token", "num_blocks",
                 "t_first_us")  # int64 each
KIND_KV, KIND_DONE, KIND_ERROR = 0, 1, 2
HEADER_BYTES = len(HEADER_FIELDS) * 8

_HEADER_TAG, _PAYLOAD_TAG = 1, 2
_POLL_S = 0.0005  # between is_completed() checks where the backend's wait cannot time out


def wait_for(done: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``done()`` until it returns True; TransferTimeout after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TransferTimeout(f"{what} did not complete within {timeout_s:g} s")
        time.sleep(_POLL_S)


class TransferTimeout(RuntimeError):
    """A transfer that did not complete in time; the message says which one and how long it waited."""


class PeerLost(TransferTimeout):
    """The peer closed the connection (it crashed, was killed or exited) before the transfer completed."""


def wire_device(backend: str, device: torch.device) -> torch.device:
    """Where tensors travel between ranks whose tensors live on ``device``: NCCL moves GPU memory itself;
    gloo moves host memory only, so a CUDA tensor is staged through a host copy."""
    return torch.device("cpu") if backend == "gloo" else torch.device(device)


def needs_staging(tensor: torch.Tensor, wire: torch.device) -> bool:
    """True when the backend cannot use ``tensor`` as it is: it lives off the wire, or is not contiguous."""
    return tensor.device != wire or not tensor.is_contiguous()


def send_buffer(tensor: torch.Tensor, wire: torch.device) -> torch.Tensor:
    """What the backend sends for ``tensor``: the tensor itself, or a contiguous copy on the wire device."""
    if not needs_staging(tensor, wire):
        return tensor
    buf = _empty_on_wire(tensor, wire)
    buf.copy_(tensor)  # a blocking copy: the data is in ``buf`` before the send starts
    return buf


def recv_buffer(tensor: torch.Tensor, wire: torch.device) -> torch.Tensor:
    """Where the backend writes a message meant for ``tensor``: the tensor itself, or a buffer on the wire
    device that the caller copies into ``tensor`` once the receive completes."""
    return _empty_on_wire(tensor, wire) if needs_staging(tensor, wire) else tensor


def _empty_on_wire(tensor: torch.Tensor, wire: torch.device) -> torch.Tensor:
    # page-locked host memory: copies between it and the GPU run at full speed
    pin = wire.type == "cpu" and tensor.device.type == "cuda" and pinned_memory_available()
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=wire, pin_memory=pin)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _reason(err: BaseException) -> str:
    """The gist of a backend error: its first line, without gloo's source location and sign-off."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0]


def _describe(tensor: torch.Tensor) -> str:
    return f"tensor {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


@dataclass(eq=False)
class Handle:
    """A send or receive in flight. It keeps its tensors alive until the transfer completes."""

    link: Link
    work: Any  # the backend's torch.distributed Work
    what: str  # for error messages: "send of tensor (4, 8) float32 to rank 1"
    buffers: tuple[torch.Tensor, ...]
    on_done: Callable[[], None] | None = None  # e.g. copy a staged receive into its destination
    done: bool = False
    # gloo: completed by the link's waiter thread, which sets ``finished`` (and ``error`` if it failed)
    background: bool = False
    finished: threading.Event = field(default_factory=threading.Event, repr=False)
    error: BaseException | None = None

    def is_completed(self) -> bool:
        if self.done:
            return True
        return self.finished.is_set() if self.background else self.work.is_completed()

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the transfer completes; TransferTimeout after ``timeout_s`` (default: the link's)."""
        if self.done:
            return
        self.link._wait(self, timeout_s)
        self.done = True
        if self.on_done is not None:
            self.on_done()
        self.buffers = ()


class _Waiter:
    """A daemon thread that waits on gloo Works in the order they were posted (gloo marks a point-to-point
    Work complete only inside its wait), so the rank can ask whether they are done without blocking."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Handle] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="servelab-link-waiter", daemon=True).start()

    def submit(self, handle: Handle) -> None:
        handle.background = True
        self._queue.put(handle)

    def _run(self) -> None:
        while True:
            handle = self._queue.get()
            try:
                handle.work.wait()  # bounded by the process group's timeout (the end of the run)
            except BaseException as err:  # a dead peer, mostly: Handle.wait raises it in the rank's thread
                handle.error = err
            handle.finished.set()


class Link:
    """Point-to-point channel to rank ``peer`` over the default process group (see the module docstring)."""

    def __init__(self, peer: int, device: torch.device, timeout_s: float = 30):
        self.peer = peer
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.backend = str(dist.get_backend())
        self.wire = wire_device(self.backend, self.device)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._header: Handle | None = None  # the posted header receive, until its header is taken
        self._header_buf = torch.empty(len(HEADER_FIELDS), dtype=torch.int64)
        self._sends: list[Handle] = []  # sends not yet seen complete: flush() waits for them
        # gloo only: one thread for sends, one for header receives, so neither waits behind the other
        self._send_waiter = _Waiter() if self.backend == "gloo" else None
        self._header_waiter = _Waiter() if self.backend == "gloo" else None
        self._recv_waiter = _Waiter() if self.backend == "gloo" else None  # irecv_into's payloads

    # ------------------------------------------------------------------ headers
    def send_header(self, **fields: int) -> None:
        """Send one header (missing fields are 0). Returns at once: the header goes out when the peer posts
        its header receive, and the rank's end (``flush``) waits for it."""
        unknown = sorted(set(fields) - set(HEADER_FIELDS))
        if unknown:
            raise TypeError(f"unknown header field(s) {unknown}: a header has {', '.join(HEADER_FIELDS)}")
        header = torch.tensor([int(fields.get(f, 0)) for f in HEADER_FIELDS], dtype=torch.int64)
        self._isend(header, _HEADER_TAG, "header")

    def poll_header(self) -> dict[str, int] | None:
        """The next header if it has arrived, else None, without blocking. Call it only when the next
        message is a header: after every payload of the previous message has been received."""
        if self._header is None:
            self._header = self._irecv(self._header_buf, _HEADER_TAG, "header", self._header_waiter)
        if not self._header.is_completed():
            return None
        return self._take_header(None)

    def wait_header(self, timeout_s: float | None = None) -> dict[str, int]:
        """Block for the next header; TransferTimeout after ``timeout_s`` (default: the link's timeout)."""
        if self._header is None:
            self._header = self._irecv(self._header_buf, _HEADER_TAG, "header", self._header_waiter)
        return self._take_header(timeout_s)

    def _take_header(self, timeout_s: float | None) -> dict[str, int]:
        self._header.wait(timeout_s)  # at once when polled complete; raises if it failed
        self._header = None
        return dict(zip(HEADER_FIELDS, self._header_buf.tolist()))

    # ------------------------------------------------------------------ payloads
    def isend(self, tensor: torch.Tensor) -> Handle:
        """Start sending ``tensor``; ``handle.wait()`` blocks until the peer has received it."""
        return self._isend(tensor, _PAYLOAD_TAG, _describe(tensor))

    def send(self, tensor: torch.Tensor) -> None:
        self.isend(tensor).wait()

    def recv_into(self, tensor: torch.Tensor, timeout_s: float | None = None) -> None:
        """Receive the next payload into ``tensor`` (same shape and dtype as sent). Blocks;
        TransferTimeout after ``timeout_s`` (default: the link's timeout)."""
        self._no_header_posted("recv_into")
        self._irecv(tensor, _PAYLOAD_TAG, _describe(tensor)).wait(timeout_s)

    def irecv_into(self, tensor: torch.Tensor) -> Handle:
        """Start receiving the next payload into ``tensor`` and return at once: ``handle.is_completed()`` says
        (without blocking) whether it has arrived, ``handle.wait()`` finishes it (``tensor`` holds the data
        only then) or raises TransferTimeout / PeerLost. Post a message's receives in the order it was sent."""
        self._no_header_posted("irecv_into")
        return self._irecv(tensor, _PAYLOAD_TAG, _describe(tensor), self._recv_waiter)

    def _no_header_posted(self, what: str) -> None:
        if self._header is not None:
            raise RuntimeError(
                f"{what} called while a header receive is posted (poll_header returned None and the header "
                "has not been taken yet). Receive every payload of a message before polling for the next "
                "header: with NCCL the posted header receive would swallow this payload.")

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until the peer has received everything sent so far (run_ranks does this when a rank ends)."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while self._sends:
            self._sends[0].wait(max(deadline - time.monotonic(), 0.001))
            self._sends.pop(0)

    # ------------------------------------------------------------------ plumbing
    def _isend(self, tensor: torch.Tensor, tag: int, what: str) -> Handle:
        buf = send_buffer(tensor, self.wire)
        what = f"send of {what} to rank {self.peer}"
        work = self._post(dist.isend, buf, what, dst=self.peer, tag=tag)
        self.bytes_sent += _nbytes(buf)
        handle = Handle(self, work, what, (tensor, buf))
        if self._send_waiter is not None:
            self._send_waiter.submit(handle)
        self._sends = [h for h in self._sends if not h.is_completed()] + [handle]
        return handle

    def _irecv(self, tensor: torch.Tensor, tag: int, what: str, waiter: _Waiter | None = None) -> Handle:
        buf = recv_buffer(tensor, self.wire)

        def done() -> None:
            if buf is not tensor:
                tensor.copy_(buf)
            self.bytes_received += _nbytes(buf)

        what = f"receive of {what} from rank {self.peer}"
        work = self._post(dist.irecv, buf, what, src=self.peer, tag=tag)
        handle = Handle(self, work, what, (tensor, buf), done)
        if waiter is not None:
            waiter.submit(handle)
        return handle

    def _post(self, op: Callable[..., Any], buf: torch.Tensor, what: str, **kwargs: int) -> Any:
        try:  # fails at once when the peer is already gone
            return op(buf, **kwargs)
        except RuntimeError as err:
            raise self._failure(err, what, 0.0, self.timeout_s) from err

    def _wait(self, handle: Handle, timeout_s: float | None) -> None:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        try:
            if handle.background:  # the waiter thread waits; a timeout here leaves the transfer posted
                if not handle.finished.wait(timeout):
                    raise TransferTimeout(f"{handle.what} did not complete within {timeout:g} s")
                if handle.error is not None:
                    raise handle.error
            elif self.backend == "gloo":  # honours the timeout and notices a dead peer at once
                handle.work.wait(timeout=timedelta(seconds=max(timeout, 0.001)))
            else:  # NCCL's wait does not block the host: poll until the deadline
                while not handle.work.is_completed():
                    if time.monotonic() - start > timeout:
                        raise TransferTimeout(f"{handle.what} did not complete within {timeout:g} s")
                    time.sleep(_POLL_S)
                handle.work.wait()
        except TransferTimeout:
            raise
        except RuntimeError as err:
            raise self._failure(err, handle.what, time.monotonic() - start, timeout) from err

    def _failure(self, err: RuntimeError, what: str, waited: float, timeout: float) -> RuntimeError:
        """The backend's error as TransferTimeout or PeerLost when it is one of those."""
        reason = _reason(err)
        if "timed out" in reason.lower():
            return TransferTimeout(f"{what} did not complete within {timeout:g} s ({self.backend}: {reason})")
        if "closed" in reason.lower() or "reset" in reason.lower():
            return PeerLost(f"{what} failed after {waited:.1f} s: rank {self.peer} closed the connection "
                            f"(it crashed, was killed or exited). {self.backend}: {reason}")
        return err
