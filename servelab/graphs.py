"""CUDA graphs for decode steps: capture a step once per batch-size bucket, then replay it every step.

A small model's decode step on a GPU is made of a few hundred tiny kernels; launching them from Python
takes longer than running them. A CUDA graph records the kernels of one step once and replays the whole
sequence with one launch. The price: every tensor the step touches must keep its shape and its address.
So a graphed step has fixed inputs (ids, positions and slots of ``bucket`` rows, copied in before each
replay), reads the whole ``max_len`` of each slot's cache (a mask hides what a row may not see), and pads
a batch up to the next bucket with rows that write only where nothing is read (the last position of a
slot no real row uses). vLLM captures its decode steps the same way, one graph per batch size.

The switch: ``with_cuda_graphs(model)`` returns a model that runs every one-token-per-row step through a
``ContiguousKVCache`` view from a graph, and everything else (prefills, other caches) as before. Engines
need no change. On a CPU, ``servelab.device.graph_backend()`` says "eager": the same fixed-shape step is
"replayed" by calling it again, so the CPU tests check everything but the recording itself.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from servelab.attention import CausalMask, causal_mask, reference_attention
from servelab.attention_metadata import AttentionMetadata
from servelab.device import graph_backend, host_to_device
from servelab.kv_cache import ContiguousKVCache, KVCache, SlotView
from servelab.model import CausalLM, check_token_ids

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # batch sizes with a graph of their own; a batch pads up to the next one
KEEP_CACHES = 2  # graphs of the latest caches are kept; an older cache's are dropped (and its memory freed)


class EagerGraph:
    """A graph's contract without the recording: ``replay`` re-runs the step into the same output tensor."""

    warmups = 0

    def capture(self, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.step, self.out = step, step()
        return self.out

    @torch.inference_mode()
    def replay(self) -> torch.Tensor:
        self.out.copy_(self.step())
        return self.out


class CudaGraph:
    """A real CUDA graph: warm up on a side stream (lazy inits, allocator), record once, replay."""

    warmups = 2

    def __init__(self, pool=None):
        self.graph, self.pool = torch.cuda.CUDAGraph(), pool

    def capture(self, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmups):  # a decode step is idempotent: it rewrites the same K/V
                step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.out = step()
        self.graph.replay()  # recording ran nothing: this computes the current step
        return self.out

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


@dataclass
class DecodeMetadata(AttentionMetadata):
    """One decode step of fixed shape: row i writes slot ``slots[i]`` at ``positions[i, 0]``."""

    slots: torch.Tensor  # [b] cache slot of each row (padding rows: slots no real row uses)
    key_positions: torch.Tensor  # [max_len] 0..max_len-1: every key of a slot is read, the mask hides the rest
    mask: CausalMask | None = field(default=None, kw_only=True)

    def on_device(self) -> None:  # runs inside the graph: rebuilt from the current positions at every replay
        b, n = self.slots.shape[0], self.key_positions.shape[0]
        self.mask = causal_mask(self.positions, self.key_positions.expand(b, n), dense=True)


class DecodeView(KVCache):
    """The cache as a fixed-shape decode step sees it: gather each row's whole slot, no host work."""

    def __init__(self, cache: ContiguousKVCache):
        self.cache = cache

    def plan(self, positions):
        raise RuntimeError("a DecodeView's metadata is built on the device (GraphedDecoder), never planned")

    def attend(self, layer, q, k, v, meta: DecodeMetadata):  # q [b, Hq, 1, D]; k, v [b, Hkv, 1, D]
        pos = meta.positions[:, 0]  # [b]
        self.cache.k[layer, meta.slots, :, pos] = k[:, :, 0].to(self.cache.k.dtype)  # [b, Hkv, D]
        self.cache.v[layer, meta.slots, :, pos] = v[:, :, 0].to(self.cache.v.dtype)
        keys = self.cache.k[layer].index_select(0, meta.slots).to(q.dtype)  # [b, Hkv, max_len, D]
        vals = self.cache.v[layer].index_select(0, meta.slots).to(q.dtype)
        return reference_attention(q, keys, vals, mask=meta.mask)


class GraphedDecoder:
    """Decode steps through one ``ContiguousKVCache``, one graph per bucket, captured on first use."""

    def __init__(self, model: CausalLM, cache: ContiguousKVCache, buckets: tuple[int, ...] = BUCKETS):
        self.model, self.cache, self.view = model, cache, DecodeView(cache)
        self.buckets = tuple(b for b in sorted(buckets) if b <= cache.num_slots)
        self.backend = graph_backend(model.device)
        self.pool = torch.cuda.graph_pool_handle() if self.backend == "cuda" else None  # buckets share memory
        self.graphs: dict[int, tuple[EagerGraph | CudaGraph, torch.Tensor]] = {}  # bucket -> (graph, inputs)
        self.replays = 0

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def _capture(self, b: int) -> tuple[EagerGraph | CudaGraph, torch.Tensor, Callable[[], torch.Tensor]]:
        inputs = torch.zeros(3, b, dtype=torch.long, device=self.model.device)  # ids, positions, slots
        key_positions = torch.arange(self.cache.max_len, device=self.model.device)

        def step() -> torch.Tensor:
            meta = DecodeMetadata(inputs[1][:, None], slots=inputs[2], key_positions=key_positions)
            meta.on_device()
            return self.model.run(inputs[0][:, None], meta, self.view)

        graph = CudaGraph(self.pool) if self.backend == "cuda" else EagerGraph()
        return graph, inputs, step

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """input_ids, positions: host LongTensors [B, 1]; slots: B distinct slots. Returns logits [B, 1, V]."""
        rows = len(slots)
        b = self.bucket(rows)
        assert b is not None, "callers check bucket() first"
        check_token_ids(input_ids, self.model.config.vocab_size)
        top = int(positions.max())
        if int(positions.min()) < 0 or top >= self.cache.max_len:
            raise ValueError(f"decode positions must be in [0, {self.cache.max_len}) for this KV cache, got "
                             f"{int(positions.min())}..{top}")
        # padding rows write at the last position of slots no real row uses: written before it is ever read
        used = set(slots)
        spare = [s for s in range(self.cache.num_slots) if s not in used][: b - rows] if b > rows else []
        host = torch.tensor([input_ids[:, 0].tolist() + [0] * (b - rows),
                             positions[:, 0].tolist() + [self.cache.max_len - 1] * (b - rows),
                             list(slots) + spare], dtype=torch.long)
        (moved,) = host_to_device([host], self.model.device)
        if b not in self.graphs:
            graph, inputs, step = self._capture(b)
            inputs.copy_(moved)
            self.graphs[b] = (graph, inputs)
            out = graph.capture(step)
        else:
            graph, inputs = self.graphs[b]
            inputs.copy_(moved, non_blocking=True)
            out = graph.replay()
        self.replays += 1
        return out[:rows].clone()  # the graph's output is overwritten by the next replay


class GraphedModel:
    """``with_cuda_graphs(model)``: the model, with decode steps through a ``ContiguousKVCache`` replayed
    from CUDA graphs. Anything else (prefills, paged caches, a batch above the largest bucket) runs eagerly."""

    def __init__(self, model: CausalLM, buckets: tuple[int, ...] = BUCKETS):
        self.inner, self.buckets = model, buckets
        self.decoders: list[GraphedDecoder] = []  # the latest caches' decoders (their graphs hold the caches)
        self.eager_calls = 0

    def __getattr__(self, name):  # config, device, dtype, new_cache, ... are the model's
        return getattr(self.inner, name)

    def decoder(self, cache: ContiguousKVCache) -> GraphedDecoder:
        for d in self.decoders:
            if d.cache is cache:
                return d
        self.decoders = [*self.decoders[-(KEEP_CACHES - 1):], GraphedDecoder(self.inner, cache, self.buckets)]
        return self.decoders[-1]

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                 cache: KVCache | None = None) -> torch.Tensor:
        if isinstance(cache, SlotView) and positions is not None and input_ids.dim() == 2 and \
                input_ids.shape[1] == 1 and positions.shape == input_ids.shape and input_ids.shape[0] == len(cache.ids):
            decoder = self.decoder(cache.cache)
            if decoder.bucket(len(cache.ids)) is not None:
                return decoder(input_ids.cpu(), positions.cpu(), cache.ids)
        self.eager_calls += 1
        return self.inner(input_ids, positions, cache)


def with_cuda_graphs(model: CausalLM, buckets: tuple[int, ...] = BUCKETS) -> GraphedModel:
    """Optimisation switch: decode steps replayed from CUDA graphs (on a CPU: the same fixed-shape step,
    run eagerly). Same tokens as ``model``; on a GPU, one launch per step instead of one per kernel."""
    if isinstance(model, GraphedModel):
        return model
    return GraphedModel(model, buckets)
