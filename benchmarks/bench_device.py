"""The machine a benchmark runs on: synchronising, measuring and freeing GPU memory, names and versions.

Imported by every file of benchmarks/ (bench.py, bench_train.py, bench_eval.py, bench_unsloth.py,
profile_*.py); torch and the libraries are imported inside the functions, so that importing this is instant.
"""
from __future__ import annotations

import gc
import os
import platform
import re
import sys


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "cpu"


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'unknown'})"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "liger_kernel"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "installed")
        except Exception:  # noqa: BLE001 - absent or broken: say so, keep going
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


def quiet_libraries() -> None:
    """No Hub (there is none on the GPU machine) and no progress bars flooding the log."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def release(loaded: dict) -> None:
    """Drop the model held in `loaded`, and what the process keeps of earlier variants: compiled code
    and bitsandbytes' optimizer registrations, which hold models alive."""
    loaded.clear()
    if "torch._dynamo" in sys.modules:  # compiled code (train variants with torch.compile) holds models
        sys.modules["torch._dynamo"].reset()  # CUDA-graph trees (train.cuda_graphs) included
        sys.modules["torch._dynamo"].utils.counters.clear()
    if "bitsandbytes" in sys.modules:
        # The Trainer registers every nn.Embedding with bitsandbytes' process-wide GlobalOptimManager
        # (32-bit optimizer states for it) and never unregisters it: each trainer's input embedding,
        # 1 GiB for the 8B shape, stayed allocated through the later variants (runs 1-11).
        sys.modules["bitsandbytes"].optim.GlobalOptimManager.get_instance().initialize()
    free_memory()
