"""Lab 02, PagedAttention: a KV cache made of fixed-size blocks, found through per-sequence block tables,
and the Triton kernels that read it.

``reference`` holds the plain PyTorch versions of the kernels in ``kernels`` (import that one only when
you need Triton: it imports triton, in its interpreter on a machine without a CUDA GPU).
"""
