"""python -m stages.train --train-file data/gsm8k_train.jsonl --dev-file data/gsm8k_dev.jsonl \
    --output-dir checkpoints/sft_lora --resume-dir checkpoints/resume --metrics metrics/train.json \
    --live-dir dvclive/train

QLoRA SFT with TRL: NF4 base (bitsandbytes), LoRA (peft), loss on the answer + EOS only.
Checkpoints go to --resume-dir every train.save_steps; an interrupted run picks up from the newest
complete one when started again with the same params and data (see `find_resume_checkpoint`).
Under `accelerate launch` each GPU runs one rank; the effective batch stays the params' value.

What it refuses to do: start a second trainer on a --resume-dir another one is using (`resume_dir_lock`),
load the model before the params and output locations are checked (`check_output_locations`,
`check_target_modules`), and save or report anything from a run whose loss or gradients went
non-finite (`stop_on_non_finite`) or whose checkpoint could not be written (`name_save_errors`).
After a resume, the dev loss (--metrics), the run's facts (--run-info) and the curves describe the whole
run, not the last process (`RunClock`, `whole_run_loss_mean`).

What it prints: a line for each thing worth knowing before training (a resume, rows cut at max_length,
a setting that does nothing on this machine), the Trainer's one progress bar with the latest losses
in its postfix (`LossInProgressBar`), and one summary line at the end (`summary_line`). Known
harmless library warnings are filtered at their source (stages/quiet.py).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from stages.config import CUDA_GRAPH_LENGTH_MULTIPLE, ModelParams, PromptParams, TrainParams, load_params
from stages.io import UserError, atomic_path, cli, is_write_error, read_jsonl, write_json

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"
FINGERPRINT_FILE = "fingerprint.json"
# Written into each checkpoint before its marker: what the Trainer's own checkpoint does not keep
# (the training seconds so far, TRL's token counter), so a resumed run reports the whole run.
PROGRESS_FILE = "progress.json"
# Inside --resume-dir (which .gitignore covers), kept when the directory is emptied for other params.
LOCK_FILE = "train.lock"


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
    train = train.resolved(on_gpu, model.bnb_4bit_compute_dtype)
    if train.use_liger_kernel and on_gpu and importlib.util.find_spec("liger_kernel") is None:
        raise UserError("params.yaml: train.use_liger_kernel: true, but liger-kernel is not installed; "
                        "pip install -r requirements-gpu.txt, or set it to false")
    if train.use_liger_kernel and not on_gpu:
        print("train: train.use_liger_kernel ignored: Liger's kernels need CUDA")
    if train.optim.startswith("paged_") and not on_gpu:
        # In place of bitsandbytes' own warning (filtered in stages/quiet.py), which reads like a failure.
        print(f"train: {train.optim} runs unpaged on CPU (bitsandbytes has no paged memory without CUDA)")
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
        # transformers 5.23's names for gradient checkpointing (the old ones are deprecated aliases that
        # it copies into these, with a FutureWarning); TRL 1.16 reads the old names, which mirror these.
        activation_checkpointing=train.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
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
        # Pinned host memory only speeds up copies to a GPU; without one, torch warns and ignores it.
        dataloader_pin_memory=on_gpu,
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


def fingerprint(model: ModelParams, prompt: PromptParams, train: TrainParams, files: list[str],
                model_identity: dict) -> str:
    """What a checkpoint must match to be resumed: every param that shapes training, what model.name
    resolved to (a model directory rebuilt at the same path, a hub branch that moved: the params alone
    are the same), and the data."""
    h = hashlib.sha256(json.dumps([asdict(model), asdict(prompt), asdict(train), model_identity], sort_keys=True).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def find_resume_checkpoint(resume_dir: str | Path, expected_fingerprint: str) -> Path | None:
    """Newest checkpoint in resume_dir that finished saving (has the marker written after the save)
    and belongs to this exact configuration; checkpoints of another configuration are deleted.
    The lock file of the run calling this stays: deleting it would let a second run lock a new one."""
    resume_dir = Path(resume_dir)
    fp_file = resume_dir / FINGERPRINT_FILE
    if resume_dir.exists():
        stored = json.loads(fp_file.read_text()).get("fingerprint") if fp_file.is_file() else None
        if stored != expected_fingerprint:
            for child in resume_dir.iterdir():
                if child.name == LOCK_FILE:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    resume_dir.mkdir(parents=True, exist_ok=True)
    write_json(fp_file, {"fingerprint": expected_fingerprint})
    complete = [p for p in resume_dir.glob("checkpoint-*")
                if (p / COMPLETE_MARKER).is_file() and (p / PROGRESS_FILE).is_file()
                and p.name.split("-")[-1].isdigit()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def mark_checkpoint_complete(ckpt: Path, progress: dict) -> None:
    """The progress file, then the marker: a checkpoint with the marker has everything a resume reads.
    (A checkpoint written before progress files existed has no progress file and is not resumed:
    its run's time and token count are unknown, so the metrics could not describe the whole run.)"""
    write_json(ckpt / PROGRESS_FILE, progress)
    (ckpt / COMPLETE_MARKER).write_text(str(progress.get("step", "")))


def read_progress(ckpt: Path | None) -> dict:
    if ckpt is None:
        return {"train_seconds": 0.0, "num_tokens": 0, "step": 0}
    return json.loads((ckpt / PROGRESS_FILE).read_text())


@contextlib.contextmanager
def resume_dir_lock(resume_dir: str | Path):
    """Hold an exclusive flock on --resume-dir for the whole run: a second trainer started on it (a
    `dvc repro` after only `dvc` was killed) would otherwise train, checkpoint and rotate checkpoints
    next to the first. The kernel drops a flock when its process dies, even by SIGKILL, so a killed
    run leaves at most a stale file that the next run simply locks again."""
    import fcntl

    resume_dir = Path(resume_dir)
    path = resume_dir / LOCK_FILE
    while True:
        resume_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the directory was removed by a run that just finished: make it again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            stop = f"; wait for it to finish or stop it (kill {holder})" if holder.isdigit() else ""
            raise UserError(f"--resume-dir {resume_dir}: another training run (PID {holder}) is using it{stop}, "
                            "then run again") from None
        except OSError as exc:  # a filesystem without flock (some network mounts): train, but say so
            os.close(fd)
            print(f"train: warning: cannot lock {path} ({exc.strerror}); nothing stops a second run on it")
            yield None
            return
        # The previous holder may have deleted the file between our open and our flock: then this lock
        # is on a file nobody else can find. Only a lock on the file now at `path` counts.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with contextlib.suppress(OSError):  # only when empty: a failed check leaves no directory behind
            resume_dir.rmdir()
        os.close(fd)


def why_unwritable(path: str | Path, must_be_dir: bool, written_into: bool) -> str | None:
    """Why the stage could not create `path` (or, with written_into, files inside it), or None.
    Outputs replaced atomically (atomic_path) are written through a sibling: their parent counts."""
    path = Path(os.path.abspath(path))
    if os.path.lexists(path):
        if path.is_dir() != must_be_dir:
            return f"{path} is {'not ' if must_be_dir else ''}a directory"
        probe = path if written_into else path.parent
    else:
        probe = path.parent
        while not os.path.lexists(probe):
            probe = probe.parent
        if not probe.is_dir():
            return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def check_output_locations(locations: list[tuple[str, str | None, bool, bool]]) -> None:
    """(flag, path, must_be_dir, written_into) for each output: one line naming the first that cannot be
    written, before anything is loaded (otherwise it shows after the whole training, as a traceback)."""
    for flag, path, must_be_dir, written_into in locations:
        if path is None:
            continue
        reason = why_unwritable(path, must_be_dir, written_into)
        if reason:
            raise UserError(f"{flag} {path}: cannot write there: {reason}")


def model_module_names(config) -> tuple[list[str], list[str]]:
    """(every module name, the distinct names of its linear layers) of the model `config` describes,
    from an instance on the meta device: no weights are read or allocated, even for 8B."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = [name for name, _ in model.named_modules() if name]
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    return names, linear


def check_target_modules(targets, module_names: list[str], linear_names: list[str]) -> None:
    """Every name in train.lora_target_modules must match a module the way peft matches it (the full
    name, or its last dotted parts). peft itself only fails when none matches, after the model loaded,
    and silently skips a misspelt name in a list of otherwise valid ones."""
    if targets == "all-linear":
        return
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]
    if unknown:
        raise UserError(f"params.yaml: train.lora_target_modules: no module of the model is named "
                        f"{', '.join(unknown)}; its linear layers are {', '.join(linear_names)} (or use all-linear)")


def non_finite_message(what: str, value: float, step: int, learning_rate: float, max_grad_norm: float) -> str:
    clip = "" if max_grad_norm > 0 else ", or set train.max_grad_norm > 0 to clip gradients"
    return (f"train: training diverged: the {what} is {value} at step {step}, so nothing is saved; "
            f"lower train.learning_rate (now {learning_rate:g}){clip}")


def stop_on_non_finite(trainer, learning_rate: float, max_grad_norm: float) -> None:
    """Stop at the first non-finite loss or gradient norm, checked at every micro-batch and optimizer step.

    The logs are not enough: the Trainer logs grad_norm only every logging_steps, and it replaces a NaN
    loss by the mean of the earlier ones (logging_nan_inf_filter), so a run whose weights turned to NaN
    would log plausible losses and save a NaN adapter. training_step returns each micro-batch's raw loss
    (the Trainer reads it back for that very filter, so .item() costs no extra sync); after the
    micro-batch that completes an optimizer step, the gradients are complete (and all-reduced under DDP),
    so their norm is the pre-clipping grad_norm the Trainer would log. The dev loss is checked at every
    evaluation, and logged values once more on their way to the curves."""
    import torch
    from transformers import TrainerCallback

    step = trainer.training_step

    def checked_training_step(model, inputs, num_items_in_batch=None):
        loss = step(model, inputs, num_items_in_batch)
        current = trainer.state.global_step + 1  # the optimizer step this micro-batch belongs to
        value = float(loss.item())
        if not math.isfinite(value):
            raise UserError(non_finite_message("training loss", value, current, learning_rate, max_grad_norm))
        # Under fp16's GradScaler the gradients are scaled, and an inf among them is the scaler's
        # signal to skip that step and lower the scale (measured on the H200: step 1 of an fp16 run),
        # not divergence; the loss is still checked at every micro-batch.
        if trainer.accelerator.sync_gradients and getattr(trainer.accelerator, "scaler", None) is None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if not math.isfinite(norm):
                raise UserError(non_finite_message("gradient norm", norm, current, learning_rate, max_grad_norm))
        return loss

    trainer.training_step = checked_training_step

    class CheckFinite(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = (metrics or {}).get("eval_loss")
            if value is not None and not math.isfinite(value):
                raise UserError(non_finite_message("dev loss", value, state.global_step, learning_rate, max_grad_norm))

        def on_log(self, args, state, control, logs=None, **kwargs):
            scaled = getattr(trainer.accelerator, "scaler", None) is not None
            for key, what in (("loss", "training loss"), ("grad_norm", "gradient norm")):
                if key == "grad_norm" and scaled:
                    continue
                value = (logs or {}).get(key)
                if isinstance(value, float) and not math.isfinite(value):
                    raise UserError(non_finite_message(what, value, state.global_step, learning_rate, max_grad_norm))

    # First, so that a non-finite value stops the run before any other callback writes it anywhere.
    trainer.callback_handler.callbacks.insert(0, CheckFinite())


def save_failed_message(where: str | Path, exc: BaseException, then: str) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
    return (f"train: cannot write {where} ({first}); the disk {'is' if full else 'may be'} full: "
            f"free space there and run again ({then})")


def name_save_errors(trainer) -> None:
    """A checkpoint that fails to write becomes one line naming it, and is deleted: it never got its
    marker (written after the save, in on_save), and what was written of it only takes disk."""
    save = trainer._save_checkpoint

    def guarded_save_checkpoint(model, trial, *args, **kwargs):
        ckpt = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        try:
            return save(model, trial, *args, **kwargs)
        except Exception as exc:
            if not is_write_error(exc):
                raise
            if not (ckpt / COMPLETE_MARKER).exists():
                shutil.rmtree(ckpt, ignore_errors=True)
            raise UserError(save_failed_message(
                ckpt, exc, "training resumes from the last complete checkpoint")) from None

    trainer._save_checkpoint = guarded_save_checkpoint


def canonicalize_adapter_config(adapter_dir: Path) -> None:
    """peft keeps target_modules as a set and writes it in iteration order, which depends on the
    per-process string hash seed: the same adapter would get a different adapter_config.json, and the
    directory a different DVC hash, on every run. Sorted, the bytes follow from the params alone."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), list) and all(isinstance(v, str) for v in config[key]):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))  # peft's own format


def whole_run_loss_mean(log_history: list[dict]) -> float | None:
    """Mean training loss over every step of the run, from the Trainer's log history (restored from the
    checkpoint on resume). Each logged loss is the mean over the steps since the previous log; with a
    log at every checkpoint and at the last step (`RunProgress.on_step_end`) those windows tile the run."""
    total, previous = 0.0, 0
    for entry in sorted((e for e in log_history if "loss" in e), key=lambda e: e["step"]):
        total += entry["loss"] * (entry["step"] - previous)
        previous = entry["step"]
    return total / previous if previous else None


def whole_run_logs(logs: dict, seconds: float, steps: int, samples: int, tokens: int,
                   loss_mean: float | None) -> dict:
    """The Trainer's speed figures count only this process's part of a resumed run; these count all of it."""
    out = dict(logs)
    per_second = {"train_runtime": None, "train_tokens_per_second": tokens, "train_steps_per_second": steps,
                  "train_samples_per_second": samples}
    for key, count in per_second.items():
        if key in out and seconds > 0:
            out[key] = round(seconds, 4) if count is None else round(count / seconds, 3)
    if "train_loss" in out and loss_mean is not None:
        out["train_loss"] = loss_mean
    return out


class RunClock:
    """Training seconds of the whole run: those stored in the checkpoint it resumed from plus this
    process's. The time a killed run spent after its last checkpoint is not counted: that work was
    redone, and the adapter is what the counted steps produced."""

    def __init__(self, prior_seconds: float = 0.0):
        self.prior, self._start, self._stopped = prior_seconds, None, None

    def start(self) -> None:
        self._start, self._stopped = time.perf_counter(), None

    def stop(self) -> None:
        self._stopped = self.seconds()

    def seconds(self) -> float:
        if self._stopped is not None:
            return self._stopped
        return self.prior + (time.perf_counter() - self._start if self._start is not None else 0.0)


def truncate_live_curves(live_dir: str | Path, step: int) -> None:
    """Drop the curves' rows after `step`: a run killed after its checkpoint logged steps that the
    resumed run logs again, and the curves should show the run that made the adapter, once."""
    for tsv in Path(live_dir, "plots", "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines(keepends=True)
        header = lines[0].rstrip("\n").split("\t") if lines else []
        if "step" not in header:
            continue
        col = header.index("step")
        kept = [lines[0]] + [line for line in lines[1:] if line.strip() and float(line.split("\t")[col]) <= step]
        if len(kept) != len(lines):
            with atomic_path(tsv) as tmp:
                tmp.write_text("".join(kept))


def add_run_callbacks(trainer, progress: dict, live_dir: str | None, resumed_step: int) -> RunClock:
    """Checkpoint bookkeeping, whole-run accounting and the DVCLive curves, attached to a built trainer
    (so that Live, which clears its directory on a fresh run, starts only once the model has loaded)."""
    from transformers import TrainerCallback

    clock = RunClock(progress["train_seconds"])

    class RunProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()
            # TRL counts the logged num_tokens itself, from 0 in every process; the Trainer's
            # state.num_input_tokens_seen is restored from the checkpoint but counts differently.
            if resumed_step and progress.get("num_tokens") is not None and hasattr(trainer, "_total_train_tokens"):
                trainer._total_train_tokens = progress["num_tokens"]

        def on_step_end(self, args, state, control, **kwargs):
            # A log at every checkpoint and at the last step: the logged windows then tile the run (see
            # whole_run_loss_mean), and a resumed run logs the same windows as an uninterrupted one.
            if control.should_save or state.global_step >= state.max_steps:
                control.should_log = True

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not ckpt.is_dir():
                return
            try:
                mark_checkpoint_complete(ckpt, {"step": state.global_step, "train_seconds": clock.seconds(),
                                                "num_tokens": getattr(trainer, "_total_train_tokens", None)})
            except OSError as exc:
                shutil.rmtree(ckpt, ignore_errors=True)
                raise UserError(save_failed_message(
                    ckpt, exc, "training resumes from the last complete checkpoint")) from None

        def on_train_end(self, args, state, control, **kwargs):
            clock.stop()

    trainer.add_callback(RunProgress())
    if live_dir and trainer.is_world_process_zero():
        from dvclive import Live
        from transformers.integrations import DVCLiveCallback

        class StepAlignedDVCLive(DVCLiveCallback):
            """DVCLive counts its own steps from 0; plot against the optimizer step instead, so
            curves from resumed runs and runs with other logging_steps line up."""

            def on_log(self, args, state, control, model=None, logs=None, **kwargs):
                if state.is_world_process_zero and self.live is not None:
                    self.live.step = state.global_step
                samples = (state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
                           * args.world_size)
                loss_mean = whole_run_loss_mean(state.log_history) if "train_loss" in (logs or {}) else None
                logs = whole_run_logs(logs or {}, clock.seconds(), state.global_step, samples,
                                      state.num_input_tokens_seen, loss_mean)
                super().on_log(args, state, control, model=model, logs=logs, **kwargs)

        if resumed_step:
            truncate_live_curves(live_dir, resumed_step)
        live = Live(dir=live_dir, resume=bool(resumed_step), dvcyaml=None, save_dvc_exp=False, report=None)
        trainer.add_callback(StepAlignedDVCLive(live=live))
    return clock


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
    parser.add_argument("--metrics", required=True, help="JSON of the dev loss (the DVC metric)")
    parser.add_argument("--run-info", default=None, help="JSON of how it ran: losses, steps, time, tokens/s, peak memory")
    parser.add_argument("--live-dir", default=None, help="DVCLive directory for loss curves")
    parser.add_argument("--model-fingerprint", default=None,
                        help="the fingerprint stage's JSON of what model.name resolved to (else computed here); "
                             "a checkpoint of another model is not resumed")
    args = parser.parse_args(argv)

    model_p, prompt_p, train_p = load_params(args.params, "model", "prompt", "train")
    train_rows, dev_rows = read_jsonl(args.train_file), read_jsonl(args.dev_file)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    per_rank_batch(world_size, train_p.per_device_train_batch_size, train_p.gradient_accumulation_steps)  # fail early
    model_identity = read_model_identity(args.model_fingerprint, model_p)
    check_output_locations([
        ("--metrics", args.metrics, False, False),
        *([("--run-info", args.run_info, False, False)] if args.run_info else []),
        ("--output-dir", args.output_dir, True, False),
        ("--live-dir", args.live_dir, True, True),
        ("--resume-dir", args.resume_dir, True, True),
    ])
    # Rank 0 alone holds the lock: the ranks of one run share the directory. When a second launch's
    # rank 0 stops, the launcher stops its other ranks, which are waiting for rank 0 by then.
    is_main = int(os.environ.get("RANK", "0")) == 0
    with resume_dir_lock(args.resume_dir) if is_main else contextlib.nullcontext():
        run_training(args, model_p, prompt_p, train_p, train_rows, dev_rows, world_size, model_identity)


def read_model_identity(path: str | None, model_p: ModelParams) -> dict:
    """What model.name resolves to now: the fingerprint stage's file (dvc.yaml passes it), else hashed here."""
    if path is None:
        from stages.fingerprint import model_fingerprint

        return model_fingerprint(model_p.name, model_p.revision, cache={})
    try:
        identity = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--model-fingerprint {path}: cannot read it ({exc}); run `dvc repro`, whose fingerprint "
                        f"stage writes it") from None
    described = identity.get("name") if isinstance(identity, dict) else identity
    if described != model_p.name:
        raise UserError(f"--model-fingerprint {path}: it describes {described!r}, not model.name '{model_p.name}'; "
                        f"run `dvc repro`, whose fingerprint stage rewrites it")
    return identity


def run_training(args, model_p: ModelParams, prompt_p: PromptParams, train_p: TrainParams,
                 train_rows: list[dict], dev_rows: list[dict], world_size: int, model_identity: dict) -> None:
    from stages import memory
    from stages.modeling import load_config, load_tokenizer, process_state

    config = load_config(model_p.name, model_p.revision)
    memory.preflight_train(config.to_dict(), model_p, train_p)
    if train_p.lora_target_modules != "all-linear":
        check_target_modules(train_p.lora_target_modules, *model_module_names(config))

    import torch
    from datasets import Dataset

    tokenizer = load_tokenizer(model_p.name, model_p.revision)
    train_tok, n_cut = tokenize_rows(tokenizer, prompt_p, train_rows, train_p.max_length, args.train_file)
    dev_tok, n_cut_dev = tokenize_rows(tokenizer, prompt_p, dev_rows, train_p.max_length, args.dev_file)
    for split, cut, tokenized in (("train", n_cut, train_tok), ("dev", n_cut_dev, dev_tok)):
        if cut:
            print(f"train: {cut} of {len(tokenized)} {split} rows are longer than train.max_length={train_p.max_length} "
                  "and were cut (their answers lose their end, #### N included)")

    fp = fingerprint(model_p, prompt_p, train_p, [args.train_file, args.dev_file], model_identity)
    # Rank 0 first: it deletes checkpoints of another configuration before any rank looks.
    with process_state().main_process_first():
        resume_from = find_resume_checkpoint(args.resume_dir, fp)
    if resume_from:
        print(f"train: resuming from {resume_from}")
    resumed_step = int(resume_from.name.split("-")[-1]) if resume_from else 0
    progress = read_progress(resume_from)

    with library_progress_bars_off():
        trainer = build_trainer(model_p, train_p, tokenizer, Dataset.from_list(train_tok), Dataset.from_list(dev_tok),
                                args.resume_dir, world_size)
    show_losses_in_progress_bar(trainer)
    stop_on_non_finite(trainer, train_p.learning_rate, train_p.max_grad_norm)
    name_save_errors(trainer)
    clock = add_run_callbacks(trainer, progress, args.live_dir, resumed_step)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        dev_metrics = final_dev_metrics(trainer)
    except torch.OutOfMemoryError:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        raise UserError(memory.oom_message("train", config.to_dict(), model_p, train_p,
                                           peak_memory_bytes() or 0, total)) from None
    wall = time.perf_counter() - started
    kernels = train_p.resolved(torch.cuda.is_available(), model_p.bnb_4bit_compute_dtype)

    if not trainer.is_world_process_zero():
        return
    state = trainer.state
    train_seconds = max(clock.seconds(), 1e-9)  # stopped at the end of training, before the dev pass
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    loss_mean = whole_run_loss_mean(state.log_history)
    peak = peak_memory_bytes()
    metrics = {
        "train_loss": losses[-1] if losses else result.training_loss,
        "train_loss_mean": loss_mean if loss_mean is not None else result.training_loss,
        "dev_loss": dev_metrics["eval_loss"],
        "steps": state.global_step,
        "effective_batch": train_p.per_device_train_batch_size * train_p.gradient_accumulation_steps,
        # Whole run: the seconds before the checkpoint it resumed from, plus this process's.
        "runtime_s": round(progress["train_seconds"] + wall, 2),
        "seconds_per_step": round(train_seconds / max(state.global_step, 1), 4),
        "train_tokens": state.num_input_tokens_seen,
        "train_tokens_per_second": round(state.num_input_tokens_seen / train_seconds, 1),
        "peak_memory_gib": round(peak / 2**30, 3) if peak is not None else None,
        "resumed_from_step": resumed_step,
        "world_size": world_size,
        # What train.torch_compile / use_liger_kernel "auto" chose on this machine (Liger runs on CUDA only).
        "torch_compile": kernels.torch_compile,
        "use_liger_kernel": kernels.use_liger_kernel and torch.cuda.is_available(),
        "rows_cut_at_max_length": {"train": n_cut, "dev": n_cut_dev},
    }
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:  # the checks during training should have stopped it; never report such a run
        raise UserError(non_finite_message(bad[0].replace("_", " "), metrics[bad[0]], state.global_step,
                                           train_p.learning_rate, train_p.max_grad_norm))
    then = f"the checkpoints in {args.resume_dir} are kept: the next run resumes from the last one"
    try:
        with atomic_path(args.output_dir) as tmp:
            trainer.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            canonicalize_adapter_config(tmp)
    except Exception as exc:
        if not is_write_error(exc):
            raise
        raise UserError(save_failed_message(args.output_dir, exc, then)) from None
    # The metric holds the dev loss only: `dvc exp show` puts every metric in a column, the run's facts
    # (time, speed, memory) differ between any two runs, and the training loss (a mean over the last
    # logging window, noisy) is what the curves and the run-info file are for.
    dev_only = {"dev_loss": metrics["dev_loss"]}
    written = [(args.run_info, metrics)] if args.run_info else []
    try:
        for path, content in written + [(args.metrics, dev_only)]:  # the metric last: it says "done"
            write_json(path, content)
    except OSError as exc:
        # A new adapter next to the old metrics would be reported as the old result.
        shutil.rmtree(args.output_dir, ignore_errors=True)
        for path, _ in written:
            Path(path).unlink(missing_ok=True)
        raise UserError(save_failed_message(path, exc, then)) from None
    # The adapter is saved; the intermediate checkpoints would only take disk.
    shutil.rmtree(args.resume_dir, ignore_errors=True)
    print(summary_line(metrics, train_seconds, args.output_dir))


def summary_line(metrics: dict, train_seconds: float, output_dir: str) -> str:
    """The stage's last line, from the run-info figures (which keep the full precision):
    `train: 28 steps in 57.9 s (1,170 train tokens/s), train loss 6.269, dev loss 6.253 -> checkpoints/sft_lora`."""
    steps = metrics["steps"]
    resumed = f" (resumed from step {metrics['resumed_from_step']})" if metrics["resumed_from_step"] else ""
    facts = [f"{metrics['train_tokens_per_second']:,.0f} train tokens/s"]
    if metrics["world_size"] > 1:
        facts.append(f"{metrics['world_size']} processes")
    if metrics["peak_memory_gib"] is not None:
        facts.append(f"peak GPU memory {metrics['peak_memory_gib']:.1f} GiB")
    return (f"train: {steps} step{'' if steps == 1 else 's'}{resumed} in {train_seconds:.1f} s ({', '.join(facts)}), "
            f"train loss {metrics['train_loss']:.4g}, dev loss {metrics['dev_loss']:.4g} -> {output_dir}")


@contextlib.contextmanager
def library_progress_bars_off():
    """No progress bars from the libraries while the trainer is built: transformers' "Loading weights"
    (seconds) and datasets' "Building labels for train dataset" (TRL's pass over rows that arrive
    tokenized), so that the training bar is the stage's one bar. A download from the Hub keeps its bar
    (huggingface_hub's own); an explicit HF_DATASETS_DISABLE_PROGRESS_BARS keeps the user's choice."""
    import datasets.utils
    from transformers.utils import logging as hf_logging

    datasets_bars = (not datasets.utils.are_progress_bars_disabled()
                     and os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") is None)
    if datasets_bars:
        datasets.utils.disable_progress_bars()
    hook = hf_logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(hook)
        if datasets_bars:
            datasets.utils.enable_progress_bars()


def show_losses_in_progress_bar(trainer) -> None:
    """The Trainer's one progress bar, with the latest training and dev loss as its postfix.

    transformers' ProgressCallback writes each log dict as a line under the bar (`{'loss': '6.261',
    'grad_norm': ...}`, a dozen keys at every logging step) and draws a second bar for each dev pass;
    the curves (DVCLive) and the run-info file keep every logged value already. This replaces it with
    a subclass that does neither; the logs themselves are untouched (ProgressCallback only read them).
    Under disable_tqdm the Trainer prints the dicts instead (PrinterCallback): then neither shows."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class LossInProgressBar(ProgressCallback):
        def __init__(self):
            super().__init__()
            self.postfix: dict[str, str] = {}

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            pass  # a dev pass takes seconds; a bar of its own would break the training bar's line

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or self.training_bar is None:
                return  # the final trainer.evaluate() runs after the bar is closed: its loss is in the summary
            for key, name in (("loss", "loss"), ("eval_loss", "dev_loss")):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)):
                    self.postfix[name] = f"{value:.4g}"
            if self.postfix:
                self.training_bar.set_postfix(self.postfix)

    with_bar = not trainer.args.disable_tqdm
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if with_bar:
        trainer.add_callback(LossInProgressBar())


def final_dev_metrics(trainer) -> dict:
    """The dev loss after the last step: the Trainer's own pass when its eval_steps fell on the last
    step (evaluating again would log that step twice in the dev-loss curve), else one more pass."""
    state = trainer.state
    last = next((e for e in reversed(state.log_history) if "eval_loss" in e), None)
    if last is not None and last.get("step") == state.global_step:
        return {"eval_loss": last["eval_loss"]}
    return trainer.evaluate()


def build_trainer(model_p: ModelParams, train_p: TrainParams, tokenizer, train_ds, dev_ds, output_dir: str,
                  world_size: int = 1, callbacks=None, **sft_overrides):
    """The SFTTrainer of this project: 4-bit base + LoRA, loss on answer tokens. Benchmarks call it too."""
    import torch
    from trl import SFTTrainer

    from stages.modeling import load_model

    train_p = train_p.resolved(torch.cuda.is_available(), model_p.bnb_4bit_compute_dtype)
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
    if model_p.bnb_4bit_compute_dtype == "float16":
        fp32_master_weights(trainer.model)
    trainer.add_callback(keep_trainable_dtypes(trainer.model))
    if train_p.torch_compile:
        n = compile_decoder_layers(trainer.model, cuda_graphs=train_p.cuda_graphs,
                                   checkpointing=train_p.gradient_checkpointing)
        # Else the first step's silence (one compilation: 18-22 s for the 8B shape, bench runs 18-19) reads as a hang.
        print(f"train: train.torch_compile: compiling the {n} decoder layers as one; the first step takes "
              "longer (train.torch_compile: false turns it off)")
    dev_loss_per_answer_token(trainer)
    if train_p.cuda_graphs:
        evaluate_eagerly(trainer)
    if train_p.padding_free:
        train_without_cudnn_attention(trainer)
    return trainer


def train_without_cudnn_attention(trainer) -> None:
    """A padding-free micro-batch is one packed sequence whose length changes every step, and PyTorch's
    cuDNN attention backend builds an execution plan for every new length: ~65 ms forward + ~72 ms
    backward of host time on the H200, ~140 ms of a 0.9 s step (benchmarks/results/
    diagnose_run15_nvidia-h200.md). The memory-efficient kernel needs no plan: with cuDNN left out,
    padding-free training ran 1.25x faster (2,043 -> 2,563 tokens/s, Llama-3.1-8B shape), same peak
    memory, per-step losses within 4e-4. The backend choice is process-wide, so it holds only while
    train() runs (the dev passes inside it included)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    train = trainer.train
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def train_without_cudnn(*args, **kwargs):
        with sdpa_kernel(backends):
            return train(*args, **kwargs)

    trainer.train = train_without_cudnn


def dev_loss_per_answer_token(trainer) -> None:
    """eval_loss (the dev_loss metric, the dev-loss curve, the non-finite check) becomes the loss per answer
    token over all dev rows: the sum of their answer tokens' losses over the number of those tokens, the
    normalisation of the training loss, so that it no longer depends on how the rows are batched.

    The Trainer averages one loss per batch, each batch's own token mean: the mean of per-row means at the
    card's batch 1, of 8-row means padding-free (one packed row per batch), of 4-row means on 2 GPUs, where
    a partial last batch weighs as much as a full one (7.0277 / 7.0340 / 7.0278 for one model and 12 rows).
    In eval, TRL's loss is a batch's summed token losses over its count of scored labels (compute_loss gets
    no num_items_in_batch there), so loss × count gives the sum back; the sums and counts add up over
    batches and processes. Unlike the Trainer's mean, which drops non-finite batch losses
    (logging_nan_inf_filter), a NaN in any batch makes the dev loss NaN, for stop_on_non_finite to see."""
    import torch

    predict, loop = trainer.prediction_step, trainer.evaluation_loop
    totals = {}

    def counted_prediction_step(model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = predict(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        if loss is not None and "labels" in inputs:
            # The positions TRL's fused LM head scores: the next-token labels (pre-shifted ones as they are).
            # A padding-free batch has -100 at each packed row's first token: nothing scores across rows.
            scored = inputs["shift_labels"] if "shift_labels" in inputs else inputs["labels"][..., 1:]
            count = (scored != -100).sum().to(totals["sum_count"].device, torch.float64)
            totals["sum_count"] += torch.stack([loss.detach().to(count) * count, count])
        return loss, logits, labels

    def token_weighted_evaluation_loop(dataloader, description, prediction_loss_only=None, ignore_keys=None,
                                       metric_key_prefix="eval"):
        totals["sum_count"] = torch.zeros(2, dtype=torch.float64, device=trainer.args.device)
        output = loop(dataloader, description, prediction_loss_only=prediction_loss_only, ignore_keys=ignore_keys,
                      metric_key_prefix=metric_key_prefix)
        loss_sum, count = trainer.accelerator.reduce(totals.pop("sum_count"), reduction="sum").tolist()
        key = f"{metric_key_prefix}_loss"
        if key in output.metrics and count > 0:
            output.metrics[key] = loss_sum / count
        return output

    trainer.prediction_step = counted_prediction_step
    trainer.evaluation_loop = token_weighted_evaluation_loop
    if trainer.args.world_size > 1 and trainer.eval_dataset is not None:
        pad_dev_rows_for_ranks(trainer)


def pad_dev_rows_for_ranks(trainer) -> None:
    """Under N processes, accelerate fills the last dev batches with rows from the start of the dev set
    (even_batches: every rank must run as many batches), and those rows would count twice in the dev loss.
    Rows without a scored token are appended instead, up to a multiple of micro-batch × N, so that no
    batch needs filling: they add 0 to the loss sum and to the token count. Two tokens each (the first
    row's first two), all labels -100; appended to the prepared set, since TRL's preparation drops rows
    with no label left (on the padded path)."""
    from datasets import Dataset, concatenate_datasets

    ds = trainer.eval_dataset
    missing = -len(ds) % (trainer.args.eval_batch_size * trainer.args.world_size)
    if missing:
        tokens = ds[0]["input_ids"][:2]
        pads = Dataset.from_dict({"input_ids": [tokens] * missing, "labels": [[-100] * len(tokens)] * missing},
                                 features=ds.features)
        trainer.eval_dataset = concatenate_datasets([ds, pads])


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


def compile_decoder_layers(model, cuda_graphs: bool = False, checkpointing: bool = False) -> int:
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
    elif checkpointing:  # (the Trainer turns checkpointing on in the layers only when train() starts)
        for layer in layers:
            recomputable_4bit_matmuls(layer)
    for layer in layers:
        layer.compile(dynamic=True, options=options)
    return len(layers)


def recomputable_4bit_matmuls(module) -> int:
    """Inside a compiled, checkpointed layer, each 4-bit projection becomes dequantize + F.linear.

    bitsandbytes' own 4-bit matmul is an autograd.Function around its fused gemm_4bit kernel, and
    the compiled layer's backward kept that kernel's outputs instead of recomputing them as
    checkpointing does: 224 gemm_4bit calls per step instead of 448, +5.3 GiB for the 8B model
    (benchmarks/results/diagnose_run15_nvidia-h200.md). Written as bitsandbytes' dequantize op and a
    plain linear, the whole projection is ops the checkpointed region recomputes, and the backward
    (grad @ W, W dequantized again) is what MatMul4Bit's backward computes. Same values: the
    dequantized weight is what gemm_4bit multiplies with (tests/test_compiled_4bit.py)."""
    import bitsandbytes as bnb

    count = 0
    for sub in module.modules():
        if isinstance(sub, bnb.nn.Linear4bit):
            sub.forward = _dequantize_linear_forward.__get__(sub)
            count += 1
    return count


def _dequantize_linear_forward(self, x):
    import bitsandbytes.functional as bnb_functional
    import torch.nn.functional as F

    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    weight = bnb_functional.dequantize_4bit(self.weight.data, self.weight.quant_state).to(x.dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.linear(x, weight, bias).to(inp_dtype)


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


def fp32_master_weights(model) -> None:
    """fp16 cards (T4, V100: no bf16) train under fp16 autocast with a GradScaler, which unscales
    float32 gradients only ("_amp_foreach_non_finite_check_and_unscale_cuda" not implemented for
    BFloat16, measured on the H200), and TRL casts a QLoRA adapter to bf16 whatever the compute dtype.
    The trainable weights go back to float32, the usual master copy of mixed-precision training;
    the matmuls still run in fp16 under autocast."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


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
