"""Lab 04's stretch, the KV layout across tensor parallelism: the solution passes both criteria, and classic
wrong splits, merges and connectors planted into it fail their named criterion with words that fit."""
from __future__ import annotations

import pytest
from planted import assert_fails

import servelab.reference.disaggregation as solution
from grader.labs import lab04_disagg as lab04
from grader.spec import Context, Learner, run_criterion

SPLIT = "    return [part.contiguous() for part in blocks.split(heads // world, dim=2)]\n"
MERGE = "            blocks[own] = merge_kv_heads([buf for _, buf in parts])\n"

CLASSIC = [
    ("merge in reverse rank order",
     [("    return torch.cat(list(parts), dim=2)", "    return torch.cat(list(parts)[::-1], dim=2)")],
     "tp_layout", "reverse rank order"),
    ("split along head_dim, not the heads",
     [(SPLIT, "    return [p.contiguous() for p in blocks.split(blocks.shape[3] // world, dim=3)]\n")],
     "tp_layout", "not another axis"),
    ("heads dealt round-robin, not in contiguous runs",
     [(SPLIT, "    return [blocks[:, :, r::world].contiguous() for r in range(world)]\n")],
     "tp_layout", "contiguous run of heads"),
    ("parts left as strided views",
     [(SPLIT, "    return list(blocks.split(heads // world, dim=2))\n")],
     "tp_layout", "not contiguous"),
    ("heads that do not divide are not refused",
     [("    if heads % world:\n", "    if False:\n")],
     "tp_layout", "did not raise ValueError"),
    ("receiver merges the parts in reverse link order",
     [(MERGE, "            blocks[own] = merge_kv_heads([buf for _, buf in parts][::-1])\n")],
     "tp_handover", "holds the prefill's head [1, 0]"),
    ("receiver writes the sender's block ids, not its own table",
     [("    own = torch.tensor(table, device=cache.k[0].device)",
       "    own = torch.arange(len(table), device=cache.k[0].device)")],
     "tp_handover", "all zeros"),
]


@pytest.mark.parametrize("name,edits,criterion,words", CLASSIC, ids=[c[0] for c in CLASSIC])
def test_classic_bug_fails_its_criterion(name, edits, criterion, words):
    assert_fails(lab04.LAB, solution, name, edits, criterion, words)


@pytest.mark.parametrize("criterion", ["tp_layout", "tp_handover"])
def test_the_solution_passes(criterion):
    res = run_criterion(lab04.LAB.get(criterion), Learner(vars(solution)), Context("04_disaggregation", seed=5))
    assert res.status == "passed", res.message
    if criterion == "tp_handover":  # 2->1: each prefill rank sent its half of every block (rank 0 also the tokens)
        sent = res.metrics["bytes_sent"]
        assert sent["2->1"][0] - sent["2->1"][1] == 3 * 8 and sent["1->2"][0] == 2 * sent["2->1"][0]


def test_the_stretch_is_registered_on_lab_04():
    assert {"split_kv_heads", "merge_kv_heads", "send_kv_split", "recv_kv_merged",
            "kv_handover_tp"} <= set(lab04.LAB.functions)
    assert lab04.LAB.get("tp_layout").exercise == "split_kv_heads"
    assert lab04.LAB.get("tp_handover").exercise == "send_kv_split"
