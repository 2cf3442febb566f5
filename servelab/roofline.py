"""The memory roofline of decoding: the fastest batch-1 decode a GPU's memory bandwidth allows.

A batch-1 decode step multiplies one token's activations by every weight matrix, so it must read every weight
from memory once per token, and does only ~2 FLOPs per weight read: far too few to keep the compute units
busy. Its speed limit is therefore memory bandwidth / weight bytes. Example: bench-1b in bf16 is 1.10e9 x 2 B
= 2.2 GB; an H200 reads 4.8 TB/s (an H100 SXM 3.35 TB/s), so 4.2 TB/s of it gives 4.2e12 / 2.2e9 ~ 1,900
tokens/s at best. A measured rate well below the roofline means overhead (Python, kernel launches, syncs)
dominates; batching raises tokens/s because a batch shares each weight read. KV-cache reads (small at batch 1
and short contexts) are left out, so this is an upper bound.
"""
from __future__ import annotations

import torch
from torch import nn


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (each tied tensor counted once: it is read once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_roofline_tokens_per_s(weight_bytes: int, bandwidth_bytes_per_s: float) -> float:
    """Upper bound on batch-1 decode tokens/s: every step reads all ``weight_bytes`` once."""
    if weight_bytes <= 0 or bandwidth_bytes_per_s <= 0:
        raise ValueError(f"weight bytes and bandwidth must be positive, got {weight_bytes} and {bandwidth_bytes_per_s}")
    return bandwidth_bytes_per_s / weight_bytes


def decode_loop_rates(models: dict, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, list[float]]:
    """Tokens/s of ``new_tokens`` batch-1 greedy decode steps after a prefill of ``prompt`` (not timed), for each
    of ``models`` (name -> model), alternating; each model keeps one KV cache, so a graphed model captures
    once, in the untimed warm-up round. Each step waits for its token on the host, as a real decode does."""
    from servelab.timing import timer

    views = {k: m.new_cache(1, len(prompt) + new_tokens + 1).rows([0]) for k, m in models.items()}
    rates: dict[str, list[float]] = {k: [] for k in models}
    for round_ in range(repeats + 1):  # round 0: warm-up (allocator, kernels, graph capture)
        for k, model in models.items():
            logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], views[k])
            with timer(model.device) as t:
                for i in range(new_tokens):
                    token = int(logits[0, -1].argmax())
                    logits = model(torch.tensor([[token]]), torch.tensor([[len(prompt) + i]]), views[k])
            if round_:
                rates[k].append(new_tokens / t.elapsed_s)
    return rates
