"""Lab 03 (speculative decoding), the solution's graded cells as a plain module.

Each section below becomes one graded cell of ``solutions/03_speculative/speculative.ipynb``: the
signature and docstring stay in the learner's notebook, the code between the BEGIN/END SOLUTION markers
is what the learner writes.

KV caches and rejection: K/V of position p live at index p of a contiguous cache, and a forward reads
keys only up to its own largest position (causally masked). So rejected drafts need no copy and no
"rollback": the next forward writes the same positions again, and nothing reads a stale entry before it
is overwritten. Each model only has to remember how many positions of the sequence it holds.
"""
from __future__ import annotations

import torch

from servelab.speculative import SpecRun, check_speculative


# ----------------------------------------------------------------------------- cell: speculative_greedy
@torch.inference_mode()
def speculative_greedy(target, draft, prompt_ids: list[int], max_new_tokens: int, gamma: int,
                       eos_id: int | None = None) -> SpecRun:
    """Greedy speculative decoding at batch 1; the tokens equal plain greedy decoding of ``target``.

    Each round: ``draft`` proposes up to ``gamma`` tokens one at a time (its own KV cache), ``target``
    scores the last token and all proposals in ONE forward, the longest prefix of proposals that equal
    the target's argmax is accepted, and the target's next token is appended (the correction, or a bonus
    token when all were accepted). A round drafts min(gamma, tokens still to produce) tokens and stops
    drafting after a proposed ``eos_id``. Raises ValueError for gamma < 1, different vocabularies, a bad
    prompt. Returns a ``SpecRun`` (tokens, per-round (drafted, accepted), forward counts without prefills).
    """
    ### BEGIN SOLUTION: prefill both caches with prompt[:-1]; per round draft k tokens (first feeding what the draft has not seen: 1 token, or 2 after an all-accepted round), verify [last token] + drafts in one target forward, accept the agreeing prefix + the target's token, trim at EOS / max_new_tokens, and remember how many positions each cache holds
    check_speculative(target, draft, prompt_ids, max_new_tokens, gamma)
    n = len(prompt_ids)
    t_view = target.new_cache(1, n + max_new_tokens).rows([0])
    d_view = draft.new_cache(1, n + max_new_tokens).rows([0])
    if n > 1:  # the last prompt token opens the first round, like every later round's last token
        ids, pos = torch.tensor([prompt_ids[:-1]]), torch.arange(n - 1)[None]
        target(ids, pos, t_view)
        draft(ids, pos, d_view)
    seq, run = list(prompt_ids), SpecRun()
    d_len = n - 1  # positions the draft's cache holds; the target's always holds len(seq) - 1
    while len(seq) - n < max_new_tokens and not (seq[-1] == eos_id and len(seq) > n):
        k = min(gamma, max_new_tokens - (len(seq) - n))
        p = len(seq) - 1  # the last token's position: neither model has seen it yet
        drafted, new = [], seq[d_len:]
        for _ in range(k):
            logits = draft(torch.tensor([new]), torch.arange(d_len, d_len + len(new))[None], d_view)
            d_len += len(new)
            new = [int(logits[0, -1].argmax())]
            drafted.append(new[0])
            if new[0] == eos_id:
                break
        logits = target(torch.tensor([[seq[-1]] + drafted]), torch.arange(p, p + len(drafted) + 1)[None], t_view)
        best = logits[0].argmax(-1).tolist()  # the target's choice after the last token and after each draft
        j = 0
        while j < len(drafted) and drafted[j] == best[j]:
            j += 1
        emitted = drafted[:j] + [best[j]]
        if eos_id in emitted:
            emitted = emitted[: emitted.index(eos_id) + 1]
        seq += emitted[: max_new_tokens - (len(seq) - n)]
        d_len = min(d_len, len(seq) - 1)  # the draft's K/V past the accepted prefix get overwritten
        run.rounds.append((len(drafted), j))
        run.target_forwards += 1
        run.draft_forwards += len(drafted)
    run.tokens = seq[n:]
    return run
    ### END SOLUTION


# ----------------------------------------------------------------------------- cell: accept_or_resample
def accept_or_resample(p: torch.Tensor, q: torch.Tensor, drafted: list[int],
                       generator: torch.Generator) -> tuple[int, int]:
    """The lossless acceptance step of speculative sampling (Leviathan et al.; Chen et al.).

    p: [k + 1, V] the target's probabilities after the last token and after each draft; q: [k, V] the
    draft's probabilities each draft was sampled from; drafted: the k drafted token ids. Draft i is
    accepted with probability min(1, p[i, d] / q[i, d]); at the first rejection the replacement is
    sampled from norm(max(0, p[i] - q[i])); when all k are accepted a bonus token is sampled from p[k].
    All randomness comes from ``generator`` (on p's device). Returns (accepted count, next token): the
    emitted tokens are drafted[:accepted] + [next token], distributed exactly as sampling from p.
    """
    ### BEGIN SOLUTION: for each draft draw r ~ U[0, 1) and accept while r * q < p; on the first rejection sample from the normalised residual max(0, p - q) (p itself if it is all zero); all accepted: sample the bonus from p[k]
    for i, tok in enumerate(drafted):
        r = torch.rand((), generator=generator, device=p.device)
        if r * q[i, tok] < p[i, tok]:  # r < p/q, without dividing by q
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        if not residual.sum() > 0:  # p == q up to rounding: nothing to correct
            residual = p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(drafted), int(torch.multinomial(p[len(drafted)], 1, generator=generator))
    ### END SOLUTION


# ----------------------------------------------------------------------------- cell: speculative_sample
@torch.inference_mode()
def speculative_sample(target, draft, prompt_ids: list[int], max_new_tokens: int, gamma: int,
                       temperature: float, generator: torch.Generator, eos_id: int | None = None) -> SpecRun:
    """Speculative sampling at batch 1: the tokens are distributed as sampling ``target`` at ``temperature``.

    The rounds of ``speculative_greedy``, with the draft *sampling* its proposals from q = softmax(draft
    logits / temperature) and ``accept_or_resample`` deciding against p = softmax(target logits /
    temperature). Every random draw uses ``generator`` (a CPU torch.Generator: probabilities are moved to
    the CPU), so a seed fixes the run. temperature must be > 0 (ValueError otherwise).
    """
    ### BEGIN SOLUTION: as speculative_greedy, but each draft step samples its token from q (keep the q rows), the verify forward gives p for every position, and accept_or_resample picks the accepted count and the next token
    check_speculative(target, draft, prompt_ids, max_new_tokens, gamma, temperature)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator (seeded), got {type(generator).__name__}")
    n = len(prompt_ids)
    t_view = target.new_cache(1, n + max_new_tokens).rows([0])
    d_view = draft.new_cache(1, n + max_new_tokens).rows([0])
    if n > 1:
        ids, pos = torch.tensor([prompt_ids[:-1]]), torch.arange(n - 1)[None]
        target(ids, pos, t_view)
        draft(ids, pos, d_view)
    seq, run = list(prompt_ids), SpecRun()
    d_len = n - 1
    while len(seq) - n < max_new_tokens and not (seq[-1] == eos_id and len(seq) > n):
        k = min(gamma, max_new_tokens - (len(seq) - n))
        p = len(seq) - 1
        drafted, q_rows, new = [], [], seq[d_len:]
        for _ in range(k):
            logits = draft(torch.tensor([new]), torch.arange(d_len, d_len + len(new))[None], d_view)
            d_len += len(new)
            q_rows.append(torch.softmax(logits[0, -1].cpu() / temperature, -1))
            new = [int(torch.multinomial(q_rows[-1], 1, generator=generator))]
            drafted.append(new[0])
            if new[0] == eos_id:
                break
        logits = target(torch.tensor([[seq[-1]] + drafted]), torch.arange(p, p + len(drafted) + 1)[None], t_view)
        probs = torch.softmax(logits[0].cpu() / temperature, -1)
        q = torch.stack(q_rows) if q_rows else probs[:0]
        j, nxt = accept_or_resample(probs, q, drafted, generator)
        emitted = drafted[:j] + [nxt]
        if eos_id in emitted:
            emitted = emitted[: emitted.index(eos_id) + 1]
        seq += emitted[: max_new_tokens - (len(seq) - n)]
        d_len = min(d_len, len(seq) - 1)
        run.rounds.append((len(drafted), j))
        run.target_forwards += 1
        run.draft_forwards += len(drafted)
    run.tokens = seq[n:]
    return run
    ### END SOLUTION


# ----------------------------------------------------------------------------- cell: prompt lookup
def prompt_lookup_propose(context: list[int], ngram: int, k: int) -> list[int]:
    """Prompt lookup: up to ``k`` tokens that followed the most recent earlier occurrence of the context's
    last ``ngram`` tokens; if there is none, the same for ngram - 1, ... 1; [] when nothing matches.

    "Earlier" means the occurrence ends before the last token, so at least one token follows it.
    """
    ### BEGIN SOLUTION: for n = ngram .. 1: scan start positions from the end backwards (excluding the tail itself) for the last n tokens; return up to k tokens after the first hit
    for n in range(min(ngram, len(context) - 1), 0, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == tail:
                return list(context[start + n : start + n + k])
    return []
    ### END SOLUTION


@torch.inference_mode()
def speculative_lookup(target, prompt_ids: list[int], max_new_tokens: int, gamma: int, ngram: int = 3,
                       eos_id: int | None = None) -> SpecRun:
    """Greedy speculative decoding with prompt lookup as the proposer (no draft model): each round
    proposes ``prompt_lookup_propose(prompt + tokens so far, ngram, min(gamma, tokens still to produce))``,
    possibly nothing (then the round is a plain decode step). Tokens equal plain greedy decoding."""
    ### BEGIN SOLUTION: the loop of speculative_greedy with the proposals from prompt_lookup_propose; no draft cache to keep
    check_speculative(target, None, prompt_ids, max_new_tokens, gamma)
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
        raise ValueError(f"ngram must be an int >= 1, got {ngram!r}")
    n = len(prompt_ids)
    view = target.new_cache(1, n + max_new_tokens).rows([0])
    if n > 1:
        target(torch.tensor([prompt_ids[:-1]]), torch.arange(n - 1)[None], view)
    seq, run = list(prompt_ids), SpecRun()
    while len(seq) - n < max_new_tokens and not (seq[-1] == eos_id and len(seq) > n):
        k = min(gamma, max_new_tokens - (len(seq) - n))
        drafted = prompt_lookup_propose(seq, ngram, k)
        if eos_id in drafted:
            drafted = drafted[: drafted.index(eos_id) + 1]
        p = len(seq) - 1
        logits = target(torch.tensor([[seq[-1]] + drafted]), torch.arange(p, p + len(drafted) + 1)[None], view)
        best = logits[0].argmax(-1).tolist()
        j = 0
        while j < len(drafted) and drafted[j] == best[j]:
            j += 1
        emitted = drafted[:j] + [best[j]]
        if eos_id in emitted:
            emitted = emitted[: emitted.index(eos_id) + 1]
        seq += emitted[: max_new_tokens - (len(seq) - n)]
        run.rounds.append((len(drafted), j))
        run.target_forwards += 1
    run.tokens = seq[n:]
    return run
    ### END SOLUTION


# ----------------------------------------------------------------------------- cell: the formula
def predicted_speedup(alpha: float, gamma: int, c: float, v: float) -> float:
    """Leviathan et al.'s expected speedup: (1 - alpha^(gamma+1)) / ((1 - alpha) (gamma c + v)).

    alpha in [0, 1]: acceptance rate; gamma >= 1 drafts per round; c >= 0: a draft step's cost relative
    to a target decode step; v > 0: a verify forward of gamma + 1 tokens relative to a target decode step.
    At alpha = 1 the numerator over (1 - alpha) is its limit, gamma + 1.
    """
    ### BEGIN SOLUTION: validate the ranges; expected tokens per round over the cost of a round in target steps
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if gamma < 1 or c < 0 or not v > 0:
        raise ValueError(f"need gamma >= 1, c >= 0 and v > 0, got gamma={gamma}, c={c}, v={v}")
    tokens = gamma + 1 if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * c + v)
    ### END SOLUTION
