"""Lab 02, PagedAttention: a KV cache made of fixed-size blocks, found through per-sequence block tables."""
