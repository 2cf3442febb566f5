"""Plain PyTorch attention over tokens identified by their positions: the reference every kernel
and every KV-cache layout is tested against."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class CausalMask(NamedTuple):
    allowed: torch.Tensor  # [B, 1, T, S] bool: query t of row b may look at key s
    has_key: torch.Tensor  # [B, 1, T, 1] bool: False for padding queries (they see nothing)


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> CausalMask:
    """q_pos [B, T], k_pos [B, S] (-1 = padding/empty): a query at position p sees keys at positions 0..p.

    The same for every layer of a step, so caches build it once per step (``AttentionMetadata.on_device``).
    """
    allowed = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, T, S]
    has_key = allowed.any(-1, keepdim=True)  # [B, T, 1]
    allowed = allowed | ~has_key  # keep softmax finite for padding rows, zeroed afterwards
    return CausalMask(allowed[:, None], has_key[:, None])


def reference_attention(
    q: torch.Tensor,  # [B, Hq, T, D]  queries of the T new tokens of each row
    k: torch.Tensor,  # [B, Hkv, S, D] keys this row may look at
    v: torch.Tensor,  # [B, Hkv, S, D]
    q_pos: torch.Tensor | None = None,  # [B, T] position of each query token, -1 = padding
    k_pos: torch.Tensor | None = None,  # [B, S] position of each key, -1 = empty/padding
    mask: CausalMask | None = None,  # causal_mask(q_pos, k_pos), when the caller built it already
) -> torch.Tensor:  # [B, Hq, T, D]
    """Causal grouped-query attention: a query at position p sees keys at positions 0..p.

    Query head h uses KV head h // (Hq // Hkv), as in Hugging Face's ``repeat_kv``. Padding queries
    (position -1) get zeros instead of NaNs so a padded batch never poisons anything downstream.
    """
    if mask is None:
        if q_pos is None or k_pos is None:
            raise ValueError("reference_attention needs q_pos and k_pos, or a prebuilt mask")
        mask = causal_mask(q_pos, k_pos)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed, scale=1.0 / math.sqrt(q.shape[-1]),
                                         enable_gqa=q.shape[1] != k.shape[1])  # no copy of K/V per query head
    return out * mask.has_key.to(out.dtype)
