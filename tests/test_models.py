"""Shipped models and tokenizer: load offline, round-trip text, refuse bad input clearly."""
import json

import pytest
import torch

from servelab import ModelNotFoundError, UnsupportedModelError, load_model, load_tokenizer
from servelab.generate import check_request
from servelab.loader import SHIPPED, resolve_model_path

SAMPLES = ["def f(x):\n    return x + 1\n", "    # naïve café ✓ — 中文\n\tif a != b:", "\"\"\"Docstring.\"\"\"\n\n\n"]


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_round_trip(text):
    tok = load_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert max(ids) < 4096


def test_tokenizer_is_shared_and_eos_is_zero():
    assert load_tokenizer("target").get_vocab() == load_tokenizer("draft").get_vocab()
    assert load_tokenizer().eos_token_id == 0


def test_shipped_shapes():
    target, draft = load_model("target"), load_model("draft")
    c = target.config
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, 2, 64)  # GQA for the paged-attention lab
    assert draft.config.num_layers < c.num_layers
    weights = list(SHIPPED["target"].parent.glob("*/model.safetensors"))
    assert len(weights) == 2 and sum(w.stat().st_size for w in weights) <= 40 * 2**20


def test_env_var_chooses_the_model(monkeypatch):
    monkeypatch.setenv("SERVELAB_MODEL", "draft")
    assert resolve_model_path() == SHIPPED["draft"]


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        load_model(tmp_path)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*not supported"):
        load_model(tmp_path)


def test_bad_requests_are_clear_errors():
    with pytest.raises(ValueError, match="empty prompt"):
        check_request([], 4, 4096)
    with pytest.raises(ValueError, match="max_new_tokens"):
        check_request([1], 0, 4096)
    with pytest.raises(ValueError, match="exceeds the context"):
        check_request([1] * 10, 10, 4096, max_len=16)
    with pytest.raises(ValueError, match="token ids"):
        load_model()(torch.tensor([[5000]]))
