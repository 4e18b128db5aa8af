"""The static engine's decoding-step attention as one Triton kernel: per row and KV head, the group's
query heads against the whole slot cache, read once, with the engine's additive mask.

Why: at evaluate.batch_size: auto on an H200 (1,319 rows, 555 slots for GSM8K prompts x 256 new
tokens) the cache is 96 GB, read once per decoding step. torch's SDPA kernels take the step as a
4-row query per KV head (transformers' pack_gqa) with a float mask, and spent 62 ms of a 99 ms step
on it (cuDNN; memory-efficient: ~50 ms), ~1.5 TB/s against the card's 4.8
(benchmarks/results/diagnose_run17_nvidia-h200.json). This kernel streams keys and values in blocks
of slots with an online softmax, as flash-decoding does, the group's queries padded to the 16 rows a
tensor-core dot needs. The products run on fp32 copies of the tiles as TF32 dots, which are exact
for bf16/fp16 inputs (their mantissas fit TF32's) and full fp32 ("ieee") for fp32 caches; Triton's
CPU interpreter, which the tests use, has no bf16 dot.

Same computation as SDPA with that mask: scores in fp32, softmax in fp32, probabilities rounded to
the values' dtype for the second product, fp32 accumulation. A slot the mask excludes (dtype's min)
gets weight exp(min - max) = 0 once any allowed slot has been seen, and every row allows its own
prompt, so rows whose first blocks are all padding come out right. tests/test_decode_attention.py
checks it against SDPA and through the engine against `generate`, on CPU under Triton's interpreter.
"""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK_SLOTS = 64


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, scale, lowest, slots,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                             stride_bb, stride_ob, stride_oh,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                             BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    g_ok = g < GROUP
    d_ok = d < DIM
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    k_base = k_ptr + row * stride_kb + kv_head * stride_kh
    v_base = v_ptr + row * stride_vb + kv_head * stride_vh
    # Only the blocks of slots the mask allows anything in: a row's slots past the token being
    # written (not yet written, or still holding the row's previous question) and, in a sliding
    # layer, those behind its window are whole blocks of `lowest` (the engine's masked value), whose
    # weights would be exactly 0; reading the mask row (2 bytes a slot) spares reading their keys and
    # values (2 x 2 x dim bytes a slot). Any pattern of masked blocks is skipped, wherever it lies.
    # A row with nothing allowed is attended whole, as SDPA does.
    anything = tl.zeros([], tl.int32)  # a tensor from the start: a loop-carried value keeps its type
    for start in range(0, slots, BLOCK):
        n = start + tl.arange(0, BLOCK)
        bias = tl.load(bias_ptr + row * stride_bb + n, mask=n < slots, other=lowest).to(tl.float32)
        anything = tl.maximum(anything, tl.max(((bias > lowest) & (n < slots)).to(tl.int32), axis=0))
    best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for start in range(0, slots, BLOCK):
        n = start + tl.arange(0, BLOCK)
        n_ok = n < slots
        bias = tl.load(bias_ptr + row * stride_bb + n, mask=n_ok, other=float("-inf")).to(tl.float32)
        seen = tl.max(((bias > lowest) & n_ok).to(tl.int32), axis=0)
        if (seen > 0) | (anything == 0):
            k = tl.load(k_base + n[:, None] * stride_ks + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION) * scale
            scores = scores + bias[None, :]
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            rescale = tl.exp(best - new_best)
            p = tl.exp(scores - new_best[:, None])
            total = total * rescale + tl.sum(p, axis=1)
            v = tl.load(v_base + n[:, None] * stride_vs + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            p = p.to(v.dtype).to(tl.float32)  # rounded as SDPA rounds the probabilities
            acc = acc * rescale[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
            best = new_best
    out = acc / total[:, None]
    tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])


def decode_attention(query, key, value, bias, scale: float):
    """query [rows, heads, 1, dim]; key, value [rows, kv_heads, slots, dim] (last dim contiguous);
    bias [rows, 1, 1, slots], additive. Returns [rows, heads, 1, dim] in query's dtype."""
    import torch

    rows, heads, _, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    group = heads // kv_heads
    q = query.reshape(rows, heads, dim)
    if q.stride(-1) != 1:
        q = q.contiguous()
    bias2d = bias.reshape(rows, slots)
    if bias2d.stride(-1) != 1:
        bias2d = bias2d.contiguous()
    out = torch.empty((rows, heads, dim), dtype=query.dtype, device=query.device)
    _decode_attention_kernel[(rows, kv_heads)](
        q, key, value, bias2d, out, scale, torch.finfo(bias.dtype).min, slots,
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), bias2d.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim,
        DIM_PAD=max(16, triton.next_power_of_2(dim)), BLOCK=BLOCK_SLOTS,
        PRECISION="ieee" if key.dtype == torch.float32 else "tf32")
    return out.reshape(rows, heads, 1, dim)
