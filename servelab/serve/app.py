"""The FastAPI app: POST /v1/completions (JSON or server-sent events), GET /v1/models, GET /health, /metrics.

Each request is parsed (protocol.py), checked by the engine (a 400 if it can never be served), and submitted
to the engine thread (loop.py); its tokens come back one by one on an asyncio.Queue. A client that goes away
is aborted in the engine, which frees its slot for the next request.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from servelab.serve.engines import EngineRequest, TokenEvent
from servelab.serve.loop import EngineError, EngineLoop, Stream
from servelab.serve.protocol import ApiError, CompletionParams, parse_completion


class Detokenizer:
    """Token ids -> text pieces, a few tokens at a time (vLLM's scheme): decoding a short window around the
    new token keeps each step O(1), and a piece ending in an incomplete UTF-8 character waits for the next."""

    def __init__(self, decode: Callable[[list[int]], str] | None):
        self.decode, self.ids, self.prefix, self.read = decode, [], 0, 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        if self.decode is None:
            return ""
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        if self.decode is None or self.read == len(self.ids):
            return ""
        return self.decode(self.ids[self.prefix:])[len(self.decode(self.ids[self.prefix:self.read])):]


@dataclass
class ServerInfo:
    model_name: str
    engine_name: str
    encode: Callable[[str], list[int]] | None
    decode: Callable[[list[int]], str] | None
    settings: dict


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def build_app(loop: EngineLoop, info: ServerInfo) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        loop.start()  # the engine thread lives as long as the server
        yield
        loop.stop()  # after uvicorn's graceful period: cancels what is still in flight

    app = FastAPI(title="servelab serve", lifespan=lifespan)
    created = int(time.time())

    @app.get("/health")
    async def health():
        if not loop.alive:
            return JSONResponse({"status": "engine thread stopped", "error": loop.error}, status_code=503)
        return {"status": "ok", "engine": info.engine_name, "model": info.model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": info.model_name, "object": "model", "created": created,
                                            "owned_by": "servelab", "max_model_len": info.settings.get("max_len")}]}

    @app.get("/metrics")
    async def metrics():
        """Server-side numbers (the server's clock) over the requests finished since the last reset."""
        engine = loop.engine
        return {"servelab": True, "engine": info.engine_name, "model": info.model_name, **info.settings,
                "running": getattr(engine, "num_running", None), "waiting": getattr(engine, "num_waiting", None),
                "steps": loop.steps, "max_running_seen": loop.max_running_seen,
                "engine_stats": engine.stats() if callable(getattr(engine, "stats", None)) else None,
                **loop.stats.snapshot()}

    @app.post("/metrics/reset")
    async def metrics_reset():
        loop.stats.reset()
        loop.max_running_seen = 0
        return {"reset": True}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            params = parse_completion(await request.body(), info.encode, info.model_name)
            engine_request = EngineRequest(loop.new_id(), params.prompt_ids, params.max_tokens, params.temperature,
                                           params.seed, params.ignore_eos)
            try:
                loop.engine.check(engine_request)
            except ValueError as err:  # the engine's own words, in the API's names
                message = str(err).replace("max_new_tokens", "max_tokens")
                param = "prompt" if "prompt token ids" in message or "empty prompt" in message else "max_tokens"
                raise ApiError(message, param) from None
        except ApiError as err:
            return error_response(err)
        if not loop.alive:
            return error_response(ApiError("the engine has stopped", None, 503, "server_error"))
        stream = loop.submit(engine_request)
        cid = f"cmpl-{uuid.uuid4().hex}"
        if params.stream:
            return _EngineStream(loop, stream, _sse(stream, params, info, cid, created))
        return await _whole(loop, stream, params, info, cid, created, request)

    return app


def _choice(text: str, finish: str | None, tokens: list[int] | None) -> dict:
    c = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if tokens is not None:
        c["token_ids"] = tokens
    return c


def _usage(params: CompletionParams, n: int) -> dict:
    return {"prompt_tokens": len(params.prompt_ids), "completion_tokens": n,
            "total_tokens": len(params.prompt_ids) + n}


class _EngineStream(StreamingResponse):
    """A stream that aborts its request unless it ran to the end, however the response ended.

    Not in the generator's ``finally``: Starlette (ASGI spec 2.3, uvicorn's) cancels the response when the
    client disconnects, and if that happens while the headers are being sent (uvicorn's ``send`` waits when
    the socket's write buffer is full) the generator was never started, so its ``finally`` never runs and
    the request would decode on to max_tokens. This ``finally`` runs however the response ends."""

    def __init__(self, loop: EngineLoop, stream: Stream, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream")
        self.loop, self.stream = loop, stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.stream.done:
                self.loop.abort(self.stream.request.id)


async def _sse(stream: Stream, params: CompletionParams, info: ServerInfo, cid: str,
               created: int) -> AsyncIterator[str]:
    """One chunk per token (``data: {...}``), a usage chunk if asked, then ``data: [DONE]``. A client that
    goes away is aborted by ``_EngineStream``."""
    detok, n = Detokenizer(info.decode), 0
    head = {"id": cid, "object": "text_completion", "created": created, "model": info.model_name}
    while True:
        item = await stream.events.get()
        if isinstance(item, EngineError):
            stream.done = True
            err = {"message": item.message, "type": "server_error", "param": None, "code": 500}
            yield f"data: {json.dumps({'error': err})}\n\n"
            break
        item: TokenEvent
        n += 1
        text = detok.add(item.token)
        finish = item.finish_reason or None
        if finish:
            text += detok.flush()
        ids = [item.token] if params.return_token_ids else None
        yield f"data: {json.dumps({**head, 'choices': [_choice(text, finish, ids)]})}\n\n"
        if finish:
            stream.done = True
            if params.include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(params, n)})}\n\n"
            break
    yield "data: [DONE]\n\n"


async def _whole(loop: EngineLoop, stream: Stream, params: CompletionParams, info: ServerInfo, cid: str,
                 created: int, request: Request) -> JSONResponse:
    tokens: list[int] = []
    finish = None
    try:
        while finish is None:
            try:
                item = await asyncio.wait_for(stream.events.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    loop.abort(stream.request.id)
                    return JSONResponse({}, status_code=499)
                continue
            if isinstance(item, EngineError):
                err = ApiError(item.message, None, 500 if item.finish_reason == "error" else 503, "server_error")
                return error_response(err)
            tokens.append(item.token)
            finish = item.finish_reason or None
    except asyncio.CancelledError:
        loop.abort(stream.request.id)
        raise
    text = info.decode(tokens) if info.decode else ""
    return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": info.model_name,
                         "choices": [_choice(text, finish, tokens if params.return_token_ids else None)],
                         "usage": _usage(params, len(tokens))})
