"""Which physical KV blocks each sequence owns: a free list, block tables and reference counts.

Pure host-side bookkeeping, no tensors. Token ``p`` of a sequence lives in block ``table[p // block_size]``
at offset ``p % block_size``; its *slot* is ``block * block_size + offset``, the row of the flattened cache.
Blocks can be shared (``fork``): a reference count says how many sequences hold a block, and a shared block
is copied before anyone writes into it (copy on write), so one sequence can never overwrite another's K/V.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    free_blocks: list[int] = field(init=False)  # pop() hands out the lowest block first
    ref_counts: list[int] = field(init=False)  # sequences holding each block; 0 = free
    tables: dict[int, list[int]] = field(init=False, default_factory=dict)  # seq id -> its blocks, in order
    lengths: dict[int, int] = field(init=False, default_factory=dict)  # seq id -> tokens it holds
    pending_copies: list[tuple[int, int]] = field(init=False, default_factory=list)  # (src, dst) for the cache

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"a block manager needs num_blocks >= 1 and block_size >= 1, "
                             f"got {self.num_blocks} and {self.block_size}")
        self.free_blocks = list(range(self.num_blocks - 1, -1, -1))
        self.ref_counts = [0] * self.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free_blocks

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Blocks for a new sequence's first ``num_tokens`` tokens (its prompt); returns its block table."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already holds blocks: free it before allocating again")
        if num_tokens < 0:
            raise ValueError(f"cannot allocate {num_tokens} tokens for sequence {seq_id}")
        need = self.blocks_for(num_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"sequence {seq_id} needs {need} blocks for {num_tokens} tokens but only "
                               f"{self.num_free_blocks} are free: check can_allocate first")
        self.tables[seq_id] = [self._take() for _ in range(need)]
        self.lengths[seq_id] = num_tokens
        return list(self.tables[seq_id])

    def can_append(self, seq_id: int) -> bool:
        return not self._needs_block(seq_id) or self.num_free_blocks > 0

    def append_slot(self, seq_id: int) -> int:
        """Room for one more token of ``seq_id``; returns that token's slot. Takes a block only when needed."""
        table, n = self._table(seq_id), self.lengths[seq_id]
        if self._needs_block(seq_id) and not self.free_blocks:
            raise RuntimeError(f"sequence {seq_id} needs a new block but none is free: "
                               "free or preempt a sequence first (check can_append)")
        if n % self.block_size == 0:  # the last block is full (or there is none)
            table.append(self._take())
        elif self.ref_counts[table[-1]] > 1:  # about to write into a shared block: copy it first
            copy = self._take()
            self.pending_copies.append((table[-1], copy))
            self._release(table[-1])
            table[-1] = copy
        self.lengths[seq_id] = n + 1
        return table[-1] * self.block_size + n % self.block_size

    def fork(self, parent: int, child: int) -> None:
        """``child`` starts as a copy of ``parent`` (e.g. a second beam) sharing all its blocks."""
        if child in self.tables:
            raise ValueError(f"cannot fork into sequence {child}: it already holds blocks")
        self.tables[child] = list(self._table(parent))
        self.lengths[child] = self.lengths[parent]
        for b in self.tables[child]:
            self.ref_counts[b] += 1

    def free(self, seq_id: int) -> None:
        """Give back ``seq_id``'s blocks; a block returns to the free list once no sequence holds it."""
        for b in self._table(seq_id):
            self._release(b)
        del self.tables[seq_id], self.lengths[seq_id]

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._table(seq_id))

    def num_tokens(self, seq_id: int) -> int:
        self._table(seq_id)
        return self.lengths[seq_id]

    def slot_mapping(self, seq_id: int) -> list[int]:
        """The slot of each token ``seq_id`` holds, positions 0..n-1."""
        table, bs = self._table(seq_id), self.block_size
        return [table[p // bs] * bs + p % bs for p in range(self.lengths[seq_id])]

    def take_copies(self) -> list[tuple[int, int]]:
        """(src, dst) block copies that copy-on-write asked for since the last call; the cache performs them."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _needs_block(self, seq_id: int) -> bool:
        table, n = self._table(seq_id), self.lengths[seq_id]
        return n % self.block_size == 0 or self.ref_counts[table[-1]] > 1

    def _table(self, seq_id: int) -> list[int]:
        if seq_id not in self.tables:
            raise ValueError(f"sequence {seq_id} holds no blocks (never allocated, or already freed)")
        return self.tables[seq_id]

    def _take(self) -> int:
        block = self.free_blocks.pop()
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)
