"""Values on the harness <-> worker pipe: JSON plus tagged forms. Decoding never runs code from the data.

What crosses, and how:
- plain data (None, bools, numbers, strings, lists) as JSON; tuples, dicts and sets tagged (dict keys may
  be ints: ``EngineRun.completions``);
- tensors as dtype, shape, raw bytes and device type (a CUDA tensor is rebuilt on CUDA where there is one);
  a torch dtype (an argument such as lab 04's ``dequantize_kv(q, scales, dtype)``) by its name;
- servelab's records (``Request``, ``Completion``, ``EngineRun``, ...): their dataclass fields; the harness
  rebuilds the real class from them, so a learner's subclass cannot bring its own methods along;
- the grader's own objects that learner code calls back (the model, probes, model wrappers, clocks, torch
  generators) as handles: the worker builds its own copy, and after each call sends back their state (the
  probe's records, the clock's time, the generator's state), which the harness checks and copies into its
  objects;
- anything else a learner function returns (an instance of the learner's class) stays in the worker as a
  numbered reference the harness can call methods on (``grader.remote.RemoteObject``).
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import math
import numbers
import sys
from typing import Any

RECORD_MODULES = ("servelab.workloads", "servelab.engine", "servelab.metrics", "servelab.speculative",
                  "servelab.disagg.costs")
MAX_DEPTH = 64


class CodecError(ValueError):
    """A value that cannot cross the pipe (or data that does not decode as one)."""


# ----------------------------------------------------------------------------- records
def _record_class(name: str) -> type:
    for module in RECORD_MODULES:
        cls = getattr(importlib.import_module(module), name, None)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == module:
            return cls
    raise CodecError(f"unknown record type {name!r}")


def _record_base(obj: Any) -> type | None:
    """The servelab record class ``obj`` is (or subclasses), else None."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return None
    return next((c for c in type(obj).__mro__ if c.__module__ in RECORD_MODULES and dataclasses.is_dataclass(c)),
                None)


_CHECKS = {"int": numbers.Integral, "float": numbers.Real, "str": str, "bool": bool}


def _build_record(name: str, fields: dict) -> Any:
    """The record, its fields checked against their annotations (int, float, str, bool, list, dict)."""
    cls = _record_class(name)
    known = {f.name: f for f in dataclasses.fields(cls)}
    if set(fields) - set(known):
        raise CodecError(f"{name} has no fields {sorted(set(fields) - set(known))}")
    for key, value in fields.items():
        ann = str(known[key].type).split("[")[0].split("|")[0].strip()
        want = _CHECKS.get(ann) or {"list": list, "dict": dict}.get(ann)
        if want and not isinstance(value, want) or ann == "int" and isinstance(value, bool):
            raise CodecError(f"{name}.{key} is a {type(value).__name__}; it should be a {ann}")
    init = {k: v for k, v in fields.items() if known[k].init}
    obj = cls(**init)
    for k, v in fields.items():
        if not known[k].init:
            object.__setattr__(obj, k, v)
    return obj


# ----------------------------------------------------------------------------- tensors
def _encode_tensor(t) -> dict:
    import torch

    device = t.device.type
    t = t.detach().as_subclass(torch.Tensor).cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"$tensor": [str(t.dtype).removeprefix("torch."), list(t.shape), base64.b64encode(raw).decode(), device]}


def _decode_tensor(spec: list):
    import torch

    dtype_name, shape, data = spec[:3]
    device = spec[3] if len(spec) > 3 else "cpu"  # a CUDA tensor comes back on CUDA where there is one
    dtype = getattr(torch, str(dtype_name), None)
    if not isinstance(dtype, torch.dtype) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CodecError(f"not a tensor: dtype {dtype_name!r}, shape {shape!r}")
    raw = bytearray(base64.b64decode(data))
    numel = math.prod(shape)
    if len(raw) != numel * torch.empty((), dtype=dtype).element_size():
        raise CodecError(f"tensor data of {len(raw)} bytes does not fit shape {shape} of {dtype_name}")
    out = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype)
    return out.to("cuda") if device == "cuda" and torch.cuda.is_available() else out


def _decode_dtype(name) -> Any:
    import torch

    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CodecError(f"not a torch dtype: {name!r}")
    return dtype


# ----------------------------------------------------------------------------- encode / decode
class Encoder:
    """Turns values into JSON-able data. ``handle(obj)`` may claim grader objects (harness side);
    ``ref(obj)`` stores what nothing else claims and returns its reference data (worker side)."""

    def __init__(self, handle=None, ref=None):
        self.handle, self.ref = handle, ref

    def __call__(self, x: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise CodecError(f"a value nested deeper than {MAX_DEPTH} levels")
        if x is None or type(x) in (bool, int, float, str):
            return x
        if isinstance(x, bool):
            return bool(x)
        if isinstance(x, numbers.Integral):
            return int(x)
        if isinstance(x, numbers.Real):
            return float(x)
        if isinstance(x, str):
            return str.__str__(x)
        torch = sys.modules.get("torch")  # no tensor exists unless torch is loaded: never import it here
        if torch is not None and isinstance(x, torch.Tensor):
            return _encode_tensor(x)
        if torch is not None and isinstance(x, torch.dtype):
            return {"$dtype": str(x).removeprefix("torch.")}
        if self.handle and (h := self.handle(x)) is not None:
            return h
        if isinstance(x, list):
            return [self(v, depth + 1) for v in x]
        if isinstance(x, tuple):  # torch.Size and NamedTuples too
            return {"$tuple": [self(v, depth + 1) for v in x]}
        if isinstance(x, dict):
            return {"$dict": [[self(k, depth + 1), self(v, depth + 1)] for k, v in x.items()]}
        if isinstance(x, (set, frozenset)):
            return {"$set": [self(v, depth + 1) for v in x]}
        if (cls := _record_base(x)) is not None:
            fields = {f.name: self(getattr(x, f.name), depth + 1) for f in dataclasses.fields(cls)}
            return {"$record": cls.__name__, "fields": fields}
        if self.ref is not None:
            return self.ref(x)
        raise CodecError(f"cannot send a {type(x).__name__} to the learner's code")


class Decoder:
    """Rebuilds values from ``Encoder`` data. ``tags`` handles the side-specific tags ($model, $probe,
    $clock, $ref): tag -> function(data) -> value."""

    def __init__(self, tags: dict | None = None):
        self.tags = tags or {}

    def __call__(self, d: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise CodecError(f"data nested deeper than {MAX_DEPTH} levels")
        if d is None or isinstance(d, (bool, int, float, str)):
            return d
        if isinstance(d, list):
            return [self(v, depth + 1) for v in d]
        if not isinstance(d, dict) or len(d) < 1:
            raise CodecError(f"unexpected data: {type(d).__name__}")
        tag = next(iter(d))
        if tag == "$tuple":
            return tuple(self(v, depth + 1) for v in d[tag])
        if tag == "$dict":
            out = {}
            for pair in d[tag]:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise CodecError("a dict entry is not a [key, value] pair")
                key = self(pair[0], depth + 1)
                try:
                    out[key] = self(pair[1], depth + 1)
                except TypeError:  # an unhashable key
                    raise CodecError(f"a dict key of type {type(key).__name__}") from None
            return out
        if tag == "$set":
            try:
                return set(self(v, depth + 1) for v in d[tag])
            except TypeError:
                raise CodecError("a set of unhashable values") from None
        if tag == "$tensor":
            return _decode_tensor(d[tag])
        if tag == "$dtype":
            return _decode_dtype(d[tag])
        if tag == "$record":
            fields = d.get("fields")
            if not isinstance(fields, dict):
                raise CodecError("a record without fields")
            return _build_record(str(d[tag]), {str(k): self(v, depth + 1) for k, v in fields.items()})
        if tag in self.tags:
            return self.tags[tag](d)
        raise CodecError(f"unknown tag {tag!r}")
