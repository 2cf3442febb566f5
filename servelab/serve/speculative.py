"""`--engine speculative`: lab 03's speculative decoding with a draft model, one request at a time.

Requests queue first come, first served; the one at the head is decoded alone (batch 1, as in the lab). Each
``step()`` is one round of ``servelab.reference.speculative.speculative_greedy`` (temperature 0: the tokens are
exactly the target's greedy decoding) or ``speculative_sample`` (temperature > 0: the draft samples, the
lossless ``accept_or_resample`` decides, all draws from the request's own seeded CPU generator, as in the
lab): the draft proposes up to ``gamma`` tokens, the target checks them in one forward, and the step emits
the accepted ones plus the target's own next token. A request's first step also prefills both models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from servelab.reference.speculative import accept_or_resample
from servelab.serve.engines import QueueEngine, Seq, TokenEvent


@dataclass
class SpecStats:
    """Totals over every round so far. ``checked``: drafts the target checked, up to and including the first
    rejection of each round (``servelab.speculative.SpecRun.checked``); acceptance = accepted / checked."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    checked: int = 0
    tokens: int = 0  # emitted; one verify (target) forward per round, prefills not counted

    def to_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.accepted / self.checked, 4) if self.checked else None,
                "tokens_per_target_forward": round(self.tokens / self.rounds, 3) if self.rounds else None}


class SpeculativeEngine(QueueEngine):
    name = "speculative"

    def __init__(self, model, max_running: int = 1, max_step_tokens: int = 512, eos_id: int | None = None,
                 max_len: int = 1024, gamma: int = 4, draft=None):
        # max_running and max_step_tokens: the server passes them; at batch 1 with whole-prompt prefills they
        # have nothing to bound
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"--gamma (tokens drafted per round) must be an int >= 1, got {gamma!r}")
        if draft is None:
            from servelab.loader import load_draft
            draft = load_draft(device=model.device, dtype=model.dtype)
        if draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"the draft {getattr(draft, 'name', '')} has {draft.config.vocab_size} tokens, the "
                             f"target {model.config.vocab_size}: speculation needs a draft that shares the target's "
                             "tokenizer (set $SERVELAB_DRAFT_MODEL)")
        super().__init__(model, eos_id, min(max_len, draft.config.max_position), sample_device="cpu")
        self.draft, self.gamma, self.max_running = draft, gamma, 1
        # one cache row per model, reused request after request: a new request's positions restart at 0,
        # so stale K/V past them is never read
        self.t_view = model.new_cache(1, self.max_len).rows([0])
        self.d_view = draft.new_cache(1, self.max_len).rows([0])
        self.d_len = 0  # positions the draft's cache holds for the running request
        self.totals = SpecStats()

    def _release(self, seq: Seq) -> None:
        self.running.clear()

    def stats(self) -> dict:
        return {"gamma": self.gamma, "draft": getattr(self.draft, "name", "?"), **self.totals.to_dict()}

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        if not self.running:
            seq = self.waiting.popleft()
            self.running[seq.request.id] = seq
            n = seq.request.prompt_len
            if n > 1:  # the last prompt token opens the first round, like every later round's last token
                ids, pos = torch.tensor([seq.request.prompt_ids[:-1]]), torch.arange(n - 1)[None]
                self.model(ids, pos, self.t_view)
                self.draft(ids, pos, self.d_view)
            self.d_len = n - 1
        (seq,) = self.running.values()
        self.steps += 1
        return self._round(seq)

    def _round(self, seq: Seq) -> list[TokenEvent]:
        r, ctx = seq.request, seq.context
        eos = None if r.ignore_eos else self.eos_id  # ignore_eos: drafting goes on past EOS too
        k = min(self.gamma, r.max_new_tokens - len(seq.tokens))
        p = len(ctx) - 1  # the last token's position: the target has not seen it yet
        drafted, q_rows, new = [], [], ctx[self.d_len:]
        for _ in range(k):
            logits = self.draft(torch.tensor([new]), torch.arange(self.d_len, self.d_len + len(new))[None],
                                self.d_view)[0, -1]
            self.d_len += len(new)
            if seq.generator is None:
                new = [int(logits.argmax())]
            else:
                q_rows.append(torch.softmax(logits.cpu() / r.temperature, -1))
                new = [int(torch.multinomial(q_rows[-1], 1, generator=seq.generator))]
            drafted.append(new[0])
            if new[0] == eos:
                break
        logits = self.model(torch.tensor([[ctx[-1]] + drafted]), torch.arange(p, p + len(drafted) + 1)[None],
                            self.t_view)[0]
        if seq.generator is None:  # the longest prefix of drafts equal to the target's argmax, then its token
            best = logits.argmax(-1).tolist()
            j = 0
            while j < len(drafted) and drafted[j] == best[j]:
                j += 1
            nxt = best[j]
        else:
            probs = torch.softmax(logits.cpu() / r.temperature, -1)
            j, nxt = accept_or_resample(probs, torch.stack(q_rows) if q_rows else probs[:0], drafted, seq.generator)
        events = []
        for token in drafted[:j] + [nxt]:
            events.append(seq.emit(token, self.eos_id))
            if events[-1].finish_reason:
                self._release(seq)
                break
        self.d_len = min(self.d_len, seq.length - 1)  # the draft's K/V past the accepted prefix get overwritten
        t = self.totals
        t.rounds, t.drafted, t.accepted = t.rounds + 1, t.drafted + len(drafted), t.accepted + j
        t.checked, t.tokens = t.checked + min(len(drafted), j + 1), t.tokens + len(events)
        return events
