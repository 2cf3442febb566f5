"""Load models and tokenizers: the shipped defaults, a local HF directory, or (online) a hub id.

Model choice is one setting: an argument, else ``$SERVELAB_MODEL``, else the shipped target.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from servelab.config import ModelConfig, UnsupportedModelError
from servelab.device import get_device
from servelab.model import CausalLM

MODEL_ENV = "SERVELAB_MODEL"
DRAFT_ENV = "SERVELAB_DRAFT_MODEL"
SHIPPED_DIR = Path(__file__).parent / "models"
SHIPPED = {"target": SHIPPED_DIR / "servelab-target", "draft": SHIPPED_DIR / "servelab-draft"}


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model_path(name_or_path: str | os.PathLike | None = None, env: str = MODEL_ENV) -> Path:
    """'target' / 'draft' (shipped), a local directory, or a Hugging Face hub id (needs internet)."""
    name = str(name_or_path or os.environ.get(env) or ("draft" if env == DRAFT_ENV else "target"))
    if name in SHIPPED:
        path = SHIPPED[name]
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"the shipped {name} model is missing at {path}: reinstall servelab, "
                                     "or rebuild it with `python scripts/train_default_models.py`")
        return path
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; pass the model *directory* that holds config.json")
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if looks_like_hub_id:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
        except Exception as err:  # offline, gated, or no such repo: say so plainly
            raise ModelNotFoundError(f"{name!r} is not a local directory and could not be downloaded from the "
                                     f"Hugging Face hub ({type(err).__name__}: {err}). Pass a local checkpoint "
                                     f"directory, or one of {sorted(SHIPPED)}.") from err
    raise ModelNotFoundError(f"model {name!r} not found: pass {sorted(SHIPPED)}, a local Hugging Face model "
                             f"directory, or a hub id like 'Qwen/Qwen2.5-0.5B' (set ${env} to choose it everywhere)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UnsupportedModelError(f"{path}: no model.safetensors (or sharded index); servelab loads safetensors only")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


def load_model(name_or_path: str | os.PathLike | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32, env: str = MODEL_ENV, fuse_projections: bool = True) -> CausalLM:
    """Build servelab's own CausalLM from a Hugging Face checkpoint, in eval mode, on ``device``.

    ``fuse_projections``: q/k/v and gate/up weights joined into one matmul each (``CausalLM.fuse_projections``).
    """
    path = resolve_model_path(name_or_path, env)
    cfg = ModelConfig.from_dir(path)
    model = CausalLM(cfg)
    state = {k: v for k, v in read_state_dict(path).items() if "rotary_emb" not in k}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UnsupportedModelError(f"{path}: weights do not match a {cfg.architecture} model "
                                    f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.name = path.name
    if fuse_projections:
        model.fuse_projections()
    return model.to(device=get_device(device), dtype=dtype).eval()


# tokenizer classes that are nothing but tokenizer.json behind the Hugging Face API: AutoTokenizer would pick
# this very class for them, so they load directly (see load_tokenizer)
GENERIC_TOKENIZERS = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def load_tokenizer(name_or_path: str | os.PathLike | None = None, env: str = MODEL_ENV):
    """The checkpoint's Hugging Face (fast) tokenizer.

    A checkpoint whose tokenizer_config.json declares a generic fast tokenizer (the shipped models do) loads
    it directly: ``AutoTokenizer`` would first read the model's config through ``AutoConfig``, which imports
    transformers' model and distributed code (torch.distributed.tensor, sympy: ~900 modules, seconds on a
    cold or sandboxed machine) for a tokenizer it builds from tokenizer.json all the same. Any other
    checkpoint goes through ``AutoTokenizer``, which knows each model family's tokenizer class.
    """
    path = resolve_model_path(name_or_path, env)
    if _generic_tokenizer(path):
        from transformers import PreTrainedTokenizerFast  # = TokenizersBackend in transformers 5

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _generic_tokenizer(path: Path) -> bool:
    """tokenizer.json plus a tokenizer_config.json naming a generic class, without custom code."""
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(cfg, dict)
        and cfg.get("tokenizer_class") in GENERIC_TOKENIZERS
        and "auto_map" not in cfg
        and (path / "tokenizer.json").is_file()
    )


def load_draft(name_or_path: str | os.PathLike | None = None, **kw) -> CausalLM:
    """The draft model for speculative decoding: argument, else ``$SERVELAB_DRAFT_MODEL``, else shipped draft."""
    return load_model(name_or_path, env=DRAFT_ENV, **kw)
