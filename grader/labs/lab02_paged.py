"""Lab 02 (PagedAttention): KV waste, a block manager, the step's slot mapping, Triton kernels, and
continuous batching on the paged cache.

Graded (see the notebook for the contracts): ``kv_usage(run, requests, max_len, block_size=None)``,
``BlockManager(num_blocks, block_size)``, ``slot_mapping(block_tables, positions, block_size)``, the Triton
kernels ``store_kv``, ``paged_decode`` and (stretch) ``paged_decode_split``, and
``paged_continuous_batching(model, requests, max_running, max_step_tokens, eos_id, clock, num_blocks,
block_size, max_len=1024, kernels=None) -> PagedEngineRun``.

Kernels are compared with ``servelab.paged.reference`` on hidden random shapes (on CPU in Triton's
interpreter, small); the block manager is driven through random call sequences and checked against the
grader's own account of which block is where; engines are compared token for token with decoding alone.
"""

from __future__ import annotations

import math

from grader.checks import speed_verdict, timed_runs_differ
from grader.spec import Context, Fail, Lab, Learner, Outcome, bench_calls, call_in_place

LAB = Lab(
    id="02_paged_attention",
    title="PagedAttention: a block-table KV cache and a Triton decode kernel",
    notebook="paged_attention.ipynb",
    module="paged",
    functions=("kv_usage", "BlockManager", "slot_mapping", "store_kv", "paged_decode", "paged_decode_split",
               "paged_continuous_batching", "prefix_cached_batching"),
)
DT = 0.01
TOL = {"float32": (1e-4, 1e-4), "float16": (2e-3, 2e-3), "bfloat16": (2e-2, 2e-2)}  # (atol, rtol)
BUDGET_SLOTS, BUDGET_MAX_LEN, BLOCK = 8, 1024, 8  # the memory criteria: lab 01's cache of 8 x 1,024 tokens
MIN_KV_EFFICIENCY = 0.96  # used / reserved token-steps: under 4% waste (the vLLM paper's figure)


def _blocks_for(n: int, block_size: int) -> int:
    from servelab.paged.cache import blocks_for  # imported late: the lab registry loads without torch

    return blocks_for(n, block_size)


# ----------------------------------------------------------------------------- part 1: kv_usage
@LAB.criterion("kv_usage_matches", "correctness", 2, exercise="kv_usage")
def kv_usage_matches(learner: Learner, ctx: Context) -> Outcome:
    """Used and reserved KV tokens per step of hidden engine runs, contiguous and paged (block 1, 4, 16)."""
    from grader.labs.lab01_batching import _requests
    from servelab.engine import StepClock
    from servelab.reference.batching import continuous_batching
    from servelab.reference.paged import kv_usage

    fn, checked = learner.fn("kv_usage"), 0
    for k, (slots, max_len, rate) in enumerate(((3, 64, None), (4, 128, 30.0))):
        reqs = _requests(ctx, f"usage-{k}", 9, (1, 30), (1, 24), rate=rate)
        run = continuous_batching(ctx.model(), reqs, slots, 512, None, StepClock(DT), max_len)
        for block_size in (None, 1, 4, 16):
            case = (f"run {k} ({len(reqs)} requests, {slots} slots, {run.steps} steps), max_len={max_len}, "
                    f"block_size={block_size}")
            got, want = fn(run, reqs, max_len, block_size), kv_usage(run, reqs, max_len, block_size)
            if not (isinstance(got, tuple | list) and len(got) == 2 and all(isinstance(x, list) for x in got)):
                raise Fail(f"{case}: kv_usage returned {type(got).__name__}; expected a tuple (used, reserved) of "
                           "two lists")
            for name, g, w in (("used", got[0], want[0]), ("reserved", got[1], want[1])):
                if len(g) != len(w):
                    raise Fail(f"{case}: {name} has {len(g)} entries; expected one per step: {len(w)}")
                if g != w:
                    t = next(i for i, (a, b) in enumerate(zip(g, w)) if a != b)
                    hint = ("a request admitted at step s holds prompt_len + (t - s) tokens at step t; steps run "
                            "from occupancy.start to end - 1") if name == "used" else (
                        "contiguous: run.num_slots * max_len every step" if block_size is None else
                        "paged: each live request's length rounded up to whole blocks, summed")
                    raise Fail(f"{case}: {name}[{t}] is {g[t]}, expected {w[t]}", hint)
            checked += 1
    return Outcome(True, f"{checked} runs x layouts: used and reserved tokens match at every step")


# ----------------------------------------------------------------------------- part 2: BlockManager
class _Account:
    """The grader's own view of a block manager: tables and lengths as the learner's answers built them."""

    def __init__(self, num_blocks: int, block_size: int):
        self.n, self.bs, self.tables, self.lengths = num_blocks, block_size, {}, {}

    def refs(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for t in self.tables.values():
            for b in t:
                out[b] = out.get(b, 0) + 1
        return out

    def free(self) -> int:
        return self.n - len(self.refs())

    def needs_block(self, seq: int) -> bool:
        t, n = self.tables[seq], self.lengths[seq]
        return n % self.bs == 0 or self.refs()[t[-1]] > 1


def _new_block(b, acc: _Account, what: str) -> int:
    if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < acc.n:
        raise Fail(f"{what}: block {b!r} is not a block id 0..{acc.n - 1}")
    if b in acc.refs():
        raise Fail(f"{what}: handed out block {b}, which a sequence already holds",
                   "take new blocks only from the free list, and put a block back only when its count reaches 0")
    return b


def _expect_raise(call, exc: type, what: str) -> None:
    try:
        call()
    except exc:
        return
    except NotImplementedError:
        raise  # the stub: reported as "not implemented yet"
    except Exception as err:  # noqa: BLE001
        raise Fail(f"{what}: raised {type(err).__name__}: {err}; expected {exc.__name__}") from None
    raise Fail(f"{what}: returned instead of raising {exc.__name__}")


def _walk(cls, ctx: Context, seed: int, ops: int) -> dict:
    rng = ctx.rng(f"walk-{seed}")
    acc = _Account(rng.randint(4, 20), rng.choice([1, 2, 4, 16]))
    bm, next_id, copies, counts = cls(acc.n, acc.bs), 0, [], {"allocate": 0, "append": 0, "fork": 0, "free": 0}
    where = f"walk {seed} (num_blocks={acc.n}, block_size={acc.bs})"
    for k in range(ops):
        op, seqs = rng.random(), sorted(acc.tables)
        step = f"{where}, call {k}"
        if op < 0.3 or not seqs:
            n = rng.randint(0, 3 * acc.bs)
            fits = _blocks_for(n, acc.bs) <= acc.free()
            if bool(bm.can_allocate(n)) != fits:
                raise Fail(f"{step}: can_allocate({n}) is {not fits} with {acc.free()} blocks free; expected {fits}")
            if not fits:
                _expect_raise(lambda n=n, i=next_id: bm.allocate(i, n), RuntimeError, f"{step}: allocate({next_id}, {n}) "
                              f"with only {acc.free()} blocks free")
                continue
            table = bm.allocate(next_id, n)
            if not isinstance(table, list) or len(table) != _blocks_for(n, acc.bs) or len(set(table)) != len(table):
                raise Fail(f"{step}: allocate({next_id}, {n}) returned {table!r}; expected "
                           f"{_blocks_for(n, acc.bs)} distinct blocks")
            acc.tables[next_id] = [_new_block(b, acc, f"{step}: allocate") for b in table]
            acc.lengths[next_id], next_id, counts["allocate"] = n, next_id + 1, counts["allocate"] + 1
        elif op < 0.7:
            seq = rng.choice(seqs)
            need = acc.needs_block(seq)
            ok = not need or acc.free() > 0
            if bool(bm.can_append(seq)) != ok:
                raise Fail(f"{step}: can_append({seq}) is {not ok} (sequence of {acc.lengths[seq]} tokens in "
                           f"{len(acc.tables[seq])} blocks, {acc.free()} free); expected {ok}")
            if not ok:
                _expect_raise(lambda s=seq: bm.append_slot(s), RuntimeError, f"{step}: append_slot({seq}) with no "
                              "free block")
                continue
            t, n = acc.tables[seq], acc.lengths[seq]
            slot = bm.append_slot(seq)
            if n % acc.bs == 0:
                b = _new_block(slot // acc.bs if isinstance(slot, int) else slot, acc, f"{step}: append_slot({seq})")
                t.append(b)
            elif acc.refs()[t[-1]] > 1:  # copy on write: a fresh block, and the copy recorded
                b = _new_block(slot // acc.bs if isinstance(slot, int) else slot, acc,
                               f"{step}: append_slot({seq}) into a shared block")
                copies.append((t[-1], b))
                t[-1] = b
            expected = t[-1] * acc.bs + n % acc.bs
            if slot != expected:
                raise Fail(f"{step}: append_slot({seq}) returned slot {slot!r} for token {n}; expected {expected} "
                           f"(its table {t})", "slot = block * block_size + position % block_size; a new block only "
                           "when the last one is full")
            acc.lengths[seq], counts["append"] = n + 1, counts["append"] + 1
        elif op < 0.8:
            parent = rng.choice(seqs)
            bm.fork(parent, next_id)
            acc.tables[next_id], acc.lengths[next_id] = list(acc.tables[parent]), acc.lengths[parent]
            next_id, counts["fork"] = next_id + 1, counts["fork"] + 1
        else:
            seq = rng.choice(seqs)
            bm.free(seq)
            del acc.tables[seq], acc.lengths[seq]
            counts["free"] += 1
        if bm.num_free_blocks != acc.free():
            raise Fail(f"{step}: num_free_blocks is {bm.num_free_blocks}; {acc.free()} blocks are held by no "
                       "sequence", "a block returns to the free list when the last sequence holding it frees it")
        got_copies = bm.take_copies()
        if sorted(map(tuple, got_copies)) != sorted(copies):
            raise Fail(f"{step}: take_copies() returned {got_copies}; expected {copies}",
                       "append_slot into a block another sequence also holds takes a fresh block and records "
                       "(old block, new block)")
        copies = []
        for seq in sorted(acc.tables):
            if bm.block_table(seq) != acc.tables[seq] or bm.num_tokens(seq) != acc.lengths[seq]:
                raise Fail(f"{step}: sequence {seq}: block_table {bm.block_table(seq)} / num_tokens "
                           f"{bm.num_tokens(seq)}; expected {acc.tables[seq]} / {acc.lengths[seq]}")
    for seq in sorted(acc.tables):
        bm.free(seq)
    if bm.num_free_blocks != acc.n:
        raise Fail(f"{where}: after every sequence was freed, {bm.num_free_blocks} of {acc.n} blocks are free "
                   "(blocks leaked)")
    return counts


@LAB.criterion("block_manager_invariants", "correctness", 4, exercise="BlockManager", timeout_s=180)
def block_manager_invariants(learner: Learner, ctx: Context) -> Outcome:
    """Random call sequences (allocate, append_slot, fork, free, including running out of blocks): no block
    held twice, slots where the tables say, copy on write of shared blocks, every block free at the end."""
    cls = learner.fn("BlockManager")
    for bad in ((0, 16), (4, 0)):
        _expect_raise(lambda b=bad: cls(*b), ValueError, f"BlockManager{bad}")
    bm = cls(4, 4)
    bm.allocate(1, 3)
    _expect_raise(lambda: bm.allocate(1, 1), ValueError, "allocate(1, 1) for a sequence that already holds blocks")
    _expect_raise(lambda: bm.free(2), ValueError, "free(2) of a sequence that holds nothing")
    _expect_raise(lambda: bm.block_table(2), ValueError, "block_table(2) of a sequence that holds nothing")
    total: dict[str, int] = {}
    walks = 3 if ctx.quick else 6
    for seed in range(walks):
        for k, v in _walk(cls, ctx, seed, 120 if ctx.quick else 200).items():
            total[k] = total.get(k, 0) + v
    return Outcome(True, f"{walks} random walks ({', '.join(f'{v} {k}' for k, v in total.items())}): every answer "
                         "consistent, nothing leaked", total)


# ----------------------------------------------------------------------------- part 3: slot_mapping
@LAB.criterion("slot_mapping_layout", "correctness", 1, exercise="slot_mapping")
def slot_mapping_layout(learner: Learner, ctx: Context) -> Outcome:
    """Slots of prefill and decode batches with padding, tables out of order, block sizes 1, 4, 16."""
    import torch

    from servelab.reference.paged import slot_mapping

    rng, fn = ctx.rng("slots"), learner.fn("slot_mapping")
    for case in range(6):
        bs, B = rng.choice([1, 4, 16]), rng.randint(1, 5)
        T = 1 if case % 2 else rng.randint(2, 12)
        lens = [rng.randint(1, 40) for _ in range(B)]
        pool = list(range(200))
        rng.shuffle(pool)
        tables = [[pool.pop() for _ in range(_blocks_for(n, bs))] for n in lens]
        pos = torch.full((B, T), -1, dtype=torch.long)
        for row, n in enumerate(lens):
            real = rng.randint(1 if T == 1 else 0, min(T, n))
            pos[row, T - real:] = torch.arange(n - real, n)
        want, got = slot_mapping(tables, pos, bs), fn(tables, pos, bs)
        what = f"case {case}: block_size {bs}, positions {pos.tolist()}, tables {tables}"
        if not isinstance(got, torch.Tensor) or got.dtype != torch.long or tuple(got.shape) != (B * T,):
            raise Fail(f"{what}: slot_mapping returned {type(got).__name__} "
                       f"{getattr(got, 'dtype', '')} {tuple(getattr(got, 'shape', ()))}; expected LongTensor [{B * T}]")
        if not torch.equal(got, want):
            i = int((got != want).nonzero()[0])
            raise Fail(f"{what}: token {i} (row {i // T}) got slot {int(got[i])}, expected {int(want[i])}",
                       "-1 for padding; else table[p // block_size] * block_size + p % block_size, row-major")
    return Outcome(True, "6 batches: every slot right, padding -1")


# ----------------------------------------------------------------------------- part 4: kernels
def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _problem(ctx: Context, salt: str, lens: list[int], hkv: int, group: int, d: int, bs: int, dtype: str,
             shared: bool = True):
    """Random q and caches; each sequence's blocks scattered, tails of the tables filled with valid ids (a
    kernel reading past a sequence's blocks gets a wrong answer), optionally a block shared by two rows."""
    import torch

    g = torch.Generator().manual_seed(ctx.rng(salt).randrange(2**31))
    need = [_blocks_for(n, bs) for n in lens]
    num_blocks, width = sum(need) + 2, max(need) + 1
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.empty(len(lens), width, dtype=torch.int32)
    for row, k in enumerate(need):
        tables[row, :k] = torch.tensor([perm.pop() for _ in range(k)], dtype=torch.int32)
        tables[row, k:] = torch.randint(0, num_blocks, (width - k,), generator=g, dtype=torch.int32)
    if shared and len(lens) > 1 and need[0] > 1 and need[1] > 1:
        tables[1, 0] = tables[0, 0]  # a shared prefix block
    shape = (num_blocks, bs, hkv, d)
    k_cache = torch.randn(shape, generator=g).to(_dtype(dtype))
    v_cache = torch.randn(shape, generator=g).to(_dtype(dtype))
    q = torch.randn(len(lens), hkv * group, d, generator=g).to(_dtype(dtype))
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


def _compare(got, want, dtype: str, what: str, fn: str) -> None:
    import torch

    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        raise Fail(f"{what}: {fn} returned {type(got).__name__} {tuple(getattr(got, 'shape', ()))} "
                   f"{getattr(got, 'dtype', '')}; expected {tuple(want.shape)} {want.dtype} (q's shape and dtype)")
    got, want = got.float(), want.float()
    bad = ~torch.isfinite(got)
    if bad.any():
        b, h, _ = (int(i) for i in bad.nonzero()[0])
        raise Fail(f"{what}: NaN or inf in the output at sequence {b}, head {h}: an element was never written "
                   "(the output starts as NaN) or the softmax overflowed",
                   "write every (sequence, query head) row; mask scores past seq_len to -inf before the max")
    atol, rtol = TOL[dtype]
    err = (got - want).abs() - rtol * want.abs()
    if (err > atol).any():
        b, h, d = (int(i) for i in (err == err.max()).nonzero()[0])
        raise Fail(f"{what}: sequence {b}, head {h}, dim {d}: got {got[b, h, d]:.5f}, expected {want[b, h, d]:.5f} "
                   f"(tolerance {atol} + {rtol} x |expected| for {dtype})")


# (lengths, kv heads, group, head size, block size, dtype): ragged lengths with 1 and exact multiples of the
# block, GQA 1/2/4/8, head sizes 64/80/96 (not only powers of two), blocks 8/16/32, the three dtypes
DECODE_CASES = [
    ([77, 1, 16, 35], 2, 2, 64, 16, "float32"),
    ([1, 24, 40], 1, 8, 80, 8, "float16"),
    ([33, 64, 7], 2, 4, 96, 32, "bfloat16"),
    ([5, 96], 4, 1, 64, 8, "float32"),
]


DECODE_CASES_GPU = [  # Llama-3-8B-like and Qwen2-like attention at real lengths (compiled Triton only)
    ([1, 4096, 1600, 777, 2048, 16], 8, 4, 128, 16, "bfloat16"),
    ([513, 1, 3000], 4, 7, 128, 32, "float16"),
    ([2048, 5], 2, 8, 64, 16, "bfloat16"),
]


def _decode_check(learner: Learner, ctx: Context, fn_name: str, splits=(None,)) -> Outcome:
    import torch

    from servelab.paged.reference import paged_decode_reference

    fn, n = learner.fn(fn_name), 0
    cases = DECODE_CASES[:3] if ctx.quick else DECODE_CASES
    if ctx.device == "cuda":  # compiled: the shapes real models use, too
        cases = cases + DECODE_CASES_GPU
    for k, (lens, hkv, group, d, bs, dtype) in enumerate(cases):
        q, kc, vc, tables, seq_lens = (t.to(ctx.device) for t in
                                       _problem(ctx, f"{fn_name}-{k}", lens, hkv, group, d, bs, dtype))
        want = paged_decode_reference(q, kc, vc, tables, seq_lens, d ** -0.5)
        for s in splits:
            extra = {} if fn_name == "paged_decode" else {"num_splits": s}
            what = (f"case {k}: lengths {lens}, {hkv} KV heads x {group} query heads each, head size {d}, "
                    f"block {bs}, {dtype}" + (f", num_splits={s}" if fn_name != "paged_decode" else ""))
            poisoned = torch.full_like(q, float("nan"))
            got = fn(q, kc, vc, tables, seq_lens, d ** -0.5, out=poisoned, **extra)
            _compare(got, want, dtype, what, fn_name)
            n += 1
    return Outcome(True, f"{n} hidden problems match the PyTorch reference (ragged lengths incl. 1, GQA 1-8, "
                         "head sizes 64/80/96, blocks 8/16/32, fp32/fp16/bf16, tables out of order and shared)",
                   {"cases": n})


@LAB.criterion("store_kv_matches", "interpreter", 2, exercise="store_kv", timeout_s=180)
def store_kv_matches(learner: Learner, ctx: Context) -> Outcome:
    """Writes each token's K/V to its slot and nothing else (padding slots -1 untouched), any head size."""
    import torch

    from servelab.paged.reference import store_kv_reference

    fn, rng = learner.fn("store_kv"), ctx.rng("store")
    for k, (hkv, d, bs, dtype) in enumerate(((2, 64, 16, "float32"), (1, 80, 8, "float16"), (4, 96, 32, "bfloat16"))):
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        num_blocks, n = 6, rng.randint(5, 20)
        kc = torch.randn(num_blocks, bs, hkv, d, generator=g).to(ctx.device, _dtype(dtype))
        vc = torch.randn(num_blocks, bs, hkv, d, generator=g).to(ctx.device, _dtype(dtype))
        slots = torch.randperm(num_blocks * bs, generator=g)[:n]
        slots[torch.rand(n, generator=g) < 0.25] = -1
        slots = slots.to(ctx.device)
        keys = torch.randn(n, hkv, d, generator=g).to(ctx.device, _dtype(dtype))
        vals = torch.randn(n, hkv, d, generator=g).to(ctx.device, _dtype(dtype))
        want_k, want_v = kc.clone(), vc.clone()
        store_kv_reference(keys, vals, want_k, want_v, slots)
        _, after = call_in_place(fn, keys, vals, kc.clone(), vc.clone(), slots)
        what = f"case {k}: {n} tokens ({int((slots < 0).sum())} padding), {hkv} KV heads, head size {d}, block {bs}, {dtype}"
        for name, got, want in (("k_cache", after[2], want_k), ("v_cache", after[3], want_v)):
            if not torch.equal(got, want):
                blk, off = (int(i) for i in (got != want).nonzero()[0][:2])
                slot = blk * bs + off
                who = (slots == slot).nonzero()
                why = f"token {int(who[0])}'s slot" if len(who) else "a slot no token maps to (padding -1 or none)"
                raise Fail(f"{what}: {name} differs at block {blk}, offset {off} ({why})",
                           "skip slot -1; mask the head and head-size tails; block = slot // BLOCK_SIZE")
    return Outcome(True, "3 hidden batches written exactly; padding and unmapped slots untouched")


@LAB.criterion("paged_decode_matches", "interpreter", 4, exercise="paged_decode", timeout_s=240)
def paged_decode_matches(learner: Learner, ctx: Context) -> Outcome:
    """Equals the PyTorch reference on hidden problems: ragged lengths (1, exact block multiples), GQA
    1/2/4/8, head sizes 64/80/96, blocks 8/16/32, fp32/fp16/bf16; every output element written."""
    return _decode_check(learner, ctx, "paged_decode")


@LAB.criterion("paged_decode_split_matches", "interpreter", 2, exercise="paged_decode_split", timeout_s=300)
def paged_decode_split_matches(learner: Learner, ctx: Context) -> Outcome:
    """Stretch: split-KV equals the reference for the default split count, 2, 5 and more splits than blocks."""
    return _decode_check(learner, ctx, "paged_decode_split", splits=(None, 2, 5, 16))


# ----------------------------------------------------------------------------- part 5: the engine
def _engine(learner: Learner, *args, exercise: str = "paged_continuous_batching"):
    from servelab.engine import PagedEngineRun

    run = learner.fn(exercise)(*args)
    if not isinstance(run, PagedEngineRun):
        raise Fail(f"{exercise} returned {type(run).__name__}; expected a servelab.engine.PagedEngineRun")
    return run


KV_RECORDS_HINT = "used: tokens the live sequences hold; reserved: blocks in use x block size"


def _check_kv_records(run, num_blocks: int, block_size: int, case: str, hint: str = KV_RECORDS_HINT) -> None:
    if len(run.kv_tokens_used) != run.steps or len(run.kv_tokens_reserved) != run.steps:
        raise Fail(f"{case}: kv_tokens_used / kv_tokens_reserved have {len(run.kv_tokens_used)} / "
                   f"{len(run.kv_tokens_reserved)} entries; expected one per step ({run.steps})")
    for t, (u, r) in enumerate(zip(run.kv_tokens_used, run.kv_tokens_reserved)):
        if not 0 <= u <= r <= num_blocks * block_size or r % block_size:
            raise Fail(f"{case}: step {t} records {u} tokens used and {r} reserved with {num_blocks} blocks of "
                       f"{block_size}", hint)


def _check_front_of_queue(run, requests, case: str) -> None:
    """A preempted sequence goes back to the front of the waiting queue: no request that was still waiting
    when it was preempted is admitted before it is re-admitted."""
    spans: dict[int, list] = {}
    for o in run.occupancy:
        spans.setdefault(o.request_id, []).append(o)
    first = {rid: min(o.start for o in os_) for rid, os_ in spans.items()}
    for rid, os_ in spans.items():
        os_ = sorted(os_, key=lambda o: o.start)
        for out, back in zip(os_, os_[1:]):
            jumped = sorted(w for w, s in first.items() if out.end <= s < back.start)
            if jumped:
                raise Fail(f"{case}: request {rid} was preempted after step {out.end - 1} and re-admitted at step "
                           f"{back.start}, but requests {jumped[:5]} that were waiting were admitted before it",
                           "a preempted sequence goes back to the FRONT of the waiting queue (appendleft)")


@LAB.criterion("paged_engine_matches_alone", "correctness", 4, exercise="paged_continuous_batching",
               timeout_s=240)
def paged_engine_matches_alone(learner: Learner, ctx: Context) -> Outcome:
    """Hidden traces, every request's tokens equal to decoding it alone: plenty of blocks, so few blocks that
    sequences are preempted, a request too large for the whole cache (rejected), EOS, arrivals over time."""
    from dataclasses import replace

    from grader.labs.lab01_batching import _check_outputs, _eos_case, _requests
    from servelab.engine import StepClock

    reqs = _requests(ctx, "paged", 8 if ctx.quick else 12, (2, 20), (2, 28), rate=40.0)
    eos = _eos_case(ctx, reqs)
    # tight: room for the largest request alone and a little more, far less than 4 of them running at once
    tight = max(_blocks_for(r.prompt_len + r.max_new_tokens - 1, 4) for r in reqs) + 2
    big = replace(reqs[-1], id=len(reqs), prompt_ids=reqs[-1].prompt_ids[:4], max_new_tokens=4 * tight + 1)
    n, preempted = 0, 0
    for case, rs, blocks, eos_id in (("256 blocks of 4", reqs, 256, None), ("256 blocks of 4, eos_id set", reqs, 256, eos),
                                     (f"{tight} blocks of 4 (preemption)", reqs + [big], tight, None)):
        run = _engine(learner, ctx.model(), rs, 4, 64, eos_id, StepClock(DT), blocks, 4)
        served = [r for r in rs if r is not big]
        n += _check_outputs(ctx, run, served, eos_id, "paged_continuous_batching", case)
        _check_kv_records(run, blocks, 4, case)
        if big in rs:
            c = run.completions.get(big.id)
            if c is None or c.tokens or c.finish_reason != "error" or not c.error:
                raise Fail(f"{case}: request {big.id} needs {_blocks_for(4 + 4 * tight, 4)} blocks of 4 tokens at its "
                           f"longest, more than the {tight} the cache has; expected a Completion with finish_reason 'error' and a "
                           f"message; got {c!r}", "reject requests whose prompt + max_new_tokens - 1 tokens need more "
                           "blocks than num_blocks before scheduling")
            readmitted = sum(1 for r in served if sum(o.request_id == r.id for o in run.occupancy) > 1)
            if run.preemptions < 1 or readmitted < 1:
                raise Fail(f"{case}: preemptions={run.preemptions}, requests admitted twice: {readmitted}; {tight} "
                           "blocks cannot hold 4 running requests of this trace, so a sequence must give its blocks back",
                           "when a running sequence needs a block and none is free, free the newest running sequence "
                           "and put it back at the front of the waiting queue")
            preempted = run.preemptions
            _check_front_of_queue(run, served, case)
    return Outcome(True, f"3 hidden traces, {n} tokens, all equal to decoding alone ({preempted} preemptions "
                         "in the tight one)", {"tokens": n, "preemptions": preempted})


# ----------------------------------------------------------------------------- performance
def _budget_run(learner: Learner, ctx: Context):
    from servelab.engine import StepClock
    from servelab.workloads import standard_trace

    reqs = standard_trace("skewed", encode=ctx.tokenizer(), scale=0.5 if ctx.quick else 1.0).requests
    num_blocks = BUDGET_SLOTS * BUDGET_MAX_LEN // BLOCK
    run = _engine(learner, ctx.model(), reqs, 256, 4096, ctx.tokenizer().eos_token_id, StepClock(DT), num_blocks,
                  BLOCK, BUDGET_MAX_LEN)
    _check_kv_records(run, num_blocks, BLOCK, "skewed trace")
    return reqs, run


@LAB.criterion("paged_kv_efficiency", "performance", 2, exercise="paged_continuous_batching", timeout_s=240)
def paged_kv_efficiency(learner: Learner, ctx: Context) -> Outcome:
    """Skewed trace in lab 01's cache memory (8 x 1,024 tokens, blocks of 8): the share of reserved KV
    token-steps that held a token (deterministic; >= 96%, i.e. under 4% waste), against the contiguous cache's."""
    from servelab.engine import StepClock
    from servelab.reference.batching import continuous_batching
    from servelab.reference.paged import kv_usage

    reqs, run = _budget_run(learner, ctx)
    base = continuous_batching(ctx.model(), reqs, BUDGET_SLOTS, 4096, ctx.tokenizer().eos_token_id, StepClock(DT),
                               BUDGET_MAX_LEN)
    used, reserved = kv_usage(base, reqs, BUDGET_MAX_LEN)
    contiguous = sum(used) / max(1, sum(reserved))
    efficiency = sum(run.kv_tokens_used) / max(1, sum(run.kv_tokens_reserved))
    need = ctx.threshold
    metrics = {"speedup": round(efficiency, 4), "threshold": need, "paged_waste": round(1 - efficiency, 4),
               "contiguous_waste": round(1 - contiguous, 4), "preemptions": run.preemptions}
    verdict = (f"{len(reqs)} requests: paged KV waste {1 - efficiency:.1%} (used / reserved token-steps "
               f"{efficiency:.1%}) against the contiguous cache's {1 - contiguous:.0%}")
    if need is not None and efficiency >= need:
        return Outcome(True, f"{verdict}; under the {1 - need:.0%} bar", metrics)
    raise Fail(f"{verdict}; the bar is {1 - (need or MIN_KV_EFFICIENCY):.0%} waste",
               "reserve only the blocks a sequence's tokens fill: a new block when the last is full, and give "
               "every block back the step a request finishes")


@LAB.criterion("paged_concurrency", "performance", 2, exercise="paged_continuous_batching", timeout_s=240)
def paged_concurrency(learner: Learner, ctx: Context) -> Outcome:
    """In the same KV memory as lab 01's 8 slots of 1,024 tokens, how many sequences run at once (max_running
    unbounded): deterministic; at least 3x the contiguous cache's 8."""
    reqs, run = _budget_run(learner, ctx)
    ratio = run.max_running / BUDGET_SLOTS
    metrics = {"speedup": round(ratio, 3), "threshold": ctx.threshold, "max_running": run.max_running,
               "steps": run.steps, "preemptions": run.preemptions}
    verdict = (f"skewed trace ({len(reqs)} requests) in {BUDGET_SLOTS} x {BUDGET_MAX_LEN} tokens of KV memory: at most "
               f"{run.max_running} sequences at once against the contiguous cache's {BUDGET_SLOTS} ({ratio:.1f}x)")
    if ctx.threshold is not None and ratio >= ctx.threshold:
        return Outcome(True, f"{verdict}; threshold {ctx.threshold}x", metrics)
    raise Fail(f"{verdict}, below the {ctx.threshold}x threshold",
               "admit while the prompt's blocks fit (can_allocate), not while a fixed number of slots is free")


@LAB.criterion("paged_throughput", "performance", 1, exercise="paged_continuous_batching", timeout_s=300)
def paged_throughput(learner: Learner, ctx: Context) -> Outcome:
    """Wall-clock throughput, your paged engine over lab 01's continuous batching in the same KV memory, half
    the skewed trace: median of alternating pairs; the step ratio of the same runs is shown with it."""
    from servelab.engine import WallClock
    from servelab.reference.batching import continuous_batching
    from servelab.timing import paired_benchmark
    from servelab.workloads import standard_trace

    reqs = standard_trace("skewed", encode=ctx.tokenizer(), scale=0.5).requests
    model, eos, num_blocks = ctx.model(), ctx.tokenizer().eos_token_id, BUDGET_SLOTS * BUDGET_MAX_LEN // BLOCK
    runs: dict[str, list] = {"contiguous": [], "paged": []}
    timing = paired_benchmark(
        lambda: runs["contiguous"].append(continuous_batching(model, reqs, BUDGET_SLOTS, 4096, eos, WallClock(),
                                                              BUDGET_MAX_LEN)),
        lambda: runs["paged"].append(_engine(learner, model, reqs, 256, 4096, eos, WallClock(), num_blocks, BLOCK,
                                             BUDGET_MAX_LEN)),
        repeats=2 if ctx.quick else 3, warmup=0, device=model.device)
    timed_runs_differ(runs["contiguous"], runs["paged"], reqs, "lab 01's engine")
    step_ratio = runs["contiguous"][0].steps / max(1, runs["paged"][0].steps)
    return speed_verdict(f"half the skewed trace ({len(reqs)} requests) in the same KV memory: paged / contiguous "
                         "throughput", timing, ctx.threshold, ctx.device_class,
                         f"{step_ratio:.2f}x fewer steps in the same runs", step_ratio >= 1.5,
                         {"contiguous_steps": runs["contiguous"][0].steps, "paged_steps": runs["paged"][0].steps,
                          "max_running": runs["paged"][0].max_running})


# ----------------------------------------------------------------------------- GPU
GPU_HEADS = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")
GPU_SHAPES = {"paged_decode": (64, 4096), "paged_decode_split": (8, 8192), "long": (1, 32768)}  # (batch, tokens)
GPU_REPEAT = 20


def _timed(learner: Learner, ctx: Context, fn_name: str, shape: str):
    """(seconds per call, the problem, its description): the problem is built in the learner's worker from a
    seeded recipe and the same one here; the grader times GPU_REPEAT calls, then checks three of them."""
    import torch

    from servelab.paged.bench import build_problem
    from servelab.paged.reference import paged_decode_reference

    device, (batch, context) = torch.device(ctx.device), GPU_SHAPES[shape]
    recipe = dict(GPU_HEADS, batch=batch, context=context, seed=ctx.rng(fn_name + shape).randrange(2**31),
                  repeat=GPU_REPEAT)
    picks = sorted(ctx.rng(f"{fn_name}-{shape}-picks").sample(range(GPU_REPEAT), 3))
    seconds, outs = bench_calls(learner.fn(fn_name), recipe, {}, picks, ctx.device)
    problem = build_problem(recipe, device)
    what = (f"batch {batch} x {context} tokens, {GPU_HEADS['dtype']}, {GPU_HEADS['num_q_heads']}/"
            f"{GPU_HEADS['num_kv_heads']} heads, head {GPU_HEADS['head_dim']}, block {GPU_HEADS['block_size']}")
    for i, got in zip(picks, outs):
        want = paged_decode_reference(*problem.args(i))
        _compare(got.to(device) if hasattr(got, "to") else got, want, GPU_HEADS["dtype"], f"{what}, timed call {i}",
                 fn_name)
    return seconds / GPU_REPEAT, problem, what


def _sdpa_per_call(problem, device: str) -> float:
    """The PyTorch baseline, timed here: SDPA over K/V gathered once into contiguous tensors beforehand (the
    gather is not charged to it)."""
    import time

    import torch.nn.functional as F

    from servelab.device import synchronize
    from servelab.paged.bench import sdpa_inputs

    _, k, v = sdpa_inputs(problem.q[0], problem.k_cache, problem.v_cache, problem.block_tables,
                          int(problem.seq_lens.max()))

    def call(i):
        return F.scaled_dot_product_attention(problem.q[i][:, :, None], k, v, scale=problem.scale, enable_gqa=True)

    call(0)
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(problem.repeat):
        call(i)
    synchronize(device)
    return (time.perf_counter() - t0) / problem.repeat


def _share(problem, per_call: float, device: str) -> float:
    import torch

    from servelab.paged.bench import copy_bandwidth

    return problem.bytes_per_call / per_call / (copy_bandwidth(torch.device(device)) or math.inf)


@LAB.criterion("paged_decode_bandwidth", "gpu", 2, exercise="paged_decode", timeout_s=300)
def paged_decode_bandwidth(learner: Learner, ctx: Context) -> Outcome:
    """On a GPU: paged_decode at batch 64 x 4,096 tokens reads K/V at >= 75% of the card's measured
    device-to-device copy bandwidth and beats PyTorch SDPA over pre-gathered K/V (both timed by the grader;
    outputs of the timed calls checked)."""
    per_call, problem, what = _timed(learner, ctx, "paged_decode", "paged_decode")
    share, sdpa = _share(problem, per_call, ctx.device), _sdpa_per_call(problem, ctx.device)
    metrics = {"share_of_copy_bandwidth": round(share, 3), "us_per_call": round(per_call * 1e6, 1),
               "sdpa_us_per_call": round(sdpa * 1e6, 1)}
    said = (f"{what}: {per_call * 1e6:.0f} us per call, {share:.0%} of copy bandwidth (bar 75%); SDPA over "
            f"gathered K/V {sdpa * 1e6:.0f} us")
    if share >= 0.75 and per_call < sdpa:
        return Outcome(True, said, metrics)
    raise Fail(said + ("" if per_call < sdpa else "; the kernel must be faster than SDPA"),
               "one program per (sequence, KV head) sharing K/V loads across the group; tiles of 32-64 tokens; "
               "try num_warps and BLOCK_N")


@LAB.criterion("split_kv_bandwidth", "gpu", 2, exercise="paged_decode_split", timeout_s=400)
def split_kv_bandwidth(learner: Learner, ctx: Context) -> Outcome:
    """On a GPU (stretch): paged_decode_split at batch 8 x 8,192 tokens reads K/V at >= 50% of the card's copy
    bandwidth, and at batch 1 x 32,768 is not slower than PyTorch SDPA over pre-gathered K/V."""
    per_call, problem, what = _timed(learner, ctx, "paged_decode_split", "paged_decode_split")
    share = _share(problem, per_call, ctx.device)
    long_call, long_problem, long_what = _timed(learner, ctx, "paged_decode_split", "long")
    sdpa = _sdpa_per_call(long_problem, ctx.device)
    metrics = {"share_of_copy_bandwidth": round(share, 3), "us_per_call": round(per_call * 1e6, 1),
               "long_us_per_call": round(long_call * 1e6, 1), "long_sdpa_us_per_call": round(sdpa * 1e6, 1)}
    said = (f"{what}: {share:.0%} of copy bandwidth (bar 50%); {long_what}: {long_call * 1e6:.0f} us against SDPA's "
            f"{sdpa * 1e6:.0f} us")
    if share >= 0.5 and long_call <= sdpa:
        return Outcome(True, said, metrics)
    raise Fail(said, "more splits: enough (sequence, KV head, split) programs for two waves over the multiprocessors")


# the prefix-caching stretch (its own module: it is long enough to read on its own)
from grader.labs.paged_prefix import add_criteria  # noqa: E402

add_criteria(LAB)
