"""NF4 dequantization written in plain torch ops, so that torch.compile traces the frozen 4-bit base.

Why: at the card's batch 1 a training step is bound by the host, not the GPU (benchmarks/results/
profile_train_*: GPU busy 0.45 s of a 3.16 s compiled step). Inside a compiled decoder layer every
bitsandbytes linear is an opaque custom op whose Python dispatch costs more host time than the GPU
spends on it. Written here as a lookup and a multiply, inductor fuses the dequantization into one
generated kernel per weight and the layer's graph holds no Python calls at all.

The arithmetic is bitsandbytes' own (its reference implementation, backends/default/ops.py, "matches
C++ / CUDA behavior"): each 4-bit index picks a float32 code value, times its block's float32 absmax,
rounded once to the compute dtype; with double quantization the absmax itself is first decoded from
8 bits the same way and offset. tests/test_nf4.py checks equality with bitsandbytes' dequantize_4bit.

Only the training path of train.torch_compile uses this (stages.train.compile_decoder_layers): in
eager mode the same ops would be several kernels instead of bitsandbytes' one.
"""
from __future__ import annotations

import types


def dequantize_nf4(packed, quant_state):
    """The weight a bitsandbytes 4-bit `Params4bit` stands for, as a (out, in) tensor of quant_state.dtype."""
    import torch

    qs = quant_state
    n = 1
    for d in qs.shape:
        n *= d
    data = packed.view(torch.uint8).reshape(-1)  # quant_storage may be bf16: the bytes are what count
    # Two indices per byte, high nibble first (bitsandbytes' packing order).
    idx = torch.stack((data >> 4, data & 0x0F), dim=-1).reshape(-1)[:n].long()
    position = torch.arange(n, device=data.device)
    absmax = qs.absmax
    if qs.nested:
        blocks = torch.arange(absmax.numel(), device=data.device)
        absmax = qs.state2.code[absmax.long()] * qs.state2.absmax[blocks // qs.state2.blocksize] + qs.offset
    values = qs.code[idx] * absmax[position // qs.blocksize]
    return values.to(qs.dtype).reshape(qs.shape)


def _nf4_matmul():
    """x @ W.T through an autograd.Function that keeps only the packed weight for backward and decodes
    it again there: autograd on the plain ops would save every decoded bf16 weight of the model
    (16 GB for an 8B one) until backward. Built on first use, to keep `import torch` out of import time."""
    import torch

    class NF4Matmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, packed, quant_state):
            ctx.save_for_backward(packed)
            ctx.quant_state = quant_state
            return torch.nn.functional.linear(x, dequantize_nf4(packed, quant_state))

        @staticmethod
        def backward(ctx, grad_out):
            (packed,) = ctx.saved_tensors
            return grad_out @ dequantize_nf4(packed, ctx.quant_state), None, None

    return NF4Matmul


def _traced_forward(self, x):
    """bitsandbytes' Linear4bit.forward with its matmul written out: compute dtype in, input dtype out."""
    inp_dtype = x.dtype
    quant_state = self.weight.quant_state
    x = x.to(quant_state.dtype)
    out = self._nf4_matmul.apply(x, self.weight, quant_state)
    if self.bias is not None:
        out = out + self.bias.to(quant_state.dtype)
    return out.to(inp_dtype)


def trace_nf4_linears(model) -> int:
    """Give every NF4 `bnb.nn.Linear4bit` of `model` the plain-ops forward; returns how many.

    FP4 layers keep bitsandbytes' own forward (a different code table and not measured here)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    matmul = None
    count = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        quant_state = getattr(module.weight, "quant_state", None)
        if quant_state is None or quant_state.quant_type != "nf4":
            continue
        matmul = matmul or _nf4_matmul()
        module._nf4_matmul = matmul
        module.forward = types.MethodType(_traced_forward, module)
        count += 1
    return count
