"""A step's attention metadata: what every layer needs, built once per step on the host.

A forward pass runs the same attention in every layer, and every layer needs the same facts about the
batch: each new token's position, where its K/V go in the cache, how far each row may look. Computing
those inside a layer (``int(positions.max())``, ``nonzero``, building index tensors) makes the host wait
for the GPU in every layer, so the GPU can never run ahead of Python. Instead the cache builds them once
per step from host tensors (``KVCache.plan``), they travel to the device in one copy
(``AttentionMetadata.to``), and every layer reads them. vLLM calls this the step's attention metadata.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from servelab.device import host_to_device


@dataclass
class AttentionMetadata:
    """Base class: subclasses add their own fields (slot mapping, block tables, lengths, ...).

    Every tensor field is an integer tensor built on the host; ``to(device)`` moves them all in one copy.
    Plain Python fields (ints, bools) stay on the host: they size tensors and pick code paths.
    """

    positions: torch.Tensor  # [B, T] position of each new token in its sequence, -1 = padding

    def tensor_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def to(self, device: torch.device, *extra: torch.Tensor) -> tuple[AttentionMetadata, ...]:
        """(this metadata on ``device``, *extra on ``device``): every tensor moves in a single copy.

        ``extra`` are more host tensors of the same step (the token ids) that ride along in that copy.
        """
        names = self.tensor_fields()
        moved = host_to_device([getattr(self, n) for n in names] + list(extra), device)
        meta = dataclasses.replace(self, **dict(zip(names, moved)))
        meta.on_device()
        return (meta, *moved[len(names):])

    def on_device(self) -> None:
        """Hook: derive device-side tensors every layer shares (e.g. the attention mask), once per step."""
