"""The engine thread: one step engine, fed from the server's event loop and feeding it back token by token.

HTTP handlers run on uvicorn's asyncio loop; the engine runs model forwards, which block. So the engine gets its
own thread: between steps it takes new requests and aborts from a thread-safe inbox (a request that arrives
while others run joins the running batch at the next step), and it hands each token to its request's
asyncio.Queue with ``loop.call_soon_threadsafe``. It also stamps every token with the server's clock, so the
server-measured TPOT can be set against what a client measures (the HTTP + SSE overhead).
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

from servelab.metrics import RequestTimeline, summarize
from servelab.serve.engines import EngineRequest, StepEngine, TokenEvent


@dataclass
class Stream:
    """One request in flight, as its HTTP handler sees it: events arrive on ``events``."""

    request: EngineRequest
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival_s: float  # server clock (time.perf_counter) when the handler submitted it
    token_times_s: list[float] = field(default_factory=list)
    done: bool = False  # its handler saw it end (last token or an error): nothing to abort


@dataclass
class EngineError:
    """Put on a stream's queue instead of a TokenEvent when the request cannot finish (engine error, shutdown)."""

    message: str
    finish_reason: str = "abort"


class ServerStats:
    """Server-side timelines of the requests finished since the last reset (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.timelines: list[RequestTimeline] = []
            self.aborted = self.failed = 0

    def finished(self, s: Stream) -> None:
        with self.lock:
            self.timelines.append(RequestTimeline(s.request.id, s.arrival_s, list(s.token_times_s),
                                                  prompt_len=s.request.prompt_len))

    def snapshot(self) -> dict:
        with self.lock:
            tl, aborted, failed = list(self.timelines), self.aborted, self.failed
        out = {"completed": len(tl), "aborted": aborted, "failed": failed, "summary": None}
        if tl:
            duration = max(t.finish_s for t in tl) - min(t.arrival_s for t in tl)
            out["summary"] = summarize(tl, duration_s=max(duration, 1e-9)).to_dict()
        return out


class EngineLoop:
    def __init__(self, engine: StepEngine, idle_wait_s: float = 0.05):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", Stream) | ("abort", id) | ("stop", None)
        self.streams: dict[int, Stream] = {}  # owned by the engine thread
        self.ids = itertools.count(1)
        self.stats = ServerStats()
        self.steps = 0
        self.max_running_seen = 0
        self.idle_wait_s = idle_wait_s
        self.error: str | None = None  # the last engine failure, for /health
        self.thread = threading.Thread(target=self._run, name="servelab-engine", daemon=True)

    def start(self) -> EngineLoop:
        self.thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def new_id(self) -> int:
        return next(self.ids)

    def submit(self, request: EngineRequest) -> Stream:
        """From the event loop: queue a request (already checked with ``engine.check``); returns its Stream."""
        stream = Stream(request, asyncio.Queue(), asyncio.get_running_loop(), time.perf_counter())
        self.inbox.put(("add", stream))
        return stream

    def abort(self, request_id: int) -> None:
        self.inbox.put(("abort", request_id))

    def cancel_all(self) -> None:
        """Cancel whatever is still in flight (each stream gets an EngineError) and end the thread; returns at once."""
        self.inbox.put(("stop", None))

    def stop(self, timeout_s: float = 10.0) -> None:
        self.cancel_all()
        if self.thread.is_alive():
            self.thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            block = not self.engine.has_work
            try:
                while True:  # everything that arrived during the last step, then step again
                    kind, item = self.inbox.get(timeout=self.idle_wait_s) if block else self.inbox.get_nowait()
                    block = False
                    if kind == "stop":
                        self._fail_all("server shutting down")
                        return
                    if kind == "add":
                        self._add(item)
                    else:
                        self._abort(item)
            except queue.Empty:
                pass
            if not self.engine.has_work:
                continue
            try:
                events = self.engine.step()
            except Exception as err:  # noqa: BLE001 an engine bug fails the requests in flight, not the server
                self.error = f"{type(err).__name__}: {err}"
                self._fail_all(f"engine error: {self.error}")
                continue
            now = time.perf_counter()
            self.steps += 1
            self.max_running_seen = max(self.max_running_seen, getattr(self.engine, "num_running", 0) +
                                        sum(e.finish_reason != "" for e in events))
            for event in events:
                self._deliver(event, now)

    def _add(self, stream: Stream) -> None:
        try:
            self.engine.add(stream.request)
        except Exception as err:  # noqa: BLE001 checked already, but a learner's engine may still refuse it
            self._send(stream, EngineError(f"{type(err).__name__}: {err}", "error"))
            return
        self.streams[stream.request.id] = stream

    def _abort(self, request_id: int) -> None:
        if self.streams.pop(request_id, None) is not None:
            self.engine.abort(request_id)
            with self.stats.lock:
                self.stats.aborted += 1

    def _deliver(self, event: TokenEvent, now: float) -> None:
        stream = self.streams.get(event.request_id)
        if stream is None:
            return  # aborted while its step ran
        stream.token_times_s.append(now)
        if event.finish_reason:
            del self.streams[event.request_id]
            self.stats.finished(stream)
        self._send(stream, event)

    def _fail_all(self, message: str) -> None:
        for rid, stream in list(self.streams.items()):
            self.engine.abort(rid)
            self._send(stream, EngineError(message))
        with self.stats.lock:
            self.stats.failed += len(self.streams)
        self.streams.clear()

    @staticmethod
    def _send(stream: Stream, item) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass
