"""OUT=<dir> python benchmarks/diagnose_sdpa.py  (run 15b, benchmarks/results/diagnose_run15_nvidia-h200.md)

Is cuDNN SDPA's host time per call a plan build per new sequence length (a microbenchmark of one
attention call, the packed 8-row block-causal mask transformers passes, cuDNN vs memory-efficient),
and what does padding-free training gain with cuDNN SDPA off (torch.backends.cuda.enable_cudnn_sdp(False):
SDPA then picks the memory-efficient kernel)? Writes $OUT/diag_sdpa_run15b_nvidia-h200.json."""
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
import bench_device  # noqa: E402
import bench_model  # noqa: E402
import bench_train  # noqa: E402

bench_device.quiet_libraries()
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

out = {"micro": {}, "train": {}}
OUT = Path(os.environ["OUT"]) / "diag_sdpa_run15b_nvidia-h200.json"


def save():
    OUT.write_text(json.dumps(out, indent=1) + "\n")


def attn_call(T, backend, g):
    lens = torch.full((8,), T // 8)
    lens[-1] += T - lens.sum()
    seg = torch.repeat_interleave(torch.arange(8), lens).cuda()
    mask = ((seg[:, None] == seg[None, :]) & torch.ones(T, T, dtype=torch.bool, device="cuda").tril())[None, None]
    q, k, v = (torch.randn(1, 32, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True, generator=g)
               for _ in range(3))
    torch.cuda.synchronize()
    with sdpa_kernel(backend):
        t0 = time.perf_counter()
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        t1 = time.perf_counter()
        o.sum().backward()
        t2 = time.perf_counter()
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    return {"T": T, "fwd_host_ms": round((t1 - t0) * 1e3, 2), "bwd_host_ms": round((t2 - t1) * 1e3, 2),
            "total_ms_synced": round((t3 - t0) * 1e3, 2)}


g = torch.Generator("cuda").manual_seed(0)
for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
    lengths = [1841] * 5 + [1841 + 8 * i for i in range(1, 6)] + [1849] * 3
    out["micro"][name] = [attn_call(T, backend, g) for T in lengths]
    print(name, json.dumps(out["micro"][name]), flush=True)
save()

shape = bench_model.bench_shape()
workdir = "/dev/shm/bench-model"
bench_model.build_model_dir(Path(workdir), shape, seed=42)
steps, warm = 12, 4
rows = bench_model.make_train_rows(steps * bench_model.EFFECTIVE_BATCH, shape["vocab_size"], 42, 1.0)
from stages.config import TrainParams  # noqa: E402

base = TrainParams(lora_r=32, lora_alpha=16, lora_dropout=0.05, lora_target_modules="all-linear", max_steps=steps,
                   seed=42, use_liger_kernel=False)
for variant, cudnn in (("padding_free+liger", True), ("padding_free+liger", False), ("padding_free+compile", False)):
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    bench_device.reset_peak()
    params = dataclasses.replace(base, **bench_train.TRAIN_VARIANTS[variant])
    try:
        with bench_train.undo_module_patches():
            fig = bench_train.train_project(workdir, rows, steps, warm, params, 42, None)
        fig.update(bench_device.peak_memory())
    except Exception as exc:  # noqa: BLE001
        fig = {"error": repr(exc)[:400]}
    finally:
        bench_device.release({})
        bench_device.free_memory()
    key = f"{variant} cudnn_sdp={'on' if cudnn else 'off'}"
    out["train"][key] = fig
    save()
    print(key, json.dumps({k: v for k, v in fig.items() if k not in ("grad_norms",)}), flush=True)
