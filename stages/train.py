"""python -m stages.train --train-file data/gsm8k_train.jsonl --dev-file data/gsm8k_dev.jsonl \
    --output-dir checkpoints/sft_lora --resume-dir checkpoints/resume --metrics metrics/train.json \
    --live-dir dvclive/train

QLoRA SFT with TRL: NF4 base (bitsandbytes), LoRA (peft), loss on the answer + EOS only.
Checkpoints go to --resume-dir every train.save_steps; an interrupted run picks up from the newest
complete one when started again with the same params and data (see `find_resume_checkpoint`).
Under `accelerate launch` each GPU runs one rank; the effective batch stays the params' value.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from stages.config import CUDA_GRAPH_LENGTH_MULTIPLE, ModelParams, PromptParams, TrainParams, load_params
from stages.io import UserError, atomic_path, cli, read_jsonl, write_json

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"
FINGERPRINT_FILE = "fingerprint.json"


def per_rank_batch(world_size: int, per_device_batch: int, accumulation: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) for each of `world_size` ranks such that
    micro-batch × accumulation × world_size stays the params' per_device_batch × accumulation, so
    experiments on 1 or N GPUs train the same thing. Accumulation is split first (same micro-batch,
    same memory per GPU); failing that, the micro-batch."""
    if accumulation % world_size == 0:
        return per_device_batch, accumulation // world_size
    if per_device_batch % world_size == 0:
        return per_device_batch // world_size, accumulation
    raise UserError(
        f"params.yaml: train: per_device_train_batch_size {per_device_batch} × gradient_accumulation_steps "
        f"{accumulation} cannot be split over {world_size} processes with the effective batch kept; "
        f"make one of them a multiple of {world_size}")


def build_lora_config(train: TrainParams):
    from peft import LoraConfig

    return LoraConfig(
        r=train.lora_r,
        lora_alpha=train.lora_alpha,
        lora_dropout=train.lora_dropout,
        target_modules=train.lora_target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_sft_config(train: TrainParams, model: ModelParams, output_dir: str, world_size: int = 1, **overrides):
    import torch
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    if train.use_liger_kernel and on_gpu and importlib.util.find_spec("liger_kernel") is None:
        raise UserError("params.yaml: train.use_liger_kernel: true, but liger-kernel is not installed; "
                        "pip install -r requirements-gpu.txt, or set it to false")
    if train.use_liger_kernel and not on_gpu:
        print("train: train.use_liger_kernel ignored: Liger's kernels need CUDA")
    micro_batch, accumulation = per_rank_batch(world_size, train.per_device_train_batch_size,
                                               train.gradient_accumulation_steps)
    kwargs = dict(
        output_dir=output_dir,
        per_device_train_batch_size=micro_batch,
        # The dev pass uses the training micro-batch: its peak then stays under the training step's.
        per_device_eval_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler_type,
        warmup_steps=train.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optim,
        gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # Rows arrive tokenized and already cut to max_length (stages.modeling.tokenize_example), so
        # the padded and the padding-free path see the same tokens; TRL refuses max_length with
        # padding_free because it would not enforce it.
        max_length=None if train.padding_free else train.max_length,
        padding_free=train.padding_free,
        pad_to_multiple_of=CUDA_GRAPH_LENGTH_MULTIPLE if train.cuda_graphs else None,
        completion_only_loss=True,
        use_liger_kernel=train.use_liger_kernel and on_gpu,
        logging_steps=train.logging_steps,
        eval_strategy="steps",
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,
        seed=train.seed,
        data_seed=train.seed,
        bf16=on_gpu and model.bnb_4bit_compute_dtype == "bfloat16",
        fp16=on_gpu and model.bnb_4bit_compute_dtype == "float16",
        include_num_input_tokens_seen="non_padding",
        report_to="none",  # DVCLive is attached explicitly, so its directory is the one dvc.yaml names
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def tokenize_rows(tokenizer, prompt: PromptParams, rows: list[dict], max_length: int, where: str):
    """Tokenized rows for TRL (input_ids + completion_mask) and how many were cut at max_length."""
    from stages.modeling import tokenize_example

    out, truncated = [], 0
    for i, row in enumerate(rows, 1):
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise UserError(f"{where}:{i}: row needs string fields 'question' and 'answer'")
        ex = tokenize_example(tokenizer, prompt, row["question"], row["answer"], max_length)
        truncated += ex.pop("truncated")
        if not any(ex["completion_mask"]):
            raise UserError(f"{where}:{i}: the prompt alone fills train.max_length={max_length} tokens, "
                            "so nothing of the answer would be learned; raise train.max_length")
        out.append(ex)
    if not out:
        raise UserError(f"{where}: no rows (empty split); check data.limit / data.dev_size")
    return out, truncated


def fingerprint(model: ModelParams, prompt: PromptParams, train: TrainParams, files: list[str]) -> str:
    """What a checkpoint must match to be resumed: every param that shapes training, and the data."""
    h = hashlib.sha256(json.dumps([asdict(model), asdict(prompt), asdict(train)], sort_keys=True).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def find_resume_checkpoint(resume_dir: str | Path, expected_fingerprint: str) -> Path | None:
    """Newest checkpoint in resume_dir that finished saving (has the marker written after the save)
    and belongs to this exact configuration; checkpoints of another configuration are deleted."""
    resume_dir = Path(resume_dir)
    fp_file = resume_dir / FINGERPRINT_FILE
    if resume_dir.exists():
        stored = json.loads(fp_file.read_text()).get("fingerprint") if fp_file.is_file() else None
        if stored != expected_fingerprint:
            shutil.rmtree(resume_dir)
    resume_dir.mkdir(parents=True, exist_ok=True)
    write_json(fp_file, {"fingerprint": expected_fingerprint})
    complete = [p for p in resume_dir.glob("checkpoint-*")
                if (p / COMPLETE_MARKER).is_file() and p.name.split("-")[-1].isdigit()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def make_callbacks(live_dir: str | None, resuming: bool):
    from transformers import TrainerCallback

    class MarkCheckpointComplete(TrainerCallback):
        """Trainer writes a checkpoint file by file; the marker, written last, makes it resumable."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    (ckpt / COMPLETE_MARKER).write_text(str(state.global_step))

    callbacks = [MarkCheckpointComplete()]
    if live_dir:
        from dvclive import Live
        from transformers.integrations import DVCLiveCallback

        class StepAlignedDVCLive(DVCLiveCallback):
            """DVCLive counts its own steps from 0; plot against the optimizer step instead, so
            curves from resumed runs and runs with other logging_steps line up."""

            def on_log(self, args, state, control, model=None, logs=None, **kwargs):
                if state.is_world_process_zero and self.live is not None:
                    self.live.step = state.global_step
                super().on_log(args, state, control, model=model, logs=logs, **kwargs)

        is_main = int(os.environ.get("RANK", "0")) == 0
        if is_main:
            live = Live(dir=live_dir, resume=resuming, dvcyaml=None, save_dvc_exp=False, report=None)
            callbacks.append(StepAlignedDVCLive(live=live))
    return callbacks


def peak_memory_bytes() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="QLoRA SFT on GSM8K")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--dev-file", required=True)
    parser.add_argument("--output-dir", required=True, help="final adapter + tokenizer")
    parser.add_argument("--resume-dir", required=True, help="intermediate checkpoints (kept across interruptions)")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--live-dir", default=None, help="DVCLive directory for loss curves")
    args = parser.parse_args(argv)

    model_p, prompt_p, train_p = load_params(args.params, "model", "prompt", "train")
    train_rows, dev_rows = read_jsonl(args.train_file), read_jsonl(args.dev_file)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    per_rank_batch(world_size, train_p.per_device_train_batch_size, train_p.gradient_accumulation_steps)  # fail early

    from stages import memory
    from stages.modeling import load_config, load_tokenizer, process_state

    config = load_config(model_p.name)
    memory.preflight_train(config.to_dict(), model_p, train_p)

    import torch
    from datasets import Dataset

    tokenizer = load_tokenizer(model_p.name)
    train_tok, n_cut = tokenize_rows(tokenizer, prompt_p, train_rows, train_p.max_length, args.train_file)
    dev_tok, _ = tokenize_rows(tokenizer, prompt_p, dev_rows, train_p.max_length, args.dev_file)
    if n_cut:
        print(f"train: {n_cut} of {len(train_tok)} rows are longer than train.max_length={train_p.max_length} and were cut")

    fp = fingerprint(model_p, prompt_p, train_p, [args.train_file, args.dev_file])
    # Rank 0 first: it deletes checkpoints of another configuration before any rank looks.
    with process_state().main_process_first():
        resume_from = find_resume_checkpoint(args.resume_dir, fp)
    if resume_from:
        print(f"train: resuming from {resume_from}")

    trainer = build_trainer(model_p, train_p, tokenizer, Dataset.from_list(train_tok), Dataset.from_list(dev_tok),
                            args.resume_dir, world_size, make_callbacks(args.live_dir, resuming=resume_from is not None))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        dev_metrics = trainer.evaluate()
    except torch.OutOfMemoryError:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        raise UserError(memory.oom_message("train", config.to_dict(), model_p, train_p,
                                           peak_memory_bytes() or 0, total)) from None
    wall = time.perf_counter() - started

    if not trainer.is_world_process_zero():
        return
    with atomic_path(args.output_dir) as tmp:
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    state = trainer.state
    resumed_step = int(resume_from.name.split("-")[-1]) if resume_from else 0
    steps_run = state.global_step - resumed_step
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    peak = peak_memory_bytes()
    metrics = {
        "train_loss": losses[-1] if losses else result.training_loss,
        "train_loss_mean": result.training_loss,
        "dev_loss": dev_metrics["eval_loss"],
        "steps": state.global_step,
        "effective_batch": train_p.per_device_train_batch_size * train_p.gradient_accumulation_steps,
        "runtime_s": round(wall, 2),
        "seconds_per_step": round(result.metrics["train_runtime"] / max(steps_run, 1), 4),
        "train_tokens_per_second": round(state.num_input_tokens_seen / max(result.metrics["train_runtime"], 1e-9), 1),
        "peak_memory_gib": round(peak / 2**30, 3) if peak is not None else None,
        "resumed_from_step": resumed_step,
        "world_size": world_size,
    }
    write_json(args.metrics, metrics)
    # The adapter is saved; the intermediate checkpoints would only take disk.
    shutil.rmtree(args.resume_dir, ignore_errors=True)
    print("train: " + json.dumps(metrics))


def build_trainer(model_p: ModelParams, train_p: TrainParams, tokenizer, train_ds, dev_ds, output_dir: str,
                  world_size: int = 1, callbacks=None, **sft_overrides):
    """The SFTTrainer of this project: 4-bit base + LoRA, loss on answer tokens. Benchmarks call it too."""
    from trl import SFTTrainer

    from stages.modeling import load_model

    model = load_model(model_p)
    trainer = SFTTrainer(
        model=model,
        args=build_sft_config(train_p, model_p, output_dir, world_size, **sft_overrides),
        train_dataset=train_ds,
        eval_dataset=dev_ds,
        processing_class=tokenizer,
        peft_config=build_lora_config(train_p),
        callbacks=callbacks,
    )
    trainer.add_callback(keep_trainable_dtypes(trainer.model))
    if train_p.torch_compile:
        compile_decoder_layers(trainer.model, cuda_graphs=train_p.cuda_graphs)
    if train_p.cuda_graphs:
        evaluate_eagerly(trainer)
    return trainer


def evaluate_eagerly(trainer) -> None:
    """The dev-loss passes run the layers uncompiled. Under no_grad, inductor's CUDA-graph trees
    overwrote a layer's output before the next layer read it ("accessing tensor output of CUDAGraphs
    that has been overwritten by a subsequent run", H100, torch 2.11); and a dev pass is a few
    forwards per hundred training steps, not worth its own compilation."""
    import torch

    loop = trainer.evaluation_loop

    def eager_evaluation_loop(*args, **kwargs):
        with torch.compiler.set_stance("force_eager"):
            return loop(*args, **kwargs)

    trainer.evaluation_loop = eager_evaluation_loop


# Inductor settings of train.torch_compile. fallback_random: LoRA dropout draws its masks from torch's
# generator as in eager mode, so that compiling changes the speed and not which units are dropped (the
# benchmark compares losses step by step). Measured and left out: cpp_wrapper (launching the kernels from
# C++; bench runs 9 and 10 showed no gain beyond their order effect, and it fails inside gradient checkpointing).
COMPILE_OPTIONS = {"fallback_random": True}


def compile_decoder_layers(model, cuda_graphs: bool = False) -> int:
    """Regional torch.compile: every decoder layer (transformers' GradientCheckpointingLayer) is
    compiled in place, inside gradient checkpointing, with dynamic sequence lengths. The layers
    share their code, so one compilation (~1 min for an 8B layer) serves them all; compiling the
    whole model would unroll all 32 layers into one graph. The LoRA weights stay the same
    parameters, so saving, resuming and the optimizer see nothing different.

    cuda_graphs: inductor records each layer's forward and backward as CUDA graphs (its CUDA-graph
    trees, one recording per layer and padded length) and replays them, so that the host no longer
    launches every kernel from Python."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise UserError(f"params.yaml: train.torch_compile: {type(model).__name__} has no transformers decoder "
                        "layers to compile; set it to false")
    # Python floats the layers read (LoRA's scaling, RMSNorm's eps) are constants: let dynamo bake them
    # in. By default it turns each into a CPU scalar input of the graph, which costs a host-side
    # kernel and a host-to-device copy per layer call, and which inductor's CUDA-graph partitions
    # mishandle (a segfault in the first backward replay, H100, torch 2.11).
    torch._dynamo.config.specialize_float = True
    options = dict(COMPILE_OPTIONS)
    if cuda_graphs:
        options["triton.cudagraphs"] = True
        for layer in layers:
            mark_quant_states_static(layer)
        copy_grads_out_of_graph_memory(model)
    for layer in layers:
        layer.compile(dynamic=True, options=options)
    return len(layers)


def mark_quant_states_static(module) -> None:
    """bitsandbytes keeps each 4-bit weight's scales (absmax, code, ...) on a QuantState object, not
    as parameters or buffers, so the graphs would see them as ordinary inputs and copy them into
    graph memory on every replay. They never move: tell dynamo so (unguarded: no recompilation per
    layer; a moved tensor would only cost a re-recording)."""
    import torch

    def tensors(state):
        if state is None:
            return
        for name in ("absmax", "code", "offset"):
            value = getattr(state, name, None)
            if isinstance(value, torch.Tensor):
                yield value
        yield from tensors(getattr(state, "state2", None))

    for sub in module.modules():
        for t in tensors(getattr(getattr(sub, "weight", None), "quant_state", None)):
            torch._dynamo.mark_static_address(t, guard=False)


def copy_grads_out_of_graph_memory(model) -> None:
    """A LoRA weight's gradient is an output of a replayed backward graph, living in the graphs' memory
    pool, which the next micro-batch's replay overwrites. With no .grad yet (the first micro-batch of
    each optimizer step), autograd would adopt that tensor as .grad without copying, and gradient
    accumulation would silently keep only the last micro-batch's gradient (pytorch/pytorch#169545).
    A hook hands autograd a copy in that case; later micro-batches add into the existing .grad."""
    import functools

    for param in model.parameters():
        if param.requires_grad:
            param.register_hook(functools.partial(_own_grad, param))


def _own_grad(param, grad):
    return grad.clone() if param.grad is None else grad


def keep_trainable_dtypes(model):
    """Resuming reloads the adapter through peft, which upcasts it to float32, while a fresh run trains
    it in the dtype TRL chose (bf16 on a 4-bit base): a resumed run would then train a different
    thing. This callback puts the trainable weights back in their original dtype before training."""
    from transformers import TrainerCallback

    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}

    class KeepTrainableDtypes(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            for name, param in model.named_parameters():
                if name in dtypes and param.dtype != dtypes[name]:
                    param.data = param.data.to(dtypes[name])

    return KeepTrainableDtypes()


if __name__ == "__main__":
    main()
