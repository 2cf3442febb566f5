"""Shipped models and tokenizer: load offline, round-trip text, refuse bad input clearly."""
import json
import random
import re
import shutil

import pytest
import torch

from servelab import ModelNotFoundError, UnsupportedModelError, load_model, load_tokenizer, loader
from servelab.config import CheckpointError
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


# ---------------------------------------------------------------- damaged or incomplete checkpoints (issue 8, 13)
@pytest.fixture
def checkpoint(tmp_path):
    """A copy of the shipped target's directory, to damage."""
    path = tmp_path / "model"
    shutil.copytree(SHIPPED["target"], path)
    return path


def damage(file, how: str) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if how == "truncated" else random.Random(0).randbytes(100_000))


@pytest.mark.parametrize("how", ["truncated", "random bytes"])
def test_damaged_weights_name_the_file_and_what_to_do(checkpoint, how):
    damage(checkpoint / "model.safetensors", how)
    with pytest.raises(CheckpointError, match=re.escape(str(checkpoint / "model.safetensors")) +
                       " is damaged or incomplete.*re-download the checkpoint.*SERVELAB_MODEL"):
        load_model(checkpoint)


def test_damaged_shipped_weights_say_git_checkout(checkpoint, monkeypatch):
    monkeypatch.setattr(loader, "SHIPPED_DIR", checkpoint.parent)  # the copy stands for the shipped models
    damage(checkpoint / "model.safetensors", "truncated")
    with pytest.raises(CheckpointError, match="git checkout servelab/models"):
        load_model(checkpoint)


def test_missing_shard_names_the_file(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1-of-2.safetensors"}}))
    with pytest.raises(CheckpointError, match=re.escape(str(checkpoint / "model-1-of-2.safetensors")) + " is missing"):
        load_model(checkpoint)


def test_corrupt_config_json_names_the_file_and_the_place(checkpoint):
    (checkpoint / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n  "vocab_size": 4096,,\n}')
    with pytest.raises(CheckpointError, match=re.escape(str(checkpoint / "config.json")) +
                       r" is not valid JSON \(.* at line 2, column 22\)"):
        load_model(checkpoint)


def test_config_json_without_a_needed_field_names_it(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    del cfg["hidden_size"]
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: no hidden_size"):
        load_model(checkpoint)


def test_missing_tokenizer_files_are_named_not_sentencepiece(checkpoint):
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing.*re-download") as err:
        load_tokenizer(checkpoint)
    assert "sentencepiece" not in str(err.value)


def test_corrupt_tokenizer_json_names_the_file(checkpoint):
    file = checkpoint / "tokenizer.json"
    file.write_text(file.read_text()[:1000])
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + " is not valid JSON"):
        load_tokenizer(checkpoint)
