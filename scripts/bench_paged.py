"""Time lab 02's PagedAttention decode kernels against PyTorch SDPA, as a fraction of the GPU's copy bandwidth.

    python scripts/bench_paged.py                  # CUDA: batch x context 64 x 4096, 8 x 8192, 1 x 32768
    python scripts/bench_paged.py --json r.json    # the same figures also as JSON (--json alone: stdout)
    python scripts/bench_paged.py --smoke          # one tiny shape (on a CPU: through the Triton interpreter)

Decode reads every cached K/V byte once per token, so a good kernel runs near memory bandwidth: each row shows
bytes read (K/V + q) / time, and that as a fraction of a measured device-to-device copy (read + write bytes / time).
The SDPA baseline gets K/V already gathered into contiguous tensors (the gather is not timed).
Shapes: bf16, 32 query / 8 KV heads, head size 128, block size 16. Without a CUDA GPU only --smoke runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from servelab.device import describe  # importing servelab first picks Triton's interpreter on a CPU
from servelab.paged.kernels import default_num_splits, paged_decode, paged_decode_split, triton
from servelab.paged.reference import paged_decode_reference

GPU_SHAPES = [(64, 4096), (8, 8192), (1, 32768)]  # (batch, context tokens per sequence)
HEADS = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16)
SMOKE = dict(batch=2, context=40, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16)


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
    """ms per call: triton.testing.do_bench on a GPU; one wall-clock call on a CPU (the interpreter is slow)."""
    if device.type == "cuda":
        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

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


def bench_shape(batch, context, dtype, device, heads, copy_bw, splits=None) -> list[dict]:
    q, k_cache, v_cache, block_tables, seq_lens = make_problem(batch, context, **heads, dtype=dtype, device=device)
    scale = heads["head_dim"] ** -0.5
    bytes_read = 2 * batch * context * heads["num_kv_heads"] * heads["head_dim"] * k_cache.element_size()
    bytes_read += q.numel() * q.element_size()
    sq, sk, sv = sdpa_inputs(q, k_cache, v_cache, block_tables, context)
    expected = F.scaled_dot_product_attention(sq, sk, sv, scale=scale, enable_gqa=True)[:, :, 0]
    if device.type == "cpu":  # the tiny smoke shape: also against the paged reference
        torch.testing.assert_close(expected, paged_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale))
    splits = splits or default_num_splits(batch, heads["num_kv_heads"], block_tables.shape[1] * heads["block_size"],
                                          device)
    out = torch.empty_like(q)
    methods = {
        "paged_decode": lambda: paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, out=out),
        f"paged_decode_split ({splits})": lambda: paged_decode_split(q, k_cache, v_cache, block_tables, seq_lens,
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one tiny shape (the Triton interpreter on a CPU)")
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE", help="also write the results as JSON ('-': stdout)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA GPU here: running the --smoke shape through the Triton interpreter (times are not speeds)")
        args.smoke = True
    info = describe(device)
    copy_bw = None if args.smoke else copy_bandwidth(device)
    rows = []
    if args.smoke:
        smoke = dict(SMOKE)
        batch, context = smoke.pop("batch"), smoke.pop("context")
        rows += bench_shape(batch, context, torch.float32, device, smoke, copy_bw, splits=2)  # 2: test the merge
    else:
        for batch, context in GPU_SHAPES:
            rows += bench_shape(batch, context, torch.bfloat16, device, HEADS, copy_bw)
            torch.cuda.empty_cache()

    print(f"{info['device_name']} ({info['triton_mode']} Triton)"
          + (f", device-to-device copy {copy_bw / 1e9:.0f} GB/s" if copy_bw else ""))
    print(f"{'batch x context':>16} {'method':<26} {'us':>10} {'GB/s':>8} {'of copy':>8} {'max err':>9}")
    for r in rows:
        frac = f"{r['of_copy']:.2f}" if r["of_copy"] is not None else "-"
        print(f"{r['batch']:>6} x {r['context']:<7} {r['method']:<26} {r['us']:>10.1f} {r['GB_per_s']:>8.1f} "
              f"{frac:>8} {r['max_abs_err']:>9.2e}")
    if args.json:
        text = json.dumps({"device": info, "copy_GB_per_s": copy_bw and round(copy_bw / 1e9, 1), "smoke": args.smoke,
                           "rows": rows}, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
