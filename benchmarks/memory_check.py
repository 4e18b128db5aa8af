"""python benchmarks/memory_check.py [--shapes llama-8b,qwen3-8b,llama-3b] [--cases ...] [--workdir /dev/shm/memory_check]
                                    [--out benchmarks/results] [--deadline-s 510] [--case-timeout 150]
python benchmarks/memory_check.py --tiny --out /tmp/mc.json     # CPU: the same code path on a 2-layer model
python benchmarks/memory_check.py --report benchmarks/results/memory_check_nvidia-h200.json   # CPU, no model

stages/memory.py's estimates against the peaks of the project's own code: `stages.train.build_trainer`
(then `trainer.train()` and the dev pass `trainer.evaluate()`, as the train stage runs them) and
`stages.evaluate.load_for_generation` + `stages.evaluate.generate`, on models of real shapes built
from their configs with random weights (built on the GPU in bf16, saved once per shape under
--workdir with bench_model's word-level tokenizer, deleted after the shape's cases),
on GSM8K-length rows and prompts (bench_model.make_train_rows / make_eval_prompts). Cases per shape,
in the order they run (the most telling first, so a run cut short by --deadline-s keeps them):

- train_default: params.yaml's train section (8 rows padding-free, checkpointing, the kernels "auto" picks:
  torch_compile on a bf16 GPU; files before it: Liger), --steps (2) steps;
  its adapter is saved to WORKDIR/SHAPE-adapter for eval_default;
- eval_default: static engine on the dequantized base with train_default's adapter, batch 128,
  256 new tokens (every row decodes all of them: random weights never stop). When train_default did
  not leave an adapter (it failed, or --cases left it out) it runs on the base alone, recorded as
  setting.adapter false (and the estimate counts no adapter);
- train_card: batch 1 x accumulation 8, padded (padding_free false; kernels as train_default), --steps - 1
  steps (at least 1);
- eval_4bit: the same as eval_default (the same adapter) on the 4-bit base (evaluate.dequantize: false);
- train_card_graphs: the card + torch_compile + cuda_graphs (no checkpointing, Liger off), as train_card;
- train_fp16 (on --fp16-shape only, last): model.bnb_4bit_compute_dtype: float16, --steps steps,
  losses recorded (they must be finite).

Every case runs in its own process (`--run-case SHAPE CASE`, started by the parent with the same
interpreter, PYTHONUNBUFFERED, output streamed with the parent's timestamps): its peaks are its own
(nothing left from an earlier case or model), and Liger's patching of transformers' modules does not
reach the later cases. A case that runs past --case-timeout (or past the deadline) is killed and
recorded as an error; the parent starts no new case (nor a new shape's build) when fewer than 90 s of
--deadline-s remain, and what it has is written.

The estimate is given the tokens the largest micro-batch really had (the sampler is sequential) and
the longest prompt. Per case: estimate allocated and total, measured peak allocated and reserved
(torch.cuda.max_memory_* of the fresh process, reset after CUDA's initialisation and again before the
model loads: they cover load + run), their ratio, whether it is within ±10%, and whether the admitted
total covers the reserved peak. Written after every case into memory_check_<gpu>.json (+ .md), keyed
by (shape, case), so a run cut short, or split over several calls with --shapes, keeps what it has.

Each case also records `inputs`: everything stages/memory.py's estimate is computed from (the shape's
config.json as a dict, the ModelParams / TrainParams / EvaluateParams used, as dicts, the largest
micro-batch's tokens and the dev batch size, or the longest prompt, the batch, whether the base is
dequantized and the adapter's TrainParams). `--report RESULTS.json` recomputes every case's estimate
from them with the current stages/memory.py (no GPU, no model: seconds on CPU), and rewrites the
JSON's estimate / ratio / within / covers fields and the .md table, so the committed table always
matches the committed estimator; a case recorded without those inputs (files written before they
were) keeps its estimate, and --report says, one line per case, which inputs it lacks.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_device  # noqa: E402
import bench_model  # noqa: E402
from stages.io import atomic_path, write_json  # noqa: E402

# Real-size shapes (no weights exist: random ones are built). Qwen3-8B has q/k norms and a larger
# vocabulary; Llama-3.2-3B tied embeddings.
SHAPES = {
    "llama-8b": ("LlamaConfig", "LlamaForCausalLM", dict(bench_model.LLAMA_31_8B, tie_word_embeddings=False)),
    "qwen3-8b": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1000000.0, max_position_embeddings=8192,
        tie_word_embeddings=False)),
    "llama-3b": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
        tie_word_embeddings=True)),
    "tiny": ("LlamaConfig", "LlamaForCausalLM", dict(bench_model.TINY, tie_word_embeddings=False)),
}
# The order they run in: the most telling first.
CASES = ("train_default", "eval_default", "train_card", "eval_4bit", "train_card_graphs", "train_fp16")
WITHIN = 0.10
RESERVE_S = 90  # no new case (or shape build) with less than this left of --deadline-s
ELAPSED = time.perf_counter()
# What --report needs of each kind of case's `inputs`.
TRAIN_INPUTS = ("config", "model", "train", "dev_batch_size", "tokens")
EVAL_INPUTS = ("config", "model", "evaluate", "prompt_tokens", "merged_bf16", "adapter", "batch")


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - ELAPSED:5.0f}s] {text}", flush=True)


def build_model_dir(workdir: Path, shape_name: str) -> Path:
    """Random bf16 weights of the shape, created on the GPU, saved with bench's tokenizer (reused if there)."""
    import torch
    import transformers

    config_cls, model_cls, fields = SHAPES[shape_name]
    directory = workdir / shape_name
    if (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file():
        return directory
    specials = bench_model.specials_for(fields["vocab_size"])
    config = getattr(transformers, config_cls)(**fields, bos_token_id=specials["bos"][0],
                                               eos_token_id=specials["eos"][0], pad_token_id=specials["pad"][0])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # bf16 from the start: 16 GB for 8B, not 32 GB of fp32 first
    try:
        with torch.device(device):
            model = getattr(transformers, model_cls)(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # greedy decoding must never pick EOS (the cases decode with no stop strings)
        for i, _ in specials.values():
            model.get_output_embeddings().weight[i].zero_()
    with atomic_path(directory) as tmp:
        model.save_pretrained(tmp)
        bench_model.build_tokenizer(fields["vocab_size"]).save_pretrained(tmp)
    del model
    free_memory()
    return directory


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except ImportError:
        pass


def start_measuring() -> None:
    import torch

    free_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def measured_peaks() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"allocated": None, "reserved": None}
    free, total = torch.cuda.mem_get_info()
    return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
            "outside_pytorch_now": total - free - torch.cuda.memory_reserved()}


def train_params(case: str, steps: int):
    from stages.config import TrainParams

    common = dict(max_steps=steps, logging_steps=1, eval_steps=10_000, save_steps=10_000)
    card = dict(per_device_train_batch_size=1, gradient_accumulation_steps=8, padding_free=False)
    return {
        "train_default": TrainParams(**common),
        "train_fp16": TrainParams(**common),
        "train_card": TrainParams(**common, **card),
        "train_card_graphs": TrainParams(**common, **card, use_liger_kernel=False, torch_compile=True,
                                         gradient_checkpointing=False, cuda_graphs=True),
    }[case]


def step_tokens(train_p, rows: list[dict], steps: int) -> int:
    """Tokens of the largest micro-batch the sequential sampler hands the trainer."""
    from stages.memory import micro_batch_tokens

    batch = train_p.per_device_train_batch_size
    lengths = [len(r["input_ids"]) for r in rows[:steps * 8]]
    return max(micro_batch_tokens(train_p, lengths[i:i + batch]) for i in range(0, len(lengths), batch))


def run_train(directory: Path, model_p, train_p, rows: list[dict], adapter_out: Path | None) -> dict:
    """The train stage's trainer on `rows` (in order), then its dev pass; the peak covers the load."""
    import datasets
    import torch
    import transformers
    from transformers import TrainingArguments

    from stages.modeling import load_tokenizer
    from stages.train import build_trainer

    tokenizer = load_tokenizer(str(directory))
    overrides = dict(eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True)
    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        overrides["train_sampling_strategy"] = "sequential"
    start_measuring()
    with tempfile.TemporaryDirectory(prefix="memory-check-") as output_dir:
        transformers.set_seed(train_p.seed)
        trainer = build_trainer(model_p, train_p, tokenizer, datasets.Dataset.from_list(rows),
                                datasets.Dataset.from_list(rows[:8]), output_dir, world_size=1, **overrides)
        trainer.train()
        after_train = measured_peaks()
        dev = trainer.evaluate()
        figures = {**measured_peaks(), "after_train": after_train}
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        figures.update(losses=losses, losses_finite=all(math.isfinite(x) for x in losses) and bool(losses),
                       dev_loss=dev.get("eval_loss"),
                       lora_dtype=str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad)))
        if adapter_out is not None:
            trainer.model.save_pretrained(adapter_out)
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
        if hasattr(optimizer, "page_mng"):  # bitsandbytes' global page manager would keep the paged state
            optimizer.page_mng.paged_tensors.clear()
        del trainer
    if torch.cuda.is_available():
        torch._dynamo.reset()  # the compiled layers' graphs and pools go with the case
    free_memory()
    return figures


def run_eval(directory: Path, model_p, eval_p, adapter: Path | None, prompts: list[list[int]]) -> dict:
    from stages.evaluate import generate, load_for_generation
    from stages.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(directory))
    tokenizer.padding_side = "left"
    start_measuring()
    model = load_for_generation(model_p, str(adapter) if adapter else None, eval_p.dequantize)
    texts, generated = generate(model, tokenizer, eval_p, prompts, [], eval_p.max_new_tokens, show_progress=False)
    figures = {**measured_peaks(), "generated_tokens": generated, "prompts": len(prompts)}
    del model
    free_memory()
    return figures


def estimate_of(inputs: dict) -> dict:
    """stages/memory.py's estimate from a case's recorded inputs (the run and --report both use this)."""
    from stages.config import EvaluateParams, ModelParams, TrainParams
    from stages.memory import estimate_eval, estimate_train

    model_p = ModelParams(**inputs["model"])
    if "train" in inputs:
        return estimate_train(inputs["config"], model_p, TrainParams(**inputs["train"]),
                              dev_batch_size=inputs["dev_batch_size"], tokens=inputs["tokens"])
    adapter = inputs["adapter"]
    return estimate_eval(inputs["config"], model_p, EvaluateParams(**inputs["evaluate"]), inputs["prompt_tokens"],
                         merged_bf16=inputs["merged_bf16"], adapter=TrainParams(**adapter) if adapter else None,
                         batch=inputs["batch"])


def compare(estimate: dict, measured: dict) -> dict:
    allocated, reserved = measured.get("allocated"), measured.get("reserved")
    ratio = estimate["allocated"] / allocated if allocated else None
    return {"ratio": None if ratio is None else round(ratio, 4),
            "within_10pct": None if ratio is None else abs(ratio - 1) <= WITHIN,
            "total_covers_reserved": None if reserved is None else estimate["total"] >= reserved}


def case_steps(case: str, steps: int) -> int:
    return steps if case in ("train_default", "train_fp16") else max(1, steps - 1)


def run_case(shape: str, case: str, directory: Path, args, adapter: Path | None) -> dict:
    """One case, in this (fresh) process. `adapter`: where train_default saves its adapter, or
    the adapter eval_default loads (None: none, the base alone)."""
    from stages.config import EvaluateParams, ModelParams, TrainParams
    from stages.memory import load_model_config

    config = load_model_config(str(directory))
    vocab = SHAPES[shape][2]["vocab_size"]
    model_p = ModelParams(name=str(directory))
    if case.startswith("train"):
        steps = case_steps(case, args.steps)
        train_p = train_params(case, steps)
        if case == "train_fp16":
            model_p = dataclasses.replace(model_p, bnb_4bit_compute_dtype="float16")
        rows = bench_model.make_train_rows(steps * 8, vocab, seed=0, scale=args.length_scale)
        tokens = step_tokens(train_p, rows, steps)
        inputs = {"config": config, "model": dataclasses.asdict(model_p), "train": dataclasses.asdict(train_p),
                  "dev_batch_size": train_p.per_device_train_batch_size, "tokens": tokens}
        estimate = estimate_of(inputs)
        measured = run_train(directory, model_p, train_p, rows, adapter if case == "train_default" else None)
        setting = {"tokens": tokens, "steps": steps, "train": dataclasses.asdict(train_p),
                   "compute_dtype": model_p.bnb_4bit_compute_dtype}
    else:
        dequantize = case == "eval_default"
        eval_p = EvaluateParams(max_new_tokens=args.new_tokens, batch_size=args.eval_batch, stop=[],
                                dequantize=dequantize, engine="static")
        prompts = bench_model.make_eval_prompts(args.eval_prompts, vocab, seed=0, scale=args.length_scale)
        longest = max(map(len, prompts))
        with_adapter = adapter if adapter is not None and (adapter / "adapter_config.json").is_file() else None
        batch = min(args.eval_batch, len(prompts))
        inputs = {"config": config, "model": dataclasses.asdict(model_p), "evaluate": dataclasses.asdict(eval_p),
                  "prompt_tokens": longest, "merged_bf16": dequantize, "batch": batch,
                  "adapter": dataclasses.asdict(TrainParams()) if with_adapter else None}
        estimate = estimate_of(inputs)
        measured = run_eval(directory, model_p, eval_p, with_adapter, prompts)
        setting = {"longest_prompt": longest, "batch": batch,
                   "new_tokens": args.new_tokens, "dequantize": dequantize, "adapter": bool(with_adapter)}
    return {"shape": shape, "case": case, "setting": setting, "inputs": inputs, "estimate": estimate,
            "measured": measured, **compare(estimate, measured)}


def error_record(shape: str, case: str, exc: BaseException) -> dict:
    text = str(exc).strip()
    return {"shape": shape, "case": case,
            "error": f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__}


def child_main(args) -> None:
    """--run-case SHAPE CASE: one case in this fresh process, its record written to --result-json."""
    shape, case = args.run_case
    bench_device.quiet_libraries()
    import torch

    if torch.cuda.is_available():  # the context and the allocator's start are not the case's
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        free_memory()
        torch.cuda.reset_peak_memory_stats()
    try:
        record = run_case(shape, case, Path(args.workdir) / shape, args, Path(args.adapter) if args.adapter else None)
    except Exception as exc:  # an OOM, a library refusing: a result, recorded by the parent
        traceback.print_exc()
        record = error_record(shape, case, exc)
    write_json(Path(args.result_json), record)


def stream(pipe, prefix: str) -> None:
    for line in iter(pipe.readline, ""):
        say(f"{prefix} | {line.rstrip()}")
    pipe.close()


def spawn_case(shape: str, case: str, args, adapter: Path | None, timeout: float) -> dict:
    """Runs the case in a child process; its record, or an error record (timeout, crash)."""
    with tempfile.TemporaryDirectory(prefix="memory-check-case-") as tmp:
        result_json = Path(tmp) / "record.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--run-case", shape, case,
                   "--workdir", args.workdir, "--result-json", str(result_json), "--steps", str(args.steps),
                   "--eval-prompts", str(args.eval_prompts), "--eval-batch", str(args.eval_batch),
                   "--new-tokens", str(args.new_tokens), "--length-scale", str(args.length_scale)]
        if adapter is not None:
            command += ["--adapter", str(adapter)]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        reader = threading.Thread(target=stream, args=(child.stdout, f"{shape} {case}"), daemon=True)
        reader.start()
        try:
            rc = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the child's own group: it and what it started
            child.wait()
            reader.join(timeout=5)
            return {"shape": shape, "case": case, "error": f"timeout: killed after {timeout:.0f} s"}
        reader.join(timeout=5)
        if result_json.is_file():
            return json.loads(result_json.read_text())
        return {"shape": shape, "case": case, "error": f"the case's process exited {rc} with no record"}


def gib(n) -> str:
    return "—" if n is None else f"{n / 2**30:.2f}"


def markdown(result: dict) -> str:
    rows = [f"Measured on {result['gpu']} ({', '.join(f'{k} {v}' for k, v in result['versions'].items())}), "
            f"`{result['command']}`."]
    if result.get("report"):
        rows.append(f"Estimates recomputed from the recorded inputs by `{result['report']}`.")
    rows += ["",
             "| shape | case | tokens / batch | estimate allocated GiB | measured allocated GiB | ratio | within ±10% "
             "| estimate total GiB | measured reserved GiB | total ≥ reserved | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        if "error" in c:
            rows.append(f"| {c['shape']} | {c['case']} | | | | | | | | | error: {c['error'][:120]} |")
            continue
        s, m, e = c["setting"], c["measured"], c["estimate"]
        size = s.get("tokens") or f"{s.get('batch')} × ({s.get('longest_prompt')}+{s.get('new_tokens')})"
        yes = lambda v: "—" if v is None else ("yes" if v else "**no**")  # noqa: E731
        notes = [f"losses finite: {yes(m['losses_finite'])}"] if "losses_finite" in m else []
        if s.get("adapter") is False:
            notes.append("no adapter")
        ratio = "—" if c["ratio"] is None else f"{c['ratio']:.3f}"
        rows.append(f"| {c['shape']} | {c['case']} | {size} | {gib(e['allocated'])} | {gib(m['allocated'])} "
                    f"| {ratio} "
                    f"| {yes(c['within_10pct'])} | {gib(e['total'])} | {gib(m['reserved'])} "
                    f"| {yes(c['total_covers_reserved'])} | {'; '.join(notes)} |")
    return "\n".join(rows) + "\n"


def output_path(out: str, gpu: str) -> Path:
    if out.endswith(".json"):
        return Path(out)
    return Path(out) / f"memory_check_{re.sub(r'[^a-z0-9]+', '-', gpu.lower()).strip('-')}.json"


def write_result(out: Path, result: dict) -> None:
    write_json(out, result)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(result))


def save(out: Path, result: dict, cases: list[dict]) -> None:
    done = {(c["shape"], c["case"]) for c in cases}
    previous = json.loads(out.read_text()).get("cases", []) if out.is_file() else []
    result["cases"] = [c for c in previous if (c.get("shape"), c.get("case")) not in done] + cases
    write_result(out, result)


def report(path: Path) -> None:
    """--report: every case's estimate recomputed from its recorded inputs; JSON and .md rewritten."""
    result = json.loads(path.read_text())
    for c in result.get("cases", []):
        name = f"{c.get('shape')} {c.get('case')}"
        if "error" in c:
            print(f"{name}: error recorded, nothing to estimate")
            continue
        inputs = c.get("inputs") or {}
        needed = TRAIN_INPUTS if str(c.get("case", "")).startswith("train") else EVAL_INPUTS
        missing = [k for k in needed if k not in inputs]
        if missing:
            print(f"{name}: kept the recorded estimate; missing inputs: {', '.join(missing)}")
            continue
        before = c["estimate"]["allocated"]
        c["estimate"] = estimate_of(inputs)
        c.update(compare(c["estimate"], c["measured"]))
        print(f"{name}: estimate {gib(before)} -> {gib(c['estimate']['allocated'])} GiB allocated, "
              f"measured {gib(c['measured'].get('allocated'))}, ratio {c['ratio']}")
    result["report"] = "python benchmarks/memory_check.py --report " + str(path)
    write_result(path, result)
    print(f"wrote {path} and {path.with_suffix('.md')}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="llama-8b,qwen3-8b,llama-3b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)} (run in that order)")
    p.add_argument("--fp16-shape", default="llama-3b", help="the shape the train_fp16 case runs on")
    p.add_argument("--workdir", default="/dev/shm/memory_check", help="where the random checkpoints go")
    p.add_argument("--out", default="benchmarks/results", help="a directory or a .json path")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps of train_default (the card cases: one less)")
    p.add_argument("--eval-prompts", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--length-scale", type=float, default=1.0)
    p.add_argument("--case-timeout", type=float, default=150.0, help="seconds a case's process may run")
    p.add_argument("--deadline-s", type=float, default=None,
                   help=f"no new case with fewer than {RESERVE_S} s left of this many (from the start)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir")
    p.add_argument("--tiny", action="store_true", help="CPU: the tiny shape, 1 step, 8 prompts x 8 tokens")
    p.add_argument("--report", metavar="RESULTS_JSON", help="recompute the estimates of a results file (CPU)")
    p.add_argument("--run-case", nargs=2, metavar=("SHAPE", "CASE"), help=argparse.SUPPRESS)
    p.add_argument("--result-json", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.shapes, args.fp16_shape, args.steps = "tiny", "none", 1
        args.eval_prompts, args.eval_batch, args.new_tokens, args.length_scale = 8, 8, 8, 0.25
        if args.workdir == p.get_default("workdir"):
            args.workdir = tempfile.mkdtemp(prefix="memory-check-tiny-")
    shapes = args.shapes.split(",") + ([args.run_case[0]] if args.run_case else [])
    cases = args.cases.split(",") + ([args.run_case[1]] if args.run_case else [])
    unknown = [s for s in shapes if s not in SHAPES] + [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown shape or case: {', '.join(unknown)}")
    if args.run_case and not args.result_json:
        p.error("--run-case needs --result-json")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        report(Path(args.report))
        return
    if args.run_case:
        child_main(args)
        return
    import torch

    bench_device.quiet_libraries()
    on_gpu = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name() if on_gpu else "cpu"
    out = output_path(args.out, gpu)
    result = {"gpu": gpu, "versions": bench_device.versions(), "command": "python benchmarks/memory_check.py "
              + " ".join(argv if argv is not None else sys.argv[1:]), "within": WITHIN}
    cases: list[dict] = []
    wanted = [c for c in CASES if c in args.cases.split(",")]

    def left() -> float:
        return math.inf if args.deadline_s is None else args.deadline_s - (time.perf_counter() - ELAPSED)

    stopped = False
    for shape in args.shapes.split(","):
        todo = [c for c in wanted if not (c == "train_fp16" and shape != args.fp16_shape)
                and not (c == "train_card_graphs" and not on_gpu)]  # CUDA graphs need CUDA; CPU compile: slow
        if not todo:
            continue
        if left() < RESERVE_S:
            stopped = True
            break
        say(f"{shape}: building the random checkpoint")
        directory = build_model_dir(Path(args.workdir), shape)
        adapter = Path(args.workdir) / f"{shape}-adapter"
        if "train_default" in todo:  # eval_default takes this run's adapter, not one left by another run
            shutil.rmtree(adapter, ignore_errors=True)
        say(f"{shape}: ready in {directory}")
        for case in todo:
            if left() < RESERVE_S:
                say(f"{shape} {case}: not started, {left():.0f} s left of --deadline-s {args.deadline_s:.0f}")
                stopped = True
                break
            started = time.perf_counter()
            timeout = min(args.case_timeout, left() - 10)
            if case == "train_default":  # where it saves its adapter
                record = spawn_case(shape, case, args, adapter, timeout)
            elif case.startswith("eval"):  # the adapter train_default saved, if it did
                record = spawn_case(shape, case, args, adapter if (adapter / "adapter_config.json").is_file()
                                    else None, timeout)
            else:
                record = spawn_case(shape, case, args, None, timeout)
            record["seconds"] = round(time.perf_counter() - started, 1)
            record["command"] = result["command"]  # calls split by --shapes each leave their own cases
            cases.append(record)
            save(out, result, cases)
            if "error" in record:
                say(f"{shape} {case}: {record['error']}")
            else:
                say(f"{shape} {case}: estimate {gib(record['estimate']['allocated'])} GiB, measured "
                    f"{gib(record['measured']['allocated'])} GiB allocated / {gib(record['measured']['reserved'])} "
                    f"reserved, ratio {record['ratio']} ({record['seconds']} s)")
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
            shutil.rmtree(adapter, ignore_errors=True)
        if stopped:
            break
    if not out.is_file():
        save(out, result, cases)
    print(markdown(json.loads(out.read_text())))
    say(f"wrote {out} and {out.with_suffix('.md')}" + (" (stopped by --deadline-s)" if stopped else ""))


if __name__ == "__main__":
    main()
