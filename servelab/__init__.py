"""servelab: learn LLM serving systems by building them.

Importing servelab first configures Triton for this machine (its interpreter when there is no CUDA GPU),
so ``import servelab`` belongs at the top of every notebook, before anything imports triton.
"""
from servelab.device import configure_triton_env as _configure_triton_env

_configure_triton_env()

from servelab.config import ModelConfig, UnsupportedModelError  # noqa: E402
from servelab.device import DeviceError, get_device, import_triton  # noqa: E402
from servelab.generate import reference_greedy  # noqa: E402
from servelab.kv_cache import ContiguousKVCache, KVCache, NoCache  # noqa: E402
from servelab.loader import ModelNotFoundError, load_draft, load_model, load_tokenizer  # noqa: E402
from servelab.model import CausalLM  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "CausalLM", "ContiguousKVCache", "DeviceError", "KVCache", "ModelConfig", "ModelNotFoundError", "NoCache",
    "UnsupportedModelError", "get_device", "import_triton", "load_draft", "load_model", "load_tokenizer",
    "reference_greedy",
]
