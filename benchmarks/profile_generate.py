"""python benchmarks/profile_generate.py --workdir /dev/shm/bench-model --out "$OUT"

Where a decoding step of the project's generation goes (Llama-3.1-8B shape, random weights,
dequantized + bf16 as evaluate.dequantize does, batch 256, GSM8K-test-length prompts): one model
forward per step measured alone, then `generate` with and without the stop-string criteria and
with a static cache, and a torch.profiler table of a short `generate`. Writes
profile_generate_<gpu>.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_device  # noqa: E402
import bench_eval  # noqa: E402
import bench_model  # noqa: E402


def main() -> None:
    parser = bench_model.script_parser(workdir="/dev/shm/bench-model")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    import torch
    from transformers import DynamicCache, StoppingCriteriaList, StopStringCriteria

    from stages.config import EvaluateParams

    shape = bench_model.bench_shape(layers=args.layers)
    bench_model.build_model_dir(Path(args.workdir), shape, seed=0)
    model, tokenizer = bench_eval.load_project_model(args.workdir, dequantize=True)
    device = next(model.parameters()).device
    prompts = bench_model.make_eval_prompts(args.batch, shape["vocab_size"], seed=0)
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    n = args.new_tokens
    stop = StoppingCriteriaList([StopStringCriteria(tokenizer, EvaluateParams().stop)])
    results = {"gpu": bench_device.gpu_name(), "versions": bench_device.versions(), "batch": args.batch, "prompt_width": width,
               "new_tokens": n}

    def timed(fn, repeat=2):
        times = []
        for _ in range(repeat):
            bench_device.sync()
            t = time.perf_counter()
            fn()
            bench_device.sync()
            times.append(round(time.perf_counter() - t, 3))
        return times

    with torch.inference_mode():
        # The forward alone: prefill once, then n single-token steps on a DynamicCache.
        def forward_steps():
            cache = DynamicCache()
            out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            m = mask
            bench_device.sync()
            t = time.perf_counter()
            for _ in range(n):
                m = torch.cat([m, torch.ones_like(nxt)], dim=1)
                out = model(input_ids=nxt, attention_mask=m, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
            bench_device.sync()
            results.setdefault("forward_ms_per_step", []).append(round(1000 * (time.perf_counter() - t) / n, 1))

        timed(forward_steps)
        common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      top_p=None, top_k=None, temperature=None, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        variants = {
            "generate_with_stop_criteria": dict(stopping_criteria=stop),
            "generate_without_stop_criteria": {},
            "generate_static_cache": dict(stopping_criteria=stop, cache_implementation="static"),
        }
        for name, extra in variants.items():
            try:
                seconds = timed(lambda: model.generate(**common, **extra), repeat=3)
                results[name] = {"seconds": seconds, "ms_per_step_last": round(1000 * seconds[-1] / n, 1),
                                 "tokens_per_second_last": round(args.batch * n / seconds[-1], 1)}
            except Exception as exc:  # keep the other figures
                results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(name, results[name], flush=True)

        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.generate(**{**common, "max_new_tokens": 8, "min_new_tokens": 8}, stopping_criteria=stop)
        table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
        table_cuda = prof.key_averages().table(sort_by="self_device_time_total", row_limit=12)
        results["profile_self_cpu"] = table_cpu
        results["profile_self_cuda"] = table_cuda
    print("forward ms/step", results["forward_ms_per_step"])
    print(table_cpu)
    print(table_cuda)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_generate_{bench_device.slug(results['gpu'])}.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
