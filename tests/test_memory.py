"""stages/memory.py: its counts against real objects on tiny models of every family, real-size configs
(config-only, no weights), the peaks measured on the H200 (shared/PERF-NOTES.md), the auto batch,
the advice and the CLI; benchmarks/memory_check.py's code path on CPU."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stages import memory
from stages.config import EvaluateParams, ModelParams, TrainParams
from stages.io import UserError
from stages.memory import GIB
from stages.tiny_model import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
LLAMA_8B_DIR = ROOT / "tests" / "configs" / "llama-3.1-8b"
LLAMA_8B = json.loads((LLAMA_8B_DIR / "config.json").read_text())
QLORA = ModelParams()  # 4-bit NF4, double quant, bf16 compute
BF16 = dataclasses.replace(QLORA, load_in_4bit=False)
# padding-free 8 rows, checkpointing, r=32 all-linear, paged 8-bit Adam; on a bf16 GPU (what the
# estimate is for) "auto" compiles the layers, Liger off.
DEFAULT = TrainParams()
LIGER = dataclasses.replace(DEFAULT, torch_compile=False, use_liger_kernel=True)
CARD = dataclasses.replace(DEFAULT, per_device_train_batch_size=1, gradient_accumulation_steps=8, padding_free=False)
GRAPHS = dataclasses.replace(CARD, use_liger_kernel=False, torch_compile=True, gradient_checkpointing=False,
                             cuda_graphs=True)
EVAL = EvaluateParams(max_new_tokens=256, batch_size=128)

# Real sizes, as the published config.json files give them (what matters for memory).
REAL = {
    "llama": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
    "qwen2": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen3": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "mistral": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32000, sliding_window=4096, tie_word_embeddings=False),
    "gemma2": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=256, vocab_size=256000, sliding_window=4096,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True),
    "gemma3": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=256, vocab_size=262208, sliding_window=1024,
                   tie_word_embeddings=True),
    "phi3": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, sliding_window=2047, tie_word_embeddings=False),
}
# Parameter counts of the published checkpoints (Llama-3.1-8B, Qwen2.5-7B, Qwen3-8B, Mistral-7B-v0.1,
# Gemma-2-9B, Phi-3-mini-4k): the meta instance must count what the real model has.
REAL_PARAMS = {"llama": 8_030_261_248, "qwen2": 7_615_616_512, "qwen3": 8_190_735_360, "mistral": 7_241_732_096,
               "gemma2": 9_241_705_984, "phi3": 3_821_079_552}


def config_dict(family: str, **fields) -> dict:
    import transformers

    return getattr(transformers, FAMILIES[family][0])(**fields).to_dict()


def tiny_fields(family: str, **overrides) -> dict:
    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family != "llama":
        fields["head_dim"] = 16
    return {**fields, **overrides}


def tiny_model(family: str, **overrides):
    import torch
    import transformers

    config = getattr(transformers, FAMILIES[family][0])(**tiny_fields(family, **overrides))
    torch.manual_seed(0)
    return getattr(transformers, FAMILIES[family][1])(config)


def peft_trainable(model, targets, r: int = 8) -> int:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


# ----------------------------------------------------------------- counts against the real objects

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_model_counts_equal_the_real_objects(family):
    """Parameters and LoRA parameters equal the instantiated model's and peft's, exactly."""
    import torch

    model = tiny_model(family)
    arch = memory.read_architecture(model.config.to_dict())
    assert arch.quantized_params + arch.float_params == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings())
    assert arch.quantized_params == linear
    assert memory.lora_params(arch, "all-linear", 8) == peft_trainable(model, "all-linear")


@pytest.mark.parametrize("family, targets", [
    ("phi3", ["qkv_proj", "gate_up_proj"]),  # fused projections: what the old Llama table dropped
    ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ("llama", ["q_proj", "v_proj"]),
    ("qwen3", ["k_proj", "down_proj"]),
])
def test_explicit_targets_count_what_peft_adapts(family, targets):
    model = tiny_model(family)
    arch = memory.read_architecture(model.config.to_dict())
    assert memory.lora_params(arch, targets, 8) == peft_trainable(model, targets)


@pytest.mark.parametrize("family", sorted(REAL_PARAMS))
def test_real_size_parameter_counts(family):
    arch = memory.read_architecture(config_dict(family, **REAL[family]))
    assert arch.quantized_params + arch.float_params == REAL_PARAMS[family]


def test_phi3_fused_lora_at_real_size():
    """The issue's figure: 50.3M LoRA parameters at r=32 on Phi-3-mini's four fused projections."""
    arch = memory.read_architecture(config_dict("phi3", **REAL["phi3"]))
    assert memory.lora_params(arch, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], 32) == 50_331_648
    assert memory.lora_params(arch, "all-linear", 32) == 50_331_648


def test_norms_of_each_family_are_read_off_the_model():
    norms = {f: memory.read_architecture(config_dict(f, **REAL[f])).norm_inputs for f in ("llama", "qwen3", "gemma2")}
    assert norms["llama"] == 2 * 4096
    assert norms["qwen3"] == 2 * 4096 + 32 * 128 + 8 * 128  # q/k RMSNorm over every head
    assert norms["gemma2"] == 4 * 3584  # pre/post attention and feed-forward
    gemma2 = memory.read_architecture(config_dict("gemma2", **REAL["gemma2"]))
    assert gemma2.tied and gemma2.attn_softcapping and gemma2.final_softcapping


@pytest.mark.parametrize("family, overrides", [
    ("mistral", dict(sliding_window=8)),
    ("gemma2", dict(sliding_window=8)),
    ("gemma3", dict(sliding_window=8, num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention",
                                                                        "full_attention"])),
    ("phi3", dict(sliding_window=8)),
])
def test_kv_cache_equals_what_the_engine_allocates(family, overrides):
    """The static engine allocates every layer at full length: the estimate's bytes are its buffers'.
    Under generate a sliding layer holds its window only."""
    import torch

    from stages.decode import allocate_cache

    model = tiny_model(family, **overrides)
    arch = memory.read_architecture(model.config.to_dict())
    keys, values = allocate_cache(model.config, 3, 40, torch.bfloat16, "cpu")
    allocated = sum(t.numel() * t.element_size() for t in keys + values)
    assert memory.kv_cache_bytes(arch, 3, 40, 2, "static") == allocated
    sliding = sum(kind == "sliding_attention" for kind in arch.layer_types)
    per_slot = allocated // (arch.layers * 40)
    assert sliding >= 1
    assert memory.kv_cache_bytes(arch, 3, 40, 2, "generate") == per_slot * (sliding * 8 + (arch.layers - sliding) * 40)


def test_gemma3_real_size_layer_types():
    arch = memory.read_architecture(config_dict("gemma3", **REAL["gemma3"]))
    assert arch.layer_types.count("full_attention") == 8 and arch.sliding_window == 1024
    per_slot = 2 * 8 * 256 * 2  # keys and values, 8 KV heads of 256, bf16
    assert memory.kv_cache_bytes(arch, 1, 4096, 2, "static") == 48 * 4096 * per_slot
    assert memory.kv_cache_bytes(arch, 1, 4096, 2, "generate") == (8 * 4096 + 40 * 1024) * per_slot


# ------------------------------------------------------------------- the measured peaks (H200)

@pytest.mark.parametrize("case, train, tokens, measured_gib", [
    ("padding-free 8 rows + Liger", LIGER, 2295, 6.67),
    ("card + torch_compile + cuda_graphs, rows padded to 448", GRAPHS, 448, 8.84),
    # bench run 18: peak 7.334 GiB less 0.063 held from before; its largest step had 2,204 tokens
    ("default: padding-free + torch_compile", DEFAULT, 2204, 7.27),
])
def test_train_estimate_matches_the_h200(case, train, tokens, measured_gib):
    estimate = memory.estimate_train(LLAMA_8B, QLORA, train, tokens=tokens)
    assert estimate["allocated"] / GIB == pytest.approx(measured_gib, rel=0.10), case
    assert estimate["total"] > estimate["allocated"]


@pytest.mark.parametrize("batch, measured_gib", [(128, 28.2), (440, 49.0), (1319, 107.5)])
def test_eval_estimate_matches_the_h200(batch, measured_gib):
    # 1,319 prompts of GSM8K-test length (the longest 290 tokens), 256 new tokens, dequantized base.
    estimate = memory.estimate_eval(LLAMA_8B, QLORA, EVAL, 290, merged_bf16=True, batch=batch)
    assert estimate["allocated"] / GIB == pytest.approx(measured_gib, rel=0.10)


def test_4bit_weights_are_the_measured_load():
    assert memory.estimate_eval(LLAMA_8B, QLORA, EVAL, 160, batch=1)["weights"] / GIB == pytest.approx(5.3, rel=0.02)


def test_the_default_8b_run_fits_a_16_gb_card():
    """Every row at max_length, the worst case: still within a 16 GB card's ~15 GiB."""
    estimate = memory.preflight_train(LLAMA_8B, QLORA, DEFAULT, device_free_bytes=15 * GIB)
    assert estimate["tokens"] == 8 * 512 and estimate["total"] < 15 * GIB


def test_lora_and_embeddings_in_the_dtypes_trl_uses():
    qlora = memory.estimate_train(LLAMA_8B, QLORA, DEFAULT)
    bf16 = memory.estimate_train(LLAMA_8B, BF16, DEFAULT)
    n = memory.lora_params(memory.read_architecture(LLAMA_8B), "all-linear", 32)
    assert qlora["lora"] == 2 * 2 * n  # TRL casts the adapter to bf16 on a 4-bit base
    assert bf16["lora"] == 2 * 4 * n  # peft's fp32 adapter otherwise
    embeddings = 2 * 128256 * 4096
    assert qlora["weights"] - memory.quantized_bytes(memory.read_architecture(LLAMA_8B).quantized_params, True) \
        == 2 * (embeddings + 65 * 4096)


def test_paged_optimizer_state_is_on_the_gpu_but_not_allocated():
    paged = memory.estimate_train(LLAMA_8B, QLORA, DEFAULT)
    unpaged = memory.estimate_train(LLAMA_8B, QLORA, dataclasses.replace(DEFAULT, optim="adamw_8bit"))
    assert paged["optimizer"] == unpaged["optimizer"]
    assert unpaged["allocated"] - paged["allocated"] == paged["optimizer"]
    assert paged["total"] == pytest.approx(unpaged["total"], rel=0.02)


@pytest.mark.parametrize("train, lengths, tokens", [
    (DEFAULT, [100, 300, 200] * 4, 4 * 300 + 4 * 200),  # padding-free: the 8 longest rows
    (CARD, [100, 300, 200], 300),
    (GRAPHS, [100, 300, 200], 320),  # padded up to the graphs' multiple of 64
    (dataclasses.replace(CARD, per_device_train_batch_size=4), [100, 600, 200], 4 * 512),  # cut at max_length
])
def test_micro_batch_tokens(train, lengths, tokens):
    assert memory.micro_batch_tokens(train, lengths) == tokens


@pytest.mark.parametrize("field, values", [
    ("max_length", [128, 512, 2048]), ("per_device_train_batch_size", [1, 4, 8]), ("lora_r", [4, 32, 256]),
])
def test_train_estimate_grows_with(field, values):
    totals = [memory.estimate_train(LLAMA_8B, QLORA, dataclasses.replace(DEFAULT, **{field: v}))["total"]
              for v in values]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)


def test_checkpointing_and_compile():
    def act(**changes):
        return memory.estimate_train(LLAMA_8B, QLORA, dataclasses.replace(CARD, **changes))["activations"]

    assert act() < act(gradient_checkpointing=False) / 4
    assert act(use_liger_kernel=False, torch_compile=True) > act(use_liger_kernel=False, torch_compile=False)
    assert act() == act(use_liger_kernel=False, torch_compile=True)  # what "auto" is on a bf16 GPU


# --------------------------------------------------------------------------- evaluate, auto batch

def test_static_engine_prefills_in_chunks():
    generate = dataclasses.replace(EVAL, batch_size=256, engine="generate")
    static = dataclasses.replace(generate, engine="static")
    full = memory.estimate_eval(LLAMA_8B, QLORA, generate, 200, merged_bf16=True)
    chunked = memory.estimate_eval(LLAMA_8B, QLORA, static, 200, merged_bf16=True)
    assert chunked["activations"] < full["activations"] / 5
    bigger = memory.estimate_eval(LLAMA_8B, QLORA, dataclasses.replace(static, batch_size=512), 200, merged_bf16=True)
    assert bigger["activations"] == chunked["activations"]


def test_auto_batch_is_the_largest_that_fits():
    free = 40 * GIB
    batch = memory.auto_eval_batch(LLAMA_8B, QLORA, EVAL, 290, free, 1319, merged_bf16=True, adapter=DEFAULT)

    def total(n):
        return memory.estimate_eval(LLAMA_8B, QLORA, EVAL, 290, True, DEFAULT, batch=n)["total"]

    assert 100 < batch < 1319 and total(batch) <= free < total(batch + 1)
    assert memory.auto_eval_batch(LLAMA_8B, QLORA, EVAL, 290, 139 * GIB, 200, True, DEFAULT) == 200  # questions cap
    assert memory.auto_eval_batch(LLAMA_8B, QLORA, EVAL, 290, None, 1319, True, DEFAULT) == \
        memory.AUTO_BATCH_WITHOUT_GPU


def test_auto_batch_that_would_be_zero_says_what_fits():
    with pytest.raises(UserError) as error:
        memory.auto_eval_batch(LLAMA_8B, QLORA, EVAL, 290, 15 * GIB, 1319, merged_bf16=True, adapter=DEFAULT)
    line = str(error.value)
    assert "\n" not in line and "evaluate (batch 1) needs ~" in line and "evaluate.dequantize: false" in line


def test_preflight_eval_with_auto_returns_the_batch(capsys):
    auto = dataclasses.replace(EVAL)
    object.__setattr__(auto, "batch_size", "auto")  # until EvaluateParams accepts "auto" itself
    estimate = memory.preflight_eval(LLAMA_8B, QLORA, auto, 290, merged_bf16=True, device_free_bytes=40 * GIB,
                                     adapter=DEFAULT, n_questions=1319)
    assert estimate["batch_size"] == memory.auto_eval_batch(LLAMA_8B, QLORA, EVAL, 290, 40 * GIB, 1319, True, DEFAULT)
    assert f"batch_size auto: {estimate['batch_size']}" in capsys.readouterr().out


def test_eval_advice_undoes_dequantize():
    evaluate = EvaluateParams(batch_size=8, max_new_tokens=128, dequantize=True)
    with pytest.raises(UserError, match="try: .*evaluate.dequantize: false"):
        memory.preflight_eval(LLAMA_8B, QLORA, evaluate, 160, merged_bf16=True, device_free_bytes=12 * GIB)


# ------------------------------------------------------------------------------- advice, refusals

def test_refusal_advice_applied_fits():
    train = dataclasses.replace(DEFAULT, max_length=16384)
    free = 12 * GIB
    with pytest.raises(UserError) as error:
        memory.preflight_train(LLAMA_8B, QLORA, train, device_free_bytes=free)
    message = str(error.value)
    assert "\n" not in message and message.startswith("memory preflight: train needs ~")
    length = int(message.split("train.max_length <= ")[1].split(",")[0])
    fits = memory.estimate_train(LLAMA_8B, QLORA, dataclasses.replace(train, max_length=length))["total"]
    assert fits <= free < memory.estimate_train(LLAMA_8B, QLORA, dataclasses.replace(train, max_length=length + 128))[
        "total"]


def test_eval_refusal_on_a_16_gb_card_advice_applied_fits():
    """The dequantized 8B base alone is 15 GiB: the advice is the 4-bit base with the batch that fits."""
    evaluate = dataclasses.replace(EVAL, max_new_tokens=512)
    with pytest.raises(UserError) as error:
        memory.preflight_eval(LLAMA_8B, QLORA, evaluate, 320, merged_bf16=True, device_free_bytes=15 * GIB,
                              adapter=DEFAULT)
    batch = int(str(error.value).split("evaluate.dequantize: false + evaluate.batch_size <= ")[1].split(" ")[0])
    assert memory.estimate_eval(LLAMA_8B, QLORA, evaluate, 320, False, DEFAULT, batch=batch)["total"] <= 15 * GIB


def test_advice_turns_off_graphs_with_checkpointing():
    train = dataclasses.replace(GRAPHS, max_length=2048)
    free = memory.estimate_train(LLAMA_8B, QLORA, memory.with_checkpointing(train))["total"] + GIB // 10
    found = memory.advise_train(LLAMA_8B, QLORA, train, free)
    assert "train.gradient_checkpointing: true + train.cuda_graphs: false" in found


def test_nothing_fits_says_so():
    with pytest.raises(UserError, match="no setting of the params fits.*smaller model"):
        memory.preflight_train(LLAMA_8B, QLORA, DEFAULT, device_free_bytes=1 * GIB)


def test_skip_env_and_no_cuda(monkeypatch, capsys):
    monkeypatch.setenv("QLORA_SKIP_PREFLIGHT", "1")
    assert memory.preflight_train(LLAMA_8B, QLORA, DEFAULT, device_free_bytes=1 * GIB)["total"] > GIB
    monkeypatch.delenv("QLORA_SKIP_PREFLIGHT")
    monkeypatch.setattr(memory, "cuda_free_bytes", lambda: None)
    memory.preflight_eval(LLAMA_8B, QLORA, EVAL, 320)
    assert "no CUDA device, not checked" in capsys.readouterr().out


def test_each_rank_measures_its_own_gpu(monkeypatch):
    """Under `accelerate launch` the preflight runs before a rank is placed on its GPU: it asks for
    GPU LOCAL_RANK's free memory, not the current device's (GPU 0 for every rank until then)."""
    import torch

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (7 * GIB, 80 * GIB))
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert memory.cuda_free_bytes() == 7 * GIB
    monkeypatch.delenv("LOCAL_RANK")
    memory.cuda_free_bytes()
    # A launcher that shows each rank its one GPU (CUDA_VISIBLE_DEVICES per rank): device 0 is the rank's.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    memory.cuda_free_bytes()
    assert asked == [3, 0, 0]


@pytest.mark.parametrize("config, field", [
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 512}, "num_attention_heads"),
    ({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "vocab_size": 50257}, "hidden_size"),
    # A multimodal wrapper: the decoder's numbers are read from text_config, and what it lacks is named.
    ({"model_type": "llava", "text_config": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                             "vocab_size": 512}}, "num_attention_heads"),
])
def test_a_config_it_cannot_read_is_a_warning(config, field, capsys):
    assert memory.preflight_train(config, QLORA, DEFAULT, device_free_bytes=1 * GIB) == {}
    out = capsys.readouterr().out
    assert field in out and "skipping the memory preflight" in out
    line = memory.oom_message("train", config, QLORA, DEFAULT, peak_bytes=GIB, total_bytes=16 * GIB)
    assert "\n" not in line and "ran out of GPU memory" in line


def test_a_wrapper_with_a_complete_text_config_is_estimated():
    wrapper = {"model_type": "llava", "text_config": LLAMA_8B}
    assert memory.estimate_train(wrapper, QLORA, DEFAULT) == memory.estimate_train(LLAMA_8B, QLORA, DEFAULT)


def test_oom_message_reports_the_peak_and_advice():
    train = dataclasses.replace(DEFAULT, max_length=8192)
    line = memory.oom_message("train", LLAMA_8B, QLORA, train, peak_bytes=int(15.5 * GIB), total_bytes=16 * GIB)
    assert "\n" not in line and "peak 15.5 GiB" in line and "train.max_length <= " in line


def test_format_breakdown_is_an_aligned_table():
    table = memory.format_breakdown(memory.estimate_train(LLAMA_8B, QLORA, DEFAULT)).splitlines()
    rows = [row for row in table if "GiB" in row]
    assert rows[0].split()[0] == "weights" and rows[-1].startswith("total")
    assert len({row.index("GiB") for row in rows}) == 1


# ------------------------------------------------------------------------------------------ CLI

def run_cli(capsys, *args):
    """stages.memory's main in-process (a subprocess would import torch again): (exit status, stdout, stderr)."""
    try:
        memory.main(list(args))
        status = 0
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_default_8b_fits_15_gib(capsys):
    status, out, err = run_cli(capsys, "--config-dir", str(LLAMA_8B_DIR), "--stage", "train", "--free-gib", "15")
    assert status == 0, err
    assert "fits: 15.0 GiB free" in out


def test_cli_exits_2_with_one_line_when_it_does_not_fit(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  max_length: 4096\n")
    status, out, err = run_cli(capsys, "--params", str(params), "--config-dir", str(LLAMA_8B_DIR), "--stage", "train",
                               "--free-gib", "6")
    assert status == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: memory preflight: train needs ~")
    assert "does not fit: 6.0 GiB free" in out


def test_cli_config_dir_without_config(tmp_path, capsys):
    status, _, err = run_cli(capsys, "--config-dir", str(tmp_path), "--stage", "train")
    assert status == 2 and "no config.json there" in err


# ------------------------------------------------------------------------- benchmarks/memory_check.py

def test_memory_check_runs_the_stages_code_on_cpu(tmp_path):
    out = tmp_path / "mc.json"
    run = subprocess.run([sys.executable, "benchmarks/memory_check.py", "--tiny", "--cases",
                          "train_default,eval_default", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    cases = {c["case"]: c for c in result["cases"]}
    assert set(cases) == {"train_default", "eval_default"} and not any("error" in c for c in cases.values())
    train = cases["train_default"]
    assert train["measured"]["losses_finite"] and train["estimate"]["tokens"] == train["setting"]["tokens"]
    assert cases["eval_default"]["measured"]["generated_tokens"] == 8 * 8
    assert out.with_suffix(".md").read_text().count("| tiny |") == 2
    # each case ran in its own process; eval_default loaded the adapter train_default saved
    assert cases["eval_default"]["setting"]["adapter"] and cases["eval_default"]["inputs"]["adapter"]
    assert {"config", "model", "train", "dev_batch_size", "tokens"} <= set(train["inputs"])
    # --report recomputes the same estimates from the recorded inputs, with no model
    estimates = {c["case"]: c["estimate"] for c in result["cases"]}
    report = subprocess.run([sys.executable, "benchmarks/memory_check.py", "--report", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
    again = json.loads(out.read_text())
    assert {c["case"]: c["estimate"] for c in again["cases"]} == estimates
    assert "--report" in out.with_suffix(".md").read_text()
