"""Start `servelab serve`: load the model, build the engine, run it in its thread behind uvicorn.

Shutdown (Ctrl-C / SIGTERM): uvicorn stops accepting connections and gives in-flight requests up to
``shutdown_timeout_s`` to finish; then the engine thread cancels whatever is left (each open stream gets an
error event and ``[DONE]``), the streams close, and it stops.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import uvicorn

from servelab.serve.app import ServerInfo, build_app
from servelab.serve.registry import make_engine
from servelab.serve.loop import EngineLoop


@dataclass
class ServeConfig:
    model: str | None = None  # shipped target, a local HF dir, or a preset ($SERVELAB_MODEL)
    engine: str = "continuous"  # an engine name or path/to/notebook.ipynb[:ClassName]
    max_running: int = 16
    max_step_tokens: int = 512
    max_len: int = 1024  # tokens per KV-cache slot: prompt + max_tokens must fit
    num_blocks: int | None = None  # --engine paged: KV blocks (None: max_running x max_len tokens' worth)
    block_size: int | None = None  # --engine paged: tokens per block (None: lab 02's 8)
    gamma: int | None = None  # --engine speculative: tokens drafted per round (None: 4)
    host: str = "127.0.0.1"
    port: int = 8000
    device: str | None = None
    served_model_name: str | None = None
    shutdown_timeout_s: float = 5.0
    log_level: str = "warning"


def build(cfg: ServeConfig):
    """(app, engine loop, ServerInfo) for ``cfg``; the loop is not started yet."""
    from servelab.loader import load_model, load_tokenizer
    from servelab.presets import PRESETS

    model = load_model(cfg.model, device=cfg.device)
    tokenizer = None
    if cfg.model not in PRESETS:
        with contextlib.suppress(Exception):  # a checkpoint without a tokenizer still serves token ids
            tokenizer = load_tokenizer(cfg.model)
    eos_id = getattr(model.config, "eos_token_id", None)
    if eos_id is None and tokenizer is not None:
        eos_id = tokenizer.eos_token_id
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    max_len = min(cfg.max_len, model.config.max_position)
    options = {"num_blocks": cfg.num_blocks, "block_size": cfg.block_size, "gamma": cfg.gamma}
    engine = make_engine(cfg.engine, model, options, max_running=cfg.max_running,
                         max_step_tokens=cfg.max_step_tokens, eos_id=eos_id, max_len=max_len)
    max_len = getattr(engine, "max_len", max_len)  # an engine may serve less (the speculative draft's context)
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: no Python overhead per call
    info = ServerInfo(
        model_name=cfg.served_model_name or model.name,
        engine_name=cfg.engine if ".ipynb" in cfg.engine else getattr(engine, "name", cfg.engine),
        encode=(lambda s: tokenizer.encode(s)) if tokenizer is not None else None,
        decode=(backend.decode if backend is not None else tokenizer.decode) if tokenizer is not None else None,
        settings={"max_running": getattr(engine, "max_running", cfg.max_running), "max_step_tokens": cfg.max_step_tokens, "max_len": max_len,
                  "eos_id": eos_id, "device": str(model.device)})
    loop = EngineLoop(engine)
    return build_app(loop, info), loop, info


class _Server(uvicorn.Server):
    """uvicorn's server, but at the end of the graceful period the engine cancels what is still running, so
    each open stream ends with an error event and ``[DONE]`` instead of a connection cut mid-message."""

    def __init__(self, config: uvicorn.Config, engine_loop: EngineLoop, grace_s: float):
        super().__init__(config)
        self.engine_loop, self.grace_s = engine_loop, grace_s

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(self.grace_s, self.engine_loop.cancel_all)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def serve(cfg: ServeConfig, announce=print) -> None:
    app, loop, info = build(cfg)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            timeout_graceful_shutdown=cfg.shutdown_timeout_s + 5, access_log=False)
    server = _Server(config, loop, cfg.shutdown_timeout_s)
    announce(f"servelab serve: {info.model_name} with the {info.engine_name} engine "
             f"(max_running={info.settings['max_running']}, max_len={info.settings['max_len']}) on http://{cfg.host}:{cfg.port}")
    server.run()
