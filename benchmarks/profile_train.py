"""python benchmarks/profile_train.py --out "$OUT"

Where an optimizer step of the literal batch 1 × accumulation 8 goes (Llama-3.1-8B shape, random
weights, GSM8K-length rows): the project's `build_trainer` path eager ("card") and with regional
torch.compile and no checkpointing ("card+compile-checkpointing", bench.py's variants), one step
under torch.profiler after `--warmup` untimed steps. Per variant: the step's wall seconds, CUDA
kernels launched, the GPU's busy time (sum of kernel times), and the top operators by host time
and by GPU time. Writes profile_train_<gpu>.json.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_device  # noqa: E402
import bench_model  # noqa: E402
import bench_train  # noqa: E402


def main() -> None:
    parser = bench_model.script_parser(workdir="/dev/shm/bench-model")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: bench.py's 2-layer hidden-64 shape")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default="card,card+compile-checkpointing")
    args = parser.parse_args()
    bench_device.quiet_libraries()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from stages.config import TrainParams

    shape = bench_model.bench_shape(args.tiny, args.layers)
    bench_model.build_model_dir(Path(args.workdir), shape, seed=0)
    steps = args.warmup + 1
    rows = bench_model.make_train_rows(steps * bench_model.EFFECTIVE_BATCH, shape["vocab_size"], seed=42)
    results = {"gpu": bench_device.gpu_name(), "versions": bench_device.versions(), "warmup_steps": args.warmup, "variants": {}}

    class ProfileOneStep(TrainerCallback):
        def __init__(self):
            self.prof, self.wall = None, None

        def on_step_begin(self, args_, state, control, **kwargs):
            if state.global_step == args.warmup:
                bench_device.sync()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            if self.prof is not None and self.wall is None:
                bench_device.sync()
                self.wall = time.perf_counter() - self.start
                self.prof.__exit__(None, None, None)

    for name in args.variants.split(","):
        train_p = dataclasses.replace(TrainParams(lora_r=32, lora_alpha=16, lora_dropout=0.05,
                                                  lora_target_modules="all-linear", max_steps=steps, seed=42,
                                                  use_liger_kernel=False, torch_compile=False),
                                      **bench_train.TRAIN_VARIANTS[name])
        hook = ProfileOneStep()
        with bench_train.undo_module_patches():
            figures = bench_train.train_project(args.workdir, rows, steps, args.warmup - 1, train_p, 42, None, (hook,))
        events = hook.prof.key_averages()
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
        kernels = [e for e in hook.prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        results["variants"][name] = {
            "step_seconds": figures.get("step_seconds"),
            "profiled_step_wall_s": round(hook.wall, 3),
            "kernel_launches": launches,
            "gpu_kernel_time_s": round(sum(k.device_time for k in kernels) / 1e6, 3),
            "top_host": events.table(sort_by="self_cpu_time_total", row_limit=25),
            "top_gpu": events.table(sort_by="self_device_time_total", row_limit=15),
        }
        print(name, {k: v for k, v in results["variants"][name].items() if not k.startswith("top")}, flush=True)
        print(results["variants"][name]["top_host"], flush=True)
        bench_device.free_memory()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_train_{bench_device.slug(results['gpu'])}.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
