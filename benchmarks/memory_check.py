"""Check stages/memory.py's estimates against peaks measured on a GPU, for Llama 1B/3B/8B shapes.

    python benchmarks/memory_check.py --workdir /tmp/memory_check [--shapes 1b,3b,8b] [--lengths 256,1024] [--out DIR_OR_JSON]
    python benchmarks/memory_check.py --tiny --out /tmp/mc.json     # CPU: runs the code path, measures nothing

For each shape: random bf16 weights (the config of Llama-3.2-1B, Llama-3.2-3B or Llama-3.1-8B; no
download) are saved once under --workdir, then every case reloads them as the train stage would:
4-bit NF4 with double quantization and bf16 compute, `prepare_model_for_kbit_training` with
non-reentrant gradient checkpointing, LoRA r=32 alpha 16 dropout 0.05 on all linear layers,
`bnb.optim.PagedAdamW8bit`; 3 optimizer steps of 2 micro-batches of one row of random token ids
(forward with labels, backward). The peak (torch.cuda.max_memory_allocated, reset before the load
so that loading counts) is compared with `estimate_train(...)["allocated"]` for the same params.
One evaluation case per shape: the same 4-bit model with a fresh LoRA adapter, greedy `generate`
of 128 new tokens for 64 prompts of 160 tokens, against `estimate_eval`.

Writes `memory_check_<gpu>.json` (and a .md table) into --out (a directory, default
benchmarks/results/, or a .json path); cases already in that file for other shapes or lengths are
kept, so the shapes can be run in separate calls. All 6 train cases + 3 eval cases take about 5
minutes on an H100, most of it saving and reloading the 8B checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `stages` without installing

import torch  # noqa: E402

from stages.config import EvaluateParams, ModelParams, TrainParams  # noqa: E402
from stages.io import atomic_path, write_json  # noqa: E402
from stages.memory import GIB, estimate_eval, estimate_train, load_model_config  # noqa: E402

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=False)
OPTIMIZER_STEPS = 3
ACCUMULATION = 2  # so that LoRA gradients are held while the second micro-batch's loss backpropagates
TOLERANCE = 0.15
MODEL = ModelParams(name="set per shape", load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype="bfloat16", attn_implementation="sdpa")


def train_params(length: int) -> TrainParams:
    return TrainParams(lora_r=32, lora_alpha=16, lora_dropout=0.05, lora_target_modules="all-linear",
                       per_device_train_batch_size=1, gradient_accumulation_steps=ACCUMULATION,
                       gradient_checkpointing=True, optim="paged_adamw_8bit", learning_rate=2e-4,
                       max_length=length)


def save_random_checkpoint(shape: dict, directory: Path, device: str) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, max_position_embeddings=4096, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes for 8B
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    del model
    free_memory()


def load_4bit(directory: Path, device: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization, dtype=torch.bfloat16,
                                                device_map={"": torch.cuda.current_device() if device == "cuda" else "cpu"},
                                                attn_implementation="sdpa")


def add_lora(model, device: str):
    import peft

    lora = peft.LoraConfig(r=32, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    if device == "cpu":  # bitsandbytes' AVX512-BF16 inference path breaks under autograd
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_snapshot() -> dict:
    """PyTorch's allocated bytes, and what the GPU has in use beyond its allocator (CUDA context,
    lazily loaded kernels, bitsandbytes' paged optimizer state)."""
    if not torch.cuda.is_available():
        return {"allocated": None, "outside_pytorch": None}
    free, total = torch.cuda.mem_get_info()
    return {"allocated": torch.cuda.memory_allocated(), "outside_pytorch": total - free - torch.cuda.memory_reserved()}


def reset_peaks() -> dict:
    free_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return device_snapshot()


def peaks(start: dict) -> dict:
    """Peaks since `reset_peaks`, less what was already allocated then (nothing, normally)."""
    if not torch.cuda.is_available():
        return {"allocated": None, "reserved": None, "baseline": None, "outside_pytorch_growth": None}
    return {"allocated": torch.cuda.max_memory_allocated() - start["allocated"],
            "reserved": torch.cuda.max_memory_reserved(), "baseline": start["allocated"],
            "outside_pytorch_growth": device_snapshot()["outside_pytorch"] - start["outside_pytorch"]}


def train_case(directory: Path, vocab: int, length: int, device: str) -> dict:
    import bitsandbytes as bnb
    import peft

    start = reset_peaks()
    model = load_4bit(directory, device)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                 gradient_checkpointing_kwargs={"use_reentrant": False})
    after_prepare = torch.cuda.max_memory_allocated() - start["allocated"] if torch.cuda.is_available() else None
    model = add_lora(model, device)
    model.train()  # transformers checkpoints only in training mode
    optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(OPTIMIZER_STEPS):
        for _ in range(ACCUMULATION):
            ids = torch.randint(0, vocab, (1, length), device=device, generator=generator)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss / ACCUMULATION).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = {**peaks(start), "after_prepare": after_prepare, "loss": round(loss.item(), 3)}
    optimizer.page_mng.paged_tensors.clear()  # bitsandbytes' global page manager would keep them listed
    del model, optimizer, loss
    free_memory()
    return measured


def eval_case(directory: Path, vocab: int, batch: int, prompt_tokens: int, new_tokens: int, device: str) -> dict:
    start = reset_peaks()
    model = add_lora(load_4bit(directory, device), device)
    model.eval()
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt_tokens), device=device, generator=generator)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    measured = {**peaks(start), "generated_tokens": int(out.shape[1] - prompt_tokens)}
    del model, out
    free_memory()
    return measured


def compare(case: dict, estimate: dict, measured: dict) -> dict:
    allocated = measured["allocated"]
    ratio = estimate["allocated"] / allocated if allocated else None
    return {**case, "estimate": estimate, "measured": measured,
            "ratio": None if ratio is None else round(ratio, 4),
            "within_15pct": None if ratio is None else abs(ratio - 1) <= TOLERANCE}


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def output_path(out: str) -> Path:
    if out.endswith(".json"):
        return Path(out)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name().lower()).strip("-")
    return Path(out) / f"memory_check_{slug}.json"


def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def gib(n) -> str:
    return "—" if n is None else f"{n / GIB:.2f}"


def markdown(result: dict) -> str:
    rows = [f"Measured on {result['gpu']} ({', '.join(f'{k} {v}' for k, v in result['versions'].items())}).", "",
            "| shape | case | tokens | estimate GiB | measured allocated GiB | ratio | within ±15% "
            "| load peak est. / measured GiB | estimate total GiB | measured reserved GiB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        ratio = "—" if c["ratio"] is None else f"{c['ratio']:.3f}"
        within = "—" if c["within_15pct"] is None else ("yes" if c["within_15pct"] else "**no**")
        load = (f"{gib(c['estimate']['load_peak'])} / {gib(c['measured']['after_prepare'])}"
                if c["kind"] == "train" else "—")
        rows.append(f"| {c['shape']} | {c['kind']} | {c['tokens']} | {gib(c['estimate']['allocated'])} "
                    f"| {gib(c['measured']['allocated'])} | {ratio} | {within} | {load} "
                    f"| {gib(c['estimate']['total'])} | {gib(c['measured']['reserved'])} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1b,3b,8b")
    parser.add_argument("--lengths", default="256,1024", help="tokens per micro-batch (one row)")
    parser.add_argument("--workdir", default="/tmp/memory_check", help="where the random checkpoints go")
    parser.add_argument("--out", default="benchmarks/results", help="a directory or a .json path")
    parser.add_argument("--no-eval", action="store_true", help="skip the generation cases")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 Llama, for a CPU smoke run")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = {"tiny": TINY} if args.tiny else {name: SHAPES[name] for name in args.shapes.split(",")}
    lengths = [int(n) for n in args.lengths.split(",")]
    batch, prompt_tokens, new_tokens = (4, 16, 8) if args.tiny else (64, 160, 128)
    out = output_path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {"cases": []}
    cases = []
    for name, shape in shapes.items():
        directory = Path(args.workdir) / name
        started = time.perf_counter()
        save_random_checkpoint(shape, directory, device)
        print(f"{name}: saved random weights in {time.perf_counter() - started:.0f} s", flush=True)
        config = load_model_config(str(directory))
        model = dataclasses.replace(MODEL, name=str(directory))
        for length in lengths:
            started = time.perf_counter()
            measured = train_case(directory, shape["vocab_size"], length, device)
            case = compare({"shape": name, "kind": "train", "tokens": length},
                           estimate_train(config, model, train_params(length)), measured)
            case["seconds"] = round(time.perf_counter() - started, 1)
            cases.append(case)
            print(f"{name} train {length}: estimate {gib(case['estimate']['allocated'])} GiB, "
                  f"measured {gib(measured['allocated'])} GiB ({case['seconds']} s)", flush=True)
        if not args.no_eval:
            started = time.perf_counter()
            measured = eval_case(directory, shape["vocab_size"], batch, prompt_tokens, new_tokens, device)
            evaluate = EvaluateParams(batch_size=batch, max_new_tokens=new_tokens, engine="generate")
            case = compare({"shape": name, "kind": "eval", "tokens": batch * (prompt_tokens + new_tokens)},
                           estimate_eval(config, model, evaluate, prompt_tokens, adapter=train_params(lengths[0])),
                           measured)
            case["seconds"] = round(time.perf_counter() - started, 1)
            cases.append(case)
            print(f"{name} eval {batch}x({prompt_tokens}+{new_tokens}): estimate "
                  f"{gib(case['estimate']['allocated'])} GiB, measured {gib(measured['allocated'])} GiB", flush=True)
        shutil.rmtree(directory, ignore_errors=True)

    replaced = {(c["shape"], c["kind"], c["tokens"]) for c in cases}
    kept = [c for c in previous.get("cases", []) if (c["shape"], c["kind"], c["tokens"]) not in replaced]
    result = {"gpu": gpu_name(), "versions": versions(),
              "recipe": "4-bit NF4 double quant bf16 compute; prepare_model_for_kbit_training, non-reentrant "
                        "checkpointing; LoRA r=32 alpha 16 dropout 0.05 all-linear; PagedAdamW8bit; "
                        f"{OPTIMIZER_STEPS} steps x {ACCUMULATION} micro-batches of 1 row; eval: greedy generate "
                        f"batch {batch}, {prompt_tokens}-token prompts, {new_tokens} new tokens, fresh LoRA",
              "tolerance": TOLERANCE, "cases": kept + cases}
    write_json(out, result)
    table = markdown(result)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
