"""OUT=<dir> python benchmarks/diagnose_decode.py [--tiny]  (run 17, benchmarks/results/diagnose_run17_<gpu>.json)

Where the static engine's evaluation time goes (Llama-3.1-8B shape, random weights, dequantized as
evaluate.dequantize does, GSM8K-test-length prompts): for batch 1,319 (evaluate.batch_size: auto on an
H200) and 128 (a 40 GB card), the prefill alone and the seconds per decoding step (steps 33-96 of
stages.decode.greedy_decode, CUDA graphs on; written for the engine of run 17, which decoded a batch
without taking further questions into its rows), under each SDPA backend that takes a float mask; then a
torch.profiler table (CUDA time per op) of the prefill alone and of the prefill + 32 eager steps.
Then training: padding-free + torch_compile with the 4-bit projections written as dequantize + linear
(stages.train.recomputable_4bit_matmuls) and without (bitsandbytes' own matmul), tokens/s and peak memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_device  # noqa: E402
import bench_eval  # noqa: E402
import bench_model  # noqa: E402
import bench_train  # noqa: E402


def timed(fn):
    bench_device.sync()
    start = time.perf_counter()
    out = fn()
    bench_device.sync()
    return time.perf_counter() - start, out


def stop_after(n_tokens):
    return lambda i, ids: len(ids) >= n_tokens


def grouped_matmul_attention(original):
    """A decoding step's attention as two matmuls per KV head (the query heads of a group as rows):
    the cache is read once per step, whatever SDPA's kernels do with 4 query rows and a float mask."""
    import torch

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        b, heads, q_len, dim = query.shape
        kv_heads = key.shape[1]
        if q_len != 1 or attention_mask is None or attention_mask.shape[1] != 1 or kwargs.get("softcap"):
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        grouped = query.reshape(b, kv_heads, heads // kv_heads, dim)
        scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * (scaling or dim ** -0.5)
        probs = (scores + attention_mask.float()).softmax(-1).to(value.dtype)
        out = torch.matmul(probs, value)                      # [b, kv_heads, group, dim]
        return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None

    return attention


def decode_section(workdir, shape, batches, new_tokens, tiny, out, save):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import stages.decode
    from stages.decode import CHECK_EVERY, greedy_decode

    model, tokenizer = bench_eval.load_project_model(workdir, dequantize=True)
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    prompts = bench_model.make_eval_prompts(bench_model.GSM8K_TEST_SIZE, shape["vocab_size"], seed=42,
                                            scale=0.25 if tiny else 1.0)
    backends = {"default": None, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "math": SDPBackend.MATH, "default, prefill at the batch's width": None,
                "grouped matmul attention": None}
    first, last = CHECK_EVERY + 1, 2 * CHECK_EVERY + 1
    chunked = stages.decode.prefill_chunks

    def padded(lengths):  # the prefill before prefill_chunks: every chunk at the batch's width
        rows = max(1, stages.decode.PREFILL_TOKENS // max(lengths))
        return [(slice(s, min(s + rows, len(lengths))), max(lengths)) for s in range(0, len(lengths), rows)]
    for rows in batches:
        reference = None
        batch = prompts[:rows]
        entry = out["decode"].setdefault(str(rows), {"width": max(map(len, batch)),
                                                     "mean_prompt": sum(map(len, batch)) / rows})

        def decode(n_new, n_stop, graph=on_gpu, batch=batch, rows=rows):
            return greedy_decode(model, batch, rows, n_new, tokenizer.pad_token_id, stop_after(n_stop), use_graph=graph)

        for name, backend in backends.items():
            ctx = sdpa_kernel(backend) if backend is not None else torch.autocast("cpu", enabled=False)
            stages.decode.prefill_chunks = padded if "prefill at" in name else chunked
            if name == "grouped matmul attention":
                ALL_ATTENTION_FUNCTIONS["sdpa"] = grouped_matmul_attention(ALL_ATTENTION_FUNCTIONS["sdpa"])
            try:
                with ctx, torch.inference_mode():
                    decode(1, 1)  # warm-up
                    prefill, _ = timed(lambda: decode(1, 1))
                    short, _ = timed(lambda: decode(new_tokens, first))
                    long_, tokens = timed(lambda: decode(new_tokens, last))
                tokens = torch.tensor([ids[:last] for ids in tokens])
                step_ms = (long_ - short) / (last - first) * 1e3
                entry[name] = {"prefill_s": round(prefill, 3), "step_ms": round(step_ms, 2),
                               "estimated_full_batch_s": round(prefill + (new_tokens - 1) * step_ms / 1e3, 2)}
                reference = reference if name != "default" else tokens[:, :last]
                # bf16 near-ties on random weights flip the argmax between kernels: the first token
                # (the prefill's) and whole rows, as a rough check that nothing is broken.
                entry[name]["same_first_token_rows"] = int((tokens[:, 0] == reference[:, 0]).sum())
                entry[name]["identical_rows"] = int((tokens[:, :last] == reference).all(dim=1).sum())
            except Exception as exc:  # noqa: BLE001 - a backend that refuses the inputs: record it
                entry[name] = {"error": repr(exc)[:300]}
            finally:
                stages.decode.prefill_chunks = chunked
                if "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping:
                    del ALL_ATTENTION_FUNCTIONS["sdpa"]
            print(f"decode b{rows} {name}: {json.dumps(entry[name])}", flush=True)
            save()
        if on_gpu:
            from torch.profiler import ProfilerActivity, profile

            for label, n_tokens in (("prefill", 1), ("prefill+32_eager_steps", first)):
                with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    decode(new_tokens if n_tokens > 1 else 1, n_tokens, graph=False)
                    bench_device.sync()
                entry[f"profile/{label}"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                                                      max_name_column_width=60)
                save()
        bench_device.free_memory()
    bench_device.release({"model": model})
    del model


def train_section(workdir, shape, steps, warmup, out, save):
    import stages.train
    from stages.config import TrainParams

    rows = bench_model.make_train_rows(steps * bench_model.EFFECTIVE_BATCH, shape["vocab_size"], 42, 1.0)
    base = TrainParams(lora_r=32, lora_alpha=16, lora_dropout=0.05, lora_target_modules="all-linear", max_steps=steps,
                       seed=42, use_liger_kernel=False)
    original = stages.train.recomputable_4bit_matmuls
    for variant, recompute in (("padding_free+compile", True), ("padding_free+compile", False),
                               ("padding_free+liger", False)):
        stages.train.recomputable_4bit_matmuls = original if recompute else (lambda module: 0)
        bench_device.reset_peak()
        params = dataclasses.replace(base, **bench_train.TRAIN_VARIANTS[variant])
        try:
            with bench_train.undo_module_patches():
                fig = bench_train.train_project(workdir, rows, steps, warmup, params, 42, None)
            fig.update(bench_device.peak_memory())
        except Exception as exc:  # noqa: BLE001
            fig = {"error": repr(exc)[:400]}
        finally:
            stages.train.recomputable_4bit_matmuls = original
            bench_device.release({})
        key = f"{variant}{' dequantize+linear' if recompute else ''}"
        out["train"][key] = {k: v for k, v in fig.items() if k != "grad_norms"}
        save()
        print(key, json.dumps(out["train"][key]), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--sections", default="decode,train")
    args = p.parse_args()
    bench_device.quiet_libraries()
    shape = bench_model.bench_shape(tiny=args.tiny)
    workdir = "/dev/shm/bench-model" if not args.tiny else os.path.join(os.environ["OUT"], "tiny-model")
    out = {"gpu": bench_device.gpu_name(), "versions": bench_device.versions(), "command": " ".join(sys.argv),
           "decode": {}, "train": {}}
    path = Path(os.environ["OUT"]) / f"diagnose_run17_{bench_device.slug(out['gpu'])}.json"

    def save():
        path.write_text(json.dumps(out, indent=1) + "\n")

    out["build"] = bench_model.build_model_dir(Path(workdir), shape, seed=42)
    if "decode" in args.sections:
        decode_section(workdir, shape, (8, 4) if args.tiny else (1319, 128), 128 if args.tiny else 256, args.tiny,
                       out, save)
    if "train" in args.sections:
        train_section(workdir, shape, 3 if args.tiny else 8, 1 if args.tiny else 3, out, save)
    save()


if __name__ == "__main__":
    main()
