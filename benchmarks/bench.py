"""python benchmarks/bench.py [--layers 32] [--sections train,eval] [--unsloth-site DIR] [--out benchmarks/results/bench_<gpu>.json]

One run that times the plain QLoRA recipe against this project's own code paths and against Unsloth, on a
model of a real architecture (Llama-3.1-8B shape by default; `--layers N` for quick runs) built from its
config with random weights (bench_model.py), on token sequences of GSM8K's length distribution:

- train: the plain recipe (NF4 + double quant + bf16 compute, `prepare_model_for_kbit_training`,
  non-reentrant gradient checkpointing, LoRA r=32/alpha 16/dropout 0.05 on all linear layers,
  `bnb.optim.PagedAdamW8bit`, batch 1 × accumulation 8, a plain PyTorch loop) against
  `stages.train.build_trainer` with the project's settings: "padding_free" (the 8 rows of a step
  in one micro-batch), "card" (batch 1 × accumulation 8), each also with Liger's kernels ("+liger")
  or regional torch.compile ("+compile", train.torch_compile; "-checkpointing": without gradient
  checkpointing). Every path reads
  the same rows in the same order from the same LoRA init, so their per-step losses must agree
  (see `bench_report.loss_agreement`): a faster path that trains something else does not count
  (bench_train.py). The peer, "unsloth" (and "unsloth+dropout0"), is Unsloth's QLoRA on the same model
  directory and rows in a process of its own over `--unsloth-site` (bench_unsloth.py); its losses are
  reported beside ours, not gated (other kernels, another LoRA init).
- eval: plain 4-bit `generate` (batch 64) against `stages.evaluate.load_for_generation` +
  `stages.evaluate.generate` unchanged, as `evaluate` runs a fine-tuned model (the base with a LoRA
  adapter, r=32 on all linear layers, random, unmerged: bench_model.build_adapter_dir, built once per
  model directory), on GSM8K-test-length prompts × 256 new tokens:
  "static_b128"/"static_b256" (the project's engine, stages/decode.py, on the dequantized model),
  "generate_b256"/"generate_b128" (transformers' generate on the same model) and "4bit_b64". The
  static ones run the whole 1,319-prompt split; the others run one or two batches (after a warm-up)
  and are extrapolated to the split's batch count ("extrapolated": true): the 4-bit ones take ~9
  minutes each for the whole split. Where static_b256 and generate_b256 decoded the same prompts,
  "engine_agreement" says how many completions are identical (bf16 near-ties may differ) (bench_eval.py).

Writes one JSON (GPU, versions, every figure, ratios, goal checks: bench_report.py) after every variant, so a run
cut short keeps what it measured, and prints a markdown table at the end. A variant whose time
estimate no longer fits `--time-budget-s` is skipped and recorded as such (run it alone later with
`--merge`). `--tiny` runs everything on CPU with a 2-layer model in ~15 s (tests/test_bench.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling files, when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import stages`

from stages.io import write_json  # noqa: E402  (light imports only, here and in the siblings)

from bench_device import (free_memory, gpu_name, peak_memory, quiet_libraries, release, reset_peak,  # noqa: E402
                          slug, versions)
from bench_eval import (EVAL_VARIANTS, auto_batch, engine_agreement, engine_checks, eval_baseline, eval_project,  # noqa: E402
                        load_project_model)
from bench_model import (ANSWER_LENGTHS, EFFECTIVE_BATCH, EVAL_ADAPTER, EVAL_LENGTHS, GSM8K_TEST_SIZE,  # noqa: E402
                         TRAIN_LENGTHS, bench_shape, build_adapter_dir, build_model_dir, default_workdir,
                         existing_shape_matches, make_answer_lengths, make_eval_prompts, make_train_rows)
from bench_report import loss_agreement, markdown_table, ratios_and_goals, steady_state  # noqa: E402
from bench_train import TRAIN_VARIANTS, train_baseline, train_project, undo_module_patches  # noqa: E402
from bench_unsloth import PEER_VARIANTS, compare_with, run_peer  # noqa: E402


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
                                  "gen_bf16_step", "gen_static_step", "compile", "peer_start")}
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
        "peer_start": 90.0,                # `import unsloth` (patches, compiled modules) in a fresh process
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default: the shape's, 32)")
    p.add_argument("--tiny", action="store_true", help="CPU test mode: 2-layer hidden-64 Llama, vocab 512")
    p.add_argument("--sections", default="train,eval", help="comma list of: train, eval")
    p.add_argument("--train-variants", default=",".join(TRAIN_VARIANTS),
                   help=f"variants to train after the plain recipe, in this order: {', '.join(TRAIN_VARIANTS)}, "
                        f"and the peer's {', '.join(PEER_VARIANTS)} (which need --unsloth-site)")
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
                        "extrapolated; the whole split takes ~9 min each; 0 leaves the plain baseline out)")
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
    p.add_argument("--unsloth-site", default=None,
                   help="site directory with Unsloth and its pins (benchmarks/unsloth_wheels.sh); the peer's variants "
                        "run in a process of their own with PYTHONPATH set to it alone")
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
    unknown = {v for v in args.train_variants.split(",") if v} - set(TRAIN_VARIANTS) - set(PEER_VARIANTS) | \
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
        for key, value in peak_memory().items():
            figures.setdefault(key, value)  # a peer's process measured its own
    except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others
        traceback.print_exc()
        first_line = (str(exc).strip().splitlines() or [""])[0]
        figures = {"error": f"{type(exc).__name__}: {first_line}"[:500]}
    figures["section_seconds"] = round(time.perf_counter() - started, 1)
    # With --merge a file holds variants of several invocations: each says which one measured it, so that a
    # ratio is only taken between variants of one run (bench_report: the goals compare within one).
    figures["command"] = results["command"]
    if resident is not None:
        figures.setdefault("allocated_at_start_gib", round(resident, 3))  # > 0 on a fresh load means a leak
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
        "lengths": {"train": TRAIN_LENGTHS, "eval": EVAL_LENGTHS, "answers": ANSWER_LENGTHS, "scale": args.length_scale,
                    "seed": args.seed},
        "settings": {
            "train_steps": args.train_steps, "warmup_steps_untimed": args.warmup_steps,
            "effective_batch": EFFECTIVE_BATCH, "loss_rtol": args.loss_rtol,
            "lora": {"r": 32, "alpha": 16, "dropout": args.lora_dropout, "targets": "all-linear"},
            "new_tokens": args.new_tokens, "full_split": GSM8K_TEST_SIZE,
            "eval_prompts": {"4bit": args.eval_baseline_prompts, "generate": args.eval_dequant_prompts,
                             "static": args.eval_prompts},
            "unsloth_site": args.unsloth_site,
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
        # evaluate.batch_size: auto, sized from the free memory once the model is loaded (440 for the plan)
        "static_auto": (static, large * 2 if not args.tiny else large, "static", "dequant"),
        "static_auto_sdpa": (static, large * 2 if not args.tiny else large, "static", "dequant"),
        # answers ending at GSM8K-like lengths (bench_model.make_answer_lengths): rows take the next questions
        "static_auto_answers": (static, large * 2 if not args.tiny else large, "static", "dequant"),
        "static_b256_answers": (static, large, "static", "dequant"),
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
        return ["baseline"] + [v for v in args.train_variants.split(",") if v in TRAIN_VARIANTS or v in PEER_VARIANTS]
    # The plain recipe's baseline always, unless --eval-baseline-prompts 0 leaves it out.
    return [v for v in EVAL_VARIANTS if (v == "baseline_4bit_b64" and args.eval_baseline_prompts != 0)
            or v in args.eval_variants.split(",")]


def time_plan(args, est: dict, build_needed: bool) -> dict:
    """Estimated seconds of every piece of the run, in the order it runs."""
    plan = {"build": est["build"] if build_needed else 0.0}
    for name in wanted_variants(args, "train"):
        if name in PEER_VARIANTS:  # a new process: its imports and patching, then a padding-free loop
            plan[f"train/{name}"] = est["peer_start"] + est["load"] + args.train_steps * est["train_pf_step"]
            continue
        padding_free = name != "baseline" and TRAIN_VARIANTS[name]["padding_free"]
        compiled = name != "baseline" and TRAIN_VARIANTS[name].get("torch_compile", False) is not False
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


def train_section(args, results, out, clock, plan, shape, workdir) -> None:
    from stages.config import TrainParams

    lora = {"r": 32, "alpha": 16, "dropout": args.lora_dropout}
    # The project's settings (params.yaml's train section) with the benchmark's step count and LoRA;
    # Liger and compilation off, as each variant says whether it uses them ("default": as committed).
    train_p = TrainParams(lora_r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                          lora_target_modules="all-linear", max_steps=args.train_steps, seed=args.seed,
                          use_liger_kernel=False, torch_compile=False)
    rows = make_train_rows(args.train_steps * EFFECTIVE_BATCH, shape["vocab_size"], args.seed, args.length_scale)
    state = {}

    def baseline():
        figures, state["lora_a"], state["lora_b"] = train_baseline(str(workdir), rows, args.train_steps,
                                                                   args.warmup_steps, lora, train_p, args.seed)
        return figures

    base = None
    for name in wanted_variants(args, "train"):
        why = clock.admit(f"train/{name}", plan[f"train/{name}"])
        if not why and TRAIN_VARIANTS.get(name, {}).get("use_liger_kernel") is True and not importlib.util.find_spec(
                "liger_kernel"):
            why = "skipped: liger_kernel is not installed"
        if why:
            skip(results, "train", name, out, why)
            continue
        if name == "baseline":
            base = run_variant(results, "train", name, out, baseline)
            continue
        if name in PEER_VARIANTS:
            peer_variant(args, results, out, clock, name, rows, train_p, workdir, base)
            continue
        params = dataclasses.replace(train_p, **TRAIN_VARIANTS[name])

        def project(params=params):
            try:
                with undo_module_patches():
                    return train_project(str(workdir), rows, args.train_steps, args.warmup_steps, params,
                                         args.seed, state.get("lora_a"), reference_lora_b=state.get("lora_b"))
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
    compare_peers_with_ours(results)
    save(results, out)


def peer_variant(args, results, out, clock, name, rows, train_p, workdir, base) -> None:
    """Unsloth in its own process (bench_unsloth.py) on the same model directory and rows; its losses are
    compared with the plain loop's and with our default path's, and reported, not gated."""
    if not args.unsloth_site:
        skip(results, "train", name, out, "skipped: needs --unsloth-site (see benchmarks/unsloth_wheels.sh)")
        return
    settings = dict(steps=args.train_steps, warmup=args.warmup_steps, lora_r=train_p.lora_r,
                    lora_alpha=train_p.lora_alpha, lora_dropout=train_p.lora_dropout,
                    learning_rate=train_p.learning_rate, weight_decay=train_p.weight_decay,
                    lr_scheduler_type=train_p.lr_scheduler_type, warmup_ratio=train_p.warmup_ratio,
                    max_grad_norm=train_p.max_grad_norm, seed=args.seed)
    settings.update(PEER_VARIANTS[name])
    timeout_s = max(clock.budget - clock.elapsed(), 120.0)
    figures = run_variant(results, "train", name, out, lambda: run_peer(
        args.unsloth_site, str(workdir), rows[:args.train_steps * EFFECTIVE_BATCH], settings, timeout_s))
    if "losses" not in figures:
        return
    if base and "losses" in base:
        agreement = loss_agreement(base, figures, args.warmup_steps, args.loss_rtol)
        figures.update({k: v for k, v in agreement.items() if not k.startswith("loss_check")})
        save(results, out)


def compare_peers_with_ours(results: dict) -> None:
    """Once every variant ran (the peer may run before ours): its losses against our default path's."""
    train = results.get("train", {})
    ours = next((n for n in ("default", "padding_free+liger", "padding_free") if "losses" in train.get(n, {})), None)
    for name in PEER_VARIANTS:
        if ours and "losses" in train.get(name, {}):
            train[name]["loss_vs_ours"] = {"ours": ours, **compare_with(train[ours], train[name])}


def eval_section(args, results, out, clock, plan, shape, workdir) -> None:
    prompts = make_eval_prompts(GSM8K_TEST_SIZE, shape["vocab_size"], args.seed, args.length_scale)
    loaded, texts = {}, {}
    wanted = wanted_variants(args, "eval")
    if any(eval_plan(args)[name][3] != "plain" for name in wanted):
        # What `evaluate` loads for a fine-tuned model; the plain recipe's baseline stays adapter-free.
        results["build_adapter"] = build_adapter_dir(workdir, args.seed)
        print(f"build_adapter: {results['build_adapter']}", flush=True)
    adapter = results.get("build_adapter", {}).get("path")
    for name in wanted:
        n, batch, engine, kind = eval_plan(args)[name]
        if loaded.get("kind") != kind:
            release(loaded)
        why = clock.admit(f"eval/{name}", plan[f"eval/{name}"])
        if why:
            skip(results, "eval", name, out, why)
            continue

        def fn(name=name, n=n, batch=batch, engine=engine, kind=kind):
            import stages.decode

            if kind == "plain":
                return eval_baseline(str(workdir), prompts[:n], batch, args.new_tokens, GSM8K_TEST_SIZE)
            if not loaded:
                model, tokenizer = load_project_model(str(workdir), dequantize=kind == "dequant", adapter=adapter)
                loaded.update(kind=kind, model=model, tokenizer=tokenizer)
            if name.startswith("static_auto"):
                batch = auto_batch(str(workdir), loaded["model"], prompts[:n], args.new_tokens, n) if not args.tiny \
                    else batch
            # static_auto_sdpa: the decoding steps' attention as before the fused kernel, for the ratio
            fused = stages.decode.FUSED_STEP_ATTENTION
            stages.decode.FUSED_STEP_ATTENTION = False if name.endswith("_sdpa") else fused
            try:
                # GSM8K's answers take about half of the default 256-token budget: scaled with the budget
                answers = make_answer_lengths(n, args.seed, args.new_tokens, args.new_tokens / 256) \
                    if name.endswith("_answers") else None
                figures = eval_project(loaded["model"], loaded["tokenizer"], prompts[:n], batch, args.new_tokens,
                                       engine, GSM8K_TEST_SIZE, warm_up=n < GSM8K_TEST_SIZE, answer_lengths=answers)
            finally:
                stages.decode.FUSED_STEP_ATTENTION = fused
            # Whether the kernel did the steps: it passed its self-check on this GPU (stages.decode).
            figures["fused_step_attention"] = engine == "static" and not name.endswith("_sdpa") and \
                any(stages.decode._SELF_CHECKS.values())
            figures["batch_size"] = batch
            figures["adapter"] = {**EVAL_ADAPTER, "path": adapter}
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


if __name__ == "__main__":
    main()
