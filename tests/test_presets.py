"""Benchmark presets (timing-only models with seeded random weights) and the decode roofline."""
import pytest
import torch

from servelab import ModelNotFoundError, load_model, load_tokenizer
from servelab.generate import reference_greedy
from servelab.presets import PRESETS, NoTokenizerError, build_preset, parameter_count
from servelab.reference.warmup import greedy_decode
from servelab.roofline import decode_roofline_tokens_per_s, weight_bytes


def random_ids(vocab: int, n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tiny():
    return build_preset("bench-tiny", device="cpu")


def test_presets_have_the_real_shape():
    for cfg in PRESETS.values():
        assert cfg.architecture == "llama" and cfg.head_dim == 128 and cfg.q_per_kv == 4
    big = PRESETS["bench-1b"]
    assert big.num_heads * big.head_dim == big.hidden_size
    layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048
    assert parameter_count(big) == 16 * layer + 2 * 32000 * 2048 + 2048 == 1_104_218_112
    assert 1.0e9 <= parameter_count(big) <= 1.3e9


def test_tiny_builds_float32_on_cpu(tiny):
    assert (tiny.name, tiny.source, tiny.dtype, tiny.device.type) == ("bench-tiny", "bench-tiny", torch.float32, "cpu")
    assert tiny.fused and not tiny.training
    assert sum(p.numel() for p in tiny.parameters()) == parameter_count(PRESETS["bench-tiny"])


def test_weights_are_seeded(tiny):
    again, other = build_preset("bench-tiny", "cpu"), build_preset("bench-tiny", "cpu", seed=1)
    same = tiny.state_dict()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in same.items())
    assert not torch.equal(same["lm_head.weight"], other.state_dict()["lm_head.weight"])
    assert torch.equal(same["model.norm.weight"], torch.ones(1024))


def test_forward_gives_finite_logits(tiny):
    ids = torch.tensor([random_ids(2048, 9), random_ids(2048, 9, seed=2)])
    logits = tiny(ids)
    assert logits.shape == (2, 9, 2048) and logits.isfinite().all() and logits.std() > 0.1


def test_cached_decode_matches_the_reference(tiny):
    prompt = random_ids(2048, 6)
    out = greedy_decode(tiny, prompt, 5)
    assert out == reference_greedy(tiny, prompt, 5) and len(out) == 5  # no EOS: runs to max_new_tokens


def test_chosen_like_any_model(monkeypatch, tiny):
    by_name = load_model("bench-tiny", device="cpu")
    monkeypatch.setenv("SERVELAB_MODEL", "bench-tiny")
    by_env = load_model(device="cpu")
    again = load_model(by_env.source, device="cpu", dtype=by_env.dtype)  # how lab 04's workers reload a model
    for m in (by_name, by_env, again):
        assert m.name == "bench-tiny" and torch.equal(m.lm_head.weight, tiny.lm_head.weight)


def test_unknown_names_list_the_presets(tmp_path):
    with pytest.raises(ModelNotFoundError, match="bench-1b.*bench-tiny"):
        load_model(str(tmp_path / "bench-2b"))


def test_presets_have_no_tokenizer(monkeypatch):
    with pytest.raises(NoTokenizerError, match="timing only.*token ids"):
        load_tokenizer("bench-1b")
    monkeypatch.setenv("SERVELAB_MODEL", "bench-tiny")
    with pytest.raises(NoTokenizerError, match="'bench-tiny'"):
        load_tokenizer()


def test_roofline():
    model = torch.nn.Linear(1000, 1000, bias=False).to(torch.bfloat16)
    assert weight_bytes(model) == 2_000_000
    assert decode_roofline_tokens_per_s(2_000_000, 4e12) == 2e6
    big = parameter_count(PRESETS["bench-1b"]) * 2  # bf16
    assert 1800 < decode_roofline_tokens_per_s(big, 4.2e12) < 2000
    with pytest.raises(ValueError, match="positive"):
        decode_roofline_tokens_per_s(0, 4e12)
