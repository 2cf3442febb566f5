"""How a worker's result gets back to the grader: over a pipe, sealed with a key made for that one worker.

The parent makes a random key per worker and writes it to the worker's stdin (a pipe; never in argv, the
environment or a file). The worker reads it first thing, before any learner code runs, keeps only an HMAC
state derived from it, drops the key and points stdin at /dev/null. It sends its result down an inherited
pipe (close-on-exec, so programs the learner starts do not get it) as ``payload \\n hmac-sha256 \\n``; there
is no result file a learner could write. The parent accepts only data that is exactly one sealed payload:
anything else (a forgery, or bytes a learner wrote to the pipe before the real result) is reported as
`error: result not from the grader`.

What this does not prevent: learner code runs in the same process as the criterion, so it can still reach
the HMAC state in memory (``gc``, frames) or change the criterion's objects before they report. That needs
a separate harness process, the issue's planned "trusted harness"; the integrity rules
(``grader.integrity``) reject the obvious ways to try.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets

KEY_BYTES = 32
_MAC_HEX = 2 * hashlib.sha256().digest_size


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def read_key(fd: int = 0) -> bytearray:
    """The worker's key from ``fd`` (its stdin), which then reads /dev/null."""
    raw = bytearray()
    while len(raw) < 2 * KEY_BYTES and (chunk := os.read(fd, 2 * KEY_BYTES - len(raw))):
        raw += chunk
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, fd)
    os.close(null)
    key = bytearray.fromhex(raw.decode("ascii"))
    raw[:] = bytes(len(raw))
    if len(key) != KEY_BYTES:
        raise ValueError("the grader did not pass a result key on stdin")
    return key


class Sealer:
    """Seals payloads with the key it was made from; the key itself is zeroed at once."""

    def __init__(self, key: bytearray):
        self._mac = hmac.new(bytes(key), digestmod=hashlib.sha256)
        key[:] = bytes(len(key))

    def seal(self, payload: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(payload)
        return payload + b"\n" + mac.hexdigest().encode("ascii") + b"\n"


def unseal(data: bytes, key: bytes) -> dict | None:
    """The payload of ``data`` if it is exactly one payload sealed with ``key``, else None."""
    if len(data) < _MAC_HEX + 2 or data[-1:] != b"\n" or data[-_MAC_HEX - 2 : -_MAC_HEX - 1] != b"\n":
        return None
    payload, mac = data[: -_MAC_HEX - 2], data[-_MAC_HEX - 1 : -1]
    expected = hmac.new(key, payload, hashlib.sha256).hexdigest().encode("ascii")
    if not hmac.compare_digest(mac, expected):
        return None
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
