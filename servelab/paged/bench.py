"""Timing lab 02's decode kernels on a GPU: problems of a given shape, the card's copy bandwidth, a
timer, and one shape's table (used by ``scripts/bench_paged.py`` and the lab notebook's GPU experiment)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from servelab.device import import_triton
from servelab.paged.reference import paged_decode_reference


def _sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def make_problem(batch, context, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=0):
    """Random q and caches; each sequence's blocks scattered over the cache in random order."""
    g = torch.Generator(device=device).manual_seed(seed)
    blocks = batch * -(-context // block_size)
    shape = (blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g, device=device).to(dtype)
    v_cache = torch.randn(shape, generator=g, device=device).to(dtype)
    q = torch.randn(batch, num_q_heads, head_dim, generator=g, device=device).to(dtype)
    block_tables = torch.randperm(blocks, generator=g, device=device).view(batch, -1).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, block_tables, seq_lens


def sdpa_inputs(q, k_cache, v_cache, block_tables, context):
    """Gather K/V into contiguous [B, Hkv, context, D] (all sequences have the same length here)."""
    B, Hq, D = q.shape
    k = k_cache[block_tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    v = v_cache[block_tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    return q[:, :, None], k, v  # q [B, Hq, 1, D]


def timer(device):
    """ms per call: import_triton().testing.do_bench on a GPU; one wall-clock call on a CPU (the interpreter is slow)."""
    if device.type == "cuda":
        return lambda fn: import_triton().testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    def once(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return once


def copy_bandwidth(device) -> float | None:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), the practical ceiling for a memory-bound kernel."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(device)(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def bench_shape(batch, context, dtype, device, heads, copy_bw, decode, decode_split, splits=None) -> list[dict]:
    """Time ``decode`` and ``decode_split`` (paged_decode's signature) and SDPA over gathered K/V on one shape;
    check each against SDPA. Rows: time, GB/s of K/V + q read, share of ``copy_bw``, max error."""
    q, k_cache, v_cache, block_tables, seq_lens = make_problem(batch, context, **heads, dtype=dtype, device=device)
    scale = heads["head_dim"] ** -0.5
    bytes_read = 2 * batch * context * heads["num_kv_heads"] * heads["head_dim"] * k_cache.element_size()
    bytes_read += q.numel() * q.element_size()
    sq, sk, sv = sdpa_inputs(q, k_cache, v_cache, block_tables, context)
    expected = F.scaled_dot_product_attention(sq, sk, sv, scale=scale, enable_gqa=True)[:, :, 0]
    if device.type == "cpu":  # the tiny smoke shape: also against the paged reference
        torch.testing.assert_close(expected, paged_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale))
    splits = splits or max(1, min(32, -(-2 * _sms(device) // (batch * heads["num_kv_heads"]))))
    out = torch.empty_like(q)
    methods = {
        "paged_decode": lambda: decode(q, k_cache, v_cache, block_tables, seq_lens, scale, out=out),
        f"paged_decode_split ({splits})": lambda: decode_split(q, k_cache, v_cache, block_tables, seq_lens,
                                                                     scale, num_splits=splits, out=out),
        "sdpa (gathered)": lambda: F.scaled_dot_product_attention(sq, sk, sv, scale=scale, enable_gqa=True),
    }
    rows, time_ms = [], timer(device)
    for name, fn in methods.items():
        got = fn()
        got = got[:, :, 0] if got.dim() == 4 else got
        ms = time_ms(fn)
        rows.append({
            "batch": batch, "context": context, "method": name, "us": round(ms * 1e3, 1),
            "GB_per_s": round(bytes_read / (ms * 1e-3) / 1e9, 1),
            "of_copy": round(bytes_read / (ms * 1e-3) / copy_bw, 3) if copy_bw else None,
            "max_abs_err": float((got.float() - expected.float()).abs().max()),
        })
    return rows


@dataclass
class Problem:
    """A decode-attention problem built from a recipe: the same tensors wherever it is built (seeded)."""

    q: torch.Tensor  # [repeat, B, Hq, D]: a fresh query for every timed call
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32, blocks scattered in random order
    seq_lens: torch.Tensor  # [B] int32
    scale: float
    repeat: int

    def args(self, i: int) -> tuple:
        return self.q[i], self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.scale

    @property
    def bytes_per_call(self) -> int:
        """K/V of every sequence's tokens, plus the query: what a decode kernel must read at least."""
        kv = 2 * int(self.seq_lens.sum()) * self.k_cache.shape[2] * self.k_cache.shape[3]
        return (kv + self.q[0].numel()) * self.k_cache.element_size()


def build_problem(recipe: dict, device) -> Problem:
    """``recipe``: batch, context, num_q_heads, num_kv_heads, head_dim, block_size, dtype (name), seed, repeat."""
    r, device = dict(recipe), torch.device(device)
    dtype = getattr(torch, r["dtype"])
    q, k_cache, v_cache, tables, lens = make_problem(r["batch"], r["context"], r["num_q_heads"], r["num_kv_heads"],
                                                     r["head_dim"], r["block_size"], dtype, device, seed=r["seed"])
    g = torch.Generator(device=device).manual_seed(r["seed"] + 1)
    qs = torch.randn(r["repeat"], *q.shape, generator=g, device=device).to(dtype)
    return Problem(qs, k_cache, v_cache, tables, lens, r["head_dim"] ** -0.5, r["repeat"])
