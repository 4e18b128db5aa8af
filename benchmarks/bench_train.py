"""Timing training: the plain QLoRA recipe in a plain PyTorch loop against `stages.train.build_trainer` with the
project's settings, per optimizer step, on the same rows in the same order from the same LoRA init.

- the plain recipe: NF4 + double quant + bf16 compute, `prepare_model_for_kbit_training`, non-reentrant
  gradient checkpointing, LoRA r=32/alpha 16 on all linear layers, `bnb.optim.PagedAdamW8bit`,
  batch 1 x accumulation 8;
- TRAIN_VARIANTS: "padding_free" (the 8 rows of a step in one micro-batch), "card" (batch 1 x
  accumulation 8), each also with Liger's kernels ("+liger") or regional torch.compile ("+compile",
  train.torch_compile; "-checkpointing": without gradient checkpointing; "+cudagraphs").
The peer (Unsloth) is timed in its own process: bench_unsloth.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import time

from bench_device import sync
from bench_model import EFFECTIVE_BATCH, load_plain_4bit

TRAIN_VARIANTS = {  # name: TrainParams fields; every variant trains on 8 sequences per optimizer step
    # params.yaml's train section as committed: what its "auto" kernels choose on this machine
    # (on one CUDA GPU with bf16: padding-free + torch_compile, Liger off).
    "default": dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, padding_free=True,
                    torch_compile="auto", use_liger_kernel="auto"),
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


def lora_snapshot(model, which: str, dtype=None) -> dict:
    """A model's LoRA `which` ("lora_A", "lora_B") matrices on the CPU, keyed by module name (as peft
    names them, less the adapter name and a compiled layer's `_orig_mod`)."""
    import torch

    return {name.replace(".default", "").replace("._orig_mod", ""): p.detach().to("cpu", dtype or torch.float32)
            .clone() for name, p in model.named_parameters() if which in name}


def lora_a_snapshot(model) -> dict:
    """LoRA A matrices (their random init; B starts at zero) in bf16 on the CPU, keyed by module name."""
    import torch

    return lora_snapshot(model, "lora_A", torch.bfloat16)


# What a path's trained LoRA B must be, against the plain loop's after the same steps: the loss of a random-
# weight model hardly moves in a few steps, so a path that trained nothing (or other rows) passed the loss
# check (audit of stop 27). B starts at zero and every path starts from the same A: equal training gives
# equal B up to bf16 rounding and LoRA dropout's masks (drawn over other tensor shapes padding-free); none
# gives B = 0. The bounds are loose (neither effect, through Adam's per-element normalisation, is measured at
# 8B yet): they catch a path that trained nothing, or something else.
ADAPTER_MIN_COSINE = 0.5
ADAPTER_NORM_RATIO = (0.5, 2.0)


def compare_lora_b(reference: dict, model) -> dict:
    """The trained adapter against the plain loop's: the cosine of all LoRA B weights taken as one vector,
    and the ratio of their norms; `adapter_check` PASS when both are within the bounds above."""
    ours = lora_snapshot(model, "lora_B")
    if set(ours) != set(reference):
        return {"adapter_check": "FAIL", "adapter_note": f"{len(ours)} vs {len(reference)} LoRA B matrices"}
    dot = sum(float((ours[k].double() * reference[k].double()).sum()) for k in ours)
    norm = sum(float(ours[k].double().pow(2).sum()) for k in ours) ** 0.5
    ref_norm = sum(float(reference[k].double().pow(2).sum()) for k in ours) ** 0.5
    if not ref_norm:
        return {"adapter_check": "FAIL", "adapter_note": "the plain loop's LoRA B is zero: it trained nothing"}
    cosine, ratio = (dot / (norm * ref_norm) if norm else 0.0), norm / ref_norm
    ok = cosine >= ADAPTER_MIN_COSINE and ADAPTER_NORM_RATIO[0] <= ratio <= ADAPTER_NORM_RATIO[1]
    return {"adapter_cosine": round(cosine, 6), "adapter_norm_ratio": round(ratio, 6),
            "adapter_check": "PASS" if ok else "FAIL"}


def compare_lora_a(reference: dict, model) -> dict:
    ours = lora_a_snapshot(model)
    if set(ours) != set(reference):
        return {"lora_a_identical": False, "lora_a_note": f"{len(ours)} vs {len(reference)} LoRA A matrices"}
    worst = max(((ours[k].float() - reference[k].float()).abs().max().item() for k in ours), default=0.0)
    return {"lora_a_identical": worst == 0.0, "lora_a_max_abs_diff": worst, "lora_a_matrices": len(ours)}


def train_baseline(workdir: str, rows: list[dict], steps: int, warmup: int, lora: dict, train_p, seed: int) -> tuple:
    """The plain recipe, as plainly as it is usually written; returns (figures, LoRA A snapshot at the
    start, LoRA B snapshot at the end)."""
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
    trained = lora_snapshot(model, "lora_B")
    del model, optimizer, trainable
    return figures, snapshot, trained


def train_project(workdir: str, rows: list[dict], steps: int, warmup: int, train_p, seed: int,
                  reference_lora_a: dict | None, callbacks: tuple = (), reference_lora_b: dict | None = None) -> dict:
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
        if reference_lora_b:
            figures.update(compare_lora_b(reference_lora_b, trainer.model))
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


def compile_counters() -> dict:
    """What dynamo and inductor did in this variant (release() clears them between variants):
    graphs compiled, and for train.cuda_graphs whether any graph ran without CUDA graphs
    (cudagraph_skips) or copied inputs into graph memory on each replay."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"]["unique_graphs"],
            **{k: v for k, v in counters["inductor"].items() if "cudagraph" in k}}


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

