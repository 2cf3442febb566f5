"""Classic wrong implementations of lab 02, planted into the solution: each must fail a named criterion."""
from __future__ import annotations

import pytest
from planted import planted as plant

import servelab.reference.paged as solution
from grader.labs import lab02_paged as lab02
from grader.spec import Context, Learner, run_criterion
from grader.thresholds import threshold

CLASSIC = [
    ("kv_usage: a request's length one token too long",
     [("n = prompt[o.request_id] + t - o.start", "n = prompt[o.request_id] + t - o.start + 1")],
     "kv_usage_matches", "used["),
    ("BlockManager: no copy on write of a shared block",
     [("elif self.ref_counts[table[-1]] > 1:", "elif False:")], "block_manager_invariants", ""),
    ("BlockManager: freed blocks never return to the free list",
     [("        if self.ref_counts[block] == 0:\n            self.free_blocks.append(block)",
       "        if self.ref_counts[block] == 0:\n            pass")], "block_manager_invariants", "num_free_blocks"),
    ("slot_mapping: padding gets a slot", [("torch.where(positions >= 0, slots, -1)", "slots")],
     "slot_mapping_layout", "got slot"),
    ("store_kv: K written into the V cache",
     [("tl.store(V_cache + dst, v.to(V_cache.dtype.element_ty), mask=mask)",
       "tl.store(V_cache + dst, k.to(V_cache.dtype.element_ty), mask=mask)")], "store_kv_matches", "v_cache differs"),
    ("paged_decode: online softmax without rescaling",
     [("        l_i = l_i * alpha + tl.sum(p, 1)\n        acc = acc * alpha[:, None] +",
       "        l_i = l_i + tl.sum(p, 1)\n        acc = acc +")], "paged_decode_matches", "expected"),
    ("paged_decode: tokens past the sequence not masked",
     [("        s = tl.where(mask_n[None, :], s, float(\"-inf\"))", "        s = s")], "paged_decode_matches", "expected"),
    ("split-KV: the merge ignores each split's log-sum-exp",
     [("w = tl.exp(lse - tl.max(lse, 0))", "w = tl.where(offs_s < live, 1.0, 0.0)")],
     "paged_decode_split_matches", "expected"),
    ("engine: a preempted sequence goes to the back of the queue",
     [("                waiting.appendleft((victim.request, victim.out))\n                run.preemptions += 1\n"
       "            if seq_id in running:\n                blocks.append_slot(seq_id)\n        budget = max_step_tokens - len(running)\n        admitted: list[Active] = []",
       "                waiting.append((victim.request, victim.out))\n                run.preemptions += 1\n"
       "            if seq_id in running:\n                blocks.append_slot(seq_id)\n        budget = max_step_tokens - len(running)\n        admitted: list[Active] = []")],
     "paged_engine_matches_alone", "FRONT"),
    ("engine: reserved memory counts every block of the cache",
     [("run.kv_tokens_used.append(sum(blocks.lengths.values()))\n        run.kv_tokens_reserved.append((num_blocks - blocks.num_free_blocks) * block_size)",
       "run.kv_tokens_used.append(sum(blocks.lengths.values()))\n        run.kv_tokens_reserved.append(num_blocks * block_size)")], "paged_kv_efficiency", "waste"),
    ("engine: one decode forward per running sequence instead of one batched forward",
     [("            positions = torch.tensor([[len(running[i].context) - 1] for i in ids])\n"
       "            forwards.append((ids, model(last, positions, cache.view([blocks.block_table(i) for i in ids], "
       "blocks.take_copies()))[:, -1].argmax(-1)))",
       "            positions = torch.tensor([[len(running[i].context) - 1] for i in ids])\n"
       "            copies = blocks.take_copies()\n"
       "            for row, i in enumerate(ids):\n"
       "                forwards.append(([i], model(last[row:row + 1], positions[row:row + 1], cache.view("
       "[blocks.block_table(i)], copies if row == 0 else []))[:, -1].argmax(-1)))")],
     "paged_throughput", "below the 1.0x threshold"),
    ("engine: admission capped at 8 sequences, as with lab 01's slots",
     [("lanes = list(range(max_running - 1, -1, -1))  # pop()", "lanes = list(range(min(max_running, 8) - 1, -1, -1))  # pop()")],
     "paged_concurrency", "below the 3.0x threshold"),
]


def ctx(criterion: str) -> Context:
    return Context("02_paged_attention", quick=True, seed=3, threshold=threshold("cpu", "02_paged_attention", criterion))


@pytest.mark.slow
@pytest.mark.parametrize("name,edits,criterion,words", CLASSIC, ids=[c[0] for c in CLASSIC])
def test_classic_bug_fails_its_criterion(name, edits, criterion, words):
    res = run_criterion(lab02.LAB.get(criterion), plant(solution, *edits), ctx(criterion))
    assert res.status == "failed", f"{name}: {criterion} {res.status}: {res.message}"
    assert words in res.message, f"{name}: {res.message}"


def test_no_preemption_at_all_is_an_error_that_says_why():
    learner = plant(solution, ("        for seq_id in list(running):  # running sequences first: a slot for the token each feeds this step\n"
                               "            while seq_id in running and not blocks.can_append(seq_id):",
                               "        for seq_id in list(running):  # running sequences first: a slot for the token each feeds this step\n"
                               "            while False:"))
    res = run_criterion(lab02.LAB.get("paged_engine_matches_alone"), learner, ctx("paged_engine_matches_alone"))
    assert res.status == "error" and "none is free" in res.message, res.message


@pytest.mark.parametrize("criterion", ["kv_usage_matches", "block_manager_invariants", "slot_mapping_layout",
                                       "store_kv_matches", "paged_decode_matches", "paged_engine_matches_alone"])
def test_the_solution_passes_them(criterion):
    res = run_criterion(lab02.LAB.get(criterion), Learner(vars(solution)), ctx(criterion))
    assert res.status == "passed", res.message
