"""Draft acceptance rate (Leviathan et al.'s alpha) for greedy speculative decoding.

Greedy speculative decoding emits exactly the target's greedy tokens, and a drafted token is only
checked while every drafted token before it was accepted. So each checked proposal is the draft's
argmax after a prefix of the target's own greedy sequence: one teacher-forced draft forward over that
sequence gives every proposal that could ever be checked, and the rounds can be replayed exactly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from servelab.generate import reference_greedy
from servelab.model import CausalLM


@dataclass
class Acceptance:
    alpha: float  # accepted drafted tokens / drafted tokens checked
    accepted: int
    checked: int  # per round: the drafted tokens up to and including the first rejection
    rounds: int
    gamma: int
    sequences: int

    def to_dict(self) -> dict:
        return asdict(self)


def replay_rounds(matches: list[bool], gamma: int) -> tuple[int, int, int]:
    """matches[i]: the draft's argmax equals the target's token i of the continuation.

    Returns (accepted, checked, rounds). A round drafts min(gamma, remaining) tokens; after j accepted
    tokens the target contributes one more (the correction, or the bonus token when all were accepted).
    """
    accepted = checked = rounds = pos = 0
    while pos < len(matches):
        k = min(gamma, len(matches) - pos)
        j = 0
        while j < k:
            checked += 1
            if not matches[pos + j]:
                break
            j += 1
        accepted += j
        pos += j + 1
        rounds += 1
    return accepted, checked, rounds


@torch.inference_mode()
def measure_acceptance(target: CausalLM, draft: CausalLM, prompts: list[list[int]], new_tokens: int,
                       gamma: int = 4, continuations: list[list[int]] | None = None) -> Acceptance:
    """alpha of ``draft`` against ``target``'s greedy continuations of ``prompts`` (batch 1, greedy)."""
    if gamma < 1:
        raise ValueError(f"gamma (drafted tokens per round) must be >= 1, got {gamma}")
    if continuations is None:
        continuations = [reference_greedy(target, p, new_tokens) for p in prompts]
    accepted = checked = rounds = 0
    for prompt, cont in zip(prompts, continuations):
        seq = torch.tensor([prompt + cont], device=draft.device)
        guesses = draft(seq)[0, len(prompt) - 1 : -1].argmax(-1).tolist()  # proposal for each continuation token
        a, c, r = replay_rounds([g == t for g, t in zip(guesses, cont)], gamma)
        accepted, checked, rounds = accepted + a, checked + c, rounds + r
    return Acceptance(accepted / max(1, checked), accepted, checked, rounds, gamma, len(prompts))
