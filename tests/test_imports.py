"""The main job's start-up stays light: importing servelab and loading the shipped tokenizer and models
must not drag in transformers' model/distributed code (torch.distributed.tensor, sympy, torch._dynamo).

On a fresh H200 machine (no bytecode cache yet) that import chain, reached through
``AutoTokenizer.from_pretrained`` -> ``AutoConfig`` -> ``LlamaConfig``, cost the tour ~13 s before any model
work: thousands of modules compiled from source and DTensor's custom ops registered.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from servelab.loader import SHIPPED, _generic_tokenizer

# modules the tour has no use for; each arrived with AutoTokenizer's AutoConfig path
HEAVY = ("torch.distributed.tensor", "sympy", "torch._dynamo", "torch._inductor", "accelerate",
         "transformers.models", "transformers.core_model_loading", "transformers.integrations.hub_kernels")


def modules_after(code: str) -> set[str]:
    """The module names a fresh interpreter holds after running ``code``."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return set(json.loads(res.stdout.strip().splitlines()[-1]))


def loaded(mods: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in mods if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_importing_servelab_pulls_in_no_transformers():
    mods = modules_after("import servelab, servelab.loader, servelab.tour, servelab.cli")
    assert not loaded(mods, ("transformers",) + HEAVY), "importing servelab must not import these"


@pytest.mark.slow
def test_loading_the_shipped_models_and_tokenizer_stays_light():
    mods = modules_after("from servelab.loader import load_draft, load_model, load_tokenizer\n"
                         "load_tokenizer(); load_tokenizer('draft'); load_model(); load_draft()")
    assert "transformers" in mods  # the tokenizer is still transformers' own class
    assert not loaded(mods, HEAVY), "the tour's start-up imports modules it does not need"


def test_shipped_tokenizers_load_without_auto_tokenizer():
    assert all(_generic_tokenizer(path) for path in SHIPPED.values())


@pytest.mark.parametrize("change", [
    {"tokenizer_class": "Qwen2Tokenizer"},  # a model family's own class: AutoTokenizer must pick it
    {"auto_map": {"AutoTokenizer": ["x.Tok", None]}},  # custom code
    None,  # no tokenizer_config.json
])
def test_other_tokenizers_still_go_through_auto_tokenizer(tmp_path, change):
    (tmp_path / "tokenizer.json").write_text("{}")
    if change is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"} | change))
    assert not _generic_tokenizer(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["target", "draft"])
def test_direct_tokenizer_equals_auto_tokenizer(name):
    transformers = pytest.importorskip("transformers")
    from servelab import load_tokenizer

    ours, auto = load_tokenizer(name), transformers.AutoTokenizer.from_pretrained(SHIPPED[name])
    assert type(ours) is type(auto)
    assert ours.get_vocab() == auto.get_vocab() and ours.all_special_tokens == auto.all_special_tokens
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == (auto.eos_token_id, auto.bos_token_id,
                                                                          auto.pad_token_id)
    text = "def f(x):\n    return x + 1  # naïve café ✓ — 中文<|endoftext|>"
    assert ours.encode(text) == auto.encode(text)
    assert ours(text, add_special_tokens=False)["input_ids"] == auto(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ours.encode(text)) == auto.decode(auto.encode(text))
