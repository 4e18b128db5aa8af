"""Memory preflight: will this run fit on the GPU? Estimated from the model's config alone.

    python -m stages.memory [--params params.yaml] [--stage train|evaluate|both] [--free-gib 24]

Prints where the peak GPU memory of the train and evaluate stages goes (weights, LoRA + gradients,
optimizer state, activations, logits, KV cache, CUDA overhead) and compares it with the GPU's free
memory, or with `--free-gib N` ("would this fit on a 24 GB card?"). When it does not fit it exits
with status 2 and one line naming the params that would fit, e.g.

    error: memory preflight: train needs ~31.2 GiB but the GPU has 22.0 GiB free; try: train.max_length <= 1024, model.load_in_4bit: true

The train and evaluate stages call `preflight_train` / `preflight_eval` before loading anything.
Set `QLORA_SKIP_PREFLIGHT=1` to skip the check (the estimate is still printed) when you know better,
e.g. on a GPU shared with a process that is about to exit.

What is modelled is the plain recipe on a Llama-style decoder (q/k/v/o + gate/up/down projections,
RMSNorm, grouped-query attention): bitsandbytes NF4 weights, `peft.prepare_model_for_kbit_training`,
LoRA adapters in fp32, non-reentrant gradient checkpointing, a Hugging Face causal-LM loss.
`benchmarks/memory_check.py` measures the same recipe on a GPU; its results are committed in
`benchmarks/results/`. The estimate is of PyTorch's peak allocated memory, plus an overhead term
for what the allocator and CUDA hold beyond it. Where a run differs from that recipe the estimate
errs high: TRL's SFTTrainer without prepare_model_for_kbit_training keeps embeddings, LoRA and
activations in bf16 (about 2 GiB less for an 8B model).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from stages.config import CUDA_GRAPH_LENGTH_MULTIPLE, EvaluateParams, ModelParams, TrainParams, load_params
from stages.io import UserError, cli

GIB = 1024**3
SKIP_ENV = "QLORA_SKIP_PREFLIGHT"

# Not in PyTorch's allocator but on the GPU: the CUDA context created after the preflight looked,
# kernels loaded lazily on first use (cuBLAS, bitsandbytes), cuBLAS workspaces.
OVERHEAD_FIXED = GIB // 2
# The caching allocator reserves more than it hands out (block rounding, fragmentation between
# differently sized activations); reserved/allocated peaks of the plain recipe differ by about this.
OVERHEAD_FRACTION = 0.08

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINEAR_INPUTS = {"q_proj": "normed input", "k_proj": "normed input", "v_proj": "normed input",
                 "o_proj": "attention output", "gate_proj": "normed residual", "up_proj": "normed residual",
                 "down_proj": "gated product"}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
EIGHT_BIT_OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit")
# bitsandbytes NF4/FP4: blocks of 64 weights share one absmax; double quantization stores those
# absmaxes in 8 bits with one fp32 constant per 256 of them.
QUANT_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256
# bitsandbytes 8-bit Adam: two uint8 states per parameter, one fp32 absmax per 256-value block each.
ADAM_8BIT_BYTES = 2 + 2 * 4 / 256
ADAM_32BIT_BYTES = 8
# Elements per (token x vocab) of the loss at its peak, in bytes: in backward the saved fp32
# log-softmax, the gradient arriving from nll_loss and the gradient log-softmax hands back, all fp32.
# (Forward holds less: bf16 or fp32 logits, their fp32 upcast, the log-softmax.)
LOSS_BYTES_PER_LOGIT = 12
# The same without gradients (a dev-loss pass): bf16 logits, their fp32 upcast, the log-softmax.
NO_GRAD_LOSS_BYTES_PER_LOGIT = 10


@dataclass(frozen=True)
class Shape:
    """The numbers of a Llama-style config that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection of a decoder layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def quantized_params(self) -> int:
        """Parameters in the decoder layers' projections: what bitsandbytes quantizes."""
        return self.layers * sum(a * b for a, b in self.linear_dims().values())

    @property
    def largest_linear(self) -> int:
        return max(a * b for a, b in self.linear_dims().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def unquantized_params(self) -> int:
        """Embeddings, lm_head (unless tied) and RMSNorm weights: kept in a float dtype."""
        lm_head = 0 if self.tied else self.embedding_params
        return self.embedding_params + lm_head + (2 * self.layers + 1) * self.hidden


def model_shape(config: dict) -> Shape:
    """Read a HF config dict (`AutoConfig.to_dict()`); a non-Llama-style config is a UserError."""
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]  # multimodal wrappers keep the decoder's numbers here
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in needed if not isinstance(config.get(key), int)]
    if missing:
        raise UserError(f"memory preflight: the model config has no {', '.join(missing)}; "
                        "it only knows Llama-style decoders (set QLORA_SKIP_PREFLIGHT=1 to go on without it)")
    heads = config["num_attention_heads"]
    return Shape(
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        layers=config["num_hidden_layers"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        vocab=config["vocab_size"],
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def lora_targets(target_modules) -> tuple[str, ...]:
    """peft's "all-linear" on a Llama is every projection of a layer, not lm_head."""
    if target_modules == "all-linear":
        return LLAMA_LINEARS
    return tuple(target_modules)


def lora_params(shape: Shape, target_modules, r: int) -> int:
    dims = shape.linear_dims()
    targets = lora_targets(target_modules)
    per_layer = sum(r * (dims[name][0] + dims[name][1]) for name in targets if name in dims)
    lm_head = r * (shape.hidden + shape.vocab) if "lm_head" in targets else 0
    return shape.layers * per_layer + lm_head


def quantized_bytes(params: int, double_quant: bool) -> int:
    absmaxes = params / QUANT_BLOCK
    constants = absmaxes * (1 + 4 / DOUBLE_QUANT_BLOCK) if double_quant else absmaxes * 4
    return int(params / 2 + constants)


def layer_activation_bytes(shape: Shape, targets: tuple[str, ...], r: int, dropout: bool,
                           act: int, repeat_kv: bool) -> int:
    """Bytes one token leaves saved for backward in one decoder layer (training, no checkpointing).

    `act` is the bytes of an activation: 4 under prepare_model_for_kbit_training (it upcasts the
    embeddings, so the residual stream is fp32, and bitsandbytes casts each output back to its
    input's dtype), else the compute dtype's. The RMSNorms keep their input in fp32 whatever the
    dtype. A frozen projection saves nothing of its input (bitsandbytes' MatMul4Bit keeps only the
    weight); a LoRA projection saves its input cast to fp32 and dropped out, the dropout mask
    (1 byte on CUDA) and lora_A's output for lora_B. Checked against autograd's saved tensors on CPU.
    """
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    dims = shape.linear_dims()
    lora = 0
    shared_inputs = {}  # without dropout or a cast, projections reading one tensor save it once
    for name in targets:
        if name not in dims:
            continue
        d_in = dims[name][0]
        lora += 4 * r
        if dropout:
            lora += (4 + 1) * d_in
        elif act != 4:  # each LoRA layer casts its input to fp32 and keeps its own copy
            lora += 4 * d_in
        else:
            shared_inputs[LINEAR_INPUTS[name]] = 4 * d_in
    shared_inputs.pop("attention output", None)  # SDPA keeps it anyway
    lora += sum(shared_inputs.values())
    attention_kv = 2 * q if repeat_kv else 2 * kv
    saved = (
        4 * h                           # layer input in fp32, kept by input_layernorm
        + act * (2 * q + attention_kv)  # SDPA keeps q, k, v (after RoPE) and its output
        + 4 * h                         # residual after attention, kept by post_attention_layernorm
        + act * 3 * i                   # gate output (SiLU), SiLU output and up output (their product)
    )
    return saved + lora


def _loss_bytes(tokens: int, shape: Shape) -> int:
    return tokens * shape.vocab * LOSS_BYTES_PER_LOGIT


def estimate_train(config: dict, model: ModelParams, train: TrainParams, dev_batch_size: int = 0) -> dict[str, int]:
    """Peak GPU bytes of the train stage, by component, at the moment of the training step's peak.

    - weights: 4-bit: NF4 codes (half a byte per weight) + absmax constants for the decoder's
      projections, and fp32 for embeddings, lm_head and norms (prepare_model_for_kbit_training
      upcasts them); otherwise every weight in the compute dtype.
    - lora: adapter weights and their gradients, fp32 (peft upcasts adapters), 8 bytes per param.
    - optimizer: Adam state, 2 bytes per LoRA param for the 8-bit optimizers, 8 for 32-bit ones.
    - activations: with gradient checkpointing, each layer's input (per token: hidden x 4 bytes),
      plus, when it is the larger moment, one layer recomputed in backward (its saved tensors,
      `layer_activation_bytes`, and the gradients passing through it); without checkpointing every
      layer's saved tensors.
    - logits: tokens x vocab x 12 bytes while the loss backpropagates (LOSS_BYTES_PER_LOGIT), when
      that is the larger moment.
    - load_peak: while prepare_model_for_kbit_training casts the largest bf16 tensor (embedding
      or lm_head) to fp32 both copies exist; on a GPU with little else to hold this can be the peak.
    - dev_peak: the trainer's periodic dev-loss pass over batches of `dev_batch_size` rows (0: none):
      no gradients or activations kept, but the whole batch's logits at once
      (NO_GRAD_LOSS_BYTES_PER_LOGIT), which at 8 rows can outweigh a batch-1 training step.
    - allocated: the largest of the training moment, load_peak and dev_peak; what
      torch.cuda.max_memory_allocated() should read. Paged 8-bit optimizer state lives outside
      PyTorch's allocator (CUDA unified memory) but occupies the GPU, so it is counted anyway.
    - overhead, total: allocated + OVERHEAD_FIXED + OVERHEAD_FRACTION of it; compare with free memory.

    Tokens per micro-batch are per_device_train_batch_size x max_length: padded batches have
    exactly that many, padding-free ones at most that many.
    """
    shape = model_shape(config)
    compute = DTYPE_BYTES[model.bnb_4bit_compute_dtype]
    length = train.max_length
    if train.cuda_graphs:  # rows are padded up to the graphs' length multiple
        length = -(-length // CUDA_GRAPH_LENGTH_MULTIPLE) * CUDA_GRAPH_LENGTH_MULTIPLE
    tokens = train.per_device_train_batch_size * length
    if model.load_in_4bit:
        weights = quantized_bytes(shape.quantized_params, model.bnb_4bit_use_double_quant) \
            + 4 * shape.unquantized_params
        load_peak = weights + compute * shape.embedding_params if compute < 4 else weights
        act = 4
        dequantized = compute * shape.largest_linear  # bitsandbytes dequantizes a weight per matmul
    else:
        weights = compute * (shape.quantized_params + shape.unquantized_params)
        load_peak = weights
        act = compute
        dequantized = 0
    n_lora = lora_params(shape, train.lora_target_modules, train.lora_r)
    lora = 8 * n_lora
    optimizer = int(n_lora * (ADAM_8BIT_BYTES if train.optim in EIGHT_BIT_OPTIMIZERS else ADAM_32BIT_BYTES))

    # A batch of several rows (padded, or packed padding-free) gets an attention mask, and with a
    # mask transformers repeats the KV heads for SDPA instead of using its grouped-query path.
    repeat_kv = train.per_device_train_batch_size > 1 or train.cuda_graphs  # padded rows get a mask too
    per_layer = tokens * layer_activation_bytes(shape, lora_targets(train.lora_target_modules),
                                                train.lora_r, train.lora_dropout > 0, act, repeat_kv)
    if model.attn_implementation == "eager":  # softmax input and output, heads x rows x len^2
        rows, length = ((1, tokens) if train.padding_free else (train.per_device_train_batch_size, train.max_length))
        per_layer += 2 * act * shape.heads * rows * length**2
    residual = tokens * shape.hidden * act
    backward_work = tokens * act * (2 * shape.intermediate + 3 * shape.hidden) + dequantized
    logits = _loss_bytes(tokens, shape)
    if train.gradient_checkpointing:
        held = (shape.layers + 1) * residual
        recompute = per_layer + backward_work
    else:
        held = shape.layers * per_layer + residual
        recompute = backward_work
    if logits >= recompute:
        activations, logits_at_peak = held, logits
    else:
        activations, logits_at_peak = held + recompute, 0

    train_peak = weights + lora + optimizer + activations + logits_at_peak
    dev_logits = dev_batch_size * train.max_length * shape.vocab * NO_GRAD_LOSS_BYTES_PER_LOGIT
    dev_peak = weights + lora + optimizer + dev_logits if dev_batch_size else 0
    allocated = max(train_peak, load_peak, dev_peak)
    overhead = OVERHEAD_FIXED + int(OVERHEAD_FRACTION * allocated)
    estimate = {"weights": weights, "lora": lora, "optimizer": optimizer, "activations": activations,
                "logits": logits_at_peak, "train_peak": train_peak, "load_peak": load_peak}
    if dev_batch_size:
        estimate["dev_peak"] = dev_peak
    return {**estimate, "allocated": allocated, "overhead": overhead, "total": allocated + overhead}


def estimate_eval(config: dict, model: ModelParams, evaluate: EvaluateParams, prompt_tokens: int,
                  merged_bf16: bool = False, adapter: TrainParams | None = None) -> dict[str, int]:
    """Peak GPU bytes of batched greedy generation, by component.

    - weights: 4-bit as in training but with embeddings, lm_head and norms in the compute dtype
      (nothing upcasts them for inference); merged_bf16 or not load_in_4bit: all in compute dtype.
      Plus, unless merged, the LoRA adapter trained with `adapter` (peft loads it in fp32).
    - kv_cache: batch x (prompt_tokens + max_new_tokens) x layers x 2 x kv_heads x head_dim.
    - activations: the prefill's working set, one layer at a time with no gradients: per prompt
      token the residual, its normed copy and three MLP-wide tensors, plus a dequantized weight.
    - logits: the last position's logits per row in the compute dtype, their fp32 copy and the
      scores generation derives from them.
    `prompt_tokens` is the longest prompt (a batch is left-padded to it). The static engine
    (stages/decode.py) prefills at most PREFILL_TOKENS prompt tokens per forward, so its prefill
    activations stop growing with the batch; its CUDA graph's pool holds one step's tensors (a
    [batch, hidden] residual and the logits row), which the logits term covers.
    """
    from stages.decode import prefill_rows

    shape = model_shape(config)
    compute = DTYPE_BYTES[model.bnb_4bit_compute_dtype]
    batch = min(evaluate.batch_size, evaluate.limit or evaluate.batch_size)
    prefill_batch = min(batch, prefill_rows(prompt_tokens)) if evaluate.engine == "static" else batch
    prefill_tokens = prefill_batch * prompt_tokens
    if model.load_in_4bit and not merged_bf16:
        weights = quantized_bytes(shape.quantized_params, model.bnb_4bit_use_double_quant) \
            + compute * shape.unquantized_params
        dequantized = compute * shape.largest_linear
    else:
        weights = compute * (shape.quantized_params + shape.unquantized_params)
        dequantized = 0
    if adapter is not None and not merged_bf16:
        weights += 4 * lora_params(shape, adapter.lora_target_modules, adapter.lora_r)
    kv_cache = batch * (prompt_tokens + evaluate.max_new_tokens) * shape.layers * 2 * shape.kv_dim * compute
    activations = prefill_tokens * compute * (2 * shape.hidden + 3 * shape.intermediate) + dequantized
    logits = batch * shape.vocab * (compute + 4 + 4)
    allocated = weights + kv_cache + activations + logits
    overhead = OVERHEAD_FIXED + int(OVERHEAD_FRACTION * allocated)
    return {"weights": weights, "kv_cache": kv_cache, "activations": activations, "logits": logits,
            "allocated": allocated, "overhead": overhead, "total": allocated + overhead}


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
    """Single changes to the params under which `estimate_train` fits `free_bytes`, best first.

    When no single change fits, one combined suggestion (4-bit, checkpointing, batch 1, 8-bit Adam
    and the longest max_length that fits), or nothing when even that does not fit.
    """
    def fits(m: ModelParams, t: TrainParams) -> bool:
        return estimate_train(config, m, t, dev_batch_size)["total"] <= free_bytes

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
    if not model.load_in_4bit and fits(dataclasses.replace(model, load_in_4bit=True), train):
        advice.append("model.load_in_4bit: true")
    if train.optim not in EIGHT_BIT_OPTIMIZERS and fits(model, dataclasses.replace(train, optim="paged_adamw_8bit")):
        advice.append("train.optim: paged_adamw_8bit")
    ranks = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) if r < train.lora_r]
    rank = _largest_fitting(ranks, lambda r: fits(model, dataclasses.replace(train, lora_r=r)))
    if rank:
        advice.append(f"train.lora_r <= {rank}")
    if advice:
        return advice

    small_model = dataclasses.replace(model, load_in_4bit=True)
    small_train = dataclasses.replace(with_checkpointing(train), per_device_train_batch_size=1,
                                      optim="paged_adamw_8bit" if train.optim not in EIGHT_BIT_OPTIMIZERS
                                      else train.optim)
    length = _largest_fitting(list(range(128, train.max_length + 1, 128)),
                              lambda n: fits(small_model, dataclasses.replace(small_train, max_length=n)))
    if not length:
        return []
    changes = [f"{key}: true" for key, old in (("model.load_in_4bit", model.load_in_4bit),
                                               ("train.gradient_checkpointing", train.gradient_checkpointing))
               if not old]
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
    """Single changes under which `estimate_eval` fits `free_bytes`, best first."""
    def fits(m: ModelParams, e: EvaluateParams, merged: bool = merged_bf16) -> bool:
        return estimate_eval(config, m, e, prompt_tokens, merged, adapter)["total"] <= free_bytes

    advice = []
    batch = _largest_fitting(list(range(1, evaluate.batch_size)),
                             lambda n: fits(model, dataclasses.replace(evaluate, batch_size=n)))
    if batch:
        advice.append(f"evaluate.batch_size <= {batch}")
    new_tokens = _largest_fitting(list(range(64, evaluate.max_new_tokens, 64)),
                                  lambda n: fits(model, dataclasses.replace(evaluate, max_new_tokens=n)))
    if new_tokens:
        advice.append(f"evaluate.max_new_tokens <= {new_tokens} (answers longer than that score as wrong)")
    if merged_bf16 and model.load_in_4bit and fits(model, evaluate, merged=False):
        advice.append("evaluate.dequantize: false")
    if not model.load_in_4bit and fits(dataclasses.replace(model, load_in_4bit=True), evaluate, merged=False):
        advice.append("model.load_in_4bit: true")
    return advice


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def cuda_free_bytes() -> int | None:
    """Free memory of the current CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[0]


def not_fitting_message(stage: str, needed: int, free: int, advice: list[str], weights: int) -> str:
    head = f"memory preflight: {stage} needs ~{_gib(needed)} but the GPU has {_gib(free)} free"
    if advice:
        return f"{head}; try: {', '.join(advice)}"
    return (f"{head}; no setting of the params fits (the weights alone take {_gib(weights)}): "
            "use a smaller model or a GPU with more free memory")


def _preflight(stage: str, estimate, advise, device_free_bytes: int | None) -> dict[str, int]:
    try:
        est = estimate()
    except UserError as exc:  # not a Llama-style config: say so, do not block the run
        print(f"{exc}; skipping the memory preflight")
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


def preflight_train(config: dict, model: ModelParams, train: TrainParams,
                    device_free_bytes: int | None = None, dev_batch_size: int = 0) -> dict[str, int]:
    """Estimate the train stage's peak and stop (UserError, one line with advice) if it cannot fit.

    device_free_bytes None: ask CUDA; without a CUDA device only the estimate is printed.
    QLORA_SKIP_PREFLIGHT=1 skips the comparison. Returns the estimate ({} for a config the
    estimator does not know).
    """
    return _preflight("train", lambda: estimate_train(config, model, train, dev_batch_size),
                      lambda free: advise_train(config, model, train, free, dev_batch_size), device_free_bytes)


def preflight_eval(config: dict, model: ModelParams, evaluate: EvaluateParams, prompt_tokens: int,
                   merged_bf16: bool = False, device_free_bytes: int | None = None,
                   adapter: TrainParams | None = None) -> dict[str, int]:
    """As `preflight_train`, for generation over the evaluation set (see `estimate_eval`)."""
    return _preflight("evaluate", lambda: estimate_eval(config, model, evaluate, prompt_tokens, merged_bf16, adapter),
                      lambda free: advise_eval(config, model, evaluate, prompt_tokens, free, merged_bf16, adapter),
                      device_free_bytes)


def oom_message(stage: str, config: dict, model: ModelParams, train_or_eval, peak_bytes: int,
                total_bytes: int, prompt_tokens: int = 320, merged_bf16: bool = False,
                adapter: TrainParams | None = None, dev_batch_size: int = 0) -> str:
    """One line for a stage that caught torch.OutOfMemoryError: the measured peak and what to change.

    The estimate was too low (or the check was skipped), so the advice aims below the smaller of
    the GPU's memory and the estimate, with a 5% margin.
    """
    if isinstance(train_or_eval, TrainParams):
        estimate = estimate_train(config, model, train_or_eval, dev_batch_size)
        advise = lambda free: advise_train(config, model, train_or_eval, free, dev_batch_size)  # noqa: E731
    else:
        estimate = estimate_eval(config, model, train_or_eval, prompt_tokens, merged_bf16, adapter)
        advise = lambda free: advise_eval(config, model, train_or_eval, prompt_tokens, free, merged_bf16, adapter)  # noqa: E731
    advice = advise(int(0.95 * min(total_bytes, estimate["total"])))
    head = (f"{stage} ran out of GPU memory: peak {_gib(peak_bytes)} allocated of the GPU's "
            f"{_gib(total_bytes)} (the preflight estimated ~{_gib(estimate['total'])})")
    return f"{head}; try: {', '.join(advice)}" if advice else f"{head}; use a smaller model or a larger GPU"


def format_breakdown(est: dict[str, int]) -> str:
    """The estimate as an aligned table in GiB, the sums below a rule."""
    width = max(len(key) for key in est)
    lines = []
    for key, value in est.items():
        if key in ("train_peak", "allocated") and not any(line.startswith("-") for line in lines):
            lines.append("-" * (width + 11))
        lines.append(f"{key:<{width}} {value / GIB:6.2f} GiB")
    return "\n".join(lines)


def load_model_config(name: str) -> dict:
    """The model's config as a dict; a missing local path or an unreachable Hub is one UserError."""
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise UserError(f"model.name {name!r}: no such directory (a local model is a directory holding config.json)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name).to_dict()
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model.name {name!r}: cannot read its config ({reason}); offline, set HF_HUB_OFFLINE=1 "
                        "with the model in the Hugging Face cache, or set model.name to a local directory") from None


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--stage", choices=("train", "evaluate", "both"), default="both")
    parser.add_argument("--free-gib", type=float, default=None,
                        help="compare with this much free memory instead of the GPU's")
    parser.add_argument("--prompt-tokens", type=int, default=320,
                        help="longest evaluation prompt, in tokens (the evaluate stage passes the real one)")
    parser.add_argument("--dev-batch-size", type=int, default=0,
                        help="rows per batch of the train stage's dev-loss pass (0: leave it out)")
    args = parser.parse_args(argv)

    model, train, evaluate = load_params(args.params, "model", "train", "evaluate")
    config = load_model_config(model.name)
    free = int(args.free_gib * GIB) if args.free_gib is not None else cuda_free_bytes()
    stages = ("train", "evaluate") if args.stage == "both" else (args.stage,)
    failures = []
    for stage in stages:
        if stage == "train":
            est = estimate_train(config, model, train, args.dev_batch_size)
            advise = lambda f: advise_train(config, model, train, f, args.dev_batch_size)  # noqa: E731
        else:
            est = estimate_eval(config, model, evaluate, args.prompt_tokens, evaluate.dequantize, adapter=train)
            advise = lambda f: advise_eval(config, model, evaluate, args.prompt_tokens, f,  # noqa: E731
                                           evaluate.dequantize, adapter=train)
        print(f"{stage} ({model.name}):")
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
