"""Lab 02 (PagedAttention): KV waste, a block manager, the step's slot mapping, Triton kernels, and
continuous batching on the paged cache.
"""

from __future__ import annotations

from grader.spec import Lab

LAB = Lab(
    id="02_paged_attention",
    title="PagedAttention: a block-table KV cache and a Triton decode kernel",
    notebook="paged_attention.ipynb",
    module="paged",
    functions=("kv_usage", "BlockManager", "slot_mapping", "store_kv", "paged_decode", "paged_decode_split",
               "paged_continuous_batching"),
)
