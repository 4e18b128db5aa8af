"""OUT=<dir> python benchmarks/diagnose_engine.py [--tiny] [--cases a,b] [--before FILE] --tag run21

Whether the static engine (stages/decode.py: refill, compaction, the fused step attention, CUDA
graphs) runs on this GPU and decodes what its eager path decodes. Run 20's first try of the engine on
an H100 died with a segmentation fault inside a CUDA graph replay (`bench.py --sections eval`,
static_auto), so every case runs in a child process: a crash is recorded with the child's last
lines (faulthandler: where it died in Python) and, where the machine has gdb, the native frames, and
the next case goes on in a new child.

Cases (CASES): the Llama-3.1-8B shape with random weights, dequantized as evaluate.dequantize does,
GSM8K-test-length prompts; "_answers" cases end each answer at a GSM8K-like length
(bench_model.make_answer_lengths) so that rows take the next questions and, once none is left, move
into fewer rows; the random weights alone never end an answer. A case with `eager` also decodes
the same questions without CUDA graphs (the same kernels) and counts the questions whose tokens are
identical. `--before FILE` adds the "before_*" cases, which run FILE (a copy of an earlier
stages/decode.py) in place of the committed engine. The model is the base alone, without a LoRA adapter
(`evaluate_base`'s setup); bench.py's eval variants decode with one, as `evaluate` does after training.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_device  # noqa: E402
import bench_eval  # noqa: E402
import bench_model  # noqa: E402

# name: (questions, rows ("auto": as evaluate.batch_size: auto), new tokens, answers end at
# GSM8K-like lengths, CUDA graphs, fused step attention, compare with the eager path)
CASES = {
    "small_one_pass": (256, 256, 64, False, True, True, True),
    "small_answers": (256, 64, 128, True, True, True, True),
    "small_answers_sdpa": (256, 64, 128, True, True, False, True),
    "small_answers_no_graph": (256, 64, 128, True, False, True, False),
    # Every answer runs the budget: after three passes of 64 rows the last 8 questions take the first
    # 8 rows and the steps run on those alone (a graph of 8 rows, recorded at that refill).
    "small_budget_refill": (200, 64, 64, False, True, True, True),
    "split_auto": (1319, "auto", 256, False, True, True, False),
    "split_auto_answers": (1319, "auto", 256, True, True, True, False),
}
BEFORE = ("small_answers",)


def run_case(name: str, workdir: str, tiny: bool, before: str | None) -> dict:
    import importlib.util

    import torch

    if name.startswith("before_"):
        # The earlier engine in place of the committed one, under its module name: the imports below get it.
        import stages

        spec = importlib.util.spec_from_file_location("stages.decode", before)
        module = importlib.util.module_from_spec(spec)
        sys.modules["stages.decode"] = stages.decode = module
        spec.loader.exec_module(module)
        name = name[len("before_"):]
    import stages.decode
    from stages.decode import greedy_decode

    n, rows, new_tokens, answers, graph, fused, eager = CASES[name]
    shape = bench_model.bench_shape(tiny)
    if tiny:
        n, new_tokens = min(n, 64), min(new_tokens, 32)
        rows = 16 if rows == "auto" else min(rows, 16)
    prompts = bench_model.make_eval_prompts(n, shape["vocab_size"], seed=42, scale=0.25 if tiny else 1.0)
    model, tokenizer = bench_eval.load_project_model(workdir, dequantize=True)
    on_gpu = torch.cuda.is_available()
    if rows == "auto":
        rows = bench_eval.auto_batch(workdir, model, prompts, new_tokens, n)
    lengths = bench_model.make_answer_lengths(n, 42, new_tokens, new_tokens / 256) if answers else None

    def ended(i, ids):
        return lengths is not None and len(ids) >= lengths[i]

    stages.decode.FUSED_STEP_ATTENTION = "auto" if fused and on_gpu else (True if fused else False)
    result = {"questions": n, "rows": rows, "new_tokens": new_tokens, "answers_end": answers,
              "cuda_graphs": graph and on_gpu, "fused_requested": fused}
    bench_device.reset_peak()
    with torch.inference_mode():
        bench_device.sync()
        start = time.perf_counter()
        tokens = greedy_decode(model, prompts, rows, new_tokens, tokenizer.pad_token_id, ended,
                               use_graph=graph and on_gpu)
        bench_device.sync()
        result["seconds"] = round(time.perf_counter() - start, 2)
        result.update(bench_device.peak_memory())
        result["fused_used"] = bool(fused and (not on_gpu or any(stages.decode._SELF_CHECKS.values())))
        result["generated_tokens"] = sum(map(len, tokens))
        if answers:
            result["answers_cut_at_their_length"] = sum(len(t) >= min(lengths[i], new_tokens)
                                                        for i, t in enumerate(tokens))
        if eager:
            reference = greedy_decode(model, prompts, rows, new_tokens, tokenizer.pad_token_id, ended, use_graph=False)
            same = [a == b for a, b in zip(tokens, reference)]
            result["identical_to_eager"] = f"{sum(same)}/{n}"
            differ = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                      for a, b, s in zip(tokens, reference, same) if not s]
            result["first_difference_at"] = sorted(differ)[:20]
    return result


def child(args) -> None:
    faulthandler.enable()
    for name in args.cases.split(","):
        with open(args.journal, "a") as f:
            f.write(json.dumps({"case": name, "started": True}) + "\n")
        try:
            result = run_case(name, args.workdir, args.tiny, args.before)
        except Exception as exc:  # noqa: BLE001 - recorded; the next case goes on
            result = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        print(f"{name}: {json.dumps(result)}", flush=True)
        with open(args.journal, "a") as f:
            f.write(json.dumps({"case": name, "result": result}) + "\n")
        bench_device.free_memory()


def main() -> None:
    parser = bench_model.script_parser(bench_model.default_workdir(bench_model.bench_shape()))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--tag", default=None, help="names the results file: diagnose_engine_<tag>_<gpu>.json (e.g. run21)")
    parser.add_argument("--before", default=None, help="an earlier stages/decode.py to run as the before_* cases")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--journal", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.tag is None:
        parser.error("--tag is required (it names the results file, e.g. --tag run21)")
    shape = bench_model.bench_shape(args.tiny)
    workdir = Path(args.workdir if not args.tiny else "/tmp/diagnose-engine-tiny")
    build = bench_model.build_model_dir(workdir, shape, seed=42)
    # The earlier engine replaces stages.decode for the rest of its child: its cases get children of their own.
    groups = ([[f"before_{c}" for c in BEFORE]] if args.before else []) + [args.cases.split(",")]
    out_dir = Path(os.environ.get("OUT", args.out))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"diagnose_engine_{args.tag}_{bench_device.slug(bench_device.gpu_name())}.json"
    results = {"command": "python " + " ".join(sys.argv), "gpu": bench_device.gpu_name(),
               "versions": bench_device.versions(), "build": build, "cases": {}}
    journal = out_dir / "diagnose_engine.journal"
    journal.unlink(missing_ok=True)
    for group in groups:
        run_group(group, args, workdir, journal, results, path)
    print(f"results: {path}")


def run_group(cases: list[str], args, workdir: Path, journal: Path, results: dict, path: Path) -> None:
    left = list(cases)
    while left:
        # Under gdb where the machine has it: a crash then also shows the native frames it died in.
        gdb = ["gdb", "-q", "-batch", "-ex", "run", "-ex", "bt 25", "--args"] if shutil.which("gdb") else []
        proc = subprocess.run(gdb + [sys.executable, __file__, "--child", "--workdir", str(workdir), "--cases", ",".join(left),
                               "--journal", str(journal)] + (["--tiny"] if args.tiny else [])
                              + (["--before", args.before] if args.before else []),
                              capture_output=True, text=True,
                              # on CPU the fused kernel runs under Triton's interpreter, as in the tests
                              env=dict(os.environ, **({"TRITON_INTERPRET": "1"} if args.tiny else {})))
        sys.stdout.write(proc.stdout)
        lines = [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []
        finished = {e["case"]: e["result"] for e in lines if "result" in e}
        results["cases"].update(finished)
        left = [c for c in left if c not in finished]
        if left and left[0] in {e["case"] for e in lines}:
            # The case it was running died with the child: its last lines say where.
            tail = [line for line in proc.stderr.splitlines() if "Warning" not in line][-20:]
            frames = [line[:300] for line in proc.stdout.splitlines() if line.startswith("#") or "signal SIG" in line]
            results["cases"][left[0]] = {"crashed": True, "returncode": proc.returncode, "stderr_tail": tail,
                                         "native_frames": frames}
            print(f"{left[0]}: crashed (rc {proc.returncode})\n" + "\n".join(tail + frames), flush=True)
            left = left[1:]
        elif left:  # the child died before starting a case
            print(proc.stderr[-3000:])
            break
        path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
