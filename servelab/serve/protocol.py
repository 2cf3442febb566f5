"""The OpenAI completions request, parsed and checked, and OpenAI-style error bodies.

A bad request gets a 400 whose body says what was wrong: ``{"error": {"message", "type", "param", "code"}}``.
Fields servelab does not know are refused rather than ignored, so a client never believes a setting took effect
when it did not. OpenAI's optional fields are accepted at their no-op values (``n: 1``, ``echo: false``, ...).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass


class ApiError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


@dataclass
class CompletionParams:
    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0  # OpenAI's default; 0 = greedy
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: fixed output lengths for benchmarks
    return_token_ids: bool = False  # vLLM's extension: each choice also carries its token ids


# field -> the values at which it changes nothing (None: any value)
NO_OP = {"n": (1, None), "best_of": (1, None), "echo": (False, None), "logprobs": (None, 0),
         "top_p": (1, 1.0, None), "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None),
         "suffix": (None, ""), "logit_bias": (None,), "user": None, "stop": (None, [])}
SUPPORTED = ("model", "prompt", "max_tokens", "temperature", "stream", "stream_options", "seed", "ignore_eos",
             "return_token_ids")
KNOWN = set(SUPPORTED) | set(NO_OP)


def _int(body: dict, key: str, default, lo: int | None = None) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"'{key}' must be an integer, got {json.dumps(v)}", key)
    if lo is not None and v < lo:
        raise ApiError(f"'{key}' must be >= {lo}, got {v}", key)
    return v


def _bool(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(f"'{key}' must be true or false, got {json.dumps(v)}", key)
    return v


def parse_completion(raw: bytes, encode: Callable[[str], list[int]] | None, model_name: str) -> CompletionParams:
    """A /v1/completions body -> CompletionParams, or ApiError. Checks the form of every field; whether the
    engine can serve the prompt and max_tokens (vocabulary, context length) is the engine's ``check``."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise ApiError(f"unknown field(s) {', '.join(map(repr, unknown))}; servelab serve accepts "
                       f"{', '.join(SUPPORTED)} (and OpenAI's {', '.join(sorted(NO_OP))} at their defaults)", unknown[0])
    for key, ok in NO_OP.items():
        if key in body and ok is not None and body[key] not in ok:
            raise ApiError(f"'{key}'={json.dumps(body[key])} is not supported by servelab serve "
                           f"(only {' or '.join(json.dumps(v) for v in ok)}){_why(key)}", key)
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(f"The model `{model}` does not exist. This server serves `{model_name}`.", "model", 404,
                       "NotFoundError")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError("empty prompt: send at least one character or token id", "prompt")
        if encode is None:
            raise ApiError("this model has no tokenizer: send the prompt as a list of token ids", "prompt")
        ids = list(encode(prompt))
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(f"a batch of {len(prompt)} prompts: servelab serve takes one prompt per request", "prompt")
    elif prompt is None:
        raise ApiError("'prompt' is required: a string or a list of token ids", "prompt")
    else:
        raise ApiError(f"'prompt' must be a string or a list of token ids, got {json.dumps(prompt)[:80]}", "prompt")
    if not ids:
        raise ApiError("empty prompt: send at least one token id", "prompt")
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or not 0 <= temperature <= 2:
        raise ApiError(f"'temperature' must be a number in [0, 2], got {json.dumps(temperature)}", "temperature")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise ApiError("'stream_options' may only hold include_usage", "stream_options")
    return CompletionParams(
        prompt_ids=ids, max_tokens=_int(body, "max_tokens", 16, lo=1), temperature=float(temperature),
        stream=_bool(body, "stream"), include_usage=bool(options.get("include_usage")),
        seed=_int(body, "seed", None), ignore_eos=_bool(body, "ignore_eos"),
        return_token_ids=_bool(body, "return_token_ids"))


def _why(key: str) -> str:
    return {"stop": "; generation stops on the model's EOS token and at max_tokens",
            "logprobs": "; no log-probabilities are returned"}.get(key, "")
