"""python benchmarks/pipeline_8b.py --workdir /tmp/bench-model --out benchmarks/results

The real stage commands (`python -m stages.train`, `python -m stages.evaluate`, and the memory
preflight CLI) on a Llama-3.1-8B-shaped model with random weights, built from its config by
benchmarks/bench.py. The data are GSM8K-length rows in that model's word-level vocabulary
("w123 w456 ... #### w7"), so memory and seconds per step are real and accuracy is not.
Writes pipeline_8b_<gpu>.json: each command's wall time and exit code, and the stages' metrics.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_device  # noqa: E402
import bench_model  # noqa: E402


def write_rows(path: Path, rows: list[dict]) -> None:
    """Token-id rows → question/answer text that the benchmark tokenizer encodes back to them."""
    with open(path, "w") as f:
        for i, row in enumerate(rows):
            ids, n_prompt = row["input_ids"][1:-1], row["completion_mask"].count(0) - 1
            question = " ".join(f"w{t}" for t in ids[:n_prompt])
            answer = " ".join(f"w{t}" for t in ids[n_prompt:]) + f"\n#### {i}"
            f.write(json.dumps({"question": question, "answer": answer, "final": str(i)}) + "\n")


def run(cmd: list[str], log: Path) -> dict:
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    print(f"{' '.join(cmd[:4])}: exit {proc.returncode} in {time.perf_counter() - started:.0f} s", flush=True)
    return {"cmd": " ".join(cmd), "returncode": proc.returncode, "wall_s": round(time.perf_counter() - started, 1),
            "log_tail": log.read_text()[-1500:]}


def main() -> None:
    parser = bench_model.script_parser(workdir="/tmp/bench-model")
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--eval-limit", type=int, default=128)
    parser.add_argument("--variant", default="default", choices=["default", "card", "card-graphs"],
                        help="default: params.yaml as committed; card: batch 1 x accumulation 8, 4-bit generation; "
                             "card-graphs: batch 1 x accumulation 8 with torch_compile and cuda_graphs, a dev "
                             "pass mid-run (graphs recorded for training and for evaluation), default evaluation")
    args = parser.parse_args()

    import yaml

    shape = bench_model.bench_shape(layers=args.layers)
    model_dir = Path(args.workdir)
    built = bench_model.build_model_dir(model_dir, shape, seed=0)
    run_dir = Path("/tmp/pipeline_8b")
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = bench_model.make_train_rows(8 * args.train_steps + 16, shape["vocab_size"], seed=0)
    write_rows(run_dir / "train.jsonl", rows[16:])
    write_rows(run_dir / "dev.jsonl", rows[:16])
    prompts = bench_model.make_eval_prompts(args.eval_limit, shape["vocab_size"], seed=0)
    with open(run_dir / "test.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"question": bench_model.as_question(p), "answer": f"#### {i}", "final": str(i)}) + "\n")

    params = yaml.safe_load(Path("params.yaml").read_text())
    params["model"]["name"] = str(model_dir)
    params["prompt"]["template"] = "{question}"  # the word-level vocabulary has no English
    params["train"].update(max_steps=args.train_steps, logging_steps=1, eval_steps=args.train_steps,
                           save_steps=max(args.train_steps // 2, 1), max_length=512)
    if args.variant == "card":
        params["train"].update(per_device_train_batch_size=1, gradient_accumulation_steps=8, padding_free=False,
                               use_liger_kernel=False, torch_compile=False)
        params["evaluate"].update(dequantize=False, engine="generate", batch_size=64)
    if args.variant == "card-graphs":
        params["train"].update(per_device_train_batch_size=1, gradient_accumulation_steps=8, padding_free=False,
                               use_liger_kernel=False, torch_compile=True, cuda_graphs=True,
                               gradient_checkpointing=False, eval_steps=max(args.train_steps // 2, 1))
    params["evaluate"].update(max_new_tokens=256, limit=args.eval_limit, stop=[bench_model.PROBE_WORD])
    params_file = run_dir / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    # What identifies the model (its shape: random weights either way), in place of the fingerprint
    # stage's hash of the 16 GB directory, which would take a share of the device call.
    model_fingerprint = run_dir / "model_fingerprint.json"
    model_fingerprint.write_text(json.dumps({"name": str(model_dir), "shape": shape}, sort_keys=True))

    py = sys.executable
    steps = {
        "memory_preflight_24gb": run([py, "-m", "stages.memory", "--params", str(params_file), "--stage", "both",
                                      "--free-gib", "22"], run_dir / "memory.log"),
        "train": run([py, "-m", "stages.train", "--params", str(params_file), "--train-file", str(run_dir / "train.jsonl"),
                      "--dev-file", str(run_dir / "dev.jsonl"), "--output-dir", str(run_dir / "adapter"),
                      "--resume-dir", str(run_dir / "resume"), "--metrics", str(run_dir / "train.json"),
                      "--model-fingerprint", str(model_fingerprint)],
                     run_dir / "train.log"),
        "evaluate": run([py, "-m", "stages.evaluate", "--params", str(params_file), "--data-file",
                         str(run_dir / "test.jsonl"), "--adapter", str(run_dir / "adapter"), "--metrics",
                         str(run_dir / "eval.json"), "--predictions", str(run_dir / "predictions.jsonl")],
                        run_dir / "evaluate.log"),
    }
    result = {"gpu": bench_device.gpu_name(), "versions": bench_device.versions(), "shape": shape, "model_build": built,
              "variant": args.variant, "params": {k: params[k] for k in ("train", "evaluate")}, "commands": steps}
    for name in ("train", "eval"):
        path = run_dir / f"{name}.json"
        result[f"{name}_metrics"] = json.loads(path.read_text()) if path.is_file() else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"pipeline_8b_{args.variant}_{bench_device.slug(result['gpu'])}.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("train_metrics", "eval_metrics")}, indent=1))


if __name__ == "__main__":
    main()
