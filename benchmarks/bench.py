"""python benchmarks/bench.py [--layers 32] [--sections train,eval] [--out benchmarks/results/bench_<gpu>.json]

One run that times the plain QLoRA recipe against this project's own code paths, on a model of a
real architecture (Llama-3.1-8B shape by default; `--layers N` for quick runs) built from its config
with random weights, on token sequences of GSM8K's length distribution:

- train: the plain recipe (NF4 + double quant + bf16 compute, `prepare_model_for_kbit_training`,
  non-reentrant gradient checkpointing, LoRA r=32/alpha 16/dropout 0.05 on all linear layers,
  `bnb.optim.PagedAdamW8bit`, batch 1 × accumulation 8, a plain PyTorch loop) against
  `stages.train.build_trainer` with the project's settings: "padding_free" (the 8 rows of a step
  in one micro-batch), "card" (batch 1 × accumulation 8), each also with Liger's kernels ("+liger")
  or regional torch.compile ("+compile", train.torch_compile; "-checkpointing": without gradient
  checkpointing). Every path reads
  the same rows in the same order from the same LoRA init, so their per-step losses must agree
  (see `loss_agreement`): a faster path that trains something else does not count.
- eval: plain 4-bit `generate` (batch 64) against `stages.evaluate.load_for_generation` +
  `stages.evaluate.generate` unchanged, on GSM8K-test-length prompts × 256 new tokens:
  "static_b128"/"static_b256" (the project's engine, stages/decode.py, on the dequantized model),
  "generate_b256"/"generate_b128" (transformers' generate on the same model) and "4bit_b64". The
  static ones run the whole 1,319-prompt split; the others run one or two batches (after a warm-up)
  and are extrapolated to the split's batch count ("extrapolated": true): the 4-bit ones take ~9
  minutes each for the whole split. Where static_b256 and generate_b256 decoded the same prompts,
  "engine_agreement" says how many completions are identical (bf16 near-ties may differ).

Writes one JSON (GPU, versions, every figure, ratios, goal checks) after every variant, so a run
cut short keeps what it measured, and prints a markdown table at the end. A variant whose time
estimate no longer fits `--time-budget-s` is skipped and recorded as such (run it alone later with
`--merge`). `--tiny` runs everything on CPU with a 2-layer model in ~15 s (tests/test_bench.py).

The model directory (`--workdir`) is written once and reused while its config matches the shape.
Its tokenizer is a word-level one whose token "w<id>" is id <id>, for every id of the vocabulary:
a prompt of N ids is the question "w.. w.." of N-1 words (plus BOS), which the project's own
`generate` encodes back to exactly those ids, and any generated id decodes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import stages` when run as a script

from stages.io import atomic_path, write_json  # noqa: E402  (light imports only)

LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                   max_position_embeddings=8192)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, rope_theta=500000.0,
            max_position_embeddings=2048)
SHAPE_KEYS = tuple(LLAMA_31_8B)

# GSM8K in Llama-3 tokens: train rows (prompt template + question + solution + EOS) and test prompts.
TRAIN_LENGTHS = dict(mean=240, sd=60, min=120, max=450, prompt_mean=110, prompt_sd=20, prompt_min=60)
EVAL_LENGTHS = dict(mean=160, sd=35, min=90, max=300)
GSM8K_TEST_SIZE = 1319
EFFECTIVE_BATCH = 8

# Llama-3's special-token ids, for the full vocabulary; small vocabularies put them first.
LLAMA3_SPECIALS = {"bos": (128000, "<|begin_of_text|>"), "eos": (128001, "<|end_of_text|>"),
                   "unk": (128002, "<|reserved_special_token_0|>"), "pad": (128004, "<|finetune_right_pad_id|>")}
SMALL_SPECIALS = {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (3, "<pad>")}

# Goals of the issue, on the 8B shape.
GOAL_TRAIN_SPEEDUP = 5.0
GOAL_CARD_SPEEDUP = 2.0
GOAL_EVAL_WALL_S = 60.0
GOAL_EVAL_MEMORY_GB = 40.0


# ---------------------------------------------------------------------------------------- helpers

def specials_for(vocab_size: int) -> dict:
    return LLAMA3_SPECIALS if vocab_size > 128004 else SMALL_SPECIALS


# transformers' StopStringCriteria (generate's stop strings) learns how tokens render by encoding
# this word and decoding it in front of each token, so it must be a token of its own; and every stop
# string must be a token too, or it refuses to start.
PROBE_WORD = "abcdef"


def reserved_tokens(vocab_size: int) -> dict[int, str]:
    """id -> token for everything that is not a word "w<id>": specials, the probe word, the stop strings."""
    from stages.config import EvaluateParams

    names = {i: name for i, name in specials_for(vocab_size).values()}
    free = (i for i in range(128000 if vocab_size > 128004 else 0, vocab_size) if i not in names)
    for token in [PROBE_WORD] + list(EvaluateParams().stop):
        if token not in names.values():
            names[next(free)] = token
    return names


def word_id_range(vocab_size: int) -> tuple[int, int]:
    """Ids that stand for ordinary words "w<id>": none of the reserved tokens among them."""
    return (0, 128000) if vocab_size > 128004 else (max(reserved_tokens(vocab_size)) + 1, vocab_size)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "cpu"


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'unknown'})"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "liger_kernel"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "installed")
        except Exception:  # noqa: BLE001 - absent or broken: say so, keep going
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


# ------------------------------------------------------------------------------- model + tokenizer

def bench_shape(tiny: bool = False, layers: int | None = None) -> dict:
    """The benchmark's config fields: the 8B shape (TINY for CPU runs), optionally with fewer layers."""
    return dict(TINY if tiny else LLAMA_31_8B, **({"num_hidden_layers": layers} if layers else {}))


def build_tokenizer(vocab_size: int):
    """Word-level tokenizer over the whole vocabulary: "w<id>" is id <id>; BOS is prepended like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = specials_for(vocab_size)
    names = reserved_tokens(vocab_size)
    vocab = {names.get(i, f"w{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk"][1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos_id, bos = specials["bos"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=specials["eos"][1],
                                   pad_token=specials["pad"][1], unk_token=specials["unk"][1],
                                   model_max_length=8192)


def llama_config(shape: dict):
    from transformers import LlamaConfig

    specials = specials_for(shape["vocab_size"])
    return LlamaConfig(**shape, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
                       mlp_bias=False, bos_token_id=specials["bos"][0], eos_token_id=specials["eos"][0],
                       pad_token_id=specials["pad"][0])


def existing_shape_matches(workdir: Path, shape: dict) -> bool:
    path = workdir / "config.json"
    if not path.is_file() or not (workdir / "tokenizer.json").is_file():
        return False
    saved = json.loads(path.read_text())
    # transformers 5 writes rope_theta inside rope_parameters
    saved.setdefault("rope_theta", (saved.get("rope_parameters") or {}).get("rope_theta"))
    return all(saved.get(k) == shape[k] for k in SHAPE_KEYS)


def build_model_dir(workdir: Path, shape: dict, seed: int) -> dict:
    """Random bf16 Llama of `shape`, created on the GPU (fast init), saved as safetensors + tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    if existing_shape_matches(workdir, shape):
        return {"reused": True, "seconds": 0.0}
    started = time.perf_counter()
    config = llama_config(shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # bf16 from the start: 16 GB for 8B, not 32 GB of fp32 first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)  # Llama's own init: normal(0, 0.02), norms at 1
    finally:
        torch.set_default_dtype(previous)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        # Greedy decoding of random weights must never pick EOS, pad or a stop string, so that every row
        # generates exactly the tokens asked for (generate() counts up to the first EOS/pad): a zero
        # logit never wins against the vocabulary's logits of sd ~1.
        for i in reserved_tokens(shape["vocab_size"]):
            model.lm_head.weight[i].zero_()
    n_params = sum(p.numel() for p in model.parameters())
    with atomic_path(workdir) as tmp:
        model.save_pretrained(tmp)
        build_tokenizer(shape["vocab_size"]).save_pretrained(tmp)
    del model
    free_memory()
    return {"reused": False, "seconds": round(time.perf_counter() - started, 1), "params": n_params}


# ------------------------------------------------------------------------------------- sequences

def clipped_normal(rng, mean, sd, lo, hi) -> int:
    return int(min(max(round(rng.normal(mean, sd)), lo), hi))


def scaled(lengths: dict, scale: float) -> dict:
    return {k: max(1, round(v * scale)) for k, v in lengths.items()}


def make_train_rows(n: int, vocab_size: int, seed: int, scale: float = 1.0) -> list[dict]:
    """Rows like stages.train.tokenize_rows writes: BOS + prompt + answer + EOS, mask on answer + EOS.
    Drawn row by row, so the first k rows are the same whatever n is."""
    import numpy as np

    rng = np.random.default_rng(seed)
    specials = specials_for(vocab_size)
    lo, hi = word_id_range(vocab_size)
    d = scaled(TRAIN_LENGTHS, scale)
    rows = []
    for _ in range(n):
        length = clipped_normal(rng, d["mean"], d["sd"], d["min"], d["max"])
        prompt_len = clipped_normal(rng, d["prompt_mean"], d["prompt_sd"], d["prompt_min"], length // 2)
        ids = [specials["bos"][0]] + rng.integers(lo, hi, length - 2).tolist() + [specials["eos"][0]]
        rows.append({"input_ids": ids, "completion_mask": [0] * prompt_len + [1] * (length - prompt_len)})
    return rows


def make_eval_prompts(n: int, vocab_size: int, seed: int, scale: float = 1.0) -> list[list[int]]:
    """Token-id prompts (BOS first) of GSM8K-test lengths; the first k are the same whatever n is."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    bos = specials_for(vocab_size)["bos"][0]
    lo, hi = word_id_range(vocab_size)
    d = scaled(EVAL_LENGTHS, scale)
    return [[bos] + rng.integers(lo, hi, clipped_normal(rng, d["mean"], d["sd"], d["min"], d["max"]) - 1).tolist()
            for _ in range(n)]


def as_question(prompt_ids: list[int]) -> str:
    """The question text that the benchmark tokenizer encodes (with template "{question}") to prompt_ids."""
    return " ".join(f"w{i}" for i in prompt_ids[1:])


# ------------------------------------------------------------------------------------------ train

def completion_tokens(rows: list[dict]) -> int:
    """Tokens that carry loss, as Trainer counts them (labels[1:] != -100): the first token never does."""
    return sum(sum(r["completion_mask"][1:]) for r in rows)


def step_rows(rows: list[dict], step: int) -> list[dict]:
    return rows[step * EFFECTIVE_BATCH:(step + 1) * EFFECTIVE_BATCH]


def timing_summary(step_ends: list[float], start: float, rows: list[dict], warmup: int) -> dict:
    """Seconds per step and tokens/s over the steps after `warmup` (step k ends at step_ends[k])."""
    marks = [start] + step_ends
    seconds = [b - a for a, b in zip(marks, marks[1:])]
    timed = list(range(warmup, len(seconds)))
    if not timed:
        return {"step_seconds": [round(s, 4) for s in seconds], "timed_steps": 0}
    timed_s = sum(seconds[k] for k in timed)
    tokens = sum(len(r["input_ids"]) for k in timed for r in step_rows(rows, k))
    return {
        "step_seconds": [round(s, 4) for s in seconds],
        "timed_steps": len(timed),
        "seconds_per_step": round(timed_s / len(timed), 4),
        "tokens_per_step": round(tokens / len(timed), 1),
        "train_tokens_per_second": round(tokens / timed_s, 1),
    }


def lora_a_snapshot(model) -> dict:
    """LoRA A matrices (their random init; B starts at zero) in bf16 on the CPU, keyed by module name."""
    import torch

    return {name.replace(".default", ""): p.detach().to("cpu", torch.bfloat16).clone()
            for name, p in model.named_parameters() if "lora_A" in name}


def compare_lora_a(reference: dict, model) -> dict:
    ours = lora_a_snapshot(model)
    if set(ours) != set(reference):
        return {"lora_a_identical": False, "lora_a_note": f"{len(ours)} vs {len(reference)} LoRA A matrices"}
    worst = max(((ours[k].float() - reference[k].float()).abs().max().item() for k in ours), default=0.0)
    return {"lora_a_identical": worst == 0.0, "lora_a_max_abs_diff": worst, "lora_a_matrices": len(ours)}


def load_plain_4bit(workdir: str):
    """The recipe's model: NF4, double quantization, bf16 compute, written the usual way."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from stages.modeling import disable_cpu_bf16_repack

    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        workdir,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
        dtype=torch.bfloat16, device_map={"": 0} if on_gpu else None, attn_implementation="sdpa")
    if not on_gpu:
        disable_cpu_bf16_repack(model)  # bitsandbytes' AVX512-BF16 path breaks backward
    return model


def train_baseline(workdir: str, rows: list[dict], steps: int, warmup: int, lora: dict, train_p, seed: int) -> tuple:
    """The plain recipe, as plainly as it is usually written; returns (figures, LoRA A snapshot)."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import get_scheduler

    model = prepare_model_for_kbit_training(load_plain_4bit(workdir), use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)  # the same seed TRL sets right before its get_peft_model: same LoRA init
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    snapshot = lora_a_snapshot(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The project's optimisation settings (weight decay 0, clipping, schedule), so that the per-step
    # losses can be compared; none of them costs measurable time.
    optimizer = bnb.optim.PagedAdamW8bit(trainable, lr=train_p.learning_rate, weight_decay=train_p.weight_decay)
    scheduler = get_scheduler(train_p.lr_scheduler_type, optimizer,
                              num_warmup_steps=math.ceil(steps * train_p.warmup_ratio), num_training_steps=steps)
    device = next(model.parameters()).device
    model.train()
    losses, grad_norms, step_ends = [], [], []
    sync()
    start = time.perf_counter()
    for step in range(steps):
        batch = step_rows(rows, step)
        n_items = completion_tokens(batch)  # Trainer's num_items_in_batch: the step's loss tokens
        step_loss = torch.zeros((), device=device)
        for row in batch:
            input_ids = torch.tensor([row["input_ids"]], device=device)
            labels = input_ids.clone()
            labels[0, torch.tensor(row["completion_mask"], device=device) == 0] = -100
            out = model(input_ids=input_ids, labels=labels)
            # out.loss is the mean over this row's loss tokens; weight it by their share of the step's.
            loss = out.loss * (labels[0, 1:] != -100).sum() / n_items
            loss.backward()
            step_loss += loss.detach()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, train_p.max_grad_norm)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss.item())
        sync()
        step_ends.append(time.perf_counter())
    figures = {"losses": losses, "grad_norms": grad_norms, **timing_summary(step_ends, start, rows, warmup)}
    del model, optimizer, trainable
    return figures, snapshot


def train_project(workdir: str, rows: list[dict], steps: int, warmup: int, train_p, seed: int,
                  reference_lora_a: dict | None, callbacks: tuple = ()) -> dict:
    """stages.train.build_trainer with `train_p`, timed per optimizer step by a callback."""
    import datasets
    import transformers
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback, TrainingArguments

    from stages.config import ModelParams
    from stages.modeling import load_tokenizer
    from stages.train import build_trainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.start, self.ends = None, []

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.recorded = [graphs_recorded()]
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.ends.append(time.perf_counter())
            self.recorded.append(graphs_recorded())

    model_p = ModelParams(name=workdir)
    tokenizer = load_tokenizer(workdir)
    train_ds = datasets.Dataset.from_list(rows[:steps * EFFECTIVE_BATCH])
    dev_ds = datasets.Dataset.from_list(rows[:EFFECTIVE_BATCH])  # unused (eval_strategy "no"), TRL wants one
    overrides = dict(eval_strategy="no", save_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True)
    # Same rows, same order as the baseline: a sequential sampler (transformers >= 5.2).
    sequential_arg = "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}
    if sequential_arg:
        overrides["train_sampling_strategy"] = "sequential"
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as output_dir:
        transformers.set_seed(seed)  # SFTTrainer sets train_p.seed itself before get_peft_model, too
        trainer = build_trainer(model_p, train_p, tokenizer, train_ds, dev_ds, output_dir, world_size=1,
                                callbacks=[timer, *callbacks], **overrides)
        if not sequential_arg:
            trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
        figures = compare_lora_a(reference_lora_a, trainer.model) if reference_lora_a else {}
        first = next(iter(trainer.get_train_dataloader()))
        expected = [t for r in rows[:train_p.per_device_train_batch_size] for t in r["input_ids"]]
        got = first["input_ids"].flatten().tolist()
        figures["data_order_sequential"] = got[:len(expected)] == expected
        trainer.train()
        if train_p.torch_compile:
            figures["compile_counters"] = compile_counters()
        history = trainer.state.log_history
        figures["losses"] = [e["loss"] for e in history if "loss" in e]
        figures["grad_norms"] = [e.get("grad_norm") for e in history if "loss" in e]
        figures.update(timing_summary(timer.ends, timer.start, rows, warmup))
        if train_p.cuda_graphs:
            figures["cuda_graph_recording_steps"] = [k for k, (a, b) in enumerate(zip(timer.recorded, timer.recorded[1:]))
                                                     if b > a]
    return figures


def graphs_recorded() -> int:
    """A count that grows whenever inductor records a CUDA graph (every recorded layer graph has inputs
    it copies in: the embeddings' output, RoPE's cos and sin)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_recorded_non_static_inputs"]


def steady_state(baseline: dict, figures: dict, warmup: int) -> dict:
    """Both paths over the timed steps in which no CUDA graph was recorded. Recording happens once per
    padded length and layer in a run (~12 s a step at 8B, for each new length), so this is what a run
    of hundreds of steps sees; the short benchmark's whole-window figure includes the recordings."""
    recording = set(figures["cuda_graph_recording_steps"])
    steps = [k for k in range(warmup, len(figures["step_seconds"])) if k not in recording]
    if not steps:
        return {"steps": []}
    ours = sum(figures["step_seconds"][k] for k in steps)
    plain = sum(baseline["step_seconds"][k] for k in steps)
    return {"steps": steps, "seconds_per_step": round(ours / len(steps), 4),
            "plain_seconds_per_step": round(plain / len(steps), 4), "speedup": round(plain / ours, 3)}


def compile_counters() -> dict:
    """What dynamo and inductor did in this variant (release() clears them between variants):
    graphs compiled, and for train.cuda_graphs whether any graph ran without CUDA graphs
    (cudagraph_skips) or copied inputs into graph memory on each replay."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"]["unique_graphs"],
            **{k: v for k, v in counters["inductor"].items() if "cudagraph" in k}}


def loss_agreement(baseline: dict, figures: dict, warmup: int, rtol: float) -> dict:
    """Per-step loss of a project path against the plain loop's, on the same rows in the same order.

    `loss_check` (the gate) is the issue's: the largest relative difference over the timed steps is at
    most `rtol` (bf16 numerics: the paths differ in autocast, fp32 vs bf16 norms and adapters, fused
    vs plain cross-entropy). A random-weight model's loss is ~ln(vocab) on every row, though, so rtol
    alone cannot tell one batch from another; `loss_resolution` is how far apart the losses of
    consecutive steps (different rows) are, and `loss_check_strict` passes when the paths agree to
    better than half of that, i.e. when a path that read other rows or masked other tokens would
    have failed it.
    """
    base, losses = baseline["losses"], figures.get("losses", [])
    if len(losses) != len(base) or not base:
        return {"loss_check": "FAIL", "loss_note": f"{len(losses)} losses vs {len(base)} for the baseline"}
    rel = [abs(a - b) / abs(b) for a, b in zip(losses, base)]
    timed = rel[warmup:] or rel
    steps = sorted(abs(b - a) / abs(a) for a, b in zip(base, base[1:]))
    resolution = steps[len(steps) // 2] if steps else None
    out = {"first_step_loss_rel_diff": rel[0], "max_loss_rel_diff": max(timed), "max_loss_rel_diff_all_steps": max(rel),
           "loss_check": "PASS" if max(timed) <= rtol else "FAIL", "loss_resolution": resolution,
           "loss_check_strict": None if resolution is None else ("PASS" if max(rel) < resolution / 2 else "FAIL")}
    grads = [(a, b) for a, b in zip(figures.get("grad_norms", []), baseline.get("grad_norms", [])) if a and b]
    if grads:
        out["max_grad_norm_rel_diff"] = max(abs(a - b) / abs(b) for a, b in grads)
    return out


# ------------------------------------------------------------------------------------------- eval

def full_split_wall(wall_s: float, batches_run: int, prompts_run: int, batch_size: int, n_full: int) -> float:
    """Whole-split seconds from a subset: per batch, times the batches the full split needs."""
    if prompts_run >= n_full:
        return wall_s
    return wall_s / batches_run * math.ceil(n_full / batch_size)


def eval_baseline(workdir: str, prompts: list[list[int]], batch_size: int, new_tokens: int, n_full: int) -> dict:
    """Plain 4-bit generate: input order, batches of `batch_size`, left padding, greedy, exactly N new tokens."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir)
    model = load_plain_4bit(workdir)
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id

    def run(batch, n_new):
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
        return out.shape[1] - width

    run(prompts[:2], 4)  # warm-up (CUDA context, cuBLAS): it would be multiplied by the extrapolation
    sync()
    started = time.perf_counter()
    generated, batches = 0, 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        generated += run(batch, new_tokens) * len(batch)
        batches += 1
    sync()
    wall = time.perf_counter() - started
    return {"prompts": len(prompts), "batch_size": batch_size, "batches": batches, "generated_tokens": generated,
            "wall_seconds_measured": round(wall, 2),
            "generated_tokens_per_second": round(generated / wall, 1),
            "wall_seconds_full_split": round(full_split_wall(wall, batches, len(prompts), batch_size, n_full), 1),
            "extrapolated": len(prompts) < n_full}


def load_project_model(workdir: str, dequantize: bool):
    from stages.config import ModelParams
    from stages.evaluate import load_for_generation
    from stages.modeling import load_tokenizer

    tokenizer = load_tokenizer(workdir)
    tokenizer.padding_side = "left"  # as stages.evaluate.main does
    return load_for_generation(ModelParams(name=workdir), adapter=None, dequantize=dequantize), tokenizer


def eval_project(model, tokenizer, prompts: list[list[int]], batch_size: int, new_tokens: int, engine: str,
                 n_full: int, warm_up: bool) -> dict:
    """stages.evaluate.generate unchanged; prompts go in as questions that encode to exactly their ids."""
    import stages.decode
    from stages.config import EvaluateParams, PromptParams
    from stages.evaluate import generate
    from stages.modeling import encode_prompt, render_prompt

    prompt_p = PromptParams(template="{question}", chat=False)
    # No stop strings: every row runs exactly `new_tokens` steps, in both engines.
    eval_p = EvaluateParams(max_new_tokens=new_tokens, batch_size=batch_size, dequantize=False, engine=engine, stop=[])
    questions = [as_question(p) for p in prompts]
    encoded = encode_prompt(tokenizer, render_prompt(tokenizer, prompt_p, questions[0]), prompt_p)
    if encoded != prompts[0]:
        raise RuntimeError("benchmark tokenizer does not round-trip the prompt ids")
    # Per-batch times (the first includes one-off costs), from the call each engine makes per batch.
    owner, attr = (stages.decode, "greedy_decode") if engine == "static" else (model, "generate")
    original = getattr(owner, attr)
    batch_seconds = []

    def timed(*args, **kwargs):
        sync()
        t = time.perf_counter()
        out = original(*args, **kwargs)
        sync()
        batch_seconds.append(round(time.perf_counter() - t, 3))
        return out

    if warm_up:  # the subset will be extrapolated: keep one-off start-up costs out of it
        generate(model, tokenizer, prompt_p, EvaluateParams(max_new_tokens=4, batch_size=2, engine=engine),
                 questions[:2], show_progress=False)
    setattr(owner, attr, timed)
    try:
        sync()
        started = time.perf_counter()
        texts, generated = generate(model, tokenizer, prompt_p, eval_p, questions, show_progress=False)
        sync()
        wall = time.perf_counter() - started
    finally:
        setattr(owner, attr, original)
    batches = len(batch_seconds)
    figures = {"prompts": len(prompts), "batch_size": batch_size, "engine": engine, "batches": batches,
               "batch_seconds": batch_seconds, "generated_tokens": generated,
               "generated_tokens_expected": len(prompts) * new_tokens,
               "wall_seconds_measured": round(wall, 2),
               "generated_tokens_per_second": round(generated / wall, 1),
               "wall_seconds_full_split": round(full_split_wall(wall, batches, len(prompts), batch_size, n_full), 1),
               "extrapolated": len(prompts) < n_full, "texts": texts}
    if batches > 1 and sum(batch_seconds[1:]) > 0:  # steady state: without compilation / first-call costs
        rest_tokens = generated - min(batch_size, len(prompts)) * new_tokens
        figures["tokens_per_second_after_first_batch"] = round(rest_tokens / sum(batch_seconds[1:]), 1)
    return figures


# ---------------------------------------------------------------------------------------- summary

def ratios_and_goals(results: dict, tiny: bool) -> tuple[dict, dict]:
    train, ev = results.get("train", {}), results.get("eval", {})
    ratios, goals = {}, {}
    base_tps = train.get("baseline", {}).get("train_tokens_per_second")
    base_peak = train.get("baseline", {}).get("peak_allocated_gib")
    for name, v in train.items():
        if name != "baseline" and base_tps and v.get("train_tokens_per_second"):
            ratios[f"train_tokens_per_second/{name}"] = round(v["train_tokens_per_second"] / base_tps, 2)
    base_wall = ev.get("baseline_4bit_b64", {}).get("wall_seconds_full_split")
    for name, v in ev.items():
        if name != "baseline_4bit_b64" and base_wall and v.get("wall_seconds_full_split"):
            ratios[f"eval_wall_speedup/{name}"] = round(base_wall / v["wall_seconds_full_split"], 2)

    def fast_and_same(name, factor, memory=True):
        v = train.get(name, {})
        if "train_tokens_per_second" not in v or not base_tps:
            return None
        # A variant's own peak: what earlier variants of this process left allocated is not its memory
        # (until release() cleared bitsandbytes' optimizer manager, each left ~1 GiB: allocated_at_start_gib).
        own_peak = v.get("peak_allocated_gib") and v["peak_allocated_gib"] - v.get("allocated_at_start_gib", 0.0)
        memory_ok = not memory or base_peak is None or own_peak is None or own_peak <= base_peak
        return bool(v["train_tokens_per_second"] >= factor * base_tps and memory_ok and v.get("loss_check") == "PASS")

    pf = [fast_and_same(n, GOAL_TRAIN_SPEEDUP) for n, v in TRAIN_VARIANTS.items() if v["padding_free"]]
    goals[f"train_effective_batch_8_>={GOAL_TRAIN_SPEEDUP:g}x_same_loss_no_more_memory"] = (
        any(pf) if any(p is not None for p in pf) else None)
    card_names = [n for n, v in TRAIN_VARIANTS.items()
                  if (v["per_device_train_batch_size"], v["gradient_accumulation_steps"]) == (1, EFFECTIVE_BATCH)]
    for suffix, memory in (("_no_more_memory", True), ("", False)):
        card = [fast_and_same(n, GOAL_CARD_SPEEDUP, memory) for n in card_names]
        goals[f"train_card_batch_1x8_>={GOAL_CARD_SPEEDUP:g}x_same_loss{suffix}"] = (
            any(card) if any(c is not None for c in card) else None)
    measured = {n: v for n, v in ev.items() if n != "baseline_4bit_b64" and "wall_seconds_full_split" in v}
    full = {n: v for n, v in measured.items() if not v.get("extrapolated")}
    goals[f"eval_full_split_<={GOAL_EVAL_WALL_S:g}s_measured"] = (
        any(v["wall_seconds_full_split"] <= GOAL_EVAL_WALL_S for v in full.values()) if full else None)
    fits = [v for v in measured.values() if v.get("peak_allocated_gib") is not None
            and v["wall_seconds_full_split"] <= GOAL_EVAL_WALL_S]
    goals[f"eval_<={GOAL_EVAL_WALL_S:g}s_within_{GOAL_EVAL_MEMORY_GB:g}GB"] = (
        any(v["peak_allocated_gib"] * 2**30 <= GOAL_EVAL_MEMORY_GB * 1e9 for v in fits) if measured else None)
    if tiny:
        goals = {k: None for k in goals}  # the goals are about the 8B shape on an H100
    return ratios, goals


def markdown_table(results: dict) -> str:
    def fmt(x, spec="{:,.1f}"):
        return "—" if x is None else spec.format(x)

    def ordered(section, names):
        found = results.get(section, {})
        return [(n, found[n]) for n in names if n in found] + [(n, v) for n, v in found.items() if n not in names]

    ratios = results.get("ratios", {})
    lines = ["| section | variant | tokens/s | s/step (train) · wall s for 1,319 (eval) | peak GiB | × plain "
             "| loss vs plain: max rel. diff, check |",
             "|---|---|---|---|---|---|---|"]
    for section, names, key in (("train", ["baseline", *TRAIN_VARIANTS], "train_tokens_per_second"),
                                ("eval", list(EVAL_VARIANTS), "generated_tokens_per_second")):
        for name, v in ordered(section, names):
            if "error" in v or "skipped" in v:
                lines.append(f"| {section} | {name} | {v.get('error') or v.get('skipped')} | | | | |")
                continue
            ratio = ratios.get(f"train_tokens_per_second/{name}" if section == "train" else f"eval_wall_speedup/{name}")
            if section == "train":
                middle = fmt(v.get("seconds_per_step"), "{:.3f}")
                check = "reference" if name == "baseline" else (
                    f"{fmt(v.get('max_loss_rel_diff'), '{:.1e}')} {v.get('loss_check', '—')}"
                    f" (strict {v.get('loss_check_strict', '—')})")
            else:
                middle = fmt(v.get("wall_seconds_full_split")) + (" (extrapolated)" if v.get("extrapolated") else "")
                check = ""
            lines.append(f"| {section} | {name} | {fmt(v.get(key))} | {middle} | "
                         f"{fmt(v.get('peak_allocated_gib'), '{:.2f}')} | {'' if ratio is None else f'{ratio:.2f}×'} "
                         f"| {check} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ estimates

class Clock:
    """Elapsed time against --time-budget-s: a variant whose estimate does not fit is skipped, recorded."""

    def __init__(self, budget_s: float):
        self.start, self.budget = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def admit(self, what: str, estimate_s: float) -> str | None:
        left = self.budget - self.elapsed()
        print(f"[{self.elapsed():6.0f}s] {what}: estimate ~{estimate_s:.0f}s, {left:.0f}s of budget left", flush=True)
        if estimate_s > left:
            return f"skipped: estimate {estimate_s:.0f}s > {left:.0f}s left of --time-budget-s"
        return None


def estimates(shape: dict, on_gpu: bool) -> dict:
    """Rough seconds per piece on one H100 (PERF-NOTES.md's rates), scaled by the model's size."""
    if not on_gpu:
        return {k: 3.0 for k in ("build", "load", "train_plain_step", "train_pf_step", "gen_4bit_step",
                                  "gen_bf16_step", "gen_static_step", "compile")}
    f = max(shape["num_hidden_layers"] / 32 * shape["hidden_size"] * shape["intermediate_size"] / (4096 * 14336), 0.02)
    return {
        "build": 20 + 60 * f,              # init on the GPU, write 16 GB of safetensors
        "load": 3 + 6 * f,                 # page cache -> NF4 on the GPU (memory_check: ~7 s for 8B)
        "train_plain_step": 3.8 * f + 0.1,  # 1,920 tokens at 517 tok/s (plain, all-linear)
        "train_pf_step": 1.1 * f + 0.1,    # one 1,920-token micro-batch at ~1,900 tok/s
        "gen_4bit_step": 0.110 * f + 0.01,  # one decode step, batch 64 (638 tok/s with LoRA)
        "gen_bf16_step": 0.084 * f + 0.01,  # batch 256 (3,042 tok/s)
        "gen_static_step": 0.025 * f + 0.005,  # static engine, batch 256: run 3, 39 s for 6 × 256 steps
        "compile": 30 + 60 * f,            # train.torch_compile: one decoder layer, forward and backward
    }


# ------------------------------------------------------------------------------------------- main

TRAIN_VARIANTS = {  # name: TrainParams fields; every variant trains on 8 sequences per optimizer step
    "padding_free": dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, padding_free=True),
    "card": dict(per_device_train_batch_size=1, gradient_accumulation_steps=8, padding_free=False),
    "padding_free+liger": dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, padding_free=True,
                               use_liger_kernel=True),
    "card+liger": dict(per_device_train_batch_size=1, gradient_accumulation_steps=8, padding_free=False,
                       use_liger_kernel=True),
    "card+compile": dict(per_device_train_batch_size=1, gradient_accumulation_steps=8, padding_free=False,
                         torch_compile=True),
    "card+compile-checkpointing": dict(per_device_train_batch_size=1, gradient_accumulation_steps=8,
                                       padding_free=False, torch_compile=True, gradient_checkpointing=False),
    "padding_free+compile": dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, padding_free=True,
                                 torch_compile=True),
    "card+cudagraphs": dict(per_device_train_batch_size=1, gradient_accumulation_steps=8, padding_free=False,
                            torch_compile=True, gradient_checkpointing=False, cuda_graphs=True),
}
# Run in this order, so that a short budget drops the least needed last. The static_* and generate_*
# variants share one dequantized model; "static" is the project's engine (stages/decode.py, evaluate.engine: static),
# "generate" transformers' generate() on the same model (evaluate.engine: generate).
EVAL_VARIANTS = ("baseline_4bit_b64", "static_b128", "static_b256", "generate_b256", "generate_b128", "4bit_b64")


def script_parser(workdir: str) -> argparse.ArgumentParser:
    """The options every script built on this benchmark's model takes (pipeline_8b.py, profile_*.py):
    where the model is built (`workdir`: its default), where results go, how many layers."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=workdir)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--layers", type=int, default=None)
    return parser


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default: the shape's, 32)")
    p.add_argument("--tiny", action="store_true", help="CPU test mode: 2-layer hidden-64 Llama, vocab 512")
    p.add_argument("--sections", default="train,eval", help="comma list of: train, eval")
    p.add_argument("--train-variants", default=",".join(TRAIN_VARIANTS), help="project variants to train")
    p.add_argument("--eval-variants", default=",".join(EVAL_VARIANTS[1:]), help="project variants to evaluate")
    p.add_argument("--train-steps", type=int, default=None, help="optimizer steps per path (default 6; tiny 3)")
    p.add_argument("--warmup-steps", type=int, default=None, help="first steps left out of timing (default 2; tiny 1)")
    p.add_argument("--lora-dropout", type=float, default=0.05,
                   help="0.05 is the recipe (the same value for every path); 0 removes dropout's randomness")
    p.add_argument("--loss-rtol", type=float, default=0.02, help="bf16 numerics; see loss_agreement")
    p.add_argument("--eval-prompts", type=int, default=None,
                   help=f"prompts for the static_* variants (default {GSM8K_TEST_SIZE}: the whole split, measured)")
    p.add_argument("--eval-dequant-prompts", type=int, default=None,
                   help="prompts for the generate_* variants (default 256: one or two batches, extrapolated)")
    p.add_argument("--eval-baseline-prompts", type=int, default=None,
                   help="prompts for the 4-bit variants, plain and project (default 128: two batches, "
                        "extrapolated; the whole split takes ~9 min each)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per prompt (default 256; tiny 16)")
    p.add_argument("--length-scale", type=float, default=None,
                   help="multiply every sequence length (default 1; tiny 0.25, for CPU speed)")
    p.add_argument("--workdir", default=None,
                   help="model directory (default: /dev/shm/bench-model if it has room, else /tmp/bench-model)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_<gpu>.json)")
    p.add_argument("--merge", action="store_true", help="keep the variants of an existing --out that this run skips")
    p.add_argument("--time-budget-s", type=float, default=540,
                   help="a variant whose estimate no longer fits is skipped (and recorded as such)")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(train_steps=3 if tiny else 6, warmup_steps=1 if tiny else 2,
                    eval_prompts=16 if tiny else GSM8K_TEST_SIZE, eval_dequant_prompts=16 if tiny else 256,
                    eval_baseline_prompts=8 if tiny else 128, new_tokens=16 if tiny else 256,
                    length_scale=0.25 if tiny else 1.0, workdir="/tmp/bench-model-tiny" if tiny else "auto")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup_steps >= args.train_steps:
        p.error("--warmup-steps must be smaller than --train-steps")
    unknown = {v for v in args.train_variants.split(",") if v} - set(TRAIN_VARIANTS) | \
        {v for v in args.eval_variants.split(",") if v} - set(EVAL_VARIANTS) | \
        {v for v in args.sections.split(",") if v} - {"train", "eval"}
    if unknown:
        p.error(f"unknown section(s) or variant(s): {', '.join(sorted(unknown))}")
    return args


def run_variant(results: dict, section: str, name: str, out: Path, fn) -> dict:
    """Run one variant; an exception is recorded as {"error": ...} and the run goes on."""
    import torch

    reset_peak()
    started = time.perf_counter()
    resident = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
    try:
        figures = fn()
        figures.update(peak_memory())
    except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others
        traceback.print_exc()
        first_line = (str(exc).strip().splitlines() or [""])[0]
        figures = {"error": f"{type(exc).__name__}: {first_line}"[:500]}
    figures["section_seconds"] = round(time.perf_counter() - started, 1)
    if resident is not None:
        figures["allocated_at_start_gib"] = round(resident, 3)  # > 0 on a fresh load means a leak
    free_memory()
    results.setdefault(section, {})[name] = figures
    save(results, out)
    print(f"{section}/{name}: " + json.dumps({k: v for k, v in figures.items() if not isinstance(v, (list, dict))}),
          flush=True)
    return figures


def skip(results: dict, section: str, name: str, out: Path, why: str) -> None:
    results.setdefault(section, {})[name] = {"skipped": why}
    save(results, out)
    print(f"{section}/{name}: {why}", flush=True)


def save(results: dict, out: Path) -> None:
    """Ratios, goals and table from what has been measured so far, then the JSON (atomically)."""
    results["ratios"], results["goals"] = ratios_and_goals(results, results.get("tiny", False))
    results["table_markdown"] = markdown_table(results)
    write_json(out, results)


def default_workdir(shape: dict) -> str:
    """A RAM disk when it has room: writing 16 GB of safetensors to a slow disk takes minutes."""
    import shutil

    from stages.modeling import estimate_param_count

    needed = 2 * estimate_param_count(shape) * 1.2 + 2**30
    shm = Path("/dev/shm")
    if shm.is_dir() and (existing_shape_matches(shm / "bench-model", shape) or shutil.disk_usage(shm).free > needed):
        return str(shm / "bench-model")
    return "/tmp/bench-model"


def quiet_libraries() -> None:
    """No Hub (there is none on the GPU machine) and no progress bars flooding the log."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet_libraries()
    import torch

    if args.tiny:
        # Tiny matmuls gain nothing from threads, and OpenMP threads that spin-wait for a core
        # another process holds make a CPU run several times slower.
        torch.set_num_threads(1)
    on_gpu = torch.cuda.is_available()
    shape = bench_shape(args.tiny, args.layers)
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"bench_{slug(gpu_name())}.json")
    clock = Clock(args.time_budget_s)
    results = json.loads(out.read_text()) if args.merge and out.is_file() else {}
    results.update({
        "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "gpu": gpu_name(), "versions": versions(), "tiny": args.tiny, "shape": shape,
        "lengths": {"train": TRAIN_LENGTHS, "eval": EVAL_LENGTHS, "scale": args.length_scale, "seed": args.seed},
        "settings": {
            "train_steps": args.train_steps, "warmup_steps_untimed": args.warmup_steps,
            "effective_batch": EFFECTIVE_BATCH, "loss_rtol": args.loss_rtol,
            "lora": {"r": 32, "alpha": 16, "dropout": args.lora_dropout, "targets": "all-linear"},
            "new_tokens": args.new_tokens, "full_split": GSM8K_TEST_SIZE,
            "eval_prompts": {"4bit": args.eval_baseline_prompts, "generate": args.eval_dequant_prompts,
                             "static": args.eval_prompts},
        },
    })
    workdir = Path(args.workdir if args.workdir != "auto" else default_workdir(shape))
    results["workdir"] = str(workdir)
    plan = time_plan(args, estimates(shape, on_gpu), build_needed=not existing_shape_matches(workdir, shape))
    print("time plan (rough estimates, s): " + ", ".join(f"{k} {v:.0f}" for k, v in plan.items()) +
          f"; total {sum(plan.values()):.0f} of --time-budget-s {args.time_budget_s:.0f}", flush=True)
    clock.admit("build", plan["build"])
    results["build"] = build_model_dir(workdir, shape, args.seed)  # never skipped: everything needs it
    print(f"build: {results['build']}", flush=True)
    save(results, out)

    train_section(args, results, out, clock, plan, shape, workdir)
    eval_section(args, results, out, clock, plan, shape, workdir)

    results["total_seconds"] = round(clock.elapsed(), 1)
    save(results, out)
    print("\n" + results["table_markdown"])
    print("\ngoals: " + json.dumps(results["goals"]))
    print(f"wrote {out} ({results['total_seconds']}s)")
    return results


def eval_plan(args) -> dict:
    small, large = (4, 8) if args.tiny else (64, 256)
    static, dequant, four_bit = (min(n, GSM8K_TEST_SIZE) for n in (args.eval_prompts, args.eval_dequant_prompts,
                                                                    args.eval_baseline_prompts))
    return {  # name: (prompts, batch size, engine, which model); b128 is the default, sized for 40 GB cards
        "baseline_4bit_b64": (four_bit, small, "generate", "plain"),
        "static_b128": (static, large // 2, "static", "dequant"),
        "static_b256": (static, large, "static", "dequant"),
        "generate_b256": (dequant, large, "generate", "dequant"),
        "generate_b128": (dequant, large // 2, "generate", "dequant"),
        "4bit_b64": (four_bit, small, "generate", "4bit"),
    }


def wanted_variants(args, section: str) -> list[str]:
    if section not in args.sections.split(","):
        return []
    if section == "train":
        # In the order asked for: a compiled variant that follows another one in the process ran faster
        # (runs 9 and 10), so the order is part of the measurement.
        return ["baseline"] + [v for v in args.train_variants.split(",") if v in TRAIN_VARIANTS]
    return [v for v in EVAL_VARIANTS if v == "baseline_4bit_b64" or v in args.eval_variants.split(",")]


def time_plan(args, est: dict, build_needed: bool) -> dict:
    """Estimated seconds of every piece of the run, in the order it runs."""
    plan = {"build": est["build"] if build_needed else 0.0}
    for name in wanted_variants(args, "train"):
        padding_free = name != "baseline" and TRAIN_VARIANTS[name]["padding_free"]
        compiled = name != "baseline" and TRAIN_VARIANTS[name].get("torch_compile", False)
        plan[f"train/{name}"] = est["load"] + args.train_steps * est["train_pf_step" if padding_free else
                                                                   "train_plain_step"] + (est["compile"] if compiled else 0)
    previous = None
    for name in wanted_variants(args, "eval"):
        n, batch, engine, kind = eval_plan(args)[name]
        step_s = est["gen_static_step" if engine == "static" else "gen_bf16_step" if kind == "dequant" else
                     "gen_4bit_step"]
        plan[f"eval/{name}"] = (0 if kind == previous else est["load"]) + math.ceil(n / batch) * args.new_tokens * \
            step_s
        previous = kind
    return plan


@contextlib.contextmanager
def undo_module_patches():
    """Liger patches transformers' Llama module itself (RoPE function, RMSNorm and MLP classes, maybe
    the causal-LM forward and torch's cross_entropy), so every model built after the liger variant
    would run its kernels; put everything back afterwards."""
    import torch.nn.functional as F
    from transformers.models.llama import modeling_llama

    saved_module = dict(vars(modeling_llama))
    saved_forward = modeling_llama.LlamaForCausalLM.__dict__.get("forward")
    saved_ce = F.cross_entropy
    try:
        yield
    finally:
        for key, value in saved_module.items():
            if getattr(modeling_llama, key, None) is not value:
                setattr(modeling_llama, key, value)
        modeling_llama.LlamaForCausalLM.forward = saved_forward
        F.cross_entropy = saved_ce


def train_section(args, results, out, clock, plan, shape, workdir) -> None:
    from stages.config import TrainParams

    lora = {"r": 32, "alpha": 16, "dropout": args.lora_dropout}
    # The project's settings (params.yaml's train section) with the benchmark's step count and LoRA;
    # Liger off, as each variant says whether it uses it (and compiled ones cannot).
    train_p = TrainParams(lora_r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                          lora_target_modules="all-linear", max_steps=args.train_steps, seed=args.seed,
                          use_liger_kernel=False)
    rows = make_train_rows(args.train_steps * EFFECTIVE_BATCH, shape["vocab_size"], args.seed, args.length_scale)
    state = {}

    def baseline():
        figures, state["lora_a"] = train_baseline(str(workdir), rows, args.train_steps, args.warmup_steps, lora,
                                                  train_p, args.seed)
        return figures

    base = None
    for name in wanted_variants(args, "train"):
        why = clock.admit(f"train/{name}", plan[f"train/{name}"])
        if not why and TRAIN_VARIANTS.get(name, {}).get("use_liger_kernel") and not importlib.util.find_spec(
                "liger_kernel"):
            why = "skipped: liger_kernel is not installed"
        if why:
            skip(results, "train", name, out, why)
            continue
        if name == "baseline":
            base = run_variant(results, "train", name, out, baseline)
            continue
        params = dataclasses.replace(train_p, **TRAIN_VARIANTS[name])

        def project(params=params):
            try:
                with undo_module_patches():
                    return train_project(str(workdir), rows, args.train_steps, args.warmup_steps, params,
                                         args.seed, state.get("lora_a"))
            finally:
                # Dynamo's cache is per code object, not per model: without a reset the next compiled
                # variant would run this one's compiled layers (run 7 did: a first step of 2 s).
                release({})

        figures = run_variant(results, "train", name, out, project)
        if base and "losses" in base and "losses" in figures:
            figures.update(loss_agreement(base, figures, args.warmup_steps, args.loss_rtol))
            if "cuda_graph_recording_steps" in figures and "step_seconds" in base:
                figures["steady_state"] = steady_state(base, figures, args.warmup_steps)
            save(results, out)


def eval_section(args, results, out, clock, plan, shape, workdir) -> None:
    prompts = make_eval_prompts(GSM8K_TEST_SIZE, shape["vocab_size"], args.seed, args.length_scale)
    loaded, texts = {}, {}
    for name in wanted_variants(args, "eval"):
        n, batch, engine, kind = eval_plan(args)[name]
        if loaded.get("kind") != kind:
            release(loaded)
        why = clock.admit(f"eval/{name}", plan[f"eval/{name}"])
        if why:
            skip(results, "eval", name, out, why)
            continue

        def fn(name=name, n=n, batch=batch, engine=engine, kind=kind):
            if kind == "plain":
                return eval_baseline(str(workdir), prompts[:n], batch, args.new_tokens, GSM8K_TEST_SIZE)
            if not loaded:
                model, tokenizer = load_project_model(str(workdir), dequantize=kind == "dequant")
                loaded.update(kind=kind, model=model, tokenizer=tokenizer)
            figures = eval_project(loaded["model"], loaded["tokenizer"], prompts[:n], batch, args.new_tokens, engine,
                                   GSM8K_TEST_SIZE, warm_up=n < GSM8K_TEST_SIZE)
            texts[name] = figures.pop("texts")
            return figures

        run_variant(results, "eval", name, out, fn)
        if name in ("static_b256", "generate_b256") and texts.get("static_b256") and texts.get("generate_b256"):
            results["engine_agreement"] = engine_agreement(texts["static_b256"], texts["generate_b256"])
            results["engine_checks"] = engine_checks(loaded["model"], loaded["tokenizer"], prompts,
                                                     {e: texts[f"{e}_b256"] for e in ("static", "generate")})
            print("engine checks: " + json.dumps(results["engine_checks"]), flush=True)
            save(results, out)
    release(loaded)


def engine_checks(model, tokenizer, prompts: list[list[int]], texts: dict, rows: int = 16) -> dict:
    """With random weights the logits are nearly flat, so bf16 rounding alone flips the argmax
    between two correct engines after a few tokens (engine_agreement). These checks do not depend
    on that:
    - graph_vs_eager: the static engine with and without CUDA graphs on one batch, token for token
      (the same kernels, so they must be identical);
    - teacher_forced: each engine's completions of the first `rows` prompts, scored by one plain
      forward over prompt + completion: how often the engine's token is that forward's argmax,
      and the largest gap between the argmax logit and the chosen one, in units of the logits'
      standard deviation at that position (a decoding bug gives gaps of whole units, rounding
      gives hundredths)."""
    import torch

    from stages.decode import allocate_cache, greedy_decode
    from stages.evaluate import make_batches

    device = next(model.parameters()).device
    checks = {}
    if device.type == "cuda":
        (_, batch), *_ = make_batches(prompts[:64], 64, tokenizer.pad_token_id, device)
        buffers = allocate_cache(model.config, 64, batch.width + 63, model.dtype, device)
        with torch.inference_mode():
            graph = greedy_decode(model, batch, 64, buffers, lambda _: False, use_graph=True)
            eager = greedy_decode(model, batch, 64, buffers, lambda _: False, use_graph=False)
        del buffers
        checks["graph_vs_eager"] = {"rows": 64, "new_tokens": 64,
                                    "identical_rows": int((graph == eager).all(dim=1).sum())}
    for engine, completions in texts.items():
        matches, total, worst = 0, 0, 0.0
        for prompt, text in zip(prompts[:rows], completions[:rows]):
            new = tokenizer(text, add_special_tokens=False).input_ids
            ids = torch.tensor([prompt + new], device=device)
            with torch.inference_mode():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            chosen = logits.gather(1, torch.tensor(new, device=device)[:, None])[:, 0]
            gap = (logits.max(dim=1).values - chosen) / logits.std(dim=1)
            matches += int((gap == 0).sum())
            total += len(new)
            worst = max(worst, float(gap.max()))
        checks[f"teacher_forced/{engine}"] = {"rows": rows, "tokens": total, "argmax_match": round(matches / total, 4),
                                              "worst_gap_in_std": round(worst, 4)}
    return checks


def engine_agreement(static: list[str], reference: list[str]) -> dict:
    """How far the static engine's completions match generate()'s on the prompts both decoded."""
    pairs = list(zip(static, reference))
    common = [next((k for k, (a, b) in enumerate(zip(x.split(), y.split())) if a != b), len(y.split()))
              for x, y in pairs]
    return {"prompts": len(pairs), "identical": sum(x == y for x, y in pairs),
            "mean_common_prefix_tokens": round(sum(common) / max(len(common), 1), 1)}


def release(loaded: dict) -> None:
    loaded.clear()
    if "torch._dynamo" in sys.modules:  # compiled code (train variants with torch.compile) holds models
        sys.modules["torch._dynamo"].reset()  # CUDA-graph trees (train.cuda_graphs) included
        sys.modules["torch._dynamo"].utils.counters.clear()
    if "bitsandbytes" in sys.modules:
        # The Trainer registers every nn.Embedding with bitsandbytes' process-wide GlobalOptimManager
        # (32-bit optimizer states for it) and never unregisters it: each trainer's input embedding,
        # 1 GiB for the 8B shape, stayed allocated through the later variants (runs 1-11).
        sys.modules["bitsandbytes"].optim.GlobalOptimManager.get_instance().initialize()
    free_memory()


if __name__ == "__main__":
    main()
