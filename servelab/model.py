"""A small, readable Llama-family forward pass (Llama 2/3, TinyLlama, SmolLM, Qwen2).

RMSNorm -> attention (RoPE, grouped-query) -> residual -> RMSNorm -> SwiGLU MLP -> residual, repeated;
then a final RMSNorm and the LM head. Parameter names match Hugging Face checkpoints so weights load
with a plain ``load_state_dict``. Attention itself is delegated to a KV cache (``kv_cache.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from servelab.attention_metadata import AttentionMetadata
from servelab.config import ModelConfig
from servelab.kv_cache import ContiguousKVCache, KVCache, NoCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op (one kernel on a GPU)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # lower precision: normalise in fp32, cast, then scale, exactly as the reference implementation does
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    s = cfg.rope_scaling
    if s:  # Llama 3.1: stretch low frequencies, keep high ones, blend in between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old_len / lo, inv / factor, torch.where(wavelen < old_len / hi, inv, blended))
    return inv


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, [B, T, 1, D], for ``apply_rope``; built once per forward, shared by all layers."""
    angles = positions.clamp(min=0)[..., None].float() * inv_freq  # [B, T, D/2]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], -1)[:, :, None].to(dtype), torch.cat([-sin, sin], -1)[:, :, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]. Rotates each (x_i, x_{i+D/2}) pair by its position's angle (HF's rotate_half layout):
    x * cos + rotate_half(x) * sin, where rotate_half(x) = [-x2, x1] = roll(x, D/2) * [-1, +1]."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


def fuse_linears(*linears: nn.Linear) -> nn.Linear:
    """One Linear computing all of ``linears`` side by side: one matmul (one kernel launch) instead of several."""
    w = torch.cat([m.weight for m in linears])
    fused = nn.Linear(w.shape[1], w.shape[0], bias=linears[0].bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(w)
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    return fused


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.qkv_proj: nn.Linear | None = None  # set by fuse(): q, k and v in one matmul

    def fuse(self) -> None:
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, meta: AttentionMetadata, cache: KVCache):
        B, T, _ = x.shape
        hq, hkv, hd = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qkv = qkv.view(B, T, hq + 2 * hkv, hd)
        qk = apply_rope(qkv[:, :, : hq + hkv], cos, sin)  # q and k heads rotated together
        q, k, v = qk[:, :, :hq], qk[:, :, hq:], qkv[:, :, hq + hkv:]
        out = cache.attend(self.layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), meta)  # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, hq * hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=b), nn.Linear(d, f, bias=b)
        self.down_proj = nn.Linear(f, d, bias=b)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse(): gate and up in one matmul

    def fuse(self) -> None:
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, meta, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """``logits = model(input_ids, positions, cache)``; see ``forward``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.name = "unnamed"

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def fuse_projections(self) -> CausalLM:
        """Optimisation switch: q/k/v and gate/up projections as one matmul each (vLLM does the same).

        Same results; 3 fewer kernel launches per layer, which is what a small model's decode step on a
        GPU is made of. ``load_model(..., fuse_projections=False)`` keeps the separate, HF-named layers.
        """
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    @property
    def fused(self) -> bool:
        """Whether ``fuse_projections`` ran (the layers then hold qkv_proj and gate_up_proj)."""
        return any(layer.self_attn.qkv_proj is not None for layer in self.model.layers)

    def new_cache(self, num_slots: int, max_len: int) -> ContiguousKVCache:
        c = self.config
        return ContiguousKVCache(c.num_layers, num_slots, max_len, c.num_kv_heads, c.head_dim, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """input_ids, positions: LongTensor [B, T] (position -1 = padding); returns fp32 logits [B, T, V].

        Without a cache the call is a plain causal forward over the given tokens; with one, the new
        tokens' K/V are stored in it and attention also sees what it already holds.

        Build ``input_ids`` and ``positions`` on the host (CPU): once per step the cache plans the step's
        attention metadata from them, and they travel to the model's device in one copy, so no layer
        ever waits on the GPU. (Tensors already on the GPU work too, at the cost of one sync per call.)
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if positions is None:
            positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        if positions.shape != input_ids.shape:
            raise ValueError(f"positions {tuple(positions.shape)} must match input_ids {tuple(input_ids.shape)}")
        if input_ids.device.type == "cpu":  # free on the host; on the GPU it would cost a sync per call
            check_token_ids(input_ids, self.config.vocab_size)
        cache = cache or NoCache()
        meta, input_ids = cache.plan(positions.cpu().long()).to(self.device, input_ids.long())  # one copy
        return self.run(input_ids, meta, cache)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        """The device half of ``forward``: ids and metadata already on the device, no host work at all,
        so a CUDA graph can capture it (``servelab.graphs``). Returns fp32 logits [B, T, V]."""
        cos, sin = rope_tables(meta.positions, self.inv_freq, self.dtype)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, meta, cache)
        return self.lm_head(self.model.norm(x)).float()


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.numel() and (int(input_ids.max()) >= vocab_size or int(input_ids.min()) < 0):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got {int(input_ids.min())}..{int(input_ids.max())}")
