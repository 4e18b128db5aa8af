"""The benchmark's model and data: a Llama of a real shape with random weights, its tokenizer, and token rows of
GSM8K's length distribution (train rows with a completion mask, test prompts).

The model directory is written once and reused while its config matches the shape. Its tokenizer is a
word-level one whose token "w<id>" is id <id>, for every id of the vocabulary: a prompt of N ids is the
question "w.. w.." of N-1 words (plus BOS), which the project's own `generate` encodes back to exactly
those ids, and any generated id decodes. Rows are drawn row by row from a seed, so every path and every
run reads the same rows in the same order, and the first k rows are the same whatever n is.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_device import free_memory

LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                   max_position_embeddings=8192)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, rope_theta=500000.0,
            max_position_embeddings=2048)
SHAPE_KEYS = tuple(LLAMA_31_8B)

# GSM8K in Llama-3 tokens: train rows (prompt template + question + solution + EOS) and test prompts.
TRAIN_LENGTHS = dict(mean=240, sd=60, min=120, max=450, prompt_mean=110, prompt_sd=20, prompt_min=60)
EVAL_LENGTHS = dict(mean=160, sd=35, min=90, max=300)
GSM8K_TEST_SIZE = 1319
EFFECTIVE_BATCH = 8

# Llama-3's special-token ids, for the full vocabulary; small vocabularies put them first.
LLAMA3_SPECIALS = {"bos": (128000, "<|begin_of_text|>"), "eos": (128001, "<|end_of_text|>"),
                   "unk": (128002, "<|reserved_special_token_0|>"), "pad": (128004, "<|finetune_right_pad_id|>")}
SMALL_SPECIALS = {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (3, "<pad>")}

def specials_for(vocab_size: int) -> dict:
    return LLAMA3_SPECIALS if vocab_size > 128004 else SMALL_SPECIALS


# transformers' StopStringCriteria (generate's stop strings) learns how tokens render by encoding
# this word and decoding it in front of each token, so it must be a token of its own; and every stop
# string must be a token too, or it refuses to start.
PROBE_WORD = "abcdef"


def default_stops() -> list[str]:
    """The stop strings evaluate uses by default: evaluate.stop, or where it is null the train_prompt
    protocol's own (stages/protocols.py)."""
    from stages.config import EvaluateParams

    stop = EvaluateParams().stop
    if stop is None:
        from stages.protocols import TRAIN_PROMPT_STOP

        stop = TRAIN_PROMPT_STOP
    return list(stop)


def reserved_tokens(vocab_size: int) -> dict[int, str]:
    """id -> token for everything that is not a word "w<id>": specials, the probe word, the stop strings."""
    names = {i: name for i, name in specials_for(vocab_size).values()}
    free = (i for i in range(128000 if vocab_size > 128004 else 0, vocab_size) if i not in names)
    for token in [PROBE_WORD] + default_stops():
        if token not in names.values():
            names[next(free)] = token
    return names


def word_id_range(vocab_size: int) -> tuple[int, int]:
    """Ids that stand for ordinary words "w<id>": none of the reserved tokens among them."""
    return (0, 128000) if vocab_size > 128004 else (max(reserved_tokens(vocab_size)) + 1, vocab_size)


def bench_shape(tiny: bool = False, layers: int | None = None) -> dict:
    """The benchmark's config fields: the 8B shape (TINY for CPU runs), optionally with fewer layers."""
    return dict(TINY if tiny else LLAMA_31_8B, **({"num_hidden_layers": layers} if layers else {}))


def build_tokenizer(vocab_size: int):
    """Word-level tokenizer over the whole vocabulary: "w<id>" is id <id>; BOS is prepended like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = specials_for(vocab_size)
    names = reserved_tokens(vocab_size)
    vocab = {names.get(i, f"w{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk"][1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos_id, bos = specials["bos"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=specials["eos"][1],
                                   pad_token=specials["pad"][1], unk_token=specials["unk"][1],
                                   model_max_length=8192)


def llama_config(shape: dict):
    from transformers import LlamaConfig

    specials = specials_for(shape["vocab_size"])
    return LlamaConfig(**shape, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
                       mlp_bias=False, bos_token_id=specials["bos"][0], eos_token_id=specials["eos"][0],
                       pad_token_id=specials["pad"][0])


def existing_shape_matches(workdir: Path, shape: dict) -> bool:
    path = workdir / "config.json"
    if not path.is_file() or not (workdir / "tokenizer.json").is_file():
        return False
    saved = json.loads(path.read_text())
    # transformers 5 writes rope_theta inside rope_parameters
    saved.setdefault("rope_theta", (saved.get("rope_parameters") or {}).get("rope_theta"))
    return all(saved.get(k) == shape[k] for k in SHAPE_KEYS)


def build_model_dir(workdir: Path, shape: dict, seed: int) -> dict:
    """Random bf16 Llama of `shape`, created on the GPU (fast init), saved as safetensors + tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    from stages.io import atomic_path

    if existing_shape_matches(workdir, shape):
        return {"reused": True, "seconds": 0.0}
    started = time.perf_counter()
    config = llama_config(shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # bf16 from the start: 16 GB for 8B, not 32 GB of fp32 first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)  # Llama's own init: normal(0, 0.02), norms at 1
    finally:
        torch.set_default_dtype(previous)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        # Greedy decoding of random weights must never pick EOS, pad or a stop string, so that every row
        # generates exactly the tokens asked for (generate() counts up to the first EOS/pad): a zero
        # logit never wins against the vocabulary's logits of sd ~1.
        for i in reserved_tokens(shape["vocab_size"]):
            model.lm_head.weight[i].zero_()
    n_params = sum(p.numel() for p in model.parameters())
    with atomic_path(workdir) as tmp:
        model.save_pretrained(tmp)
        build_tokenizer(shape["vocab_size"]).save_pretrained(tmp)
    del model
    free_memory()
    return {"reused": False, "seconds": round(time.perf_counter() - started, 1), "params": n_params}


# The train section's LoRA (params.yaml: lora_r 32, lora_alpha 16, all-linear): the adapter the
# evaluation variants load, as `evaluate` loads a trained one.
EVAL_ADAPTER = dict(r=32, alpha=16, targets="all-linear")


def adapter_dir(workdir: Path) -> Path:
    """Inside the model directory: a rebuilt model (atomic_path) takes its stale adapter with it."""
    return Path(workdir) / f"adapter_r{EVAL_ADAPTER['r']}"


def lora_on_meta(workdir: Path):
    """The model of `workdir` under peft's LoRA (EVAL_ADAPTER, through stages.train.build_lora_config),
    on the meta device: the adapter's names and shapes, with no weight of the base read or allocated."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from stages.config import TrainParams
    from stages.train import build_lora_config

    config = AutoConfig.from_pretrained(workdir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    train_p = TrainParams(lora_r=EVAL_ADAPTER["r"], lora_alpha=EVAL_ADAPTER["alpha"],
                          lora_target_modules=EVAL_ADAPTER["targets"])
    return get_peft_model(model, build_lora_config(train_p))


def saved_adapter_matches(path: Path, expected: dict) -> bool:
    """Whether `path` holds an adapter of EVAL_ADAPTER's r and alpha with exactly the tensors
    {saved name: shape} of `expected` (the same model shape and target modules)."""
    from safetensors import safe_open

    config_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not (config_file.is_file() and weights.is_file() and (path / "tokenizer.json").is_file()):
        return False
    saved = json.loads(config_file.read_text())
    if (saved.get("r"), saved.get("lora_alpha")) != (EVAL_ADAPTER["r"], EVAL_ADAPTER["alpha"]):
        return False
    with safe_open(str(weights), "pt") as f:
        return {key: list(f.get_slice(key).get_shape()) for key in f.keys()} == expected


def build_adapter_dir(workdir: Path, seed: int) -> dict:
    """A LoRA adapter for the model in `workdir`, written as the train stage leaves one (peft's
    save_pretrained: adapter_config.json and a bf16 adapter_model.safetensors, which is what TRL
    trains on a 4-bit base; the tokenizer beside it), with random weights: A ~ N(0, 1/in_features),
    about the scale of peft's init, which training keeps; B ~ N(0, 1e-3), not peft's zeros, so that
    the adapter changes the logits as a trained one does, by a little, and the random base's stay
    finite. From the config alone, on a meta-device model (2.3 s at the 8B shape on a CPU): the
    16 GB base is never loaded for it. Reused while its r, alpha and tensors' names and shapes match."""
    import torch
    from transformers import AutoTokenizer

    from stages.io import atomic_path

    started = time.perf_counter()
    path = adapter_dir(workdir)
    model = lora_on_meta(workdir)
    prefix = f".{model.active_adapter}."  # peft saves the names without the adapter's
    lora = {name: param for name, param in model.named_parameters() if "lora_" in name}
    expected = {name.replace(prefix, "."): list(param.shape) for name, param in lora.items()}
    info = {**EVAL_ADAPTER, "path": str(path), "tensors": len(lora)}
    if saved_adapter_matches(path, expected):
        return {**info, "reused": True, "seconds": 0.0}
    generator = torch.Generator().manual_seed(seed)
    for name, param in lora.items():
        out_features, in_features = param.shape
        scale = in_features ** -0.5 if ".lora_A." in name else 1e-3
        value = (torch.randn(out_features, in_features, generator=generator) * scale).to(torch.bfloat16)
        module_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(value, requires_grad=False))
    with atomic_path(path) as tmp:
        # The base's embeddings are not targeted (all-linear) and its vocabulary is unchanged.
        model.save_pretrained(tmp, save_embedding_layers=False)
        AutoTokenizer.from_pretrained(workdir).save_pretrained(tmp)
    return {**info, "reused": False, "seconds": round(time.perf_counter() - started, 1),
            "params": sum(p.numel() for p in lora.values())}


def load_plain_4bit(workdir: str):
    """The recipe's model: NF4, double quantization, bf16 compute, written the usual way."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from stages.modeling import disable_cpu_bf16_repack

    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        workdir,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
        dtype=torch.bfloat16, device_map={"": 0} if on_gpu else None, attn_implementation="sdpa")
    if not on_gpu:
        disable_cpu_bf16_repack(model)  # bitsandbytes' AVX512-BF16 path breaks backward
    return model


def clipped_normal(rng, mean, sd, lo, hi) -> int:
    return int(min(max(round(rng.normal(mean, sd)), lo), hi))


def scaled(lengths: dict, scale: float) -> dict:
    return {k: max(1, round(v * scale)) for k, v in lengths.items()}


def make_train_rows(n: int, vocab_size: int, seed: int, scale: float = 1.0) -> list[dict]:
    """Rows like stages.train.tokenize_rows writes: BOS + prompt + answer + EOS, mask on answer + EOS.
    Drawn row by row, so the first k rows are the same whatever n is."""
    import numpy as np

    rng = np.random.default_rng(seed)
    specials = specials_for(vocab_size)
    lo, hi = word_id_range(vocab_size)
    d = scaled(TRAIN_LENGTHS, scale)
    rows = []
    for _ in range(n):
        length = clipped_normal(rng, d["mean"], d["sd"], d["min"], d["max"])
        prompt_len = clipped_normal(rng, d["prompt_mean"], d["prompt_sd"], d["prompt_min"], length // 2)
        ids = [specials["bos"][0]] + rng.integers(lo, hi, length - 2).tolist() + [specials["eos"][0]]
        rows.append({"input_ids": ids, "completion_mask": [0] * prompt_len + [1] * (length - prompt_len)})
    return rows


def make_eval_prompts(n: int, vocab_size: int, seed: int, scale: float = 1.0) -> list[list[int]]:
    """Token-id prompts (BOS first) of GSM8K-test lengths; the first k are the same whatever n is."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    bos = specials_for(vocab_size)["bos"][0]
    lo, hi = word_id_range(vocab_size)
    d = scaled(EVAL_LENGTHS, scale)
    return [[bos] + rng.integers(lo, hi, clipped_normal(rng, d["mean"], d["sd"], d["min"], d["max"]) - 1).tolist()
            for _ in range(n)]


# Where a GSM8K answer ends, in tokens: the benchmark's training rows' answers (TRAIN_LENGTHS: 240 in
# all less a 110-token prompt, sd ~sqrt(60^2 - 20^2)), at least 30, at most the generation budget.
ANSWER_LENGTHS = dict(mean=130, sd=57, min=30)


def make_answer_lengths(n: int, seed: int, budget: int, scale: float = 1.0) -> list[int]:
    """How many tokens each of n answers runs before it ends (random weights never end one)."""
    import numpy as np

    rng = np.random.default_rng(seed + 2)
    d = scaled(ANSWER_LENGTHS, scale)
    return [clipped_normal(rng, d["mean"], d["sd"], min(d["min"], budget), budget) for _ in range(n)]


def as_question(prompt_ids: list[int]) -> str:
    """The question text that the benchmark tokenizer encodes (with template "{question}") to prompt_ids."""
    return " ".join(f"w{i}" for i in prompt_ids[1:])


def default_workdir(shape: dict) -> str:
    """A RAM disk when it has room: writing 16 GB of safetensors to a slow disk takes minutes."""
    import shutil

    from stages.modeling import estimate_param_count

    needed = 2 * estimate_param_count(shape) * 1.2 + 2**30
    shm = Path("/dev/shm")
    if shm.is_dir() and (existing_shape_matches(shm / "bench-model", shape) or shutil.disk_usage(shm).free > needed):
        return str(shm / "bench-model")
    return "/tmp/bench-model"


def script_parser(workdir: str) -> argparse.ArgumentParser:
    """The options every script built on this benchmark's model takes (pipeline_8b.py, profile_*.py):
    where the model is built (`workdir`: its default), where results go, how many layers."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=workdir)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--layers", type=int, default=None)
    return parser

