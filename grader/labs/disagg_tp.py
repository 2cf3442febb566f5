"""Lab 04, stretch: the KV layout transform across tensor parallelism (TP=2 prefill -> TP=1 decode and back).

Graded: ``split_kv_heads(blocks, world) -> parts`` and ``merge_kv_heads(parts) -> blocks``, and the connector
``send_kv_split(links, cache, layer, table)`` / ``recv_kv_merged(links, cache, table)``, run across three real
processes by the given ``kv_handover_tp`` (``servelab.disagg.tp_handover``).

``add_criteria(LAB)`` registers the two criteria on lab 04's ``Lab``. The layout is checked exactly on hand-made
blocks whose heads all differ; the handover by its tokens against plain single-rank greedy decoding and by the
blocks the decode side received against the single-rank prefill's.
"""

from __future__ import annotations

from grader.spec import Context, Fail, Lab, Learner, Outcome

MARGIN = 1e-2  # smallest top-2 logit gap a hidden prompt may have at any step (see _comfortable)
KV_TOL = {"rtol": 1e-4, "atol": 1e-5}  # a TP=2 prefill's KV against one rank's (float32 sums, another order)


# ----------------------------------------------------------------------------- split_kv_heads / merge_kv_heads
def _layout_cases(ctx: Context) -> list[tuple[str, object, int]]:
    """(what, blocks, world): every head offset by 10 x its index, so a head found in the wrong place shows."""
    import torch

    gen = torch.Generator().manual_seed(ctx.rng("tp_layout").randrange(2**31))

    def blocks(n, bs, heads, dim, dtype=torch.float32):
        x = torch.randn(n, bs, heads, dim, generator=gen) + 10 * torch.arange(heads)[None, None, :, None]
        return x.to(dtype)

    return [("5 blocks of 4 tokens x 2 heads x 8 dims, world 2", blocks(5, 4, 2, 8), 2),
            ("3 blocks of 16 x 4 heads x 16 dims, world 2", blocks(3, 16, 4, 16), 2),
            ("3 blocks of 16 x 4 heads x 16 dims, world 4", blocks(3, 16, 4, 16), 4),
            ("2 blocks of 8 x 4 heads x 8 dims in bfloat16, world 2", blocks(2, 8, 4, 8, torch.bfloat16), 2),
            ("1 block of 4 x 2 heads x 8 dims, world 1", blocks(1, 4, 2, 8), 1)]


def _which_heads(x, part) -> list[int | None]:
    """For each head of ``part``, the head of ``x`` it equals (None: none)."""
    import torch

    return [next((h for h in range(x.shape[2]) if x.shape[3] == part.shape[3] and torch.equal(part[:, :, i], x[:, :, h])),
                 None) for i in range(part.shape[2])]


def _check_split(what: str, x, world: int, parts) -> None:
    import torch

    n, bs, heads, dim = x.shape
    h = heads // world
    if not isinstance(parts, list | tuple) or len(parts) != world:
        raise Fail(f"split_kv_heads({what}): returned {type(parts).__name__} of "
                   f"{len(parts) if isinstance(parts, list | tuple) else '-'} parts; expected a list of {world}, "
                   "one per rank")
    for r, part in enumerate(parts):
        want = x[:, :, r * h:(r + 1) * h]
        shape = tuple(getattr(part, "shape", ()))
        if not isinstance(part, torch.Tensor) or shape != tuple(want.shape) or part.dtype != x.dtype:
            hint = ("split the heads (axis 2 of [n, block_size, heads, head_dim]), not another axis"
                    if isinstance(part, torch.Tensor) and part.numel() == want.numel() else
                    "each part holds num_kv_heads / world whole heads of every block and token")
            raise Fail(f"split_kv_heads({what}): part {r} is {getattr(part, 'dtype', type(part).__name__)} {shape}; "
                       f"expected {x.dtype} {tuple(want.shape)}", hint)
        if not torch.equal(part, want):
            found = _which_heads(x, part)
            raise Fail(f"split_kv_heads({what}): part {r} should hold heads {list(range(r * h, (r + 1) * h))}; "
                       f"it holds {['?' if f is None else f for f in found]} ('?': no head of the blocks)",
                       "rank r holds the contiguous run of heads r * H / world .. (r + 1) * H / world - 1, as "
                       "shard_model gives rank r its query and KV heads; split along axis 2, in order")
        if not part.is_contiguous():
            raise Fail(f"split_kv_heads({what}): part {r} is not contiguous",
                       "return part.contiguous(): a slice of the heads axis is a strided view, and a send needs "
                       "one buffer")


def _check_merge(learner: Learner, what: str, x, world: int) -> None:
    import torch

    h = x.shape[2] // world
    parts = [x[:, :, r * h:(r + 1) * h].contiguous() for r in range(world)]
    got = learner.fn("merge_kv_heads")(parts)
    if not isinstance(got, torch.Tensor) or got.shape != x.shape or got.dtype != x.dtype:
        raise Fail(f"merge_kv_heads of {what} split in {world}: got {getattr(got, 'dtype', type(got).__name__)} "
                   f"{tuple(getattr(got, 'shape', ()))}; expected {x.dtype} {tuple(x.shape)}",
                   "concatenate the parts along the heads axis (2)")
    if not torch.equal(got, x):
        if world > 1 and torch.equal(got, torch.cat(parts[::-1], dim=2)):
            raise Fail(f"merge_kv_heads of {what}: the heads came back in reverse rank order",
                       "join the parts in rank order: part 0 holds heads 0 .. H / world - 1")
        found = _which_heads(x, got)
        raise Fail(f"merge_kv_heads of {what} split in {world}: head i of the result holds head "
                   f"{['?' if f is None else f for f in found]} of the original; expected {list(range(x.shape[2]))}",
                   "torch.cat(parts, dim=2), parts in rank order")


def tp_layout(learner: Learner, ctx: Context) -> Outcome:
    """Hidden blocks whose heads all differ (float32 and bfloat16, worlds 1, 2 and 4): ``split_kv_heads`` gives
    rank r its contiguous run of heads, exactly; ``merge_kv_heads`` undoes it (a round trip is bit for bit);
    heads that do not divide by ``world`` are a ValueError."""
    import torch

    for what, x, world in _layout_cases(ctx):
        _check_split(what, x, world, learner.fn("split_kv_heads")(x, world))
        _check_merge(learner, what, x, world)
        back = learner.fn("merge_kv_heads")(learner.fn("split_kv_heads")(x, world))
        if not torch.equal(back, x):
            raise Fail(f"merge_kv_heads(split_kv_heads({what})) is not the blocks it started from")
    odd = torch.randn(2, 4, 3, 8)
    try:
        learner.fn("split_kv_heads")(odd, 2)
    except ValueError:
        pass
    else:
        raise Fail("split_kv_heads of blocks with 3 heads, world 2, did not raise ValueError: 3 heads cannot be "
                   "shared out evenly (shard_model refuses such a model too)")
    return Outcome(True, f"{len(_layout_cases(ctx))} hidden sets of blocks: split and merge exact, round trips bit "
                         "for bit; 3 heads over 2 ranks refused", {})


# ----------------------------------------------------------------------------- the handover
def _margins(model, prompt: list[int], tokens: list[int]) -> float:
    """Smallest gap between the best and second-best logit over the steps that chose ``tokens``."""
    import torch

    ids = torch.tensor([prompt + tokens[:-1]])
    logits = model(ids)[0, len(prompt) - 1:]  # [len(tokens), vocab]: the logits each token was chosen from
    top = logits.topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def _comfortable(ctx: Context, model, max_new: int) -> list[tuple[str, list[int], list[int]]]:
    """(what, prompt, single-rank greedy tokens) of 3 hidden prompts: 1 token, a few blocks, many blocks.

    A TP forward sums its partials in another order, so its logits differ from one rank's by ~1e-6; at a near
    tie (two logits that close) the argmax could flip and a correct handover would decode other tokens. So
    every hidden prompt is one whose top-2 logit gap is at least MARGIN at every step: then identical tokens
    is what a correct handover must give, and anything else is a wrong KV."""
    from servelab.reference.warmup import greedy_decode

    rng, vocab = ctx.rng("tp_prompts"), model.config.vocab_size
    out = []
    for what, lo, hi in (("a 1-token prompt", 1, 1), ("a prompt of", 5, 11), ("a prompt of", 33, 45)):
        for _ in range(50):
            prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))]
            tokens = greedy_decode(model, prompt, max_new)
            if _margins(model, prompt, tokens) >= MARGIN:
                break
        else:
            raise RuntimeError(f"no hidden {what} with a top-2 logit gap >= {MARGIN} in 50 draws")
        label = what if lo == hi else f"{what} {len(prompt)} tokens ({-(-len(prompt) // 4)} blocks of 4)"
        out.append((label, prompt, tokens))
    return out


def _prefill_blocks(model, prompt: list[int]) -> dict[str, list]:
    """The single-rank prefill's K and V blocks of ``prompt`` (blocks of 4, in order)."""
    import torch

    from servelab.paged.cache import PagedKVCache, blocks_for

    n = blocks_for(len(prompt), 4)
    cache = PagedKVCache.for_model(model, n, 4)
    model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache.view([list(range(n))]))
    return {"k": cache.k, "v": cache.v}


def _check_blocks(direction: str, what: str, got: dict, want: dict) -> None:
    """The decode side's blocks against one rank's: exact for 1->2 (one rank prefilled), to KV_TOL for 2->1."""
    import torch

    exact = direction == "1->2"
    for kind in ("k", "v"):
        for layer, w in enumerate(want[kind]):
            g = got[kind][layer] if isinstance(got, dict) and kind in got else None
            if not isinstance(g, torch.Tensor) or g.shape != w.shape:
                raise Fail(f"{direction}, {what}: the decode side's layer {layer} {kind.upper()} blocks are "
                           f"{tuple(getattr(g, 'shape', ()))}; expected {tuple(w.shape)} (all the model's heads)")
            same = torch.equal(g, w) if exact else torch.allclose(g, w, **KV_TOL)
            if same:
                continue
            heads = w.shape[2]
            found = [next((j for j in range(heads) if torch.allclose(g[:, :, i], w[:, :, j], **KV_TOL)), None)
                     for i in range(heads)]
            said = (f"{direction}, {what}: layer {layer} {kind.upper()} received by the decode side differs from "
                    f"the single-rank prefill's (" + ("bit for bit: one rank prefilled" if exact else
                                                        "to rtol 1e-4: TP=2 adds its partial sums in another "
                                                        "order, so only rounding may differ") + ")")
            if sorted(f for f in found if f is not None) == list(range(heads)):
                raise Fail(f"{said}: its head i holds the prefill's head {found}",
                           "merge the parts in link order (rank 0's heads first) and split into contiguous runs, "
                           "in rank order")
            if float(g.abs().max()) == 0:
                raise Fail(f"{said}: the blocks are all zeros", "write the merged parts into the cache's blocks "
                                                                "table (row i into table[i])")
            raise Fail(said, "per layer K then V, blocks gathered in table order and written row i into table[i]; "
                             "split by heads on the sender, merged by heads on the receiver")


def tp_handover(learner: Learner, ctx: Context) -> Outcome:
    """``kv_handover_tp`` across three real processes, "2->1" (TP=2 prefill, one decode rank) and "1->2": on
    hidden prompts of 1 token, a few and many blocks, the tokens equal plain single-rank greedy decoding, and
    the KV the decode side received equals the single-rank prefill's (bit for bit for 1->2; to float rounding
    for 2->1, where the TP prefill adds its partial sums in another order)."""
    model = ctx.model(device="cpu")  # the ranks load it on their device; this process never touches CUDA
    max_new = 6 if ctx.quick else 10
    cases = _comfortable(ctx, model, max_new)
    prompts = [p for _, p, _ in cases]
    sent = {}
    for direction in ("2->1", "1->2"):
        try:
            got = learner.fn("kv_handover_tp")(model, prompts, max_new, direction, block_size=4, timeout_s=120)
        except NotImplementedError:
            raise  # a subclass of RuntimeError: an exercise not written yet, reported as such
        except RuntimeError as err:
            raise Fail(f"{direction}: {err}") from None
        if not isinstance(got, dict) or not {"tokens", "blocks", "bytes_sent"} <= set(got):
            raise Fail(f"{direction}: kv_handover_tp returned {type(got).__name__}; expected {{'tokens', 'blocks', "
                       "'bytes_sent'}} (is the given kv_handover_tp changed?)")
        for (what, prompt, want), tokens, blocks in zip(cases, got["tokens"], got["blocks"]):
            _check_blocks(direction, what, blocks, _prefill_blocks(model, prompt))
            if tokens != want:
                k = next((i for i, (a, b) in enumerate(zip(want, tokens)) if a != b), min(len(want), len(tokens)))
                raise Fail(f"{direction}, {what}: decoded {tokens}; single-rank greedy decoding gives {want} (first "
                           f"difference at token {k}; every step's top-2 logit gap is >= {MARGIN}, so rounding "
                           "cannot explain it)", "the KV arrived right (checked first): check the first token, "
                                                 "sent by prefill rank 0 after the KV")
        sent[direction] = {int(r): int(b) for r, b in got["bytes_sent"].items()}
    return Outcome(True, f"3 hidden prompts, 2->1 and 1->2 across three processes: tokens equal to one rank's, KV "
                         f"blocks equal; bytes sent per prefill rank {sent}", {"bytes_sent": sent})


def add_criteria(lab: Lab) -> None:
    """Register the TP layout criteria on lab 04's ``Lab`` (and its graded functions)."""
    for name in ("split_kv_heads", "merge_kv_heads", "send_kv_split", "recv_kv_merged", "kv_handover_tp"):
        if name not in lab.functions:
            lab.functions = (*lab.functions, name)
    lab.criterion("tp_layout", "correctness", 1, exercise="split_kv_heads", timeout_s=60)(tp_layout)
    lab.criterion("tp_handover", "correctness", 2, exercise="send_kv_split", timeout_s=300,
                  gate=("tp_layout",))(tp_handover)
