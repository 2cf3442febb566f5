"""Speculative decoding's run record and input checks (lab 03), shared by the lab and the grader.

A speculative run proceeds in rounds: a proposer (a draft model, or prompt lookup) drafts up to gamma
tokens, the target scores them all in one forward, and the round emits the accepted drafts plus one token
of the target's own (the correction at the first rejection, or the bonus token when all were accepted).
``SpecRun`` records what each round drafted and accepted, so that alpha and the accepted length are
computed one way everywhere (``servelab.acceptance`` defines alpha).
"""
from __future__ import annotations

from dataclasses import dataclass, field


from servelab.generate import check_request


@dataclass
class SpecRun:
    """One speculative decode at batch 1: the new tokens and what every round drafted and accepted.

    ``rounds[r] = (drafted, accepted)``: round r drafted ``drafted`` tokens and the target accepted the
    first ``accepted`` of them (then emitted one token of its own, unless the run ended first).
    Forward counts leave out each model's one prefill: they count decode-time forwards.
    """

    tokens: list[int] = field(default_factory=list)  # the new tokens (not the prompt), EOS included
    rounds: list[tuple[int, int]] = field(default_factory=list)  # per round: (drafted, accepted)
    target_forwards: int = 0  # verify forwards: one per round
    draft_forwards: int = 0  # draft-model forwards (0 for prompt lookup)

    @property
    def accepted(self) -> int:
        return sum(a for _, a in self.rounds)

    @property
    def drafted(self) -> int:
        return sum(d for d, _ in self.rounds)

    @property
    def checked(self) -> int:
        """Drafted tokens the target checked: per round up to and including the first rejection."""
        return sum(min(d, a + 1) for d, a in self.rounds)

    @property
    def alpha(self) -> float:
        """accepted / checked drafted tokens (``servelab.acceptance``'s definition); 0 with nothing checked."""
        return self.accepted / self.checked if self.checked else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Accepted drafted tokens per round."""
        return self.accepted / len(self.rounds) if self.rounds else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        """New tokens per verify forward (plain cached decoding: 1)."""
        return len(self.tokens) / self.target_forwards if self.target_forwards else 0.0

    def summary(self) -> dict:
        return {"tokens": len(self.tokens), "rounds": len(self.rounds), "alpha": round(self.alpha, 4),
                "mean_accepted_length": round(self.mean_accepted_length, 3),
                "tokens_per_target_forward": round(self.tokens_per_target_forward, 3),
                "target_forwards": self.target_forwards, "draft_forwards": self.draft_forwards}


def check_speculative(target, draft, prompt_ids: list[int], max_new_tokens: int, gamma: int,
                      temperature: float | None = None) -> None:
    """Raise a clear ValueError for a speculative request that cannot run (``draft`` None: prompt lookup)."""
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma (tokens drafted per round) must be an int >= 1, got {gamma!r}")
    if not isinstance(prompt_ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt_ids):
        raise ValueError(f"prompt_ids must be a list of int token ids, got {type(prompt_ids).__name__}")
    if draft is not None and draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft and target vocabularies differ ({draft.config.vocab_size} vs "
                         f"{target.config.vocab_size} tokens): speculation needs a draft that shares the "
                         "target's tokenizer")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0 for speculative sampling, got {temperature!r} "
                         "(for temperature 0 use speculative_greedy)")
    max_len = target.config.max_position
    if draft is not None:
        max_len = min(max_len, draft.config.max_position)
    check_request(list(prompt_ids), max_new_tokens, target.config.vocab_size, max_len)

