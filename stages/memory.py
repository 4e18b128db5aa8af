"""Memory preflight: will this run fit on the GPU? Estimated from the model's config alone.

    python -m stages.memory [--params params.yaml] [--stage train|evaluate|both] [--free-gib 15] \
        [--config-dir tests/configs/llama-3.1-8b] [--train-tokens N] [--questions 1319]

Prints where the peak GPU memory of the train and evaluate stages goes (weights, LoRA + gradients,
optimizer state, activations, KV cache, CUDA overhead) and compares it with the GPU's free memory,
or with `--free-gib N` ("would this fit on a 16 GB card?"). When it does not fit it exits with
status 2 and one line naming the params that would fit, e.g.

    error: memory preflight: train needs ~31.2 GiB but the GPU has 22.0 GiB free; try: train.max_length <= 1024

`--config-dir` reads the model's config.json from a directory instead of model.name (a hub id
needs the network or the Hugging Face cache; a config-only directory is enough).

The train and evaluate stages call `preflight_train` / `preflight_eval` before loading anything, and
`auto_eval_batch` sizes `evaluate.batch_size: auto`. Set `QLORA_SKIP_PREFLIGHT=1` to skip the check
(the estimate is still printed). A config the estimator cannot read is a warning, never a stop.

What is modelled is the code that runs, for any decoder transformers can build: the module names,
shapes, fused projections (Phi-3's qkv_proj / gate_up_proj), norms (Qwen3's q/k norms, Gemma's four
per layer) and tied embeddings are read off a meta-device instance of the model (no weights), the
layer types and sliding window off the config. Training is TRL's SFTTrainer as stages/train.py
builds it: NF4 projections, embeddings and norms in the compute dtype (no
prepare_model_for_kbit_training), LoRA weights and gradients in bf16 on a 4-bit base (TRL casts
them; fp32 otherwise, peft's default), TRL's fused LM head on every path (the logits are never
materialised, with or without Liger), padding-free or padded rows, Liger's layer kernels,
non-reentrant checkpointing, torch_compile and CUDA graphs (padded lengths). Evaluation is
stages/evaluate.py + stages/decode.py: the 4-bit or dequantized base, the adapter unmerged in the
dtype it was trained in, the static engine's preallocated cache (full length on every layer, as
`decode.allocate_cache` allocates it) or transformers' cache under `generate` (sliding layers hold
their window only). The few constants fitted to measurements (marked MEASURED) come from one H200;
`benchmarks/memory_check.py` runs the stages' own functions and compares.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from stages.config import CUDA_GRAPH_LENGTH_MULTIPLE, EvaluateParams, ModelParams, TrainParams, load_params
from stages.io import UserError, cli

GIB = 1024**3
SKIP_ENV = "QLORA_SKIP_PREFLIGHT"

# Not in PyTorch's allocator but on the GPU once the stage runs: kernels loaded lazily on first use
# (cuBLAS, Triton, bitsandbytes) and cuBLAS workspaces. (The CUDA context exists when the
# preflight asks for the free memory, so it is already taken off.)
OVERHEAD_FIXED = GIB // 2
# The caching allocator reserves more than it hands out (block rounding, fragmentation between the
# differently sized activations of rows of different lengths).
OVERHEAD_FRACTION = 0.08
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
PAGED_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit")
# Optimizer state per trainable parameter: bitsandbytes' 8-bit Adam keeps two uint8 states and one
# fp32 absmax per 256 values each; its 32-bit Adam two fp32 states; torch's AdamW two states in the
# parameter's dtype (added to these 0 bytes below).
OPTIMIZER_STATE_BYTES = {"paged_adamw_8bit": 2 + 2 * 4 / 256, "adamw_8bit": 2 + 2 * 4 / 256,
                         "paged_adamw_32bit": 8, "adamw_torch": 0, "adamw_torch_fused": 0}
# bitsandbytes NF4/FP4: blocks of 64 weights share one absmax; double quantization stores those
# absmaxes in 8 bits with one fp32 constant per 256 of them.
QUANT_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256
# TRL's fused LM head (trl.trainer.utils.add_fused_lm_head): cuBLAS tiles of at most this many
# tokens x this many vocabulary entries, one for the forward and one for the gradient.
FUSED_HEAD_TOKENS, FUSED_HEAD_VOCAB = 4096, 32768
# MEASURED (H200, Llama-3.1-8B shape, stages.train.build_trainer): a torch_compile'd decoder layer
# keeps this fraction of what the same layer keeps in eager mode (inductor recomputes pointwise ops
# instead of saving them): batch 1 x 8 + cuda_graphs peaked at 8.84 GiB, rows padded to 448 tokens.
COMPILED_SAVED_FRACTION = 0.86
# MEASURED: with gradient checkpointing inside a compiled layer (its 4-bit projections written as
# dequantize + linear, which the checkpointed region recomputes: stages.train.recomputable_4bit_matmuls),
# each layer holds this many hidden-sized tensors per token until its backward, where eager
# checkpointing holds its input alone: padding-free 8 rows + torch_compile peaked at 7.27 GiB of its
# own for 2,204 tokens (H200 run 18, benchmarks/results/bench_run18_nvidia-h200.json), 0.24 GiB
# above the eager estimate. (Before that rewrite the compiled layers kept the projections' outputs:
# 12.34 GiB for 2,295 tokens.)
COMPILED_CHECKPOINT_HELD = 1.5
# MEASURED: evaluating the dequantized base peaked this many bytes per byte of the base's NF4
# projections above weights + cache + prefill, at batch 128, 440 and 1,319 alike (4.8 GiB for 8B,
# of which the prefill explains ~1 GiB): the NF4 storage is not all given back after dequantizing.
DEQUANTIZED_RESIDUE_FRACTION = 1.0
# evaluate.batch_size: auto without a GPU to size it on.
AUTO_BATCH_WITHOUT_GPU = 128


@dataclass(frozen=True)
class Architecture:
    """What memory depends on, read off the config and a meta-device instance of the model."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    # (name, in_features, out_features) of every linear layer of the decoder (not the LM head), by
    # its full module name, as peft matches target_modules against it.
    linears: tuple
    # Elements per token that the norms of one decoder layer read (RMSNorm keeps its input).
    norm_inputs: int
    # Parameters outside the decoder's linear layers: embeddings, LM head (unless tied), norms.
    float_params: int
    layer_types: tuple
    sliding_window: int | None
    attn_softcapping: bool
    final_softcapping: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def quantized_params(self) -> int:
        """Parameters of the decoder's linear layers: what bitsandbytes quantizes."""
        return sum(a * b for _, a, b in self.linears)

    @property
    def unquantized_params(self) -> int:
        return self.float_params

    @property
    def largest_linear(self) -> int:
        return max(a * b for _, a, b in self.linears)


def _text_config_dict(config: dict) -> dict:
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        return config["text_config"]  # multimodal wrappers keep the decoder's numbers here
    return config


def read_architecture(config: dict) -> Architecture:
    """The Architecture of a HF config dict (`AutoConfig.to_dict()`); what it cannot read is a UserError."""
    return _read_architecture(json.dumps(_text_config_dict(config), sort_keys=True, default=str))


# Kept for stages/modeling.py (estimate_param_count), which reads quantized_params + unquantized_params.
model_shape = read_architecture


@functools.lru_cache(maxsize=32)
def _read_architecture(config_json: str) -> Architecture:
    config = json.loads(config_json)
    needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in needed if not isinstance(config.get(key), int)]
    if missing:
        raise UserError(f"memory preflight: the model config has no {', '.join(missing)}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        # AutoConfig.to_dict() always names the model_type; a hand-written config without one is read as Llama.
        hf_config = AutoConfig.for_model(config.get("model_type", "llama"), **fields)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(hf_config)
    except Exception as exc:  # any config transformers cannot build: the estimate is skipped, not the run
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"memory preflight: cannot build model_type {config.get('model_type')!r} "
                        f"from its config ({reason})") from None
    text = hf_config.get_text_config()
    output = lm.get_output_embeddings()
    linears = tuple((name, m.in_features, m.out_features) for name, m in lm.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not output)
    if not linears:
        raise UserError(f"memory preflight: {type(lm).__name__} has no linear layers to quantize")
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    layers = text.num_hidden_layers
    norm_inputs = 0
    decoder_layers = [m for name, m in lm.named_modules() if name.endswith(".0") and any(
        isinstance(c, torch.nn.Linear) for c in m.modules())]
    for name, module in (decoder_layers[0].named_modules() if decoder_layers else []):
        if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
            size = module.weight.numel()
            if size == head_dim:  # per-head q/k norms run over every head
                size = kv_heads * head_dim if "k_norm" in name else heads * head_dim
            norm_inputs += size
    linear_params = sum(a * b for _, a, b in linears)
    all_params = sum(p.numel() for p in lm.parameters())
    tied = output is None or output.weight is lm.get_input_embeddings().weight
    intermediate = getattr(text, "intermediate_size", None) or max(a for _, a, _ in linears)
    if isinstance(intermediate, list):
        intermediate = max(intermediate)
    sliding = getattr(text, "sliding_window", None)
    kinds = getattr(text, "layer_types", None)
    if not kinds:
        kinds = ["sliding_attention" if sliding else "full_attention"] * layers
    return Architecture(
        model_type=str(config.get("model_type")), hidden=text.hidden_size, intermediate=int(intermediate),
        layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=text.vocab_size, tied=tied,
        linears=linears, norm_inputs=norm_inputs, float_params=all_params - linear_params,
        layer_types=tuple(kinds), sliding_window=sliding if isinstance(sliding, int) else None,
        attn_softcapping=getattr(text, "attn_logit_softcapping", None) is not None,
        final_softcapping=getattr(text, "final_logit_softcapping", None) is not None)


def lora_modules(arch: Architecture, target_modules) -> list[tuple[str, int, int]]:
    """The linears peft puts an adapter on: "all-linear" is every linear but the LM head; a list
    matches a module whose full name is, or ends with "." + , one of its names."""
    if target_modules == "all-linear":
        return list(arch.linears)
    return [(n, a, b) for n, a, b in arch.linears if any(n == t or n.endswith("." + t) for t in target_modules)]


def lora_params(arch: Architecture, target_modules, r: int) -> int:
    return sum(r * (a + b) for _, a, b in lora_modules(arch, target_modules))


def quantized_bytes(params: int, double_quant: bool) -> int:
    absmaxes = params / QUANT_BLOCK
    constants = absmaxes * (1 + 4 / DOUBLE_QUANT_BLOCK) if double_quant else absmaxes * 4
    return int(params / 2 + constants)


def _lora_dtype_bytes(model: ModelParams) -> int:
    """TRL casts the adapter to bf16 on a quantized base; on a bf16 base peft keeps it in fp32."""
    return 2 if model.load_in_4bit else 4


def layer_saved_bytes(arch: Architecture, train: TrainParams, compute: int, liger: bool, masked: bool) -> float:
    """Bytes one token leaves saved for backward in one decoder layer run eagerly (no checkpointing).

    Frozen projections (NF4 or not) save nothing of their input; what is kept: each norm's input (in
    fp32 under transformers' RMSNorm, which upcasts, in the compute dtype under Liger's), SDPA's
    q, k, v and output (k and v repeated to every head when the batch has a mask: transformers then
    leaves SDPA's grouped-query path), the MLP's gate and up outputs and their activation (Liger's
    SwiGLU recomputes the latter), and per LoRA layer its dropped-out input, the dropout mask and
    lora_A's output. Eager attention adds the scores and probabilities, heads x row length per token.
    """
    r = train.lora_r
    kv = arch.q_dim if masked else arch.kv_dim
    saved = (compute if liger else 4) * arch.norm_inputs
    saved += compute * (2 * arch.q_dim + 2 * kv)
    saved += (2 if liger else 3) * compute * arch.intermediate
    targets = lora_modules(arch, train.lora_target_modules)
    per_layer = [(a, b) for _, a, b in targets][:max(1, len(targets) // arch.layers)]  # layers are alike
    if train.lora_dropout > 0:
        saved += sum((compute + 1) * a + compute * r for a, _ in per_layer)
    else:  # each distinct input once (q/k/v read one tensor, gate/up another)
        saved += compute * sum(set(a for a, _ in per_layer)) + sum(compute * r for _ in per_layer)
    return saved


def micro_batch_tokens(train: TrainParams, row_lengths: list[int] | None = None) -> int:
    """Tokens of the largest micro-batch: padding-free, the longest rows of a batch concatenated;
    padded, batch x the longest row (rounded up to the CUDA graphs' multiple). Without the rows,
    every row at train.max_length."""
    batch = train.per_device_train_batch_size
    lengths = sorted((min(n, train.max_length) for n in row_lengths), reverse=True) if row_lengths else \
        [train.max_length] * batch
    if train.padding_free:
        return sum(lengths[:batch])
    longest = lengths[0]
    if train.cuda_graphs:
        longest = -(-longest // CUDA_GRAPH_LENGTH_MULTIPLE) * CUDA_GRAPH_LENGTH_MULTIPLE
    return batch * longest


def estimate_train(config: dict, model: ModelParams, train: TrainParams, dev_batch_size: int = 0,
                   tokens: int | None = None) -> dict[str, int]:
    """Peak GPU bytes of the train stage, by component, at the training step's peak.

    `tokens`: the largest micro-batch's tokens (`micro_batch_tokens` of the real rows); None is the
    worst case, every row at train.max_length.
    - weights: NF4 codes + absmaxes of the decoder's linears, the rest in the compute dtype.
    - lora: adapter weights and gradients (2 bytes each on a 4-bit base, 4 otherwise).
    - optimizer: Adam state (paged optimizers keep it in CUDA unified memory: on the GPU, counted in
      `total` but not by PyTorch's allocator, so not in `allocated`).
    - activations: with checkpointing, every layer's input plus one layer recomputed in backward
      and the gradients passing through it (compiled, COMPILED_CHECKPOINT_HELD hidden-sized tensors
      per layer instead of one); without, every layer's saved tensors (`layer_saved_bytes`).
    - load_peak: loading quantizes one bf16 weight at a time next to what is loaded.
    - dev_peak: a dev-loss pass of `dev_batch_size` rows at max_length (forward only).
    """
    arch = read_architecture(config)
    train = train.resolved(on_gpu=True, compute_dtype=model.bnb_4bit_compute_dtype)  # a GPU's memory
    compute = DTYPE_BYTES[model.bnb_4bit_compute_dtype]
    batch = train.per_device_train_batch_size
    tokens = tokens or micro_batch_tokens(train)
    row_tokens = tokens if train.padding_free else -(-tokens // batch)
    liger = train.use_liger_kernel and not train.torch_compile
    masked = train.padding_free or batch > 1 or train.cuda_graphs
    if model.load_in_4bit:
        weights = quantized_bytes(arch.quantized_params, model.bnb_4bit_use_double_quant) + compute * arch.float_params
        dequantized = compute * arch.largest_linear  # bitsandbytes dequantizes a weight per matmul
    else:
        weights = compute * (arch.quantized_params + arch.float_params)
        dequantized = 0
    load_peak = weights + compute * arch.largest_linear
    n_lora = lora_params(arch, train.lora_target_modules, train.lora_r)
    lora_bytes = _lora_dtype_bytes(model)
    lora = 2 * lora_bytes * n_lora
    state = OPTIMIZER_STATE_BYTES[train.optim] or 2 * lora_bytes
    optimizer = int(n_lora * state)
    paged = optimizer if train.optim in PAGED_OPTIMIZERS else 0

    per_layer = layer_saved_bytes(arch, train, compute, liger, masked)
    if model.attn_implementation == "eager":
        per_layer += (2 + 2 * arch.attn_softcapping) * compute * arch.heads * row_tokens
    backward_work = compute * (3 * arch.intermediate + 2 * arch.hidden)
    head = 2 * compute * min(tokens, FUSED_HEAD_TOKENS) * min(arch.vocab, FUSED_HEAD_VOCAB)
    if train.gradient_checkpointing and train.torch_compile:
        held, recompute = arch.layers * compute * arch.hidden * COMPILED_CHECKPOINT_HELD, per_layer + backward_work
    elif train.gradient_checkpointing:
        held, recompute = arch.layers * compute * arch.hidden, per_layer + backward_work
    else:
        fraction = COMPILED_SAVED_FRACTION if train.torch_compile else 1.0
        held, recompute = arch.layers * fraction * per_layer, backward_work
    activations = int(tokens * (held + recompute) + dequantized)
    activations = max(activations, int(tokens * held + head))  # the LM head's moment, if larger

    train_peak = weights + lora + (optimizer - paged) + activations
    estimate = {"weights": weights, "lora": lora, "optimizer": optimizer, "activations": activations,
                "train_peak": train_peak, "load_peak": load_peak, "tokens": tokens}
    peaks = [train_peak, load_peak]
    if dev_batch_size:
        dev_tokens = dev_batch_size * train.max_length
        forward = compute * dev_tokens * (2 * arch.hidden + 3 * arch.intermediate + arch.q_dim + 2 * arch.kv_dim)
        estimate["dev_peak"] = weights + lora // 2 + (optimizer - paged) + forward + dequantized + head // 2
        peaks.append(estimate["dev_peak"])
    allocated = max(peaks)
    overhead = OVERHEAD_FIXED + int(OVERHEAD_FRACTION * allocated) + paged
    return {**estimate, "allocated": allocated, "overhead": overhead, "total": allocated + overhead}


def new_tokens_of(evaluate: EvaluateParams) -> int:
    """evaluate.max_new_tokens, or when null the protocol's own budget (the stage passes it filled in)."""
    if evaluate.max_new_tokens:
        return evaluate.max_new_tokens
    from stages import protocols

    if getattr(evaluate, "protocol", "train_prompt") == "train_prompt":
        return getattr(protocols, "TRAIN_PROMPT_MAX_NEW_TOKENS", 512)
    return 256  # lm-eval's max_gen_toks


def _eval_batch(evaluate: EvaluateParams, batch: int | None) -> int:
    if batch is not None:
        return batch
    if evaluate.batch_size == "auto":
        raise ValueError("evaluate.batch_size is 'auto': pass the batch (auto_eval_batch chooses it)")
    return min(evaluate.batch_size, evaluate.limit or evaluate.batch_size)


def kv_cache_bytes(arch: Architecture, rows: int, slots: int, dtype_bytes: int, engine: str) -> int:
    """The static engine allocates every layer at full length (decode.allocate_cache); transformers'
    cache under generate keeps a sliding layer's window only."""
    per_slot = rows * 2 * arch.kv_dim * dtype_bytes
    if engine == "static":
        return arch.layers * slots * per_slot
    window = arch.sliding_window or slots
    return sum(min(window, slots) if kind == "sliding_attention" else slots for kind in arch.layer_types) * per_slot


def estimate_eval(config: dict, model: ModelParams, evaluate: EvaluateParams, prompt_tokens: int,
                  merged_bf16: bool = False, adapter: TrainParams | None = None,
                  batch: int | None = None) -> dict[str, int]:
    """Peak GPU bytes of greedy generation, by component.

    `batch` overrides evaluate.batch_size (needed when it is "auto"); `prompt_tokens` is the longest
    prompt (a batch is left-padded to it); merged_bf16: the base is dequantized to the compute dtype.
    - weights: NF4 + float rest, or everything in the compute dtype; plus, dequantized from NF4,
      DEQUANTIZED_RESIDUE_FRACTION of the NF4 projections (MEASURED); plus the adapter, unmerged,
      in the dtype it was trained in (`adapter`: its TrainParams; None: no adapter).
    - kv_cache: `kv_cache_bytes` for prompt + new tokens.
    - activations: one prefill forward (the static engine PREFILL_TOKENS at a time, generate the whole
      batch): per token the residual, q/k/v (repeated under the mask), the MLP's tensors, the
      adapter's output; a weight dequantized per matmul on the 4-bit base; eager's score matrices.
    - logits: the decoding step's last-position logits (generate: also their fp32 copies).
    """
    from stages.decode import PREFILL_TOKENS

    arch = read_architecture(config)
    compute = DTYPE_BYTES[model.bnb_4bit_compute_dtype]
    rows = _eval_batch(evaluate, batch)
    static = evaluate.engine == "static"
    prefill = min(rows, max(1, PREFILL_TOKENS // prompt_tokens)) if static else rows
    dense = merged_bf16 or not model.load_in_4bit
    if dense:
        weights = compute * (arch.quantized_params + arch.float_params)
        if model.load_in_4bit:
            weights += int(DEQUANTIZED_RESIDUE_FRACTION * quantized_bytes(arch.quantized_params,
                                                                         model.bnb_4bit_use_double_quant))
        dequantized = 0
    else:
        weights = quantized_bytes(arch.quantized_params, model.bnb_4bit_use_double_quant) + compute * arch.float_params
        dequantized = compute * arch.largest_linear
    n_lora = lora_params(arch, adapter.lora_target_modules, adapter.lora_r) if adapter else 0
    weights += _lora_dtype_bytes(model) * n_lora
    slots = prompt_tokens + new_tokens_of(evaluate) - (1 if static else 0)
    kv_cache = kv_cache_bytes(arch, rows, slots, compute, evaluate.engine)
    if not static:  # the cache grows by concatenation: one layer's old and new copy at once
        kv_cache += kv_cache // arch.layers
    per_token = 2 * arch.hidden + 3 * arch.intermediate + 3 * arch.q_dim + (2 * arch.intermediate if adapter else 0)
    activations = compute * prefill * prompt_tokens * per_token + dequantized
    if model.attn_implementation == "eager":
        activations += (2 + 2 * arch.attn_softcapping) * (compute + 4) * prefill * arch.heads * prompt_tokens**2
    logits = rows * arch.vocab * (compute + (8 if not static else 0) + 2 * compute * arch.final_softcapping)
    steady = weights + kv_cache + activations + logits
    # Dequantizing: the dense weights appear while the NF4 ones are still referenced.
    load_peak = (compute * (arch.quantized_params + arch.float_params)
                 + quantized_bytes(arch.quantized_params, model.bnb_4bit_use_double_quant)) if dense and \
        model.load_in_4bit else weights + compute * arch.largest_linear
    allocated = max(steady, load_peak)
    overhead = OVERHEAD_FIXED + int(OVERHEAD_FRACTION * allocated)
    return {"weights": weights, "kv_cache": kv_cache, "activations": activations, "logits": logits,
            "load_peak": load_peak, "batch_size": rows, "allocated": allocated, "overhead": overhead,
            "total": allocated + overhead}


def auto_eval_batch(config: dict, model: ModelParams, evaluate: EvaluateParams, prompt_tokens: int,
                    free_bytes: int | None, n_questions: int, merged_bf16: bool = False,
                    adapter: TrainParams | None = None) -> int:
    """evaluate.batch_size: auto: the largest batch whose estimate fits `free_bytes`, at most
    `n_questions`; without a GPU (free_bytes None) min(n_questions, AUTO_BATCH_WITHOUT_GPU). When even
    one row does not fit, a UserError in one line saying what would."""
    if free_bytes is None:
        return max(1, min(n_questions, AUTO_BATCH_WITHOUT_GPU))

    def total(n: int) -> int:
        return estimate_eval(config, model, evaluate, prompt_tokens, merged_bf16, adapter, batch=n)["total"]

    best = _largest_fitting(list(range(1, max(1, n_questions) + 1)), lambda n: total(n) <= free_bytes)
    if best:
        return best
    one = dataclasses.replace(evaluate, batch_size=1)
    advice = [a for a in advise_eval(config, model, one, prompt_tokens, free_bytes, merged_bf16, adapter)
              if not a.startswith("evaluate.batch_size")]
    raise UserError(not_fitting_message("evaluate (batch 1)", total(1), free_bytes, advice,
                                        estimate_eval(config, model, one, prompt_tokens, merged_bf16, adapter,
                                                      batch=1)["weights"]))


def _largest_fitting(candidates: list[int], fits) -> int | None:
    """The largest candidate (ascending list) for which fits(candidate); fits must be monotone."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def with_checkpointing(train: TrainParams) -> TrainParams:
    """`train` with gradient checkpointing on; CUDA graphs cannot replay checkpointed layers, so off."""
    return dataclasses.replace(train, gradient_checkpointing=True, cuda_graphs=False)


def advise_train(config: dict, model: ModelParams, train: TrainParams, free_bytes: int,
                 dev_batch_size: int = 0) -> list[str]:
    """Single changes to the params under which `estimate_train` (worst case: rows at max_length)
    fits `free_bytes`, best first; when none does, one combined suggestion, or nothing."""
    def fits(m: ModelParams, t: TrainParams) -> bool:
        return estimate_train(config, m, t, dev_batch_size)["total"] <= free_bytes

    train = train.resolved(on_gpu=True, compute_dtype=model.bnb_4bit_compute_dtype)

    advice = []
    length = _largest_fitting(list(range(128, train.max_length, 128)),
                              lambda n: fits(model, dataclasses.replace(train, max_length=n)))
    if length:
        advice.append(f"train.max_length <= {length}")
    batch = _largest_fitting(list(range(1, train.per_device_train_batch_size)),
                             lambda n: fits(model, dataclasses.replace(train, per_device_train_batch_size=n)))
    if batch:
        advice.append(f"train.per_device_train_batch_size <= {batch} "
                      "(raise gradient_accumulation_steps to keep the effective batch)")
    if not train.gradient_checkpointing and fits(model, with_checkpointing(train)):
        advice.append("train.gradient_checkpointing: true" + (" + train.cuda_graphs: false" if train.cuda_graphs
                                                              else ""))
    if train.torch_compile and train.gradient_checkpointing and \
            fits(model, dataclasses.replace(train, torch_compile=False, cuda_graphs=False)):
        advice.append("train.torch_compile: false")
    if not model.load_in_4bit and fits(dataclasses.replace(model, load_in_4bit=True), train):
        advice.append("model.load_in_4bit: true")
    if train.optim not in PAGED_OPTIMIZERS and fits(model, dataclasses.replace(train, optim="paged_adamw_8bit")):
        advice.append("train.optim: paged_adamw_8bit")
    ranks = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) if r < train.lora_r]
    rank = _largest_fitting(ranks, lambda r: fits(model, dataclasses.replace(train, lora_r=r)))
    if rank:
        advice.append(f"train.lora_r <= {rank}")
    if advice:
        return advice

    small_model = dataclasses.replace(model, load_in_4bit=True)
    small_train = dataclasses.replace(with_checkpointing(train), per_device_train_batch_size=1, torch_compile=False,
                                      optim="paged_adamw_8bit")
    length = _largest_fitting(list(range(128, train.max_length + 1, 128)),
                              lambda n: fits(small_model, dataclasses.replace(small_train, max_length=n)))
    if not length:
        return []
    changes = [f"{key}: true" for key, old in (("model.load_in_4bit", model.load_in_4bit),
                                               ("train.gradient_checkpointing", train.gradient_checkpointing))
               if not old]
    if train.torch_compile:
        changes.append("train.torch_compile: false")
    if train.cuda_graphs:
        changes.append("train.cuda_graphs: false")
    if train.per_device_train_batch_size > 1:
        changes.append("train.per_device_train_batch_size: 1")
    if small_train.optim != train.optim:
        changes.append(f"train.optim: {small_train.optim}")
    changes.append(f"train.max_length <= {length}")
    return [" + ".join(changes)]


def advise_eval(config: dict, model: ModelParams, evaluate: EvaluateParams, prompt_tokens: int,
                free_bytes: int, merged_bf16: bool = False, adapter: TrainParams | None = None) -> list[str]:
    """Changes under which `estimate_eval` fits `free_bytes`, best first: one param each, except the
    4-bit base, which may need a smaller batch as well."""
    batch = 1 if evaluate.batch_size == "auto" else _eval_batch(evaluate, None)

    def fits(m: ModelParams, e: EvaluateParams, merged: bool = merged_bf16, rows: int = batch) -> bool:
        return estimate_eval(config, m, e, prompt_tokens, merged, adapter, batch=rows)["total"] <= free_bytes

    advice = []
    best = _largest_fitting(list(range(1, batch)), lambda n: fits(model, evaluate, rows=n))
    if best:
        advice.append(f"evaluate.batch_size <= {best} (or auto)")
    new_tokens = _largest_fitting(list(range(64, new_tokens_of(evaluate), 64)),
                                  lambda n: fits(model, dataclasses.replace(evaluate, max_new_tokens=n)))
    if new_tokens:
        advice.append(f"evaluate.max_new_tokens <= {new_tokens} (answers longer than that score as wrong)")
    # The 4-bit base (dequantize false, or load_in_4bit) as it is, or else with the largest batch that fits.
    four_bit = []
    if merged_bf16 and model.load_in_4bit:
        four_bit.append(("evaluate.dequantize: false", model))
    if not model.load_in_4bit:
        four_bit.append(("model.load_in_4bit: true", dataclasses.replace(model, load_in_4bit=True)))
    for change, m in four_bit:
        if fits(m, evaluate, merged=False):
            advice.append(change)
            continue
        smaller = _largest_fitting(list(range(1, batch)), lambda n: fits(m, evaluate, merged=False, rows=n))
        if smaller:
            advice.append(f"{change} + evaluate.batch_size <= {smaller} (or auto)")
    return advice


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def cuda_free_bytes() -> int | None:
    """Free memory of this process's CUDA device, or None without one. Under `accelerate launch` that is
    GPU LOCAL_RANK: the preflight runs before the ranks are placed on their devices, when every rank's
    current device is still GPU 0 (each would size itself, and `batch_size: auto`, from rank 0's GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    # A launcher that gives each rank one visible GPU (SLURM --gpus-per-task=1): its GPU is device 0.
    return torch.cuda.mem_get_info(rank if rank < torch.cuda.device_count() else 0)[0]


def not_fitting_message(stage: str, needed: int, free: int, advice: list[str], weights: int) -> str:
    head = f"memory preflight: {stage} needs ~{_gib(needed)} but the GPU has {_gib(free)} free"
    if advice:
        return f"{head}; try: {', '.join(advice)}"
    return (f"{head}; no setting of the params fits (the weights alone take {_gib(weights)}): "
            "use a smaller model or a GPU with more free memory")


def _preflight(stage: str, estimate, advise, device_free_bytes: int | None) -> dict[str, int]:
    try:
        est = estimate()
    except UserError as exc:  # a config the estimator cannot read: say what it lacks, do not block the run
        print(f"{exc}; skipping the memory preflight (the stage goes on unchecked)")
        return {}
    if os.environ.get(SKIP_ENV) == "1":
        print(f"memory preflight: {stage} needs ~{_gib(est['total'])}; not checked ({SKIP_ENV}=1)")
        return est
    free = device_free_bytes if device_free_bytes is not None else cuda_free_bytes()
    if free is None:
        print(f"memory preflight: {stage} would need ~{_gib(est['total'])} on a GPU; no CUDA device, not checked")
        return est
    if est["total"] > free:
        raise UserError(not_fitting_message(stage, est["total"], free, advise(free), est["weights"]))
    print(f"memory preflight: {stage} needs ~{_gib(est['total'])}, the GPU has {_gib(free)} free")
    return est


def preflight_train(config: dict, model: ModelParams, train: TrainParams, device_free_bytes: int | None = None,
                    dev_batch_size: int = 0, tokens: int | None = None) -> dict[str, int]:
    """Estimate the train stage's peak and stop (UserError, one line with advice) if it cannot fit.

    `tokens`: the largest micro-batch's tokens (`micro_batch_tokens(train, row_lengths)`); None
    assumes every row at max_length. device_free_bytes None: ask CUDA; without a CUDA device only
    the estimate is printed. Returns the estimate ({} for a config the estimator cannot read).
    """
    return _preflight("train", lambda: estimate_train(config, model, train, dev_batch_size, tokens),
                      lambda free: advise_train(config, model, train, free, dev_batch_size), device_free_bytes)


def preflight_eval(config: dict, model: ModelParams, evaluate: EvaluateParams, prompt_tokens: int,
                   merged_bf16: bool = False, device_free_bytes: int | None = None,
                   adapter: TrainParams | None = None, n_questions: int | None = None) -> dict[str, int]:
    """As `preflight_train`, for generation (see `estimate_eval`). With evaluate.batch_size "auto"
    the batch is `auto_eval_batch`'s for the free memory (printed); the returned estimate's
    "batch_size" is the batch to generate with."""
    batch = None
    if evaluate.batch_size == "auto":
        free = device_free_bytes if device_free_bytes is not None else cuda_free_bytes()
        batch = _preflight_auto_batch(config, model, evaluate, prompt_tokens, merged_bf16, adapter, free,
                                      n_questions or AUTO_BATCH_WITHOUT_GPU)
    est = _preflight("evaluate", lambda: estimate_eval(config, model, evaluate, prompt_tokens, merged_bf16, adapter,
                                                       batch=batch),
                     lambda free: advise_eval(config, model, evaluate, prompt_tokens, free, merged_bf16, adapter),
                     device_free_bytes)
    return est or ({"batch_size": batch} if batch else {})


def _preflight_auto_batch(config: dict, model: ModelParams, evaluate: EvaluateParams, prompt_tokens: int,
                          merged_bf16: bool, adapter: TrainParams | None, free: int | None, n_questions: int) -> int:
    """auto_eval_batch for a stage about to generate: a config it cannot read falls back to a fixed
    batch, and under QLORA_SKIP_PREFLIGHT=1 a batch of 1 that does not fit is tried anyway."""
    fallback = min(n_questions, AUTO_BATCH_WITHOUT_GPU)
    try:
        read_architecture(config)
    except UserError as exc:
        print(f"{exc}; evaluate.batch_size: auto falls back to {fallback}")
        return fallback
    try:
        batch = auto_eval_batch(config, model, evaluate, prompt_tokens, free, n_questions, merged_bf16, adapter)
    except UserError as exc:
        if os.environ.get(SKIP_ENV) != "1":
            raise
        print(f"{exc}; trying batch 1 anyway ({SKIP_ENV}=1)")
        return 1
    where = "for the GPU's free memory" if free is not None else f"(no GPU to size it on: at most {fallback})"
    print(f"evaluate: batch_size auto: {batch} {where}")
    return batch


def oom_message(stage: str, config: dict, model: ModelParams, train_or_eval, peak_bytes: int,
                total_bytes: int, prompt_tokens: int = 320, merged_bf16: bool = False,
                adapter: TrainParams | None = None, dev_batch_size: int = 0, batch: int | None = None) -> str:
    """One line for a stage that caught torch.OutOfMemoryError: the measured peak and what to change.

    The estimate was too low (or the check was skipped), so the advice aims below the smaller of
    the GPU's memory and the estimate, with a 5% margin.
    """
    head = f"{stage} ran out of GPU memory: peak {_gib(peak_bytes)} allocated of the GPU's {_gib(total_bytes)}"
    try:
        if isinstance(train_or_eval, TrainParams):
            estimate = estimate_train(config, model, train_or_eval, dev_batch_size)
            advise = lambda free: advise_train(config, model, train_or_eval, free, dev_batch_size)  # noqa: E731
        else:
            if train_or_eval.batch_size == "auto" and batch is None:
                batch = 1
            if batch is not None:
                train_or_eval = dataclasses.replace(train_or_eval, batch_size=batch)
            estimate = estimate_eval(config, model, train_or_eval, prompt_tokens, merged_bf16, adapter)
            advise = lambda free: advise_eval(config, model, train_or_eval, prompt_tokens, free,  # noqa: E731
                                              merged_bf16, adapter)
    except UserError:
        return f"{head}; use a smaller model or a larger GPU"
    advice = advise(int(0.95 * min(total_bytes, estimate["total"])))
    head += f" (the preflight estimated ~{_gib(estimate['total'])})"
    return f"{head}; try: {', '.join(advice)}" if advice else f"{head}; use a smaller model or a larger GPU"


def format_breakdown(est: dict[str, int]) -> str:
    """The estimate as an aligned table in GiB, the sums below a rule (counts as plain numbers)."""
    width = max(len(key) for key in est)
    lines = []
    for key, value in est.items():
        if key in ("train_peak", "allocated") and not any(line.startswith("-") for line in lines):
            lines.append("-" * (width + 11))
        if key in ("tokens", "batch_size"):
            lines.append(f"{key:<{width}} {value:6d}")
        else:
            lines.append(f"{key:<{width}} {value / GIB:6.2f} GiB")
    return "\n".join(lines)


def load_model_config(name: str, revision: str | None = None) -> dict:
    """The model's config as a dict; a missing local path or an unreachable Hub is one UserError."""
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise UserError(f"model.name {name!r}: no such directory (a local model is a directory holding config.json)")
    config_file = Path(name).expanduser() / "config.json"
    if config_file.is_file():  # a config-only directory needs no transformers model class to read
        try:
            return json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{config_file}: not a readable JSON config ({exc})") from None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, revision=revision).to_dict()
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model.name {name!r}: cannot read its config ({reason}); offline, set HF_HUB_OFFLINE=1 "
                        "with the model in the Hugging Face cache, pass --config-dir DIR (a directory holding "
                        "its config.json), or set model.name to a local directory") from None


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--stage", choices=("train", "evaluate", "both"), default="both")
    parser.add_argument("--free-gib", type=float, default=None,
                        help="compare with this much free memory instead of the GPU's")
    parser.add_argument("--config-dir", default=None,
                        help="read the model's config.json here instead of from model.name (offline)")
    parser.add_argument("--prompt-tokens", type=int, default=320,
                        help="longest evaluation prompt, in tokens (the evaluate stage passes the real one)")
    parser.add_argument("--train-tokens", type=int, default=None,
                        help="tokens of the largest training micro-batch (default: every row at max_length)")
    parser.add_argument("--questions", type=int, default=1319, help="questions evaluated (caps batch_size auto)")
    parser.add_argument("--dev-batch-size", type=int, default=0,
                        help="rows per batch of the train stage's dev-loss pass (0: leave it out)")
    args = parser.parse_args(argv)

    model, train, evaluate = load_params(args.params, "model", "train", "evaluate")
    if args.config_dir and not (Path(args.config_dir) / "config.json").is_file():
        raise UserError(f"--config-dir {args.config_dir}: no config.json there")
    config = load_model_config(args.config_dir or model.name, model.revision)
    name = args.config_dir or model.name
    free = int(args.free_gib * GIB) if args.free_gib is not None else cuda_free_bytes()
    stages = ("train", "evaluate") if args.stage == "both" else (args.stage,)
    failures = []
    for stage in stages:
        if stage == "train":
            est = estimate_train(config, model, train, args.dev_batch_size, args.train_tokens)
            advise = lambda f: advise_train(config, model, train, f, args.dev_batch_size)  # noqa: E731
        else:
            batch = None
            if evaluate.batch_size == "auto":
                try:
                    batch = auto_eval_batch(config, model, evaluate, args.prompt_tokens, free, args.questions,
                                            evaluate.dequantize, adapter=train)
                except UserError as exc:
                    failures.append(str(exc))
                    continue
            est = estimate_eval(config, model, evaluate, args.prompt_tokens, evaluate.dequantize, adapter=train,
                                batch=batch)
            advise = lambda f: advise_eval(config, model, evaluate, args.prompt_tokens, f,  # noqa: E731
                                           evaluate.dequantize, adapter=train)
        print(f"{stage} ({name}):")
        print(format_breakdown(est))
        if free is None:
            print("no CUDA device: not compared (pass --free-gib N to ask about an N GiB GPU)\n")
        elif est["total"] <= free:
            print(f"fits: {_gib(free)} free\n")
        else:
            print(f"does not fit: {_gib(free)} free\n")
            failures.append(not_fitting_message(stage, est["total"], free, advise(free), est["weights"]))
    sys.stdout.flush()
    if failures:
        raise UserError("; ".join(failures))


if __name__ == "__main__":
    main()
