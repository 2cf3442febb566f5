"""Model shapes read from a Hugging Face ``config.json`` (Llama and Qwen2 families)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED_ROPE_TYPES = {"default", "llama3"}
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class UnsupportedModelError(ValueError):
    """The checkpoint is not one servelab's runtime can execute."""


class CheckpointError(UnsupportedModelError):
    """A checkpoint file is missing, damaged or incomplete (a truncated download, a file overwritten...)."""


def read_json(file: Path) -> dict:
    """A checkpoint's JSON file as a dict, or a CheckpointError naming the file and where it stops being JSON."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from err
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON (not UTF-8 text: {err.reason} at byte {err.start})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} should hold a JSON object, not a {type(data).__name__}")
    return data


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # llama3-style frequency scaling, None for plain RoPE
    qkv_bias: bool  # Qwen2 adds biases to the q/k/v projections
    mlp_bias: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | list[int] | None

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """Bytes of K and V one token occupies across all layers (what a KV cache stores)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config") -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"{source}: architecture {archs or hf.get('model_type')!r} is not supported; servelab runs "
                f"{sorted(SUPPORTED_ARCHITECTURES)} checkpoints (e.g. Llama 3.x, TinyLlama, SmolLM, Qwen2/2.5)."
            )
        missing = [key for key in REQUIRED_KEYS if key not in hf]
        if missing:
            raise CheckpointError(f"{source}: no {', '.join(missing)}: a Llama/Qwen2 config.json has them all")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"{source}: RoPE type {rope_type!r} is not supported ({sorted(SUPPORTED_ROPE_TYPES)})")
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{source}: sliding-window attention is not supported")
        num_heads = hf["num_attention_heads"]
        num_kv = hf.get("num_key_value_heads") or num_heads
        if num_heads % num_kv:
            raise UnsupportedModelError(f"{source}: {num_heads} query heads are not a multiple of {num_kv} KV heads")
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            max_position=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_scaling=dict(rope) if rope_type == "llama3" else None,
            qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        file = Path(path) / "config.json"
        if not file.is_file():
            raise UnsupportedModelError(f"{path}: no config.json, so this is not a Hugging Face model directory")
        return cls.from_hf(read_json(file), source=str(file))
