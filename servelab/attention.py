"""Plain PyTorch attention over tokens identified by their positions: the reference every kernel
and every KV-cache layout is tested against."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_attention(
    q: torch.Tensor,  # [B, Hq, T, D]  queries of the T new tokens of each row
    k: torch.Tensor,  # [B, Hkv, S, D] keys this row may look at
    v: torch.Tensor,  # [B, Hkv, S, D]
    q_pos: torch.Tensor,  # [B, T] position of each query token, -1 = padding
    k_pos: torch.Tensor,  # [B, S] position of each key, -1 = empty/padding
) -> torch.Tensor:  # [B, Hq, T, D]
    """Causal grouped-query attention: a query at position p sees keys at positions 0..p.

    Query head h uses KV head h // (Hq // Hkv), as in Hugging Face's ``repeat_kv``. Padding queries
    (position -1) get zeros instead of NaNs so a padded batch never poisons anything downstream.
    """
    allowed = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, T, S]
    has_key = allowed.any(-1, keepdim=True)  # [B, T, 1]
    allowed = allowed | ~has_key  # keep softmax finite for padding rows, zeroed below
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=1.0 / math.sqrt(q.shape[-1]),
                                         enable_gqa=q.shape[1] != k.shape[1])  # no copy of K/V per query head
    return out * has_key[:, None].to(out.dtype)
