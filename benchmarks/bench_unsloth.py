"""python benchmarks/bench_unsloth.py --workdir MODEL_DIR --rows ROWS.json --out PEER.json --steps 24 --warmup 8

The peer: Unsloth's QLoRA on the benchmark's random model and rows, timed like bench.py times its own paths.
bench.py writes the rows (token ids + completion masks, in step order) to ROWS.json and starts this script in
a process of its own with PYTHONPATH set to `--unsloth-site` alone, because Unsloth 2026.10.9 pins
transformers <= 5.17, trl <= 1.15 and datasets < 5 (the main process runs transformers 5.23): see
benchmarks/unsloth_wheels.sh for what that site holds. Then it merges PEER.json as the train variant
"unsloth" ("unsloth+dropout0": LoRA dropout 0, with which Unsloth patches its fused LoRA kernels).

Unsloth's recipe, as its docs give it: `FastLanguageModel.from_pretrained(load_in_4bit=True)` (NF4, double
quantisation, bf16), `FastLanguageModel.get_peft_model` (r=32, alpha 16, the 7 Llama projections,
`use_gradient_checkpointing="unsloth"`), padding-free batches: the 8 rows of an optimizer step in one
sequence (batch 1, no attention mask) with position ids that restart at each row. Attention stays within
each row: in Unsloth 2026.10.9 the attention reads row boundaries from a `packed_seq_lengths` kwarg, which
its SFTTrainer's padding-free collator adds (unsloth/utils/packing.py, enable_padding_free_metadata), and
when that kwarg is absent, LlamaModel_fast_forward derives it from the restarting position ids (batch 1,
no mask, no KV cache, no context parallelism: unsloth/models/llama.py, "TRL padding-free DPO sends reset
position_ids only") and passes it to every layer. Each layer then runs varlen attention: flash-attn's
varlen kernel if installed, else SDPA per row (torch varlen, per-segment SDPA or a block-diagonal mask).
What the derived lengths do not reach is the CausalLM forward's guard that masks each row's first label
(mask_packed_boundary_labels); packed_step masks it already (each row's BOS is prompt, label -100). The
loop is a plain one (the optimizer, schedule and clipping of bench.py's plain loop) rather than trl's
SFTTrainer, so that the rows and their order are exactly bench.py's and nothing of trl 1.15's data
preparation is timed; the kernels (its LoRA MLP/QKV/O, RoPE, RMSNorm, fused cross-entropy, offloaded
checkpointing) all sit in the model and run the same either way. Losses differ from ours by kernel numerics
and LoRA init: reported, not gated.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: what differs from bench.py's settings
PEER_VARIANTS = {"unsloth": {}, "unsloth+dropout0": {"lora_dropout": 0.0}}
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCRIPT = Path(__file__).resolve()
# Unsloth asks the Hub for statistics and model-name mappings, and writes compiled modules to the
# working directory, unless told otherwise; the GPU machine has no network.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "UNSLOTH_DISABLE_STATISTICS": "1", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------ the main process's side

def packed_step(rows: list[dict]) -> dict:
    """The rows of one optimizer step as one padding-free sequence: ids, per-row positions, and labels
    with -100 on each row's prompt (whose first token is BOS, so no label crosses a row boundary)."""
    ids, positions, labels = [], [], []
    for row in rows:
        ids += row["input_ids"]
        positions += list(range(len(row["input_ids"])))
        labels += [t if m else -100 for t, m in zip(row["input_ids"], row["completion_mask"])]
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def peer_command(site: str, workdir: str, rows_path: str, out_path: str, settings: dict) -> tuple[list, dict]:
    """argv and environment of the peer's process: PYTHONPATH is the peer's site alone, so that its
    transformers/trl/datasets (and the host's, below it) are the ones it imports, not the main site's."""
    argv = [sys.executable, str(SCRIPT), "--workdir", workdir, "--rows", rows_path, "--out", out_path]
    for key, value in settings.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OFFLINE_ENV, PYTHONPATH=site, PYTHONUNBUFFERED="1")
    return argv, env


def run_peer(site: str, workdir: str, rows: list[dict], settings: dict, timeout_s: float) -> dict:
    """Write the rows, run the peer, return its figures; a failure raises with one line that says why."""
    if not Path(site).is_dir():
        raise RuntimeError(f"--unsloth-site {site} is not a directory (install: see benchmarks/unsloth_wheels.sh)")
    with tempfile.TemporaryDirectory(prefix="bench-unsloth-") as tmp:
        rows_path, out_path = Path(tmp) / "rows.json", Path(tmp) / "peer.json"
        rows_path.write_text(json.dumps(rows))
        argv, env = peer_command(site, str(Path(workdir).resolve()), str(rows_path), str(out_path), settings)
        # Its own working directory: Unsloth writes unsloth_compiled_cache/ there.
        proc = subprocess.run(argv, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout_s)
        sys.stdout.write(proc.stdout[-6000:])
        if proc.returncode != 0 or not out_path.is_file():
            lines = [line for line in proc.stdout.splitlines() if line.startswith("bench_unsloth: ")]
            last = lines[-1] if lines else (proc.stdout.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"exit {proc.returncode}: {last}"[:500])
        return json.loads(out_path.read_text())


def compare_with(reference: dict, figures: dict) -> dict:
    """Per-step relative loss differences of the peer against one of our paths (reported, not gated)."""
    pairs = list(zip(figures.get("losses", []), reference.get("losses", [])))
    rel = [round(abs(a - b) / abs(b), 5) for a, b in pairs if b]
    return {"loss_rel_diff_per_step": rel, "max_loss_rel_diff": max(rel) if rel else None}


# ------------------------------------------------------------------------------------ the peer's process

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="bench.py's model directory (config, safetensors, tokenizer)")
    p.add_argument("--rows", required=True, help="JSON list of rows {input_ids, completion_mask}, in step order")
    p.add_argument("--out", required=True, help="where the figures go (JSON)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True, help="first steps left out of timing")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lr-scheduler-type", default="cosine")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--max-grad-norm", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup must be in [0, --steps): got {args.warmup} for {args.steps} steps")
    return args


def import_unsloth():
    """`import unsloth` first, as it asks (it patches transformers, peft and trl on import); one line on failure."""
    try:
        import unsloth
        from unsloth import FastLanguageModel
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign package's import is one line
        where = os.environ.get("PYTHONPATH", "")
        first = (str(exc).strip().splitlines() or [""])[0]
        sys.exit(f"bench_unsloth: unsloth does not import from PYTHONPATH={where}: {type(exc).__name__}: {first}")
    if getattr(unsloth, "_IS_CPU_BACKEND", False) and os.environ.get("BENCH_UNSLOTH_ALLOW_CPU") != "1":
        sys.exit("bench_unsloth: unsloth found no GPU and chose its CPU backend; this peer is for a CUDA GPU")
    return unsloth, FastLanguageModel


def train_peer(args, rows: list[dict]) -> dict:
    _, FastLanguageModel = import_unsloth()  # before torch, transformers, peft and bitsandbytes, as Unsloth asks
    import bitsandbytes as bnb
    import torch
    from transformers import get_scheduler

    from bench_device import peak_memory, sync
    from bench_train import step_rows, timing_summary

    on_gpu = torch.cuda.is_available()
    started = time.perf_counter()
    longest = max(sum(len(r["input_ids"]) for r in step_rows(rows, k)) for k in range(args.steps))
    model, _ = FastLanguageModel.from_pretrained(
        model_name=args.workdir, max_seq_length=2 ** math.ceil(math.log2(longest)), dtype=torch.bfloat16,
        load_in_4bit=on_gpu, fix_tokenizer=False)
    model = FastLanguageModel.get_peft_model(
        model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=list(LLAMA_PROJECTIONS), bias="none", use_gradient_checkpointing="unsloth",
        random_state=args.seed)
    load_s = time.perf_counter() - started
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = (bnb.optim.PagedAdamW8bit if on_gpu else torch.optim.AdamW)(
        trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=math.ceil(args.steps * args.warmup_ratio), num_training_steps=args.steps)
    device = next(p for p in model.parameters() if p.requires_grad).device
    model.train()
    losses, grad_norms, step_ends = [], [], []
    sync()
    start = time.perf_counter()
    for step in range(args.steps):
        batch = {k: torch.tensor([v], device=device) for k, v in packed_step(step_rows(rows, step)).items()}
        # batch 1, no attention mask, position ids that restart per row: Unsloth's padding-free input.
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
        out.loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        sync()
        step_ends.append(time.perf_counter())
    figures = {"losses": losses, "grad_norms": grad_norms, "load_seconds": round(load_s, 1),
               "allocated_at_start_gib": 0.0,  # a process of its own: nothing of the other variants' memory
               "lora_matrices": sum("lora_A" in n for n, _ in model.named_parameters()),
               "trainable_parameters": sum(p.numel() for p in trainable),
               **timing_summary(step_ends, start, rows, args.warmup), **peak_memory(),
               "versions": peer_versions(), "recipe": {
                   "load_in_4bit": on_gpu, "use_gradient_checkpointing": "unsloth", "batching": "padding-free",
                   "target_modules": list(LLAMA_PROJECTIONS), "lora_dropout": args.lora_dropout,
                   "loop": "plain (PagedAdamW8bit, the plain recipe's schedule and clipping)"}}
    return figures


def peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("unsloth", "unsloth_zoo", "transformers", "trl", "peft", "bitsandbytes", "torch", "datasets",
                 "xformers", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    sys.path.insert(0, str(SCRIPT.parent))  # bench_device, bench_train
    rows = json.loads(Path(args.rows).read_text())
    from bench_model import EFFECTIVE_BATCH

    if len(rows) < args.steps * EFFECTIVE_BATCH:
        sys.exit(f"bench_unsloth: {args.rows} has {len(rows)} rows, {args.steps} steps need "
                 f"{args.steps * EFFECTIVE_BATCH}")
    figures = train_peer(args, rows)
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(figures))
    tmp.replace(out)
    print(f"bench_unsloth: {figures.get('train_tokens_per_second')} tokens/s, "
          f"peak {figures.get('peak_allocated_gib')} GiB, losses {[round(x, 4) for x in figures['losses']]}")


if __name__ == "__main__":
    main()
