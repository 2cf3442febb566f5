"""Lab 04, stretch: compress the KV for the transfer (int8, one scale per block and KV head), graded separately.

Graded: ``quantize_kv(blocks) -> (q, scales)`` and ``dequantize_kv(q, scales, dtype)``, and the int8 connector
``send_kv_layer_int8(link, cache, layer, table)`` / ``recv_kv_int8(link, cache, table)``, run across two processes
by the given ``kv_roundtrip_int8``.

``add_criteria(LAB)`` registers the two criteria on lab 04's ``Lab``. The contract fixes every rounding step, so
the learner's q and scales are compared with the grader's own quantiser exactly (scales to 1e-6 relative). The
connector is checked like ``kv_transfer_bitwise``, against the receiver's seeded cache with the sent blocks put
through the grader's quantise/dequantise, and by the payload bytes its receiver took off the link.
"""

from __future__ import annotations

from grader.spec import Context, Fail, Lab, Learner, Outcome

MIN_RATIO = 3.5  # float32 bytes / int8 bytes: 4x less the scales (3.56x at the roundtrips' smallest blocks)


def _quantize(blocks):
    """The contract's quantiser: float32 scales max|x| / 127 per (block, head), 1 for all zeros; round, clamp."""
    import torch

    x = blocks.float()
    scales = x.abs().amax(dim=(1, 3)) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return _round(x, scales), scales


def _round(x, scales):
    import torch

    return torch.round(x / scales[:, None, :, None]).clamp(-127, 127).to(torch.int8)


def _dequantize(q, scales, dtype):
    return (q.float() * scales[:, None, :, None]).to(dtype)


# ----------------------------------------------------------------------------- quantize_kv / dequantize_kv
def _quantize_cases(ctx: Context) -> list[tuple[str, object]]:
    """(what, blocks): heads of very different magnitudes, an all-zero block and an all-zero head, bfloat16."""
    import torch

    gen = torch.Generator().manual_seed(ctx.rng("int8").randrange(2**31))
    # one magnitude per (block, head), 1e-3 .. 1e2: a scale shared across heads would crush the small ones
    mags = 10 ** (torch.rand(6, 1, 2, 1, generator=gen) * 5 - 3)
    mixed = torch.randn(6, 4, 2, 8, generator=gen) * mags
    mixed[2] = 0
    mixed[4, :, 1] = 0
    return [("6 blocks of 4 tokens x 2 heads x 8 dims, head magnitudes 1e-3..1e2 (block 2 all zeros, block 4 "
             "head 1 all zeros)", mixed),
            ("5 blocks of 16 x 2 heads x 64 dims (the shipped model's)", torch.randn(5, 16, 2, 64, generator=gen)),
            ("3 blocks of 8 x 4 heads x 16 dims in bfloat16",
             (torch.randn(3, 8, 4, 16, generator=gen) * 3).to(torch.bfloat16))]


def _first(mask) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def _check_scales(what: str, x, scales) -> None:
    import torch

    n, _, heads, _ = x.shape
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != (n, heads):
        raise Fail(f"quantize_kv({what}): scales came back as {getattr(scales, 'dtype', type(scales).__name__)} "
                   f"{tuple(getattr(scales, 'shape', ()))}; expected float32 {(n, heads)}: one per (block, KV head)")
    _, want = _quantize(x)
    bad = ~torch.isclose(scales, want, rtol=1e-6, atol=0)
    if bad.any():
        b, h = _first(bad)
        got, exp = float(scales[b, h]), float(want[b, h])
        said = (f"quantize_kv({what}): block {b}, KV head {h}: expected scale {exp:.6g} (max |x| / 127), got "
                f"{got:.6g}; {int(bad.sum())} of {bad.numel()} scales differ")
        if float(x[b, :, h].abs().max()) == 0:
            raise Fail(said, "a (block, head) of zeros gets scale 1.0: max |x| / 127 would be 0, and 0 / 0 is NaN")
        per_block = (x.float().abs().amax(dim=(1, 2, 3)) / 127)[:, None].expand(-1, heads)
        if torch.allclose(scales, torch.where(per_block > 0, per_block, 1.0), rtol=1e-6, atol=0):
            raise Fail(said, "one scale per (block, KV head): the max over the block's tokens and head_dim of "
                             "that head only (amax over dims 1 and 3), not over every head of the block")
        raise Fail(said, "scales[b, h] = max over tokens and head_dim of |blocks[b, :, h, :]|, in float32, / 127")


def _check_q(what: str, x, q, scales) -> None:
    import torch

    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.shape != x.shape:
        raise Fail(f"quantize_kv({what}): q came back as {getattr(q, 'dtype', type(q).__name__)} "
                   f"{tuple(getattr(q, 'shape', ()))}; expected int8 {tuple(x.shape)} (the shape of the blocks)")
    want = _round(x.float(), scales)  # from the learner's own scales: they passed to 1e-6
    bad = q != want
    if bad.any():
        at = _first(bad)
        b, _, h, _ = at
        value = float(x.float()[at])
        said = (f"quantize_kv({what}): element {list(at)} = {value:.6g} with scale {float(scales[b, h]):.6g}: "
                f"expected q = round(x / scale) = {int(want[at])}, got {int(q[at])}; {int(bad.sum())} of "
                f"{bad.numel()} values differ")
        scaled = x.float() / scales[:, None, :, None]
        if torch.equal(q, scaled.trunc().clamp(-127, 127).to(torch.int8)):
            raise Fail(said, "round to the nearest integer with torch.round before the cast: .to(torch.int8) "
                             "alone truncates toward zero")
        raise Fail(said, "q = torch.round(x / scale), clamped to [-127, 127], then .to(torch.int8); divide by the "
                         "scale (multiplying by 127 / max rounds differently)")


def _check_dequantize(learner: Learner, what: str, x, q, scales) -> None:
    import torch

    deq = learner.fn("dequantize_kv")(q, scales, torch.float32)
    if not isinstance(deq, torch.Tensor) or deq.dtype != torch.float32 or deq.shape != x.shape:
        raise Fail(f"dequantize_kv(q, scales, torch.float32) of {what}: got {getattr(deq, 'dtype', type(deq).__name__)} "
                   f"{tuple(getattr(deq, 'shape', ()))}; expected float32 {tuple(x.shape)}")
    half = scales[:, None, :, None] / 2
    err = (deq - x.float()).abs()
    bad = err > half * (1 + 1e-5)
    if bad.any():
        at = _first(bad)
        b, _, h, _ = at
        raise Fail(f"dequantize_kv of {what}: element {list(at)} = {float(x.float()[at]):.6g} came back as "
                   f"{float(deq[at]):.6g}, off by {float(err[at]):.3g} > scale / 2 = {float(half[at]):.3g}; "
                   f"{int(bad.sum())} of {bad.numel()} values too far",
                   "multiply q (as float32) by the scale of its block and head: scales[:, None, :, None]")
    want = _dequantize(q, scales, torch.float32)
    if not torch.equal(deq, want):
        at = _first(deq != want)
        raise Fail(f"dequantize_kv of {what}: element {list(at)}: expected q * scale = {float(want[at]):.9g}, got "
                   f"{float(deq[at]):.9g}", "compute q.float() * scale in float32, then cast to dtype")
    low = learner.fn("dequantize_kv")(q, scales, torch.bfloat16)
    if not isinstance(low, torch.Tensor) or low.dtype != torch.bfloat16 or low.shape != x.shape:
        raise Fail(f"dequantize_kv(q, scales, torch.bfloat16) of {what}: got {getattr(low, 'dtype', type(low).__name__)} "
                   f"{tuple(getattr(low, 'shape', ()))}; expected bfloat16 {tuple(x.shape)}: the dtype asked for")


def int8_quantize(learner: Learner, ctx: Context) -> Outcome:
    """Hidden blocks (heads of magnitudes 1e-3..1e2, an all-zero block and head, bfloat16): q and scales equal the
    contract's exactly (scales to 1e-6 relative), and dequantize_kv is within scale / 2 of every value."""
    import torch

    worst = 0.0
    for what, x in _quantize_cases(ctx):
        got = learner.fn("quantize_kv")(x)
        if not (isinstance(got, tuple | list) and len(got) == 2):
            raise Fail(f"quantize_kv({what}) returned {type(got).__name__}; expected a tuple (q, scales)")
        q, scales = got
        _check_scales(what, x, scales)
        _check_q(what, x, q, scales)
        want_q, want_scales = _quantize(x)
        _check_dequantize(learner, what, x, want_q, want_scales)
        err = (_dequantize(want_q, want_scales, torch.float32) - x.float()).abs() / want_scales[:, None, :, None]
        worst = max(worst, float(err.max()))
    return Outcome(True, f"3 hidden sets of blocks: q and scales exact, dequantized within {worst:.3f} of a scale",
                   {"max_error_in_scales": round(worst, 4)})


# ----------------------------------------------------------------------------- the int8 connector
def _expected_after_int8(seed: int, num_blocks: int, block_size: int, src_table: list[int],
                         dst_table: list[int]) -> dict[str, list]:
    """Rank 1's cache after a correct int8 transfer: its own blocks, with dst_table[i] = rank 0's src_table[i]
    quantised and dequantised into the cache's dtype."""
    from servelab.disagg.connector import seeded_cache

    src, dst = seeded_cache(seed, num_blocks, block_size), seeded_cache(seed + 1, num_blocks, block_size)
    for a, b in zip(src.k + src.v, dst.k + dst.v):
        b[dst_table] = _dequantize(*_quantize(a[src_table]), b.dtype)
    return {"k": dst.k, "v": dst.v}


def _payload_bytes(num_layers: int, blocks: int, block_size: int, heads: int, head_dim: int) -> tuple[int, int]:
    """(float32 bytes, int8 q + float32 scales bytes) of one transfer: K and V of every layer."""
    values = 2 * num_layers * blocks * block_size * heads * head_dim
    return 4 * values, values + 2 * num_layers * blocks * heads * 4


def _check_blocks(what: str, got, src: list[int], dst: list[int], seed: int, num_blocks: int, bs: int) -> None:
    import torch

    from servelab.disagg.connector import seeded_cache

    want = _expected_after_int8(seed, num_blocks, bs, src, dst)
    sent = seeded_cache(seed, num_blocks, bs)
    for kind in ("k", "v"):
        for layer, (w, g) in enumerate(zip(want[kind], got[kind])):
            if not isinstance(g, torch.Tensor) or g.shape != w.shape or g.dtype != w.dtype:
                raise Fail(f"{what}: layer {layer} {kind.upper()} came back as {getattr(g, 'dtype', type(g))} "
                           f"{tuple(getattr(g, 'shape', ()))}; expected {w.dtype} {tuple(w.shape)}: the "
                           "receiver's cache keeps its dtype")
            bad = [b for b in range(w.shape[0]) if not torch.equal(g[b], w[b])]
            if not bad:
                continue
            b = bad[0]
            if b not in dst:
                raise Fail(f"{what}, dst_table {dst}: layer {layer} {kind.upper()} changed block {b}, not in dst_table; "
                           f"{len(bad)} blocks differ in all", "write only the blocks of the receiver's table")
            i = dst.index(b)
            said = (f"{what}, src_table {src}, dst_table {dst}: layer {layer} {kind.upper()} differs at block {b} "
                    f"(dst_table[{i}], sent from block {src[i]}); {len(bad)} blocks differ in all")
            q, _ = _quantize(getattr(sent, kind)[layer][[src[i]]])
            if torch.equal(g[b], q[0].to(g.dtype)):
                raise Fail(said, "the receiver wrote the int8 values as they came: multiply them by their scales "
                                 "(dequantize_kv(q, scales, the cache's dtype)) before writing them into the cache")
            raise Fail(said, "per layer send K's q, K's scales, V's q, V's scales, blocks gathered in table order; "
                             "receive in the same order, dequantize into the cache's dtype and write row i into "
                             "table[i]")


def int8_transfer(learner: Learner, ctx: Context) -> Outcome:
    """``kv_roundtrip_int8`` (your int8 connector across two real processes): the receiver's cache equals, bit for
    bit, its own blocks with ``dst_table[i]`` replaced by dequantize(quantize(sender's ``src_table[i]``)), every
    layer, K and V; blocks outside ``dst_table`` untouched; the receiver took at least 3.5x fewer payload bytes
    off the link than the float32 blocks hold."""
    from grader.labs.lab04_disagg import ROUNDTRIPS  # lab04_disagg imports this module: import late
    from servelab.disagg.connector import SHAPE

    ratios = []
    for what, num_blocks, bs, src, dst in ROUNDTRIPS:
        seed = ctx.rng(f"int8{what}").randrange(10**6)
        got = learner.fn("kv_roundtrip_int8")(seed=seed, num_blocks=num_blocks, block_size=bs, src_table=src,
                                             dst_table=dst, count_bytes=True)
        if not isinstance(got, dict) or not {"k", "v", "bytes_received"} <= set(got):
            raise Fail(f"{what}: kv_roundtrip_int8(..., count_bytes=True) returned {type(got).__name__}; expected the "
                       "receiver's cache and its byte count, {'k': [...], 'v': [...], 'bytes_received': n} (is the "
                       "given kv_roundtrip_int8 changed?)")
        _check_blocks(what, got, src, dst, seed, num_blocks, bs)
        full, packed = _payload_bytes(SHAPE["num_layers"], len(src), bs, SHAPE["num_kv_heads"], SHAPE["head_dim"])
        moved = int(got["bytes_received"])
        ratio = full / max(moved, 1)
        if ratio < MIN_RATIO:
            blocks = f"{len(src)} block{'s' if len(src) != 1 else ''}"
            raise Fail(f"{what}: the receiver took {moved} bytes off the link, against {full} bytes of float32 K and "
                       f"V for {blocks}: {ratio:.2f}x fewer; at least {MIN_RATIO}x expected (int8 q and float32 "
                       f"scales: {packed} bytes)",
                       "send the int8 q and the float32 scales as they are: dequantize on the receiver, after the "
                       "transfer")
        ratios.append(ratio)
    return Outcome(True, f"{len(ROUNDTRIPS)} int8 transfers across two processes, every layer bit for bit; "
                         f"{min(ratios):.2f}-{max(ratios):.2f}x fewer bytes than float32",
                   {"transfers": len(ROUNDTRIPS), "min_bytes_ratio": round(min(ratios), 3)})


def add_criteria(lab: Lab) -> None:
    """Register the KV-compression criteria on lab 04's ``Lab`` (and its graded functions)."""
    for name in ("quantize_kv", "dequantize_kv", "send_kv_layer_int8", "recv_kv_int8", "kv_roundtrip_int8"):
        if name not in lab.functions:
            lab.functions = (*lab.functions, name)
    lab.criterion("int8_quantize", "correctness", 1, exercise="quantize_kv", timeout_s=60)(int8_quantize)
    lab.criterion("int8_transfer", "correctness", 2, exercise="send_kv_layer_int8", timeout_s=180)(int8_transfer)
