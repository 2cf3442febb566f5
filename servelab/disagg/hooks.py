"""Run code after each layer of a forward: where a KV connector sends layer i while layer i + 1 computes.

vLLM's KV connectors hook the attention layer the same way (``save_kv_layer`` after a layer has written its
KV); here a cache view is wrapped, so the model needs no change.
"""

from __future__ import annotations

from collections.abc import Callable

from servelab.kv_cache import KVCache


class AfterEachLayer(KVCache):
    """A cache view that calls ``callback(layer)`` once each layer has written its K/V to the cache."""

    def __init__(self, view: KVCache, callback: Callable[[int], None]):
        self.view, self.callback = view, callback

    def plan(self, positions):
        return self.view.plan(positions)

    def attend(self, layer, q, k, v, meta):
        out = self.view.attend(layer, q, k, v, meta)
        self.callback(layer)
        return out


def after_each_layer(view: KVCache, callback: Callable[[int], None]) -> AfterEachLayer:
    return AfterEachLayer(view, callback)
