"""Lab 02's Triton kernels against their PyTorch references (on a CPU: Triton's interpreter, so small shapes).

Every decode test writes into a NaN-filled ``out=`` buffer, so an element the kernel forgets stays NaN and fails;
caches start random (never zeros), so a store to the wrong slot or a read of the wrong block changes the result.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from servelab.reference import paged as kernels  # the solution's kernels (labs/02's answer)
from servelab.reference.paged import paged_decode, paged_decode_split, store_kv
from servelab.paged.reference import paged_decode_reference, store_kv_reference

ROOT = Path(__file__).resolve().parents[1]
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: dict(atol=1e-5, rtol=1e-5), F16: dict(atol=2e-3, rtol=2e-3), BF16: dict(atol=2e-2, rtol=2e-2)}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def paged_problem(seq_lens, num_kv_heads, group, head_dim, block_size, dtype, seed=0, device="cpu"):
    """Random q and caches for one decode step. Each sequence's blocks are scattered over the cache in random
    order, the last sequence shares the first one's first block (a common prefix), and table entries past a
    sequence's blocks point at random other blocks (a kernel that reads them gets a wrong answer)."""
    g = torch.Generator().manual_seed(seed)
    need = [cdiv(n, block_size) for n in seq_lens]
    num_blocks = sum(need) + 3  # a few blocks no sequence uses
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(num_blocks, (len(seq_lens), max(need) + 1), generator=g, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = order[used:used + n]
        used += n
    tables[-1, 0] = tables[0, 0]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    q = (2 * torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=g)).to(dtype)  # peaky softmax
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    return [t.to(device) for t in (q, k_cache, v_cache, tables, seq_lens)]


def poisoned(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


@pytest.fixture(autouse=True)
def nan_scratch(monkeypatch):
    """Split-KV's partial-result buffers start as NaN too: stage 2 must read only the splits stage 1 wrote."""
    monkeypatch.setattr(kernels, "_scratch", lambda *shape, device: torch.full(shape, float("nan"), device=device))


def test_reference_matches_dense_softmax_attention():
    """Scatter dense K/V into blocks with store_kv_reference; paged_decode_reference must undo the paging."""
    B, T, Hkv, G, D, bs = 3, 37, 2, 2, 16, 8
    lens = torch.tensor([37, 1, 16], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, B, T, Hkv, D, generator=g)
    q = torch.randn(B, Hkv * G, D, generator=g)
    per_seq = cdiv(T, bs)
    tables = torch.randperm(B * per_seq, generator=g).view(B, per_seq).to(torch.int32)
    t = torch.arange(T)
    slots = (tables[:, t // bs] * bs + t % bs).long()  # [B, T]
    slots[t[None, :] >= lens[:, None].long()] = -1  # padding tokens are not stored
    k_cache, v_cache = torch.randn(2, B * per_seq, bs, Hkv, D, generator=g)
    store_kv_reference(k.flatten(0, 1), v.flatten(0, 1), k_cache, v_cache, slots.flatten())

    got = paged_decode_reference(q, k_cache, v_cache, tables, lens, D**-0.5)

    kk, vv = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)  # [B, T, Hq, D]
    scores = torch.einsum("bhd,bthd->bht", q, kk) * D**-0.5
    scores = scores.masked_fill(t[None, None, :] >= lens[:, None, None], float("-inf"))
    want = torch.einsum("bht,bthd->bhd", torch.softmax(scores, dim=-1), vv)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype, num_kv_heads, head_dim, block_size",
                         [(F32, 2, 80, 16), (F16, 1, 64, 8), (BF16, 3, 96, 32)])
def test_store_kv_writes_only_mapped_slots(dtype, num_kv_heads, head_dim, block_size):
    g = torch.Generator().manual_seed(2)
    num_blocks, N = 5, 9
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(k_cache.shape, generator=g).to(dtype)
    kv = torch.randn(N, 2 * num_kv_heads, head_dim, generator=g).to(dtype)
    k, v = kv[:, :num_kv_heads], kv[:, num_kv_heads:]  # views of a fused projection: strided, as in a model
    slots = torch.randperm(num_blocks * block_size, generator=g)[:N]
    slots[[0, 4, 8]] = -1
    want_k, want_v = k_cache.clone(), v_cache.clone()
    store_kv_reference(k, v, want_k, want_v, slots)
    store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)  # the whole cache: -1 slots untouched


# (dtype, KV heads, query heads per KV head, head size, block size): a covering set, not the cross product
DECODE_CASES = [
    (F32, 2, 1, 64, 16),
    (F16, 1, 2, 80, 8),
    (BF16, 2, 4, 64, 32),
    (F32, 1, 8, 96, 16),
    (F16, 2, 4, 96, 32),
    (BF16, 1, 8, 128, 8),
]


@pytest.mark.parametrize("dtype, num_kv_heads, group, head_dim, block_size", DECODE_CASES)
def test_paged_decode_matches_reference(dtype, num_kv_heads, group, head_dim, block_size):
    lens = [77, 1, block_size, 2 * block_size + 3, 96]  # ragged, a single token, exact multiples of the block
    q, k_cache, v_cache, tables, seq_lens = paged_problem(lens, num_kv_heads, group, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    want = paged_decode_reference(q, k_cache, v_cache, tables, seq_lens, scale)
    out = poisoned(q)
    assert paged_decode(q, k_cache, v_cache, tables, seq_lens, scale, out=out) is out
    torch.testing.assert_close(out, want, **TOL[dtype])
    out = poisoned(q)
    paged_decode_split(q, k_cache, v_cache, tables, seq_lens, scale, num_splits=3, out=out)
    torch.testing.assert_close(out, want, **TOL[dtype])


@pytest.mark.parametrize("num_splits", [2, 5, 7, 16, None])  # None: the default (1 on a CPU)
def test_split_kv_matches_reference(num_splits):
    """Splits end mid-tile and mid-block; 16 splits is more than any sequence has blocks (the rest stay empty)."""
    lens = [200, 1, 16, 35]
    q, k_cache, v_cache, tables, seq_lens = paged_problem(lens, 2, 2, 64, 16, F32, seed=3)
    want = paged_decode_reference(q, k_cache, v_cache, tables, seq_lens, 0.125)
    out = poisoned(q)
    assert paged_decode_split(q, k_cache, v_cache, tables, seq_lens, 0.125, num_splits=num_splits, out=out) is out
    torch.testing.assert_close(out, want, **TOL[F32])


def test_out_defaults_to_a_new_tensor():
    q, k_cache, v_cache, tables, seq_lens = paged_problem([5, 17], 1, 2, 64, 16, BF16, seed=4)
    want = paged_decode_reference(q, k_cache, v_cache, tables, seq_lens, 0.125)
    for fn in (paged_decode, paged_decode_split):
        out = fn(q, k_cache, v_cache, tables, seq_lens, 0.125)
        assert out.shape == q.shape and out.dtype == q.dtype
        torch.testing.assert_close(out, want, **TOL[BF16])


def test_bench_script_smoke(tmp_path, capsys):
    """scripts/bench_paged.py in its CPU mode: one tiny shape through the interpreter, checked, table and JSON."""
    spec = importlib.util.spec_from_file_location("bench_paged", ROOT / "scripts" / "bench_paged.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    assert "paged_decode_split" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"].split()[0] for r in rows} == {"paged_decode", "paged_decode_split", "sdpa"}
    assert all(r["max_abs_err"] < 1e-4 for r in rows)


COMPILE_FOR_SM90 = """
import os
import servelab.device
servelab.device.wants_interpreter = lambda: False  # compile for a GPU this machine does not have
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from servelab.reference import paged as K

def build(fn, dtype, **consts):
    types = {"slot_mapping": "*i64", "block_tables": "*i32", "seq_lens": "*i32", "scale": "fp32",
             "Out_part": "*fp32", "Lse_part": "*fp32"}
    sig = {a: "constexpr" if a in consts else types.get(a, f"*{dtype}" if a[0].isupper() else "i32")
           for a in fn.arg_names}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32))

tiles = dict(BLOCK_N=K.BLOCK_N, BLOCK_G=16, BLOCK_D=128)
build(K._store_kv_kernel, "bf16", H=3, D=80, BLOCK_H=4, BLOCK_D=128, BLOCK_SIZE=8)
build(K._paged_decode_kernel, "bf16", G=4, D=128, BLOCK_SIZE=16, **tiles)
build(K._split_stage1_kernel, "fp16", G=8, D=96, BLOCK_SIZE=32, NUM_SPLITS=5, **tiles)
build(K._split_stage2_kernel, "bf16", D=96, BLOCK_N=K.BLOCK_N, BLOCK_D=128, NUM_SPLITS=5, BLOCK_S=8)
print("compiled")
"""


def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter skips what only the compiler checks (tl.dot's 16-wide minimum, types in loops): build
    the kernels for sm_90 here, ptxas included (Triton's Linux wheels ship it)."""
    if not (Path(importlib.util.find_spec("triton").origin).parent / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("this Triton has no NVIDIA backend")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], capture_output=True, text=True, timeout=300,
                         env=env, cwd=ROOT)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


@pytest.fixture(scope="module")
def realistic():
    """Llama-3-8B-like attention (32 query / 8 KV heads, head size 128), bf16, block 16, 64 sequences of up
    to 4096 tokens (about 1 GiB of cache), and the reference's answer."""
    g = torch.Generator().manual_seed(5)
    lens = torch.randint(1, 4097, (64,), generator=g)
    lens[:3] = torch.tensor([1, 4096, 16 * 100])
    problem = paged_problem(lens.tolist(), 8, 4, 128, 16, BF16, device="cuda")
    return problem, paged_decode_reference(*problem, 128**-0.5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_splits", [0, None, 8])  # 0: paged_decode; None: the default split count
def test_realistic_shape_on_gpu(realistic, num_splits):
    (q, k_cache, v_cache, tables, seq_lens), want = realistic
    out = poisoned(q)
    if num_splits == 0:
        paged_decode(q, k_cache, v_cache, tables, seq_lens, 128**-0.5, out=out)
    else:
        paged_decode_split(q, k_cache, v_cache, tables, seq_lens, 128**-0.5, num_splits=num_splits, out=out)
    torch.testing.assert_close(out, want, **TOL[BF16])
