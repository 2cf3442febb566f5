"""Lab 04's stretch, KV compression for the transfer: classic wrong int8 codecs and connectors planted into the
solution, each failing its named criterion with words that fit.

Not planted: a quantiser without the clamp. With scale = max |x| / 127, |x / scale| stays within rounding of 127,
so the clamp never changes a value; the contract keeps it as a guard, and no hidden input can tell it apart."""
from __future__ import annotations

import pytest
from planted import assert_fails

import servelab.reference.disaggregation as solution
from grader.labs import lab04_disagg as lab04
from grader.spec import Context, Learner, run_criterion

SCALES = "    scales = x.abs().amax(dim=(1, 3)) / 127\n"

CLASSIC = [
    ("one scale per block, not per (block, head)",
     [(SCALES, "    scales = (x.abs().amax(dim=(1, 2, 3)) / 127)[:, None].expand(-1, x.shape[2])\n")],
     "int8_quantize", "one scale per (block, KV head)"),
    ("scale from the mean |x|, not the max",
     [(SCALES, "    scales = x.abs().mean(dim=(1, 3)) / 127\n")],
     "int8_quantize", "expected scale"),
    ("an all-zero head gets scale 0",
     [("    scales = torch.where(scales > 0, scales, torch.ones_like(scales))", "    pass")],
     "int8_quantize", "a (block, head) of zeros gets scale 1.0"),
    ("q truncated toward zero, not rounded",
     [("torch.round(x / scales[:, None, :, None])", "(x / scales[:, None, :, None])")],
     "int8_quantize", "truncates toward zero"),
    ("dequantize ignores the scales",
     [("    return (q.float() * scales[:, None, :, None]).to(dtype)", "    return q.to(dtype)")],
     "int8_quantize", "> scale / 2"),
    ("receiver keeps the int8 values without dequantizing",
     [("            blocks[rows] = dequantize_kv(q, scales, blocks.dtype)", "            blocks[rows] = q.float()")],
     "int8_transfer", "multiply them by their scales"),
    ("receiver scatters in sorted order, not table order",
     [("    rows = torch.tensor(table, device=cache.k[0].device)",
       "    rows = torch.tensor(sorted(table), device=cache.k[0].device)")],
     "int8_transfer", "differs at block"),
    ("sender dequantizes before sending: bit for bit, but float32 on the wire",
     [("        handles += [link.isend(q), link.isend(scales)]",
       "        handles += [link.isend(dequantize_kv(q, scales, blocks.dtype)), link.isend(torch.ones_like(scales))]"),
      ("            q = torch.empty((len(table), *blocks.shape[1:]), dtype=torch.int8, device=blocks.device)",
       "            q = torch.empty((len(table), *blocks.shape[1:]), dtype=blocks.dtype, device=blocks.device)")],
     "int8_transfer", "at least 3.5x expected"),
]


@pytest.mark.parametrize("name,edits,criterion,words", CLASSIC, ids=[c[0] for c in CLASSIC])
def test_classic_bug_fails_its_criterion(name, edits, criterion, words):
    assert_fails(lab04.LAB, solution, name, edits, criterion, words)


@pytest.mark.parametrize("criterion", ["int8_quantize", "int8_transfer"])
def test_the_solution_passes(criterion):
    for seed in (0, 1):
        res = run_criterion(lab04.LAB.get(criterion), Learner(vars(solution)), Context("04_disaggregation", seed=seed))
        assert res.status == "passed", res.message
    if criterion == "int8_transfer":
        assert res.metrics["min_bytes_ratio"] >= 3.5


def test_the_stretch_is_registered_on_lab_04():
    assert {"quantize_kv", "dequantize_kv", "send_kv_layer_int8", "recv_kv_int8",
            "kv_roundtrip_int8"} <= set(lab04.LAB.functions)
    assert lab04.LAB.get("int8_quantize").exercise == "quantize_kv"
    assert lab04.LAB.get("int8_transfer").exercise == "send_kv_layer_int8"


def test_the_roundtrip_counts_the_bytes_received():
    """count_bytes adds the receiver's payload bytes: the uncompressed connector moves exactly the float32 blocks."""
    from servelab.disagg.connector import SHAPE

    got = solution.kv_roundtrip(seed=1, num_blocks=6, block_size=4, src_table=[0, 3], dst_table=[5, 1],
                                count_bytes=True)
    assert got["bytes_received"] == 2 * SHAPE["num_layers"] * 2 * 4 * SHAPE["num_kv_heads"] * SHAPE["head_dim"] * 4
    assert set(solution.kv_roundtrip(seed=1, num_blocks=6, block_size=4, src_table=[0], dst_table=[5])) == {"k", "v"}
