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
from pathlib import Path

import torch

from servelab.device import describe  # importing servelab first picks Triton's interpreter on a CPU
from servelab.paged.bench import bench_shape, copy_bandwidth
from servelab.reference.paged import paged_decode, paged_decode_split

GPU_SHAPES = [(64, 4096), (8, 8192), (1, 32768)]  # (batch, context tokens per sequence)
HEADS = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16)
SMOKE = dict(batch=2, context=40, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16)


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
        rows += bench_shape(batch, context, torch.float32, device, smoke, copy_bw, paged_decode, paged_decode_split,
                            splits=2)  # 2: test the merge
    else:
        for batch, context in GPU_SHAPES:
            rows += bench_shape(batch, context, torch.bfloat16, device, HEADS, copy_bw, paged_decode, paged_decode_split)
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
