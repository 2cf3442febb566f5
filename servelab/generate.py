"""The plain reference decode every engine path must reproduce token for token."""
from __future__ import annotations

import torch

from servelab.model import CausalLM


def check_request(prompt_ids: list[int], max_new_tokens: int, vocab_size: int, max_len: int | None = None) -> None:
    """Raise a clear ValueError for a request no engine can serve."""
    if len(prompt_ids) == 0:
        raise ValueError("empty prompt: a request needs at least one prompt token (e.g. the BOS token)")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {min(prompt_ids)}..{max(prompt_ids)}")
    if max_len is not None and len(prompt_ids) + max_new_tokens > max_len:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"context of {max_len} tokens: shorten the prompt or ask for fewer tokens")


@torch.inference_mode()
def reference_greedy(model: CausalLM, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Greedy decode with no cache: recompute the whole sequence for every new token.

    Slow on purpose and obviously right. Returns the new tokens, including the EOS it stops on.
    """
    check_request(prompt_ids, max_new_tokens, model.config.vocab_size, model.config.max_position)
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())  # the whole sequence, every step
        out.append(nxt)
        if nxt == eos_id:
            break
        ids.append(nxt)
    return out
