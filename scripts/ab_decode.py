"""Decode speed of this checkout against an earlier commit, in ONE process, alternating pairs.

    python scripts/ab_decode.py 516e295            # batch-1 greedy decode, 30 alternating pairs
    python scripts/ab_decode.py HEAD~3 --pairs 10 --device cuda

Separate processes on a shared 2-core VM differ by +-30% from one to the next, which hides a 5-20% change.
Here the old commit's `servelab/` is exported from git, renamed to `servelab_base` and imported next to the
current one, so both decode in the same process, in alternating order; the ratio is the median over pairs.
Both must produce the same tokens, or the comparison stops.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export_as(rev: str, dest: Path, name: str) -> None:
    """git archive REV:servelab -> dest/name, with every `servelab` import renamed to `name`."""
    blob = subprocess.run(["git", "archive", rev, "servelab"], cwd=ROOT, capture_output=True, check=True).stdout
    tarfile.open(fileobj=BytesIO(blob)).extractall(dest, filter="data")
    (dest / "servelab").rename(dest / name)
    for py in (dest / name).rglob("*.py"):
        py.write_text(re.sub(r"\bservelab\b(?=[.\s])", name, py.read_text()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the earlier commit (e.g. 516e295)")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        export_as(args.rev, Path(tmp), "servelab_base")
        sys.path[:0] = [tmp, str(ROOT)]
        import servelab
        import servelab_base
        from servelab.reference.warmup import greedy_decode as new_decode
        from servelab.timing import timer
        from servelab_base.reference.warmup import greedy_decode as old_decode

        if args.device == "cpu":
            torch.set_num_threads(1)
        new_m, old_m = servelab.load_model(device=args.device), servelab_base.load_model(device=args.device)
        prompt = [(7 * k + 3) % new_m.config.vocab_size for k in range(32)]
        if new_decode(new_m, prompt, 64) != old_decode(old_m, prompt, 64):
            raise SystemExit("the two versions decode different tokens: a speed comparison means nothing")
        rates: dict[str, list[float]] = {"old": [], "new": []}
        for i in range(args.pairs):
            order = [("old", old_decode, old_m), ("new", new_decode, new_m)]
            for name, decode, model in order[:: 1 if i % 2 == 0 else -1]:
                with timer(model.device) as t:
                    n = len(decode(model, prompt, args.new_tokens))
                rates[name].append(n / t.elapsed_s)
        ratios = [b / a for a, b in zip(rates["old"], rates["new"])]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        print(f"{args.rev}: {statistics.median(rates['old']):.0f} tokens/s, this checkout: "
              f"{statistics.median(rates['new']):.0f} tokens/s; new/old {statistics.median(ratios):.3f} "
              f"(median of {args.pairs} alternating pairs, quartiles {q1:.3f}-{q3:.3f}), batch 1, "
              f"{args.new_tokens} new tokens, {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
