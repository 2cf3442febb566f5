"""Lab 02's block-table KV cache: block manager invariants, attention equal to the contiguous cache, the paged
continuous-batching engine (with preemption) equal to decoding alone, and the memory it saves."""
from __future__ import annotations

import contextlib
import random
import types

import pytest
import torch
from test_step_metadata import no_host_sync_in_layers, tiny_model

import servelab
from servelab import device
from servelab.engine import StepClock
from servelab.kv_cache import ContiguousKVCache
from servelab.model import CausalLM
from servelab.paged import memory
from servelab.paged.cache import PagedKVCache, PagedView, blocks_for
from servelab.reference import paged as solution
from servelab.reference.paged import BlockManager, kv_usage, paged_continuous_batching
from servelab.reference.batching import continuous_batching
from servelab.reference.warmup import greedy_decode
from servelab.workloads import Request, log_uniform, make_trace, poisson, standard_trace, uniform


# ----------------------------------------------------------------------------- block manager
def slots_of(bm: BlockManager, seq: int) -> list[int]:
    table, bs = bm.block_table(seq), bm.block_size
    return [table[p // bs] * bs + p % bs for p in range(bm.num_tokens(seq))]


def check_invariants(bm: BlockManager) -> None:
    owners = [0] * bm.num_blocks
    for seq, table in bm.tables.items():
        assert len(set(table)) == len(table), f"sequence {seq} holds a block twice"
        assert len(table) == blocks_for(bm.lengths[seq], bm.block_size)
        for b in table:
            owners[b] += 1
    assert owners == bm.ref_counts, "a reference count disagrees with the tables"
    assert len(set(bm.free_blocks)) == len(bm.free_blocks)
    assert sorted(bm.free_blocks) == [b for b, n in enumerate(owners) if n == 0]


@pytest.mark.parametrize("seed", range(6))
def test_block_manager_random_walk(seed):
    """Random allocate / append / fork / preempt+restore / free: the tables stay consistent, and a simulated
    cache (each slot holds who wrote it) shows no sequence ever sees another's tokens."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=rng.randint(4, 24), block_size=rng.choice([1, 2, 4, 16]))
    cells: dict[int, tuple] = {}  # slot -> what was written there
    history: dict[int, list[tuple]] = {}  # seq -> what it wrote at positions 0..n-1
    next_id = 0

    def write(seq: int, slot: int) -> None:
        for src, dst in bm.take_copies():  # what the cache does before a layer writes
            for off in range(bm.block_size):
                if src * bm.block_size + off in cells:
                    cells[dst * bm.block_size + off] = cells[src * bm.block_size + off]
        cells[slot] = (seq, len(history[seq]), rng.random())
        history[seq].append(cells[slot])

    for _ in range(300):
        op, seqs = rng.random(), list(bm.tables)
        if op < 0.25 or not seqs:
            n = rng.randint(0, 3 * bm.block_size)
            if bm.can_allocate(n):
                bm.allocate(next_id, n)
                history[next_id] = []
                for slot in slots_of(bm, next_id):
                    cells[slot] = (next_id, len(history[next_id]), rng.random())
                    history[next_id].append(cells[slot])
                next_id += 1
            else:
                with pytest.raises(RuntimeError, match="can_allocate"):
                    bm.allocate(next_id, n)
        elif op < 0.65:
            seq = rng.choice(seqs)
            if bm.can_append(seq):
                write(seq, bm.append_slot(seq))
            else:
                with pytest.raises(RuntimeError, match="none is free"):
                    bm.append_slot(seq)
        elif op < 0.75:
            bm.fork(parent := rng.choice(seqs), next_id)
            history[next_id] = list(history[parent])
            next_id += 1
        elif op < 0.85:  # preemption (recompute): give every block back, re-prefill later if it fits
            seq = rng.choice(seqs)
            n = bm.num_tokens(seq)
            bm.free(seq)
            if bm.can_allocate(n):
                bm.allocate(seq, n)
                for slot, value in zip(slots_of(bm, seq), history[seq]):
                    cells[slot] = value
            else:
                del history[seq]
        else:
            seq = rng.choice(seqs)
            bm.free(seq)
            del history[seq]
        check_invariants(bm)
        assert min(bm.ref_counts) >= 0
        for seq in bm.tables:
            assert [cells[s] for s in slots_of(bm, seq)] == history[seq], f"sequence {seq} was overwritten"
    for seq in list(bm.tables):
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts), "blocks leaked"


def test_block_manager_slots_and_errors():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.allocate(7, 5) == [0, 1] and slots_of(bm, 7) == [0, 1, 2, 3, 4]
    assert [bm.append_slot(7) for _ in range(4)] == [5, 6, 7, 8]  # block 2 is taken only for the 9th token
    assert bm.block_table(7) == [0, 1, 2] and bm.num_free_blocks == 1
    bm.fork(7, 8)
    assert bm.append_slot(8) == 13 and bm.take_copies() == [(2, 3)]  # copy on write of the shared last block
    assert [bm.append_slot(7) for _ in range(3)] == [9, 10, 11] and not bm.take_copies()  # block 2 is 7's alone
    assert not bm.can_append(7) and not bm.can_allocate(1)
    with pytest.raises(RuntimeError, match="sequence 7 needs a new block but none is free"):
        bm.append_slot(7)
    with pytest.raises(ValueError, match="already holds blocks"):
        bm.allocate(7, 1)
    with pytest.raises(ValueError, match="sequence 9 holds no blocks"):
        bm.free(9)
    bm.free(7)
    assert bm.free_blocks == [2] and bm.ref_counts == [1, 1, 0, 1]  # blocks 0, 1 stay: sequence 8 holds them
    bm.free(8)
    assert bm.num_free_blocks == 4
    with pytest.raises(ValueError, match="num_blocks >= 1"):
        BlockManager(0, 16)


# ----------------------------------------------------------------------------- the paged cache
class Paged:
    """A paged cache and the block manager that says who holds which block, as an engine pairs them."""

    def __init__(self, cache: PagedKVCache, blocks: BlockManager):
        self.cache, self.blocks = cache, blocks

    def rows(self, seq_ids: list[int]) -> PagedView:
        return self.cache.view([self.blocks.block_table(s) for s in seq_ids], self.blocks.take_copies())


def scattered_cache(kernels=None, num_blocks=24, block_size=4, layers=2, dtype=torch.float32) -> Paged:
    cache = PagedKVCache(layers, num_blocks, block_size, num_kv_heads=2, head_dim=8, dtype=dtype, kernels=kernels)
    blocks = BlockManager(num_blocks, block_size)
    random.Random(0).shuffle(blocks.free_blocks)  # tables out of order: indexing bugs cannot hide
    return Paged(cache, blocks)


def run_steps(view, layers: int, steps: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """Random q/k/v through plan + attend for each step's positions; every layer's output."""
    g, outs = torch.Generator().manual_seed(seed), []
    for positions in steps:
        (meta,) = view.plan(positions).to(torch.device("cpu"))
        B, T = positions.shape
        for layer in range(layers):
            q, k, v = (torch.randn(B, h, T, 8, generator=g) for h in (4, 2, 2))
            outs.append(view.attend(layer, q, k, v, meta))
    return outs


def prefill_then_decode(lens: list[int], decode_steps: int) -> list[torch.Tensor]:
    width = max(lens)
    pos = torch.full((len(lens), width), -1)
    for row, n in enumerate(lens):
        pos[row, width - n:] = torch.arange(n)
    return [pos] + [torch.tensor(lens)[:, None] + i for i in range(decode_steps)]


@pytest.fixture
def fake_kernels(monkeypatch):
    """Kernels written in PyTorch, passed as the cache's kernels: checks the kernel path's wiring, not kernels."""
    fake = types.ModuleType("fake_kernels")
    fake.calls = {"store_kv": 0, "paged_decode": 0}

    def store_kv(k, v, k_cache, v_cache, slot_mapping):
        fake.calls["store_kv"] += 1
        real = slot_mapping >= 0
        k_cache.view(-1, *k.shape[1:])[slot_mapping[real]] = k[real]
        v_cache.view(-1, *v.shape[1:])[slot_mapping[real]] = v[real]

    def paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, out=None):
        fake.calls["paged_decode"] += 1
        assert q.dim() == 3 and block_tables.dtype == seq_lens.dtype == torch.int32
        B, Hq, D = q.shape
        keys = k_cache[block_tables].flatten(1, 2)  # [B, S, Hkv, D]
        vals = v_cache[block_tables].flatten(1, 2)
        group = Hq // keys.shape[2]
        scores = torch.einsum("bhd,bshd->bhs", q, keys.repeat_interleave(group, 2)) * scale
        live = torch.arange(keys.shape[1]) < seq_lens[:, None]
        probs = scores.masked_fill(~live[:, None], float("-inf")).softmax(-1)
        return torch.einsum("bhs,bshd->bhd", probs, vals.repeat_interleave(group, 2))

    fake.store_kv, fake.paged_decode = store_kv, paged_decode
    return fake


@pytest.mark.parametrize("backend", ["torch", "fake-triton"])
def test_paged_attention_equals_the_contiguous_cache(backend, fake_kernels):
    lens, seq_ids, steps = [5, 11, 1], [3, 0, 9], 6
    cache = scattered_cache(fake_kernels if backend == "fake-triton" else None)
    for seq, n in zip(seq_ids, lens):
        cache.blocks.allocate(seq, n + steps)
    expected = run_steps(ContiguousKVCache(2, 3, 32, 2, 8).rows([2, 0, 1]), 2, prefill_then_decode(lens, steps))
    got = run_steps(cache.rows(seq_ids), 2, prefill_then_decode(lens, steps))
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)
    if backend == "fake-triton":
        assert fake_kernels.calls["paged_decode"] == steps * 2 and fake_kernels.calls["store_kv"] == (steps + 1) * 2


def test_plan_builds_the_block_tables_and_slot_mapping():
    cache = Paged(PagedKVCache(1, 8, 4, 2, 8), BlockManager(8, 4))
    cache.blocks.free_blocks = [0, 1, 2, 3, 4, 5, 7, 6]  # pop() hands out 6, 7, 5, ...
    cache.blocks.allocate(1, 6)
    cache.blocks.allocate(2, 2)
    meta = cache.rows([1, 2]).plan(torch.tensor([[3, 4, 5], [-1, 0, 1]]))
    assert meta.block_tables.tolist() == [[6, 7], [5, 0]] and meta.seq_lens.tolist() == [6, 2]
    assert meta.slot_mapping.tolist() == [27, 28, 29, -1, 20, 21] and meta.write_slot.tolist() == [27, 28, 29, 20, 21]
    assert meta.k_pos.tolist() == [[0, 1, 2, 3, 4, 5, -1, -1], [0, 1] + [-1] * 6] and not meta.dense
    (dev,) = meta.to(torch.device("cpu"))
    assert dev.block_tables.dtype == dev.seq_lens.dtype == torch.int32  # what the kernels take
    with pytest.raises(ValueError, match="row 0: position 8 has no slot"):
        cache.rows([1]).plan(torch.tensor([[8]]))
    with pytest.raises(ValueError, match="out of range"):
        cache.cache.view([[8]])


def test_the_real_triton_kernels_match_the_torch_backend():
    lens, steps = [3, 9], 2
    results = []
    for kernels in (None, solution):  # PyTorch, then the solution's Triton kernels (the interpreter here)
        cache = scattered_cache(kernels, num_blocks=8, layers=1)
        for seq, n in enumerate(lens):
            cache.blocks.allocate(seq, n + steps)
        results.append(run_steps(cache.rows([0, 1]), 1, prefill_then_decode(lens, steps)))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_paged_backend_is_decided_in_one_place(monkeypatch):
    monkeypatch.delenv(device.PAGED_BACKEND_ENV, raising=False)
    monkeypatch.setattr(device, "cuda_available", lambda: True)  # a CUDA machine, faked
    assert device.paged_backend() == "triton" and device.paged_backend("cuda:0") == "triton"
    assert device.paged_backend("cpu") == "torch"  # a cache on the CPU of a GPU machine
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    assert device.paged_backend() == "torch"
    monkeypatch.setenv(device.PAGED_BACKEND_ENV, "Triton")
    assert device.paged_backend() == "triton"
    monkeypatch.setenv(device.PAGED_BACKEND_ENV, "cuda")
    with pytest.raises(device.DeviceError, match="SERVELAB_PAGED_BACKEND='cuda'.*torch, triton"):
        device.paged_backend()


@pytest.mark.parametrize("backend", ["torch", "fake-triton"])
def test_no_host_sync_inside_layers(monkeypatch, backend, fake_kernels):
    model = tiny_model()
    cache = Paged(PagedKVCache.for_model(model, 32, 4, fake_kernels if backend == "fake-triton" else None),
                  BlockManager(32, 4))
    cache.blocks.allocate(0, 5)
    cache.blocks.allocate(1, 3)
    ids, pos = torch.randint(0, 97, (2, 5)), torch.tensor([[0, 1, 2, 3, 4], [-1, -1, 0, 1, 2]])
    with no_host_sync_in_layers(monkeypatch):
        prefill = model(ids, pos, cache.rows([0, 1]))
        cache.blocks.fork(1, 2)  # the next write into the shared block is a copy on write, inside the layers
        for seq in (0, 1, 2):
            cache.blocks.append_slot(seq)
        step = model(ids[[0, 1, 1], -1:], torch.tensor([[5], [3], [3]]), cache.rows([0, 1, 2]))
    assert torch.isfinite(prefill).all() and torch.isfinite(step).all()
    torch.testing.assert_close(step[1], step[2])  # the fork computed the same as its parent


@contextlib.contextmanager
def cuda_syncs_raise(on: bool):
    if on:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if on:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_paged_steps_never_sync_on_a_gpu(backend):
    """On CUDA: a padded prefill and decode steps through the paged cache run under sync-debug mode 'error'."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 1, 2, 3, 4], [-1, -1, 0, 1, 2]])
    logits = {}
    for dev in ("cuda", "cpu"):
        model = tiny_model(dev)
        kernels = solution if backend == "triton" and dev == "cuda" else None
        cache = Paged(PagedKVCache.for_model(model, 32, 4, kernels), BlockManager(32, 4))
        cache.blocks.allocate(0, 5)
        cache.blocks.allocate(1, 3)
        model(ids, pos, cache.rows([0, 1]))  # warm-up (first-call allocations may sync); rewrites the same K/V
        with cuda_syncs_raise(dev == "cuda"):
            model(ids, pos, cache.rows([0, 1]))
            for step in range(3):
                for seq in (0, 1):
                    cache.blocks.append_slot(seq)
                out = model(ids[:, :1], torch.tensor([[5 + step], [3 + step]]), cache.rows([0, 1]))
        logits[dev] = out.cpu()
    torch.testing.assert_close(logits["cuda"], logits["cpu"], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def model():
    return servelab.load_model()


def small_trace(model, n=10, seed=0):
    rng = torch.Generator().manual_seed(seed)
    corpus = torch.randint(1, model.config.vocab_size, (512,), generator=rng).tolist()
    return make_trace("small", n, uniform(3, 16), log_uniform(1, 24), poisson(40.0), seed, corpus_tokens=corpus)


@pytest.fixture
def spy(monkeypatch):
    """Records the caches the engine builds, its forwards, its plans, and the metadata every attend gets."""
    seen = types.SimpleNamespace(caches=[], managers=[], forwards=0, plans=0, metas=[])

    class Recorded(BlockManager):
        def __init__(self, *a):
            super().__init__(*a)
            seen.managers.append(self)

    monkeypatch.setattr(solution, "BlockManager", Recorded)
    for_model, forward, plan, attend = PagedKVCache.for_model.__func__, CausalLM.forward, PagedView.plan, PagedView.attend

    def spy_for_model(cls, *a):
        seen.caches.append(for_model(cls, *a))
        return seen.caches[-1]

    def spy_forward(self, *a):
        seen.forwards += 1
        return forward(self, *a)

    def spy_plan(self, positions):
        seen.plans += 1
        return plan(self, positions)

    def spy_attend(self, layer, q, k, v, meta):
        seen.metas.append(meta)
        return attend(self, layer, q, k, v, meta)

    monkeypatch.setattr(PagedKVCache, "for_model", classmethod(spy_for_model))
    monkeypatch.setattr(CausalLM, "forward", spy_forward)
    monkeypatch.setattr(PagedView, "plan", spy_plan)
    monkeypatch.setattr(PagedView, "attend", spy_attend)
    return seen


@pytest.mark.parametrize("num_blocks", [256, 10])
def test_paged_engine_equals_decoding_alone(model, spy, num_blocks):
    """Plenty of blocks, then so few that sequences are preempted (and one request can never fit)."""
    trace = small_trace(model)
    too_big = trace.requests[3]
    too_big.max_new_tokens = 10 * 4 - too_big.prompt_len + 2  # 41 tokens: 11 blocks
    eos = model.config.eos_token_id
    run = paged_continuous_batching(model, trace.requests, max_running=4, max_step_tokens=64, eos_id=eos,
                                    clock=StepClock(), num_blocks=num_blocks, block_size=4)
    assert (run.preemptions > 0) == (num_blocks == 10) and run.max_running > 1
    rejected = [r.id for r in trace.requests if run.completions[r.id].error]
    assert rejected == ([too_big.id] if num_blocks == 10 else [])
    if rejected:
        assert "needs up to 11 KV blocks of 4 tokens but the cache has 10" in run.completions[too_big.id].error
    engine_forwards, L = spy.forwards, model.config.num_layers
    for r in trace.requests:
        if r.id not in rejected:
            assert run.completions[r.id].tokens == greedy_decode(model, r.prompt_ids, r.max_new_tokens, eos), r.id
    assert spy.managers[0].num_free_blocks == num_blocks, "blocks leaked"
    assert all(u <= r <= num_blocks * 4 for u, r in zip(run.kv_tokens_used, run.kv_tokens_reserved))
    assert spy.plans == engine_forwards and len(spy.metas) == L * engine_forwards  # one plan per forward
    assert all(len({id(m) for m in spy.metas[i:i + L]}) == 1 for i in range(0, len(spy.metas), L))


def test_preemption_evicts_the_most_recently_admitted(model):
    """Two sequences outgrow 5 blocks: the later one gives its blocks back, keeps its tokens and resumes
    before the request still waiting (it went back to the front of the queue)."""
    rng = torch.Generator().manual_seed(4)
    reqs = [Request(i, torch.randint(1, model.config.vocab_size, (4,), generator=rng).tolist(), 12, 0.0) for i in range(3)]
    run = paged_continuous_batching(model, reqs[::-1], 2, 64, None, StepClock(0.01), num_blocks=5, block_size=4)
    starts = {r.id: sorted(o.start for o in run.occupancy if o.request_id == r.id) for r in reqs}
    assert len(starts[0]) == 1 and len(starts[1]) == 2, starts  # 0 is never preempted, 1 once
    assert starts[2][0] >= starts[1][1], starts  # 2 waited behind the preempted 1
    assert run.preemptions == sum(len(s) - 1 for s in starts.values())
    for r in reqs:
        assert run.completions[r.id].tokens == greedy_decode(model, r.prompt_ids, 12)
    assert run.completions[1].token_times[0] == pytest.approx(0.01)  # what it made before preemption was kept


# ----------------------------------------------------------------------------- memory
def test_paged_memory_waste_is_small_and_more_sequences_fit(model):
    trace = standard_trace("skewed", encode=servelab.load_tokenizer(), scale=0.25)
    contiguous_run = continuous_batching(model, trace.requests, 8, 256, None, StepClock(), max_len=1024)
    bpt = memory.kv_bytes_per_token(model.config, model.dtype)
    contiguous = memory.KVMemory("contiguous", *kv_usage(contiguous_run, trace.requests, 1024), bpt)
    paged = memory.KVMemory("paged", *kv_usage(contiguous_run, trace.requests, 1024, 4), bpt)
    assert paged.waste_fraction < 0.04 and contiguous.waste_fraction > 0.9, (paged.summary(), contiguous.summary())
    # the paged engine runs the same schedule and records the same memory itself
    budget = 8 * 1024 * bpt  # the contiguous cache's bytes
    paged_run = paged_continuous_batching(model, trace.requests, 8, 256, None, StepClock(), budget // (4 * bpt), 4)
    assert memory.paged_run_memory(paged_run, bpt).reserved_tokens == paged.reserved_tokens
    assert {i: c.tokens for i, c in paged_run.completions.items()} == \
        {i: c.tokens for i, c in contiguous_run.completions.items()}
    fits = memory.max_concurrent_sequences(budget, bpt, [r.prompt_len + r.max_new_tokens for r in trace.requests],
                                           1024, 4)
    assert fits["contiguous"] == 8 and fits["paged"] > 8 * 8, fits
    wide = paged_continuous_batching(model, trace.requests, 64, 4096, None, StepClock(), budget // (4 * bpt), 4)
    assert wide.max_running == len(trace.requests) and wide.preemptions == 0  # the whole trace at once, same bytes
