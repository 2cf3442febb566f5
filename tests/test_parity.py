"""servelab's own forward pass must match Hugging Face transformers (fp32, 1e-4) and decode the same tokens.

Every model here is on servelab's device ($SERVELAB_DEVICE, else CUDA when present), and so are the Hugging
Face model and every input: the suite runs on a GPU machine as well as on CPU. Random inputs are drawn on
the CPU (same values on any device), then moved.
"""
from __future__ import annotations

import pytest
import torch

from servelab import load_model, reference_greedy
from servelab.device import get_device
from servelab.loader import SHIPPED

transformers = pytest.importorskip("transformers")


def tiny_hf(arch: str, seed: int, tmp_path, **extra):
    torch.manual_seed(seed)
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False) | extra
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
        for layer in model.model.layers:  # HF initialises biases to zero: make them matter
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    path = tmp_path / f"{arch}-{seed}"
    model.save_pretrained(path)
    return model.to(get_device()).eval(), path


def on_device(x) -> torch.Tensor:
    """A tensor (or nested list of token ids) on servelab's device."""
    return (x if isinstance(x, torch.Tensor) else torch.tensor(x)).to(get_device())


def hf_logits(model, ids):
    with torch.no_grad():
        return model(on_device(ids)).logits.float()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(on_device([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


CASES = [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {}),
         ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 64}})]


@pytest.mark.parametrize("arch,extra", CASES, ids=["llama", "llama-tied", "qwen2", "llama3-rope"])
def test_random_models_match_transformers(arch, extra, tmp_path):
    hf, path = tiny_hf(arch, seed=len(str(extra)), tmp_path=tmp_path, **extra)
    ours = load_model(path)
    assert ours.config.architecture == arch and ours.device == get_device()
    ids = torch.randint(0, 320, (3, 37), generator=torch.Generator().manual_seed(1)).tolist()
    torch.testing.assert_close(ours(on_device(ids)), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    prompt = ids[0][:9]
    assert reference_greedy(ours, prompt, 24) == hf_greedy(hf, prompt, 24)


@pytest.mark.parametrize("name", ["target", "draft"])
def test_shipped_models_match_transformers(name):
    path = SHIPPED[name]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(get_device()).eval()
    ours = load_model(name)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(1, ours.config.vocab_size, (2, 64), generator=gen).tolist()
    torch.testing.assert_close(ours(on_device(ids)), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    prompt = ids[1][:20]
    assert reference_greedy(ours, prompt, 32) == hf_greedy(hf, prompt, 32)


def test_padded_batch_and_cache_match_unpadded():
    """Left padding (position -1) and a KV cache must not change any real token's logits."""
    model = load_model("target")
    gen = torch.Generator().manual_seed(3)
    a = on_device(torch.randint(1, 4096, (11,), generator=gen))
    b = on_device(torch.randint(1, 4096, (5,), generator=gen))
    ids = torch.stack([a, torch.cat([on_device(torch.zeros(6, dtype=torch.long)), b])])
    pos = on_device(torch.stack([torch.arange(11), torch.cat([torch.full((6,), -1), torch.arange(5)])]))
    padded = model(ids, pos)
    torch.testing.assert_close(padded[0], model(a[None])[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(padded[1, 6:], model(b[None])[0], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(padded).all()
    # same sequence fed in chunks through a cache, in slot 2 of 3
    cache = model.new_cache(num_slots=3, max_len=16)
    first = model(a[None, :7], on_device(torch.arange(7)[None]), cache.rows([2]))
    rest = model(a[None, 7:], on_device(torch.arange(7, 11)[None]), cache.rows([2]))
    torch.testing.assert_close(torch.cat([first, rest], 1)[0], model(a[None])[0], atol=1e-4, rtol=1e-4)


def test_batch_over_any_slots_matches_each_sequence_alone():
    """A decode batch whose rows live in arbitrary slots (4, 1, 3 of 6) sees only its own slot's K/V."""
    model = load_model("target")
    gen = torch.Generator().manual_seed(5)
    seqs = [on_device(torch.randint(1, 4096, (n,), generator=gen)) for n in (9, 5, 12)]
    cache, slots = model.new_cache(num_slots=6, max_len=32), [4, 1, 3]
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))  # stale garbage in every slot must stay invisible
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    for s, x in zip(slots, seqs):
        model(x[None, :-1], on_device(torch.arange(len(x) - 1)[None]), cache.rows([s]))
    last = torch.stack([x[-1] for x in seqs])[:, None]
    out = model(last, on_device([[len(x) - 1] for x in seqs]), cache.rows(slots))
    for i, x in enumerate(seqs):
        torch.testing.assert_close(out[i, 0], model(x[None])[0, -1], atol=1e-4, rtol=1e-4)


def test_cache_view_rejects_bad_slots():
    model = load_model("target")
    cache = model.new_cache(num_slots=2, max_len=8)
    with pytest.raises(ValueError, match="out of range"):
        cache.rows([2])
    with pytest.raises(ValueError, match="repeat"):
        cache.rows([1, 1])
    with pytest.raises(ValueError, match="does not fit"):
        model(on_device(torch.ones(1, 9, dtype=torch.long)), on_device(torch.arange(9)[None]), cache.rows([0]))
