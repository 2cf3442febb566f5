"""The pipe between the grader's harness and a learner worker: length-prefixed JSON messages.

The harness asks ("call `continuous_batching` with these requests"), the worker answers with data. Nothing
the worker sends is trusted: it is size-capped, parsed as JSON (never unpickled) and checked by the harness
like any other learner output. A learner who writes to the pipe can only send data the harness then rejects.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time

HEADER = struct.Struct(">Q")  # message length in bytes
MAX_MESSAGE = 256 * 1024 * 1024  # what the harness accepts from a worker in one message


class ChannelClosed(Exception):
    """The other end closed the pipe (the worker died or exited) before a whole message arrived."""


class ChannelTimeout(Exception):
    """No whole message arrived before the deadline."""


class ChannelError(Exception):
    """What arrived is not a message: too large, or not JSON."""


def send(fd: int, message: dict) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    view = memoryview(HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def recv(fd: int, deadline: float | None = None, cap: int = MAX_MESSAGE) -> dict:
    """The next message on ``fd``; ``deadline`` is a ``time.monotonic()`` value (None: wait forever)."""
    (size,) = HEADER.unpack(_read(fd, HEADER.size, deadline))
    if size > cap:
        raise ChannelError(f"a message of {size} bytes, over the {cap}-byte cap")
    try:
        message = json.loads(_read(fd, size, deadline))
    except (ValueError, RecursionError) as err:
        raise ChannelError(f"not a message: {type(err).__name__}: {err}") from None
    if not isinstance(message, dict):
        raise ChannelError(f"not a message: a JSON {type(message).__name__}")
    return message


def _read(fd: int, n: int, deadline: float | None) -> bytes:
    parts, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise ChannelTimeout()
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise ChannelClosed()
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)
