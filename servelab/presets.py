"""Benchmark presets: models of a real shape with seeded random weights, for timing only.

The shipped 5.4M-parameter model is so small that on a GPU a decode step measures Python and kernel-launch
overhead, not the memory traffic serving is really about. A preset is chosen like any model, by name::

    load_model("bench-1b")            # or SERVELAB_MODEL=bench-1b for every lab, script and CLI command

Presets:

- ``bench-1b``: Llama architecture, hidden 2048 = 16 query heads x head size 128, 4 KV heads (GQA, 4 query
  heads per KV head, as Llama 3), 16 layers, MLP 8192, vocab 32000, untied LM head. Parameters:
  per layer 2 * 2048^2 (q, o) + 2 * 2048 * 512 (k, v) + 3 * 2048 * 8192 (MLP) + 2 * 2048 (norms)
  = 60,821,504; x 16 layers = 973,144,064; + 2 * 32000 * 2048 (embeddings, LM head) + 2048 (final norm)
  = 1,104,218,112 (~1.10B): 2.2 GB of weights in bf16, the default on CUDA.
- ``bench-tiny``: the same architecture, GQA ratio and head size (8 query heads, 2 KV heads, 128 each) at
  hidden 1024, 2 layers, MLP 2048, vocab 2048: 22,025,216 parameters, float32 on CPU. It keeps the preset
  path tested on CPU in a second or so.

The weights are random: drawn in float32 on the CPU from one ``torch.Generator`` (normal, std 0.02; norm
weights 1), tensor by tensor in a fixed order, then cast and moved, so a seed gives the same weights on any
machine and device. They produce no meaningful text and no meaningful acceptance rates: presets have no
tokenizer (``load_tokenizer`` refuses them); pass token ids. Building ``bench-1b`` on a CPU works but takes
a while on a few cores and ~4.4 GB of memory in float32; on a GPU the weights go there tensor by tensor.
"""
from __future__ import annotations

import torch

from servelab.config import ModelConfig, UnsupportedModelError
from servelab.device import get_device, preferred_dtype
from servelab.model import CausalLM, rope_inv_freq

INIT_STD = 0.02  # the usual transformer init: activations stay finite through the layers


def _llama(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> ModelConfig:
    return ModelConfig(
        architecture="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=128, max_position=4096,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None, qkv_bias=False, mlp_bias=False,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,  # no EOS: decode runs to max tokens
    )


PRESETS: dict[str, ModelConfig] = {
    "bench-1b": _llama(vocab=32000, hidden=2048, intermediate=8192, layers=16, heads=16, kv_heads=4),
    "bench-tiny": _llama(vocab=2048, hidden=1024, intermediate=2048, layers=2, heads=8, kv_heads=2),
}


class NoTokenizerError(UnsupportedModelError):
    """A preset has random weights, hence no tokenizer."""


def no_tokenizer(name: str) -> NoTokenizerError:
    return NoTokenizerError(f"{name!r} is a benchmark preset with seeded random weights, for timing only: it has "
                            "no tokenizer and its text would be noise. Pass token ids (e.g. random ids below "
                            f"{PRESETS[name].vocab_size}), or choose a real model for text.")


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"no preset {name!r}: the presets are {sorted(PRESETS)}")
    return PRESETS[name]


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of a model of this shape, embeddings and LM head included, counted on the meta device
    (shapes only, no memory), so it works for bench-1b on any machine."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    return sum(p.numel() for p in model.parameters())


def build_preset(name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 seed: int = 0, fuse_projections: bool = True) -> CausalLM:
    """The preset ``name`` with seeded random weights, in eval mode, on ``device`` (default: as get_device).

    ``dtype``: default ``preferred_dtype(device)`` (bf16 on CUDA, float32 on CPU). ``fuse_projections``: as
    in ``load_model``. The same seed gives bit-identical weights on every machine (see the module docstring).
    """
    cfg = preset_config(name)
    dev = get_device(device)
    dtype = dtype or preferred_dtype(dev)
    with torch.device("meta"):  # shapes first; memory only on the target device, never a float32 copy there
        model = CausalLM(cfg)
    model = model.to(dtype=dtype).to_empty(device=dev)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() follows registration order: the same draws land in the same tensors everywhere
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            elif pname.endswith(".bias"):
                p.zero_()
            else:  # drawn on the CPU in float32, so neither the device nor the dtype changes the draws
                p.copy_(torch.empty(p.shape).normal_(0.0, INIT_STD, generator=gen))
        model.inv_freq.copy_(rope_inv_freq(cfg))  # to_empty left the RoPE buffer uninitialised
    model.name = model.source = name  # source: lab 04's workers rebuild it with load_model(model.source)
    if fuse_projections:
        model.fuse_projections()
    return model.eval()

