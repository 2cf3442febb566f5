"""Plain PyTorch attention over tokens identified by their positions: the reference every kernel
and every KV-cache layout is tested against."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class CausalMask:
    """Who may look at whom in one step; built once per step and shared by every layer."""

    allowed: torch.Tensor | None  # [B, 1, T, S] bool: query t of row b may look at key s; None: every key
    has_key: torch.Tensor | None  # [B, 1, T, 1] bool: False for padding queries (they see nothing)
    dense: bool = False  # known on the host: no padding query among the rows that matter (skip zeroing)
    _bias: dict = field(default_factory=dict, repr=False)

    def bias(self, group: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask (0 where allowed, -inf elsewhere) for queries grouped by KV head, [B, 1, G*T, S].

        Built on first use in a step, reused by the other layers. Its rows are padded to a multiple of 16
        keys in memory so fused attention kernels can read it in place (no copy per layer).
        """
        if (group, dtype) not in self._bias:
            B, _, T, S = self.allowed.shape
            padded = torch.zeros(B, 1, group * T, -(-S // 16) * 16, dtype=dtype, device=self.allowed.device)
            bias = padded[..., :S]
            bias.masked_fill_(~self.allowed.repeat(1, 1, group, 1), float("-inf"))
            self._bias[(group, dtype)] = bias
        return self._bias[(group, dtype)]


SEES_EVERY_KEY = CausalMask(None, None, dense=True)  # e.g. one sequence decoding one token: no mask to build


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, dense: bool = False) -> CausalMask:
    """q_pos [B, T], k_pos [B, S] (-1 = padding/empty): a query at position p sees keys at positions 0..p.

    ``dense``: the caller knows (on the host) that no query is padding, so outputs need no zeroing.
    """
    allowed = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, T, S]
    has_key = allowed.any(-1, keepdim=True)  # [B, T, 1]
    allowed = allowed | ~has_key  # keep softmax finite for padding rows, zeroed afterwards
    return CausalMask(allowed[:, None], has_key[:, None], dense)


def reference_attention(
    q: torch.Tensor,  # [B, Hq, T, D]  queries of the T new tokens of each row
    k: torch.Tensor,  # [B, Hkv, S, D] keys this row may look at
    v: torch.Tensor,  # [B, Hkv, S, D]
    q_pos: torch.Tensor | None = None,  # [B, T] position of each query token, -1 = padding
    k_pos: torch.Tensor | None = None,  # [B, S] position of each key, -1 = empty/padding
    mask: CausalMask | None = None,  # causal_mask(q_pos, k_pos), when the caller built it already
) -> torch.Tensor:  # [B, Hq, T, D]
    """Causal grouped-query attention: a query at position p sees keys at positions 0..p.

    Query head h uses KV head h // (Hq // Hkv), as in Hugging Face's ``repeat_kv``; here the G query heads
    of one KV head are stacked as G*T query rows against that head's keys, so K/V are never copied per
    query head. Padding queries (position -1) get zeros instead of NaNs so a padded batch never poisons
    anything downstream.
    """
    if mask is None:
        if q_pos is None or k_pos is None:
            raise ValueError("reference_attention needs q_pos and k_pos, or a prebuilt mask")
        mask = causal_mask(q_pos, k_pos)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    q_rows = q.reshape(B, Hkv, group * T, D)  # row g*T + t: query head kv*G + g, token t
    bias = None if mask.allowed is None else mask.bias(group, q.dtype)
    out = F.scaled_dot_product_attention(q_rows, k, v, attn_mask=bias,
                                         scale=1.0 / math.sqrt(D)).reshape(B, Hq, T, D)
    return out if mask.dense else out * mask.has_key.to(out.dtype)
