"""Limits and isolation of a worker: the process that runs one criterion, and with it the learner's code.

Parent side (``grader.runner``): ``Limits`` (what to enforce, from options or ``$SERVELAB_GRADER_*``),
``worker_env`` and ``CappedOutput`` (the worker's stdout and stderr, kept up to a cap in memory).
Worker side (``grader.worker``): ``isolate``, called first thing, while the worker has a single thread:

- Linux: a new user, network, mount and PID namespace (``unshare``, no privileges needed where the kernel
  allows unprivileged user namespaces). In the PID namespace the learner's code runs as its PID 1 (the worker
  forks once, ``grader.worker``): it cannot signal the grader or anything else outside. The network namespace has only a loopback interface: nothing outside the
  machine can be reached. Every mount is made read-only except the worker's own folder (its cwd, ``HOME``
  and ``TMPDIR``) and ``/dev/shm``; then the worker drops every capability, so learner code can neither
  remount nor create a user namespace of its own (its uid is not mapped in the new namespace). This holds
  for a grader running as root too: root's override of file permissions does not reach into files of the
  outer namespace.
- Elsewhere (macOS), or where ``unshare`` is refused (containers that forbid user namespaces), the worker
  runs without them and says so in the report's ``environment.sandbox``; the rlimits still apply (macOS
  does not enforce ``RLIMIT_AS``).
- rlimits: address space (``RLIMIT_AS``; skipped on CUDA, whose driver reserves far more virtual memory than
  it uses), CPU seconds (``RLIMIT_CPU``: catches a process that escaped the process-group kill), file size
  (``RLIMIT_FSIZE``), no core dumps.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MiB, GiB = 1 << 20, 1 << 30
MEMORY_ENV = "SERVELAB_GRADER_MEMORY"  # e.g. "6G", "512M", "none"
OUTPUT_ENV = "SERVELAB_GRADER_OUTPUT"  # e.g. "2M"
ISOLATE_ENV = "SERVELAB_GRADER_ISOLATE"  # "0": no namespaces (to debug a worker)
# what an allocation refused by RLIMIT_AS looks like once reported (Python, numpy, torch, C++)
MEMORY_SIGNS = ("MemoryError", "can't allocate memory", "Unable to allocate", "std::bad_alloc")
CUDA_NO_MEMORY_LIMIT = (
    "not limited: the run uses CUDA, whose driver reserves far more address space than it uses "
    "(RLIMIT_AS would break it)"
)


def parse_size(text: str) -> int | None:
    """'6G', '6GiB', '512M', '2000000' -> bytes; 'none', 'off', '0' -> None (no limit)."""
    t = text.strip().lower()
    if t in ("", "none", "off", "0", "unlimited"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", t)
    if not m:
        raise ValueError(f"not a size: {text!r} (write e.g. 6G, 512M or none)")
    return int(float(m[1]) * 1024 ** " kmgt".index(m[2] or " "))


def human(n: float) -> str:
    """6442450944 -> '6 GiB', 2097152 -> '2 MiB', 1536 -> '1.5 KiB'."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{int(n)} bytes"


@dataclass(frozen=True)
class Limits:
    """What each worker may use. ``from_env`` reads ``$SERVELAB_GRADER_MEMORY`` and ``$SERVELAB_GRADER_OUTPUT``."""

    memory_bytes: int | None = 6 * GiB  # RLIMIT_AS of the worker and each of its children; None: none
    output_bytes: int = 2 * MiB  # stdout + stderr kept (half head, half tail); the rest is counted, dropped
    file_bytes: int = 256 * MiB  # largest file the worker may write (in its own folder)
    cpu_seconds: float | None = None  # None: 2 x the criterion's time limit + 10 s
    isolate: bool = True  # Linux namespaces (network, read-only files) where the kernel allows them

    @classmethod
    def from_env(cls) -> Limits:
        from grader.spec import UsageError

        kw: dict = {}
        try:
            if MEMORY_ENV in os.environ:
                kw["memory_bytes"] = parse_size(os.environ[MEMORY_ENV])
            if OUTPUT_ENV in os.environ:
                kw["output_bytes"] = parse_size(os.environ[OUTPUT_ENV]) or cls.output_bytes
        except ValueError as err:
            raise UsageError(f"${MEMORY_ENV} / ${OUTPUT_ENV}: {err}") from None
        if os.environ.get(ISOLATE_ENV, "1") == "0":
            kw["isolate"] = False
        return cls(**kw)

    def cpu_for(self, timeout_s: float) -> int:
        """CPU seconds: above the wall-clock limit, which stops a worker first; this one stops a process that
        escaped the process-group kill, or many threads burning CPU."""
        return math.ceil(self.cpu_seconds if self.cpu_seconds is not None else 2 * timeout_s + 10)

    def memory_for(self, device: str) -> int | None:
        return None if device == "cuda" else self.memory_bytes

    def describe(self, device: str) -> dict[str, str]:
        """The limits as the report's ``environment.sandbox`` states them."""
        mem = self.memory_for(device)
        return {
            "memory": (
                f"{human(mem)} of address space per process (RLIMIT_AS)"
                if mem
                else CUDA_NO_MEMORY_LIMIT
                if device == "cuda" and self.memory_bytes
                else "not limited"
            ),
            "cpu": (
                f"{self.cpu_for(0)} s per process (RLIMIT_CPU)"
                if self.cpu_seconds is not None
                else "2 x the criterion's time limit + 10 s per process (RLIMIT_CPU)"
            ),
            "output": f"{human(self.output_bytes)} of stdout and stderr kept per criterion (head and tail)",
            "files": f"{human(self.file_bytes)} per file (RLIMIT_FSIZE), in a fresh folder per criterion",
        }


def worker_env(base: dict[str, str], work: Path) -> dict[str, str]:
    """The worker's environment: ``HOME`` and ``TMPDIR`` in its own folder; caches the grader reads (Hugging
    Face models, packages installed with ``pip install --user``) still found where they are."""
    import site

    home = Path(base.get("HOME") or Path.home())
    xdg_cache = base.get("XDG_CACHE_HOME") or str(home / ".cache")
    env = dict(base)
    env.setdefault("HF_HOME", str(Path(xdg_cache) / "huggingface"))
    if site.ENABLE_USER_SITE and "PYTHONUSERBASE" not in env:
        env["PYTHONUSERBASE"] = site.getuserbase()
    env.setdefault("MALLOC_ARENA_MAX", "4")  # glibc reserves 64 MB of address space per arena (RLIMIT_AS)
    env.update(HOME=str(work), TMPDIR=str(work / "tmp"), PYTHONDONTWRITEBYTECODE="1")
    return env


class CappedOutput:
    """Drain a worker's stdout (stderr joined to it) in a thread, keeping at most ``cap`` bytes: the first
    half and the last half. A learner printing 50 MB costs the grader 2 MB of memory and no disk."""

    def __init__(self, stream: BinaryIO, cap: int):
        self.cap, self.total = cap, 0
        self._head = bytearray()
        self._tail: deque[bytes] = deque()
        self._tail_bytes = 0
        self._stream = stream
        self._thread = threading.Thread(target=self._pump, name="worker-output", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        fd, half = self._stream.fileno(), self.cap // 2
        while chunk := os.read(fd, 1 << 16):
            self.total += len(chunk)
            if len(self._head) < half:
                take = half - len(self._head)
                self._head += chunk[:take]
                chunk = chunk[take:]
            if chunk:
                self._tail.append(chunk)
                self._tail_bytes += len(chunk)
                while self._tail_bytes - len(self._tail[0]) >= self.cap - half:
                    self._tail_bytes -= len(self._tail.popleft())

    def join(self, timeout: float) -> None:
        """Wait for end of output (a stray child still holding the pipe is abandoned after ``timeout``)."""
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._stream.close()

    @property
    def dropped(self) -> int:
        return max(0, self.total - self.cap)

    def text(self) -> str:
        tail = b"".join(self._tail)
        if self.dropped:
            tail = tail[len(tail) - (self.cap - len(self._head)) :]
            gap = f"\n[... {human(self.dropped)} of output dropped ...]\n".encode()
            return (bytes(self._head) + gap + tail).decode("utf-8", "replace")
        return (bytes(self._head) + tail).decode("utf-8", "replace")

    def note(self) -> str:
        """'' or what the report says about output over the cap."""
        if not self.dropped:
            return ""
        return (
            f"output over {human(self.cap)}: truncated ({human(self.total)} printed, "
            f"{human(self.dropped)} dropped)"
        )


# ------------------------------------------------------------------------------------------ worker side
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x10000000, 0x40000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
WRITABLE_MOUNTS = ("/dev/shm",)  # POSIX shared memory (multiprocessing, vLLM): tmpfs, gone at reboot


def isolate(work: Path, limits: dict, hide: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Enter the worker's sandbox (call while the process has one thread: ``unshare`` needs that) and
    return what holds: ``{"network": ..., "filesystem": ...}``, each 'isolated: ...' or 'not isolated: why'.
    ``hide``: files and folders (this lab's answers) that the worker sees empty."""
    mode = limits.get("isolate", True)  # True: every namespace; "gpu": the ones CUDA survives; False: none
    if mode:
        state = _namespaces(str(work.resolve()), hide, gpu_safe=mode == "gpu", why=limits.get("why_not_isolated"))
    else:
        off = limits.get("why_not_isolated") or f"not isolated: turned off (${ISOLATE_ENV}=0)"
        state = {"network": off, "filesystem": off, "processes": off}
    set_rlimits(limits.get("memory"), limits.get("cpu"), limits.get("file"))
    return state


# what a worker on a GPU must be able to do: start CUDA, run a kernel, and find Triton's GPU driver
CUDA_CHECK = (
    "import torch\n"
    "torch.ones(8, device='cuda').add_(1).sum().item()\n"
    "try:\n    from triton.runtime import driver\nexcept ImportError:\n    driver = None\n"
    "if driver is not None:\n    driver.active.get_current_device()\n"
)


def cuda_refused_in_sandbox(check: str = CUDA_CHECK, gpu_safe: bool = False, timeout_s: float = 180) -> str | None:
    """None if ``check`` (by default: CUDA and Triton's GPU driver work) runs inside the worker's namespaces on
    this machine, else why not, in one line. ``gpu_safe``: the namespaces of ``isolate(mode="gpu")``. Runs in
    a throwaway process that enters them as a worker does."""
    import subprocess
    import tempfile

    code = ("import pathlib\nfrom grader.sandbox import _namespaces\n"
            f"_namespaces(str(pathlib.Path.cwd()), gpu_safe={gpu_safe})\n" + check)
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH")] if p))
    with tempfile.TemporaryDirectory(prefix="servelab-cuda-probe-") as work:
        try:
            proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"a CUDA probe in the namespaces ran past {timeout_s:.0f} s"
    if proc.returncode == 0:
        return None
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"a CUDA probe in the namespaces exited with {proc.returncode}"


@functools.cache
def cuda_isolation() -> tuple[bool | str, str | None]:
    """(the isolate mode for workers on this machine's GPU, why it is not the full one). Some GPU stacks refuse
    CUDA in some namespaces: one H200 under gVisor answered CUDA error 304 ("OS call failed or operation not
    supported on this OS") after a read-only remount or in a new PID namespace, and Triton found no driver,
    while user, network and mount namespaces were fine. So: every namespace where CUDA works in them; else
    those it survives ("gpu": network isolated, answers hidden, files writable, no PID namespace); else none.
    Asked once per grading process."""
    why = cuda_refused_in_sandbox()
    if why is None:
        return True, None
    if cuda_refused_in_sandbox(gpu_safe=True) is None:
        return "gpu", why
    return False, why


def not_isolated_on_cuda(why: str) -> str:
    return (f"not isolated: CUDA does not start inside the grader's namespaces on this machine ({why}); the "
            "worker runs without them, under the same rlimits; imports of the lab's answers are still refused, "
            "but their files are not hidden")


def set_rlimits(memory: int | None, cpu: int | None, file_bytes: int | None) -> None:
    import resource
    import signal

    def lower(res: int, soft: int, hard: int | None = None) -> None:
        _, cur_hard = resource.getrlimit(res)
        hard = soft if hard is None else hard
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(res, (soft, hard))

    lower(resource.RLIMIT_CORE, 0)
    if memory:
        lower(resource.RLIMIT_AS, memory)
    if cpu:
        lower(resource.RLIMIT_CPU, cpu, cpu + 5)  # SIGXCPU at the soft limit, SIGKILL 5 s later
    if file_bytes:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails (EFBIG) instead of killing
        lower(resource.RLIMIT_FSIZE, file_bytes)


def _namespaces(work: str, hide: list[str] | tuple[str, ...] = (), gpu_safe: bool = False,
                why: str | None = None) -> dict[str, str]:
    """Enter the namespaces. ``gpu_safe``: no PID namespace and no read-only remount, which break CUDA on some
    machines (``cuda_isolation``; ``why``: what the full sandbox got there)."""
    if not sys.platform.startswith("linux"):
        off = f"not isolated: {sys.platform} has no namespaces the grader can enter unprivileged"
        return {"network": off, "filesystem": off, "processes": off}
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    base = CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS
    processes = "isolated: its own PID namespace (the grader and other processes cannot be signalled)"
    if gpu_safe or libc.unshare(base | CLONE_NEWPID) != 0:  # some containers allow the others but not this one
        processes = (f"not isolated: no PID namespace, which CUDA does not survive on this machine ({why})"
                     if gpu_safe else f"not isolated: no PID namespace (unshare: {os.strerror(ctypes.get_errno())})")
        if libc.unshare(base) != 0:  # without a mount namespace of its own, nothing below may run
            err = ctypes.get_errno()
            off = (
                f"not isolated: this kernel refused a user namespace (unshare: {os.strerror(err)}); e.g. "
                "sysctl kernel.unprivileged_userns_clone=1 or a container that allows it"
            )
            return {"network": off, "filesystem": off, "processes": off}
    state = {"network": "isolated: a network namespace with only loopback", "processes": processes}
    try:
        _loopback_up()
    except OSError as err:
        state["network"] += f" (down: {err.strerror})"

    def mount(target: str, flags: int, source: str | None = None) -> None:
        src = source.encode() if source else None
        if libc.mount(src, target.encode(), None, flags, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), target)

    try:
        mount("/", MS_REC | MS_PRIVATE)  # nothing done here propagates to the grader's namespace
        mount(work, MS_BIND | MS_REC, source=work)  # its own mount: stays writable
        os.chdir(work)  # the cwd still pointed into the mount below, which becomes read-only
        hidden = _hide(hide, mount, work)
        if gpu_safe:
            state["filesystem"] = (f"not isolated: writable, since CUDA does not survive a read-only remount on this "
                                   f"machine ({why}); {hidden} of this lab's answer and grading files hidden")
        else:
            state["filesystem"] = _read_only(mount, work, hidden)
    except OSError as err:
        state["filesystem"] = f"not isolated: could not remount {err.filename} read-only ({err.strerror})"
    if not _drop_capabilities(libc):
        state["filesystem"] = "not isolated: could not drop the namespace's capabilities (capset refused)"
    return state


def _read_only(mount, work: str, hidden: int) -> str:
    """Remount everything read-only but the worker's folder and /dev/shm; what holds, as the report says it."""
    failed = []
    for target, options in _mounts():
        if target == work or any(target == w or target.startswith(w + "/") for w in WRITABLE_MOUNTS):
            continue
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        flags |= sum(MOUNT_FLAGS.get(o, 0) for o in set(options.split(",")))  # keep what is locked
        try:
            mount(target, flags)
        except OSError as err:
            if target == "/":
                raise
            failed.append(f"{target} ({err.strerror})")
    state = "isolated: read-only except the worker's folder and /dev/shm"
    if hidden:
        state += f"; {hidden} of this lab's answer and grading files hidden"
    if failed:
        state += "; still writable: " + ", ".join(failed)
    return state


def _hide(paths, mount, work: str) -> int:
    """Mount /dev/null over each file and an empty folder over each folder of ``paths``: the learner's code
    reads nothing there, however it opens them. Returns how many were hidden."""
    empty = os.path.join(work, ".hidden")
    n = 0
    for path in paths:
        if os.path.isdir(path):
            os.makedirs(empty, exist_ok=True)
            mount(path, MS_BIND, source=empty)
        elif os.path.isfile(path):
            mount(path, MS_BIND, source="/dev/null")
        else:
            continue
        n += 1
    return n


def _mounts() -> list[tuple[str, str]]:
    """(mount point, per-mount options) of this namespace, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])  # \040 is a space
            out.append((target, fields[5]))
    return out


def _loopback_up() -> None:
    """Bring up `lo` in the new network namespace: localhost works (vLLM talks to itself), nothing else."""
    import fcntl
    import socket
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, siocgifflags, struct.pack("16sH14s", b"lo", 0, b""))[:18])[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b""))


def _drop_capabilities(libc) -> bool:
    """Give up every capability held in the new user namespace (no remounting, no new namespaces) and set
    no_new_privs (no setuid programs)."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    pr_set_no_new_privs, linux_capability_version_3 = 38, 0x20080522
    libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0)
    return libc.capset(ctypes.byref(Header(linux_capability_version_3, 0)), (Data * 2)()) == 0
