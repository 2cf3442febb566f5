"""Tensor parallelism (Megatron-style) for lab 04's stretch: one model split by heads over ``world`` ranks.

Each rank holds a slice of every layer: q/k/v by heads and gate/up by MLP columns (column-parallel), o_proj
and down_proj by the matching input columns (row-parallel), so each rank computes a partial sum of those two
outputs and an all-reduce adds the partials up. Embeddings, norms and the LM head are replicated: every rank
ends with the same logits. The shard's config has ``num_heads / world`` and ``num_kv_heads / world`` heads, so
a cache built for it (``PagedKVCache.for_model``) holds only this rank's KV heads: rank r holds KV heads
``r * H / world .. (r + 1) * H / world - 1`` of the full model's H. That is the layout difference a connector
between a TP=2 prefill and a TP=1 decode must undo.

The partial sums are added in another order than one rank's matmul adds them, so a TP forward equals the
single-rank one to float rounding (about 1e-6 relative in float32), not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from servelab.config import ModelConfig
from servelab.model import CausalLM


def shard_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The config of one rank's shard; ValueError when the heads or the MLP do not divide by ``world``."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    for what, n in (("query heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                    ("MLP columns (intermediate_size)", cfg.intermediate_size)):
        if n % world:
            raise ValueError(f"cannot split the model over {world} ranks: its {n} {what} do not divide by {world} "
                             "(tensor parallelism gives each rank the same number of whole heads)")
    return replace(cfg, num_heads=cfg.num_heads // world, num_kv_heads=cfg.num_kv_heads // world,
                   intermediate_size=cfg.intermediate_size // world)


def _unfused_state(model: CausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under the HF names, fused projections split back into q/k/v and gate/up."""
    cfg, state = model.config, dict(model.state_dict())
    qkv_sizes = [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            fused = state.pop(f"{pre}self_attn.qkv_proj.{kind}", None)
            if fused is not None:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.split(qkv_sizes)):
                    state[f"{pre}self_attn.{name}.{kind}"] = part
            fused = state.pop(f"{pre}mlp.gate_up_proj.{kind}", None)
            if fused is not None:
                gate, up = fused.chunk(2)
                state[f"{pre}mlp.gate_proj.{kind}"], state[f"{pre}mlp.up_proj.{kind}"] = gate, up
    return state


def _shard_state(state: dict[str, torch.Tensor], cfg: ModelConfig, rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's slice of every weight: column-parallel rows, row-parallel columns, the rest replicated."""
    hd, f = cfg.head_dim, cfg.intermediate_size // world
    rows = {"q_proj": cfg.num_heads // world * hd, "k_proj": cfg.num_kv_heads // world * hd,
            "v_proj": cfg.num_kv_heads // world * hd, "gate_proj": f, "up_proj": f}
    cols = {"o_proj": cfg.num_heads // world * hd, "down_proj": f}
    out = {}
    for key, w in state.items():
        proj, kind = key.split(".")[-2:]  # "model.layers.0.self_attn.q_proj.weight" -> q_proj, weight
        if proj in rows:  # [out, in]: this rank's output rows (its heads, its MLP columns); biases alike
            n = rows[proj]
            out[key] = w[rank * n:(rank + 1) * n]
        elif proj in cols and kind == "weight":  # [out, in]: the input columns that match this rank's rows
            n = cols[proj]
            out[key] = w[:, rank * n:(rank + 1) * n]
        elif proj in cols:  # a row-parallel bias is added once, after the sum: rank 0 keeps it
            out[key] = w if rank == 0 else torch.zeros_like(w)
        else:
            out[key] = w
    return out


def _all_reduce(group) -> Callable:
    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)  # partial sums of every rank -> the full projection, on each rank
        return output

    return hook


def shard_model(model: CausalLM, rank: int, world: int, group=None) -> CausalLM:
    """A new CausalLM holding rank ``rank``'s slice of ``model`` (on its device and dtype), whose forward
    all-reduces over ``group`` (a torch.distributed group of the ``world`` ranks, in rank order; None: the
    default group) after every o_proj and down_proj. Every rank of the group must run the same forwards
    together. Fused projections are supported: the shard is fused when ``model`` is."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    cfg = shard_config(model.config, world)
    state = _shard_state(_unfused_state(model), model.config, rank, world)
    with torch.device("meta"):
        shard = CausalLM(cfg)
    shard.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True, strict=False)
    shard.inv_freq = model.inv_freq.clone()  # a non-persistent buffer: not in the state dict
    missing = [k for k, v in shard.state_dict().items() if v.is_meta]
    if missing:
        raise ValueError(f"shard_model: no weights for {missing[:3]}")
    if cfg.tie_word_embeddings:
        shard.lm_head.weight = shard.model.embed_tokens.weight
    if model.fused:
        shard.fuse_projections()
    shard.name = f"{getattr(model, 'name', 'model')} (TP rank {rank} of {world})"
    if world > 1:
        for layer in shard.model.layers:
            layer.self_attn.o_proj.register_forward_hook(_all_reduce(group))
            layer.mlp.down_proj.register_forward_hook(_all_reduce(group))
    return shard.eval()


def head_slice(num_kv_heads: int, rank: int, world: int) -> slice:
    """The KV heads rank ``rank`` of ``world`` holds, as a slice of the full model's heads (axis 2 of a block)."""
    n = num_kv_heads // world
    return slice(rank * n, (rank + 1) * n)
