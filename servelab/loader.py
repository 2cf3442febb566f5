"""Load models and tokenizers: the shipped defaults, a benchmark preset, a local HF directory, or (online) a hub id.

Model choice is one setting: an argument, else ``$SERVELAB_MODEL``, else the shipped target.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from servelab.config import CheckpointError, ModelConfig, UnsupportedModelError, read_json
from servelab.device import get_device
from servelab.model import CausalLM
from servelab.presets import PRESETS, build_preset, no_tokenizer

MODEL_ENV = "SERVELAB_MODEL"
DRAFT_ENV = "SERVELAB_DRAFT_MODEL"
SHIPPED_DIR = Path(__file__).parent / "models"
SHIPPED = {"target": SHIPPED_DIR / "servelab-target", "draft": SHIPPED_DIR / "servelab-draft"}


class ModelNotFoundError(FileNotFoundError):
    pass


def model_name(name_or_path: str | os.PathLike | None = None, env: str = MODEL_ENV) -> str:
    """The model setting: the argument, else ``$env``, else the shipped target (draft for the draft setting)."""
    return str(name_or_path or os.environ.get(env) or ("draft" if env == DRAFT_ENV else "target"))


def known_names() -> list[str]:
    """Names that need no path: the shipped models and the benchmark presets (``servelab.presets``)."""
    return sorted(SHIPPED) + sorted(PRESETS)


def resolve_model_path(name_or_path: str | os.PathLike | None = None, env: str = MODEL_ENV) -> Path:
    """'target' / 'draft' (shipped), a local directory, or a Hugging Face hub id (needs internet).

    Presets have no directory: ``load_model`` builds them in memory."""
    name = model_name(name_or_path, env)
    if name in PRESETS:
        raise ModelNotFoundError(f"{name!r} is a benchmark preset built in memory by load_model: it has no "
                                 "checkpoint directory")
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
            reason = " ".join(str(err).split())  # hub errors span several lines
            raise ModelNotFoundError(f"{name!r} is not a local directory and could not be downloaded from the "
                                     f"Hugging Face hub ({type(err).__name__}: {reason}). Pass a local checkpoint "
                                     f"directory, or one of {known_names()}.") from err
    raise ModelNotFoundError(f"model {name!r} not found: pass one of {known_names()}, a local Hugging Face model "
                             f"directory, or a hub id like 'Qwen/Qwen2.5-0.5B' (set ${env} to choose it everywhere)")


def repair_hint(path: Path, env: str = MODEL_ENV) -> str:
    """What to do about a damaged or incomplete checkpoint directory."""
    if path.resolve().is_relative_to(SHIPPED_DIR.resolve()):
        return "restore the shipped models with `git checkout servelab/models` (or reinstall servelab)"
    return f"re-download the checkpoint, or check that ${env} (or the path you passed) names the model you meant"


@contextmanager
def _with_repair_hint(path: Path, env: str) -> Iterator[None]:
    """A CheckpointError raised inside gets ``repair_hint`` appended: the file it names, then what to do."""
    try:
        yield
    except CheckpointError as err:
        raise CheckpointError(f"{err}; {repair_hint(path, env)}") from err


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map (tensor name -> shard file)")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UnsupportedModelError(f"{path}: no model.safetensors (or sharded index); servelab loads safetensors only")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_safetensors(path / f))
    return state


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """One safetensors file, or a CheckpointError naming it when it is missing, truncated or not safetensors."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing (the sharded index lists it)")
    try:
        return load_file(str(file))
    except SafetensorError as err:
        with open(file, "rb") as f:
            lfs_pointer = f.read(24) == b"version https://git-lfs."
        problem = "a Git LFS pointer, not the weights (run `git lfs pull`)" if lfs_pointer else \
            f"damaged or incomplete ({err})"
        raise CheckpointError(f"{file} is {problem}") from err


def load_model(name_or_path: str | os.PathLike | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, env: str = MODEL_ENV, fuse_projections: bool = True) -> CausalLM:
    """Build servelab's own CausalLM from a Hugging Face checkpoint, in eval mode, on ``device``.

    A preset name (``servelab.presets``: ``bench-1b``, ``bench-tiny``) builds that shape with seeded random
    weights instead, for timing. ``dtype``: default float32 for a checkpoint, the preset's device default
    (bf16 on CUDA) for a preset.
    ``fuse_projections``: q/k/v and gate/up weights joined into one matmul each (``CausalLM.fuse_projections``).
    """
    name = model_name(name_or_path, env)
    if name in PRESETS:
        return build_preset(name, device, dtype, fuse_projections=fuse_projections)
    dtype = dtype or torch.float32
    path = resolve_model_path(name, env)
    with _with_repair_hint(path, env):
        cfg = ModelConfig.from_dir(path)
        state = {k: v for k, v in read_state_dict(path).items() if "rotary_emb" not in k}
    model = CausalLM(cfg)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UnsupportedModelError(f"{path}: weights do not match a {cfg.architecture} model "
                                    f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.name, model.source = path.name, str(path)  # source: where a worker process loads it again
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

    A benchmark preset has random weights and no tokenizer: ``presets.NoTokenizerError`` says to pass token ids.
    """
    name = model_name(name_or_path, env)
    if name in PRESETS:
        raise no_tokenizer(name)
    path = resolve_model_path(name, env)
    with _with_repair_hint(path, env):
        check_tokenizer_files(path)
        try:
            return _hf_tokenizer(path)
        except Exception:
            if (path / "tokenizer.json").is_file():
                read_json(path / "tokenizer.json")  # a damaged tokenizer.json: say so, naming the file
            raise


# the files a tokenizer can be built from, each enough on its own: any fast tokenizer; a byte-level BPE (GPT-2,
# Qwen2) that transformers converts itself; a SentencePiece model (transformers asks for sentencepiece if missing)
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def check_tokenizer_files(path: Path) -> None:
    """Refuse a checkpoint without tokenizer files before transformers does, misleadingly ("install
    sentencepiece or tiktoken"), saying which files are missing."""
    if not any(all((path / f).is_file() for f in files) for files in TOKENIZER_FILES):
        others = " or ".join(" + ".join(files) for files in TOKENIZER_FILES[1:])
        raise CheckpointError(f"{path}: no tokenizer: tokenizer.json is missing (and there is no {others})")


def _hf_tokenizer(path: Path):
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
