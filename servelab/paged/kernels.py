"""Triton kernels for PagedAttention: write new K/V into the block cache, and decode attention over it.

Layout and meaning of every argument: see ``servelab.paged.reference``, the PyTorch versions these match.
Names below: B sequences, Hq query heads, Hkv KV heads, G = Hq // Hkv query heads per KV head, D head size.

Decode design:
- one program per (sequence, KV head): the G query heads that share a KV head are one [BLOCK_G, BLOCK_D]
  tile, so each K/V element is loaded once for the whole group (GQA is a bandwidth saving, keep it one);
- scores and outputs use tl.dot (tensor cores) rather than elementwise multiply-and-sum, whose
  [G, BLOCK_N, D] product would sit in registers; tl.dot wants every side >= 16 (Triton up to 3.3 at least insists, and
  the MMA works on 16 rows anyway), so the group and head size are padded to powers of two >= 16 with
  masks: the wasted tensor-core work is free, decode waits on memory;
- the context is walked in tiles of BLOCK_N tokens; each token finds its physical block through the block
  table, so a tile may span several blocks and any block size (8, 16, 32, ...) works with one tile size;
- online softmax: a running max m_i and sum l_i per query head, fp32, rescaling the output accumulator.
Every sequence must have seq_len >= 1 (its own new token): an empty softmax has no answer.
``paged_decode_split`` (flash-decoding) also splits each sequence's context across programs, for when
B x Hkv programs are too few to fill the GPU; a second kernel merges the splits by their log-sum-exp.
"""
from __future__ import annotations

import torch

from servelab.device import import_triton, triton_mode

triton = import_triton()
tl = triton.language
# Triton's interpreter runs tl.dot on bf16 as a matmul of the raw 16-bit patterns (integers): upcast there.
INTERPRETER = tl.constexpr(triton_mode() == "interpreter")

BLOCK_N = 32  # context tokens per tile (>= 16: it is tl.dot's inner size in p @ v)
MAX_SPLITS = 32
MIN_SPLIT_TOKENS = 256


# ----------------------------------------------------------------------------- store
@triton.jit
def _store_kv_kernel(
    K,  # [N, Hkv, D] keys of the new tokens
    V,  # [N, Hkv, D]
    K_cache,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    V_cache,  # [num_blocks, BLOCK_SIZE, Hkv, D], same strides as K_cache
    slot_mapping,  # [N] int64, -1 = padding token
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_cb, stride_ct, stride_ch,  # cache strides: block, token in block, head
    H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    n = tl.program_id(0)  # one program per new token, all its heads at once
    slot = tl.load(slot_mapping + n)
    if slot >= 0:  # -1: a padding token, store nothing
        offs_h = tl.arange(0, BLOCK_H)  # [BLOCK_H]
        offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
        mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)  # [BLOCK_H, BLOCK_D]
        k = tl.load(K + n * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(V + n * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct  # int64: caches can pass 2^31
        dst = dst + offs_h[:, None] * stride_ch + offs_d[None, :]  # [BLOCK_H, BLOCK_D]
        tl.store(K_cache + dst, k.to(K_cache.dtype.element_ty), mask=mask)
        tl.store(V_cache + dst, v.to(V_cache.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [N, Hkv, D] into the caches at ``slot_mapping`` [N] (-1 = skip), in place."""
    N, H, D = k.shape
    assert k.stride(-1) == v.stride(-1) == 1 and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if N == 0:
        return
    _store_kv_kernel[(N,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=H, D=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D),
        BLOCK_SIZE=k_cache.shape[1],
    )


# ----------------------------------------------------------------------------- decode
@triton.jit
def _attend(
    q,  # [BLOCK_G, BLOCK_D] the group's queries, zero-padded rows and columns
    K_cache,  # [num_blocks, BLOCK_SIZE, Hkv, D], already offset to this KV head
    V_cache,  # [num_blocks, BLOCK_SIZE, Hkv, D], already offset to this KV head
    block_table,  # [max_blocks] int32, this sequence's row
    start, end, scale,  # the context tokens [start, end) to attend to
    stride_cb, stride_ct,
    D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Online softmax over tokens [start, end) -> (acc [BLOCK_G, BLOCK_D], m_i [BLOCK_G], l_i [BLOCK_G]):
    the output is acc / l_i; m_i + log(l_i) is the log-sum-exp of the scores."""
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scores
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp(score - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running sum of exp(score - m_i) * v
    if INTERPRETER:
        q = q.to(tl.float32)
    for tile in range(start, end, BLOCK_N):
        offs_n = tile + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions in the sequence
        mask_n = offs_n < end
        block = tl.load(block_table + offs_n // BLOCK_SIZE, mask=mask_n, other=0)  # [BLOCK_N] physical blocks
        token = block.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_ct  # [BLOCK_N]
        kv_mask = mask_n[:, None] & (offs_d[None, :] < D)  # [BLOCK_N, BLOCK_D]
        k = tl.load(K_cache + token[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(V_cache + token[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        if INTERPRETER:
            k, v = k.to(tl.float32), v.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_G, BLOCK_N]; ieee: fp32 not tf32
        s = tl.where(mask_n[None, :], s, float("-inf"))  # every tile has >= 1 real token, so m stays finite
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_G]
        alpha = tl.exp(m_i - m_new)  # rescales what was summed under the old max
        p = tl.exp(s - m_new[:, None])  # [BLOCK_G, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _load_group(Q, b, kv_head, stride_qb, stride_qh,
                G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """-> the query heads of KV head ``kv_head`` (q [BLOCK_G, BLOCK_D]), their head ids [BLOCK_G] and mask."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * G + offs_g  # [BLOCK_G] query heads h with h // G == kv_head
    mask = (offs_g[:, None] < G) & (offs_d[None, :] < D)  # [BLOCK_G, BLOCK_D]
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=mask, other=0.0)
    return q, heads, mask


@triton.jit
def _paged_decode_kernel(
    Q,  # [B, Hq, D]
    K_cache,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    V_cache,  # [num_blocks, BLOCK_SIZE, Hkv, D], same strides as K_cache
    block_tables,  # [B, max_blocks] int32
    seq_lens,  # [B] int32
    Out,  # [B, Hq, D]
    scale,
    stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ob, stride_oh,
    G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    q, heads, mask = _load_group(Q, b, kv_head, stride_qb, stride_qh, G, D, BLOCK_G, BLOCK_D)
    seq_len = tl.load(seq_lens + b)
    acc, m_i, l_i = _attend(q, K_cache + kv_head * stride_ch, V_cache + kv_head * stride_ch,
                            block_tables + b * stride_bt, 0, seq_len, scale, stride_cb, stride_ct,
                            D, BLOCK_SIZE, BLOCK_N, BLOCK_G, BLOCK_D)
    out = acc / l_i[:, None]  # [BLOCK_G, BLOCK_D]
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask)


def _check(q, k_cache, v_cache, block_tables, seq_lens, out):
    """Shapes and dtypes, and the tile sizes: -> (G, BLOCK_G, BLOCK_D, out)."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    assert k_cache.shape[3] == D and v_cache.shape == k_cache.shape and Hq % Hkv == 0, (q.shape, k_cache.shape)
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and the caches must share a dtype (tl.dot)"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    assert block_tables.shape[0] == seq_lens.shape[0] == B and block_tables.dtype == seq_lens.dtype == torch.int32
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    G = Hq // Hkv
    return G, max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(D)), out  # tl.dot: sides >= 16


def paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale: float, out=None) -> torch.Tensor:
    """Decode attention, one program per (sequence, KV head). Returns ``out`` [B, Hq, D] (new if None)."""
    G, BLOCK_G, BLOCK_D, out = _check(q, k_cache, v_cache, block_tables, seq_lens, out)
    B, Hq, D = q.shape
    _paged_decode_kernel[(B, Hq // G)](
        q, k_cache, v_cache, block_tables, seq_lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        G=G, D=D, BLOCK_SIZE=k_cache.shape[1], BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D,
    )
    return out


# ----------------------------------------------------------------------------- split-KV decode
@triton.jit
def _split_len(seq_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens per split: an equal share, rounded up to whole tiles (so only the last tile is ragged)."""
    return tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N


@triton.jit
def _split_stage1_kernel(
    Q,  # [B, Hq, D]
    K_cache,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    V_cache,  # [num_blocks, BLOCK_SIZE, Hkv, D], same strides as K_cache
    block_tables,  # [B, max_blocks] int32
    seq_lens,  # [B] int32
    Out_part,  # [B, Hq, NUM_SPLITS, D] fp32: each split's normalised output
    Lse_part,  # [B, Hq, NUM_SPLITS] fp32: each split's log-sum-exp of scores
    scale,
    stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q, heads, mask = _load_group(Q, b, kv_head, stride_qb, stride_qh, G, D, BLOCK_G, BLOCK_D)
    seq_len = tl.load(seq_lens + b)
    start = split * _split_len(seq_len, NUM_SPLITS, BLOCK_N)
    end = tl.minimum(start + _split_len(seq_len, NUM_SPLITS, BLOCK_N), seq_len)
    acc, m_i, l_i = _attend(q, K_cache + kv_head * stride_ch, V_cache + kv_head * stride_ch,
                            block_tables + b * stride_bt, start, end, scale, stride_cb, stride_ct,
                            D, BLOCK_SIZE, BLOCK_N, BLOCK_G, BLOCK_D)
    if start < seq_len:  # a short sequence leaves its last splits empty: stage 2 never reads them
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(Out_part + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :],
                 acc / l_i[:, None], mask=mask)
        tl.store(Lse_part + b * stride_lb + heads * stride_lh + split, m_i + tl.log(l_i),
                 mask=tl.arange(0, BLOCK_G) < G)


@triton.jit
def _split_stage2_kernel(
    Out_part,  # [B, Hq, NUM_SPLITS, D] fp32
    Lse_part,  # [B, Hq, NUM_SPLITS] fp32
    seq_lens,  # [B] int32
    Out,  # [B, Hq, D]
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)  # one program per (sequence, query head)
    seq_len = tl.load(seq_lens + b)
    live = tl.cdiv(seq_len, _split_len(seq_len, NUM_SPLITS, BLOCK_N))  # splits that hold tokens
    offs_s = tl.arange(0, BLOCK_S)  # [BLOCK_S]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    lse = tl.load(Lse_part + b * stride_lb + h * stride_lh + offs_s,
                  mask=offs_s < live, other=float("-inf"))  # [BLOCK_S]
    o = tl.load(Out_part + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                mask=(offs_s[:, None] < live) & (offs_d[None, :] < D), other=0.0)  # [BLOCK_S, BLOCK_D]
    w = tl.exp(lse - tl.max(lse, 0))  # [BLOCK_S] each split's share of the softmax mass, 0 for empty ones
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)  # [BLOCK_D]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < D)


def _scratch(*shape: int, device) -> torch.Tensor:
    """Stage 1's partial results (tests fill them with NaN: stage 2 must read only what stage 1 wrote)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def default_num_splits(batch: int, num_kv_heads: int, max_tokens: int, device: torch.device) -> int:
    """Enough (sequence, KV head, split) programs for two waves over the SMs, >= 256 tokens a split, <= 32."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    want = triton.cdiv(2 * sms, batch * num_kv_heads)
    return max(1, min(want, triton.cdiv(max_tokens, MIN_SPLIT_TOKENS), MAX_SPLITS))


def paged_decode_split(q, k_cache, v_cache, block_tables, seq_lens, scale: float, num_splits: int | None = None,
                       out=None) -> torch.Tensor:
    """Flash-decoding: ``num_splits`` programs per (sequence, KV head), then a merge. Returns ``out``."""
    G, BLOCK_G, BLOCK_D, out = _check(q, k_cache, v_cache, block_tables, seq_lens, out)
    B, Hq, D = q.shape
    block_size = k_cache.shape[1]
    S = num_splits or default_num_splits(B, Hq // G, block_tables.shape[1] * block_size, q.device)
    out_part = _scratch(B, Hq, S, D, device=q.device)
    lse_part = _scratch(B, Hq, S, device=q.device)
    _split_stage1_kernel[(B, Hq // G, S)](
        q, k_cache, v_cache, block_tables, seq_lens, out_part, lse_part, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out_part.stride(0), out_part.stride(1), out_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        G=G, D=D, BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, NUM_SPLITS=S,
    )
    _split_stage2_kernel[(B, Hq)](
        out_part, lse_part, seq_lens, out,
        out_part.stride(0), out_part.stride(1), out_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        D=D, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, NUM_SPLITS=S, BLOCK_S=triton.next_power_of_2(S),
    )
    return out
