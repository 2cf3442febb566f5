"""Lab 04's process and transport layer: run_ranks (forked ranks, results, failures, deadlines) and the Link
between two ranks (headers, tensors, timeouts), on the CPU with gloo. The ranks' functions are closures
defined in the tests, as a learner's are defined in a notebook: fork runs them without pickling them."""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from servelab import device
from servelab.device import DeviceError
from servelab.disagg import HEADER_FIELDS, KIND_DONE, KIND_KV, PeerLost, TransferTimeout, run_ranks
from servelab.disagg import launch
from servelab.disagg import link as link_mod
from servelab.disagg.link import HEADER_BYTES

# device.cuda_available(), not torch.cuda.is_available(): that one would stop forked ranks from using the GPU
gpu = pytest.mark.skipif(not device.cuda_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def cpu_ranks(monkeypatch):
    """Ranks on the CPU, with gloo, on any machine (on a GPU machine the suite may have initialised CUDA in
    this process already, which only matters for ranks that use the GPU)."""
    monkeypatch.setenv(device.DEVICE_ENV, "cpu")


@pytest.fixture
def pids(tmp_path):
    """note(): called inside a rank, records its pid; reaped(): asserts no rank process is left."""
    folder = tmp_path / "pids"
    folder.mkdir()

    class Pids:
        @staticmethod
        def note() -> None:
            (folder / str(os.getpid())).touch()

        @staticmethod
        def reaped(expected: int = 2) -> None:
            found = [int(p.name) for p in folder.iterdir()]
            assert len(found) == expected, found
            for pid in found:
                assert not Path(f"/proc/{pid}").exists(), f"rank process {pid} is still there"
                with pytest.raises(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # already reaped by run_ranks
            assert multiprocessing.active_children() == []

    return Pids


def randn(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        return torch.randint(1, 2**62, shape, generator=g)
    return (torch.randn(shape, generator=g) + 3).to(dtype)  # never zeros


def payloads() -> list[list[torch.Tensor]]:
    """Two messages: small and odd-sized tensors, a non-contiguous slice, then a 4 MB one."""
    slice_ = randn(64, 48, seed=3)[:, ::3]
    assert not slice_.is_contiguous()
    first = [randn(17, seed=1), randn(3, 5, seed=2, dtype=torch.int64), slice_, randn(100, seed=4,
                                                                                    dtype=torch.bfloat16)]
    return [first, [randn(1 << 20, seed=5)]]


def test_headers_and_tensors_arrive_bitwise_equal_and_in_order(pids):
    messages = payloads()

    def prefill(ctx):
        pids.note()
        go = ctx.link.wait_header(timeout_s=10)  # the decode rank has polled once before this
        for i, tensors in enumerate(messages):
            ctx.link.send_header(kind=KIND_KV, request_id=100 + i, num_tokens=7 * i, num_blocks=len(tensors))
            handles = [ctx.link.isend(t) for t in tensors]
            for h in handles:
                h.wait()
        ctx.link.send_header(kind=KIND_DONE, request_id=-1)
        return go, ctx.link.bytes_sent, ctx.link.bytes_received

    def decode(ctx):
        pids.note()
        before = ctx.link.poll_header()  # nothing sent yet: the prefill rank waits for "go"
        ctx.link.send_header(kind=KIND_DONE, request_id=42, t_first_us=2**40)
        headers, received = [], []
        while True:
            header = None
            while header is None and time.monotonic() < ctx.deadline:
                header = ctx.link.poll_header()
            headers.append(header)
            if header["kind"] == KIND_DONE:
                break
            shapes = [t.shape for t in messages[len(received)]]
            dtypes = [t.dtype for t in messages[len(received)]]
            got = [torch.empty(s, dtype=d) for s, d in zip(shapes, dtypes)]
            got[0] = torch.empty(2, *shapes[0])[1]  # receive into a view: contiguous, not at offset 0
            if len(got) > 2:
                got[2] = torch.empty(shapes[2][1], shapes[2][0]).t()  # and into a non-contiguous one
            for t in got[:header["num_blocks"]]:
                ctx.link.recv_into(t, timeout_s=10)
            received.append(got)
        return before, headers, received, ctx.link.bytes_sent, ctx.link.bytes_received

    r0, r1 = run_ranks([prefill, decode], names=["prefill", "decode"], timeout_s=60)
    assert r0.ok and r1.ok, (r0.error, r1.error)
    go, sent0, received0 = r0.value
    before, headers, received, sent1, received1 = r1.value
    assert before is None
    assert go == dict.fromkeys(HEADER_FIELDS, 0) | {"kind": KIND_DONE, "request_id": 42, "t_first_us": 2**40}
    assert [h["request_id"] for h in headers] == [100, 101, -1]
    assert [h["num_blocks"] for h in headers] == [4, 1, 0] and headers[1]["num_tokens"] == 7
    for want, got in zip(messages, received):
        for a, b in zip(want, got):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))  # bitwise
    payload = sum(t.numel() * t.element_size() for tensors in messages for t in tensors)
    assert sent0 == received1 == payload + 3 * HEADER_BYTES
    assert received0 == sent1 == HEADER_BYTES
    pids.reaped()


def test_one_rank_gets_no_link_and_its_threads(pids):
    def solo(ctx):
        pids.note()
        return ctx.rank, ctx.world_size, ctx.link, str(ctx.device), torch.get_num_threads(), ctx.deadline

    start = time.monotonic()
    [r] = run_ranks([solo], names=["colocated"], threads_per_rank=2, timeout_s=30)
    assert r.ok and r.name == "colocated" and r.exitcode == 0 and r.error == ""
    assert r.value[:5] == (0, 1, None, "cpu", 2)
    assert start + 29 < r.value[5] < start + 31
    pids.reaped(1)


def test_two_ranks_each_set_their_threads():
    out = run_ranks([lambda ctx: torch.get_num_threads()] * 2, threads_per_rank=1)
    assert [r.value for r in out] == [1, 1] and [r.name for r in out] == ["rank0", "rank1"]


def test_three_ranks_each_get_a_link_to_both_others():
    def rank(ctx):
        for peer, link in ctx.links.items():
            link.isend(torch.tensor([ctx.rank, peer]))  # a send completes only once its peer receives
        got = {}
        for peer, link in ctx.links.items():
            buf = torch.empty(2, dtype=torch.long)
            link.recv_into(buf)
            got[peer] = buf.tolist()
        return ctx.link, got

    out = run_ranks([rank] * 3, timeout_s=60)
    assert all(r.ok for r in out), [r.error for r in out]
    assert [r.value for r in out] == [(None, {p: [p, r] for p in range(3) if p != r}) for r in range(3)]


def test_bad_calls_are_refused_in_the_parent():
    with pytest.raises(ValueError, match="1 to 3 ranks"):
        run_ranks([lambda ctx: 0] * 4)
    with pytest.raises(ValueError, match="names"):
        run_ranks([lambda ctx: 0], names=["a", "b"])


def test_what_cannot_come_back_is_the_ranks_error():
    def bad(ctx):
        return lambda: 0

    [r] = run_ranks([bad], names=["solo"])
    assert not r.ok and "rank 0 (solo)" in r.error and "cannot be sent back" in r.error


def test_protocol_mistakes_are_explained():
    def decode(ctx):
        errors = []
        with pytest.raises(TypeError, match="unknown header field"):
            ctx.link.send_header(kind=0, block_ids=3)
        assert ctx.link.poll_header() is None  # a header receive is now posted ...
        try:
            ctx.link.recv_into(torch.empty(4))  # ... so a payload must not be received
        except RuntimeError as err:
            errors.append(str(err))
        return errors

    _, r1 = run_ranks([lambda ctx: None, decode], names=["prefill", "decode"], timeout_s=30)
    assert r1.ok, r1.error
    assert "Receive every payload of a message before polling" in r1.value[0]


@pytest.mark.parametrize("blocked_in", ["wait_header", "recv_into"])
def test_a_rank_that_raises_names_itself_and_its_peer_ends(pids, blocked_in):
    def prefill(ctx):
        pids.note()
        raise ValueError("block table has 3 entries for 4 blocks")

    def decode(ctx):
        pids.note()
        if blocked_in == "wait_header":
            ctx.link.wait_header()
        else:
            ctx.link.recv_into(torch.empty(8))

    start = time.monotonic()
    r0, r1 = run_ranks([prefill, decode], names=["prefill", "decode"], timeout_s=60)
    assert time.monotonic() - start < 5
    assert not r0.ok and r0.exitcode == 0
    assert r0.error.startswith("rank 0 (prefill) raised ValueError: block table has 3 entries for 4 blocks")
    assert "test_disagg_link.py" in r0.error and "in prefill" in r0.error  # the line that raised
    assert "Traceback" in r0.traceback
    assert not r1.ok and r1.error.startswith("rank 1 (decode)")  # its own PeerLost, or the parent's kill
    pids.reaped()


@pytest.mark.parametrize("death", ["exit", "sigkill"])
def test_a_rank_that_dies_mid_transfer(pids, death):
    """The dead rank is reported by exit code or signal; the survivor's receive fails at once (gloo sees the
    connection close) as a TransferTimeout, and what the survivor returns is kept."""
    def prefill(ctx):
        pids.note()
        ctx.link.send_header(kind=KIND_KV, request_id=1, num_blocks=2)
        ctx.link.send(randn(256, seed=6))
        if death == "exit":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGKILL)

    def decode(ctx):
        pids.note()
        header = ctx.link.wait_header(timeout_s=10)
        ctx.link.recv_into(torch.empty(256), timeout_s=10)
        start = time.monotonic()
        try:
            if death == "exit":
                ctx.link.recv_into(torch.empty(256), timeout_s=2)  # block 2 of 2 never comes
            else:
                ctx.link.wait_header(timeout_s=2)
        except TransferTimeout as err:
            return header["num_blocks"], type(err).__name__, str(err), time.monotonic() - start
        return "no error"

    start = time.monotonic()
    r0, r1 = run_ranks([prefill, decode], names=["prefill", "decode"], timeout_s=60)
    assert time.monotonic() - start < 6
    assert not r0.ok
    if death == "exit":
        assert r0.exitcode == 3 and r0.error == "rank 0 (prefill) exited with code 3 before returning a result"
    else:
        assert r0.exitcode == -9 and "rank 0 (prefill) was killed by signal 9 (SIGKILL)" in r0.error
    assert r1.ok, r1.error
    blocks, kind, message, waited = r1.value
    assert blocks == 2 and kind == PeerLost.__name__ and waited < 2.5
    assert "from rank 0" in message and "closed the connection" in message
    pids.reaped()


def test_a_receive_times_out_when_the_peer_sends_nothing():
    def quiet(ctx):
        ctx.link.wait_header(timeout_s=5)  # ends when the peer's timeout closes the connection

    def waiting(ctx):
        start = time.monotonic()
        with pytest.raises(TransferTimeout, match=r"receive of header from rank 0 did not complete within 0.5 s"):
            ctx.link.wait_header(timeout_s=0.5)
        return time.monotonic() - start

    r0, r1 = run_ranks([quiet, waiting], timeout_s=30)
    assert r1.ok, r1.error
    assert 0.45 < r1.value < 1.5
    assert not r0.ok and ("PeerLost" in r0.error or "TransferTimeout" in r0.error), r0.error


def test_a_hanging_rank_is_killed_at_the_deadline(pids):
    def hang(ctx):
        pids.note()
        time.sleep(1000)

    def gives_up(ctx):
        pids.note()
        try:
            ctx.link.wait_header(timeout_s=1)
        except TransferTimeout:
            return "gave up"

    start = time.monotonic()
    r0, r1 = run_ranks([hang, gives_up], names=["prefill", "decode"], timeout_s=3)
    elapsed = time.monotonic() - start
    assert 3 <= elapsed < 6
    assert not r0.ok and r0.exitcode == -9
    assert r0.error == "rank 0 (prefill) did not finish within 3 s and was killed"
    assert r1.ok and r1.value == "gave up"
    pids.reaped()


def test_a_rank_that_outlives_its_failed_peer_is_killed(pids):
    """A rank that is not waiting on the link (so gloo cannot tell it its peer is gone) is stopped GRACE_S
    after the peer failed, not at the run's deadline."""
    def prefill(ctx):
        pids.note()
        raise KeyError("request 7")

    def decode(ctx):
        pids.note()
        time.sleep(1000)

    start = time.monotonic()
    r0, r1 = run_ranks([prefill, decode], names=["prefill", "decode"], timeout_s=60)
    assert time.monotonic() - start < launch.GRACE_S + 2
    assert r0.error.startswith("rank 0 (prefill) raised KeyError: 'request 7'")
    assert r1.exitcode == -9
    assert r1.error.startswith(f"rank 1 (decode) was killed {launch.GRACE_S:g} s after rank 0 (prefill) failed")
    pids.reaped()


def test_an_interrupted_launch_leaves_no_rank_behind(pids):
    """The notebook's interrupt button raises KeyboardInterrupt in run_ranks: the ranks go with it."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    def sleeper(ctx):
        pids.note()
        time.sleep(1000)

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            run_ranks([sleeper, sleeper], timeout_s=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    pids.reaped()


def test_a_parent_that_initialised_cuda_is_refused(monkeypatch):
    """The CUDA probe is faked: forking after CUDA is initialised would break CUDA in the ranks."""
    monkeypatch.setattr(device, "cuda_initialized", lambda: True)
    assert run_ranks([lambda ctx: str(ctx.device)])[0].value == "cpu"  # CPU ranks never touch CUDA: fine
    monkeypatch.setattr(device, "get_device", lambda *a, **k: torch.device("cuda", 0))
    with pytest.raises(DeviceError, match="create models and GPU tensors inside the rank functions"):
        run_ranks([lambda ctx: 0])


def test_staging_decisions():
    """Where tensors travel and when they are staged, without a GPU: gloo sends host memory only."""
    cuda0, cuda1, cpu = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")
    assert link_mod.wire_device("gloo", cuda0) == cpu
    assert link_mod.wire_device("gloo", cpu) == cpu
    assert link_mod.wire_device("nccl", cuda1) == cuda1
    on_gpu = torch.empty(3, 4, device="meta")  # stands in for a tensor that is not on the wire device
    assert link_mod.needs_staging(on_gpu, cpu)
    staged = link_mod.recv_buffer(on_gpu, cpu)
    assert staged.device == cpu and staged.shape == (3, 4) and staged.is_contiguous()
    x = randn(6, 8, seed=7)
    assert not link_mod.needs_staging(x, cpu)
    assert link_mod.send_buffer(x, cpu) is x and link_mod.recv_buffer(x, cpu) is x
    view = x[:, 1::2]
    copy = link_mod.send_buffer(view, cpu)
    assert copy.is_contiguous() and torch.equal(copy, view) and copy.data_ptr() != x.data_ptr()


def test_rank_devices_and_backend(monkeypatch):
    """One GPU per rank when there are enough (NCCL), else both on one GPU with gloo; CPU ranks use gloo."""
    assert device.rank_devices(2) == [torch.device("cpu")] * 2
    assert device.ranks_backend(device.rank_devices(2)) == "gloo"
    monkeypatch.setattr(device, "get_device", lambda *a, **k: torch.device("cuda", 0))
    monkeypatch.setattr(device, "dist_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    shared = device.rank_devices(2)
    assert shared == [torch.device("cuda", 0)] * 2 and device.ranks_backend(shared) == "gloo"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    own = device.rank_devices(2)
    assert own == [torch.device("cuda", 0), torch.device("cuda", 1)] and device.ranks_backend(own) == "nccl"


def _gpu_roundtrip() -> None:
    """Run in a fresh process (the suite may have initialised CUDA in its own): a CUDA tensor from rank 0
    to rank 1 (gloo staged through host memory on one GPU; NCCL with two)."""
    def prefill(ctx):
        x = torch.randn(1 << 20, device=ctx.device) + 3
        ctx.link.send_header(kind=KIND_KV, num_blocks=1)
        ctx.link.send(x)
        ctx.link.send(x[::2])  # non-contiguous, on the GPU
        return x

    def decode(ctx):
        ctx.link.wait_header()
        y = torch.empty(1 << 20, device=ctx.device)
        z = torch.empty(1 << 19, device=ctx.device)
        ctx.link.recv_into(y)
        ctx.link.recv_into(z)
        return y, z, str(ctx.device), ctx.link.backend

    r0, r1 = run_ranks([prefill, decode], names=["prefill", "decode"], timeout_s=120)
    assert r0.ok and r1.ok, (r0.error, r1.error)
    y, z, dev, backend = r1.value
    assert dev.startswith("cuda") and y.device.type == "cpu"  # values come back on the host
    assert torch.equal(r0.value, y) and torch.equal(r0.value[::2], z)
    assert not torch.cuda.is_initialized(), "unpickling the results initialised CUDA in the parent"
    print("ok", backend)


@gpu
@pytest.mark.gpu
@pytest.mark.slow
def test_a_cuda_tensor_crosses_between_two_ranks():
    env = os.environ | {device.DEVICE_ENV: "cuda"}
    code = "import test_disagg_link as t; t._gpu_roundtrip()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


def test_irecv_into_returns_at_once_and_says_when_the_data_is_there():
    """The decode worker's receive: posted before the data is sent, polled without blocking, then finished."""
    data = randn(300, 64, seed=7)

    def sender(ctx):
        ctx.link.wait_header()  # the receiver has posted its receive: now send
        time.sleep(0.3)
        ctx.link.send(data)

    def receiver(ctx):
        buf = torch.empty_like(data)
        handle = ctx.link.irecv_into(buf)
        early = handle.is_completed()
        ctx.link.send_header(kind=KIND_KV)
        link_mod.wait_for(handle.is_completed, 10, "the payload")
        handle.wait()
        return early, buf

    results = run_ranks([sender, receiver], timeout_s=30)
    assert all(r.ok for r in results), [r.error for r in results]
    early, got = results[1].value
    assert early is False and torch.equal(got, data)


def test_wait_for_times_out_with_what_it_waited_for():
    with pytest.raises(TransferTimeout, match="the tail did not complete within 0.05 s"):
        link_mod.wait_for(lambda: False, 0.05, "the tail")
