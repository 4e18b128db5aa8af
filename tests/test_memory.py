"""The memory estimator against the shape of the recipe and the peaks in shared/PERF-NOTES.md."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages import memory
from stages.config import EvaluateParams, ModelParams, TrainParams
from stages.io import UserError
from stages.memory import GIB

# Llama-3.1-8B (DeepSeek-R1-Distill-Llama-8B has the same shape).
LLAMA_8B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "tie_word_embeddings": False,
}
QLORA = ModelParams()  # 4-bit NF4, double quant, bf16 compute
BF16 = dataclasses.replace(QLORA, load_in_4bit=False)
# The plain recipe of PERF-NOTES: r=32 all-linear, batch 1 x 320 tokens, checkpointing, paged 8-bit Adam.
PLAIN = TrainParams(lora_r=32, lora_target_modules="all-linear", per_device_train_batch_size=1,
                    gradient_accumulation_steps=8, padding_free=False, use_liger_kernel=False,
                    max_length=320, gradient_checkpointing=True, optim="paged_adamw_8bit")


def train_total(model=QLORA, **changes) -> int:
    return memory.estimate_train(LLAMA_8B, model, dataclasses.replace(PLAIN, **changes))["total"]


@pytest.mark.parametrize("field, values", [
    ("max_length", [128, 320, 1024, 4096]),
    ("per_device_train_batch_size", [1, 2, 4, 8]),
    ("lora_r", [4, 16, 64, 256]),
])
def test_train_estimate_grows_with(field, values):
    totals = [train_total(**{field: value}) for value in values]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)


@pytest.mark.parametrize("field, values", [("batch_size", [1, 16, 64, 256]), ("max_new_tokens", [64, 256, 1024])])
def test_eval_estimate_grows_with(field, values):
    totals = [memory.estimate_eval(LLAMA_8B, QLORA, EvaluateParams(**{field: value}), 160)["total"]
              for value in values]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)


def test_4bit_weights_are_smaller_than_bf16():
    train = memory.estimate_train(LLAMA_8B, QLORA, PLAIN)["weights"]
    assert train < memory.estimate_train(LLAMA_8B, BF16, PLAIN)["weights"]
    evaluate = memory.estimate_eval(LLAMA_8B, QLORA, EvaluateParams(), 160)["weights"]
    assert evaluate < memory.estimate_eval(LLAMA_8B, QLORA, EvaluateParams(), 160, merged_bf16=True)["weights"]
    # 4-bit inference: ~3.6 GiB of NF4 projections + 2 GiB of bf16 embeddings = PERF-NOTES' 5.3 GiB load.
    assert evaluate / GIB == pytest.approx(5.3, rel=0.03)


def test_cuda_graphs_count_the_padded_length():
    # Rows are padded up to a multiple of 64 tokens for the graphs: 300 tokens are estimated as 320.
    graphs = dataclasses.replace(PLAIN, max_length=300, gradient_checkpointing=False, torch_compile=True,
                                 cuda_graphs=True)
    padded = dataclasses.replace(graphs, max_length=320)
    assert memory.estimate_train(LLAMA_8B, QLORA, graphs) == memory.estimate_train(LLAMA_8B, QLORA, padded)


@pytest.mark.parametrize("max_length", [320, 2048])
def test_checkpointing_reduces_activations(max_length):
    with_ = memory.estimate_train(LLAMA_8B, QLORA, dataclasses.replace(PLAIN, max_length=max_length))
    without = memory.estimate_train(LLAMA_8B, QLORA, dataclasses.replace(PLAIN, max_length=max_length,
                                                                         gradient_checkpointing=False))
    assert with_["activations"] < without["activations"] / 4
    assert with_["total"] < without["total"]


@pytest.mark.parametrize("case, changes, measured_gib", [
    ("all linear, batch 1 x 320", {}, 8.8),
    ("q,v only, batch 1 x 320", {"lora_target_modules": ["q_proj", "v_proj"]}, 8.2),
    ("all linear, one 2560-token micro-batch", {"max_length": 2560}, 12.6),
    ("all linear, no checkpointing", {"gradient_checkpointing": False}, 13.1),
])
def test_train_estimate_matches_perf_notes(case, changes, measured_gib):
    estimate = memory.estimate_train(LLAMA_8B, QLORA, dataclasses.replace(PLAIN, **changes))
    assert estimate["allocated"] / GIB == pytest.approx(measured_gib, rel=0.15), case


def test_train_breakdown_adds_up():
    estimate = memory.estimate_train(LLAMA_8B, QLORA, PLAIN)
    parts = ("weights", "lora", "optimizer", "activations", "logits")
    assert sum(estimate[key] for key in parts) == estimate["train_peak"]
    assert estimate["allocated"] == max(estimate["train_peak"], estimate["load_peak"])
    assert estimate["total"] == estimate["allocated"] + estimate["overhead"]


def test_dev_loss_pass_of_eight_rows_can_be_the_peak():
    alone = memory.estimate_train(LLAMA_8B, QLORA, PLAIN)
    with_dev = memory.estimate_train(LLAMA_8B, QLORA, PLAIN, dev_batch_size=8)
    assert with_dev["dev_peak"] > with_dev["train_peak"] == alone["train_peak"]
    assert with_dev["allocated"] == with_dev["dev_peak"]


def test_static_engine_prefills_in_chunks():
    """The generate engine prefills the whole batch at once; the static one PREFILL_TOKENS at a time,
    so only its activations differ, and they stop growing with the batch."""
    from stages.decode import PREFILL_TOKENS

    evaluate = EvaluateParams(batch_size=256, max_new_tokens=256, engine="generate")
    static = dataclasses.replace(evaluate, engine="static")
    full = memory.estimate_eval(LLAMA_8B, QLORA, evaluate, 200, merged_bf16=True)
    chunked = memory.estimate_eval(LLAMA_8B, QLORA, static, 200, merged_bf16=True)
    assert chunked["kv_cache"] == full["kv_cache"] and chunked["weights"] == full["weights"]
    per_token = full["activations"] / (256 * 200)
    assert chunked["activations"] == per_token * (PREFILL_TOKENS // 200 * 200)
    bigger = memory.estimate_eval(LLAMA_8B, QLORA, dataclasses.replace(static, batch_size=512), 200, merged_bf16=True)
    assert bigger["activations"] == chunked["activations"]


def test_preflight_stops_with_advice_naming_max_length():
    train = dataclasses.replace(PLAIN, max_length=8192)
    with pytest.raises(UserError) as error:
        memory.preflight_train(LLAMA_8B, QLORA, train, device_free_bytes=12 * GIB)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("memory preflight: train needs ~") and "12.0 GiB free" in message
    length = int(message.split("train.max_length <= ")[1].split(",")[0])
    # The advice is the largest multiple of 128 that fits, by the same estimator.
    assert train_total(max_length=length) <= 12 * GIB < train_total(max_length=length + 128)


def test_preflight_with_nothing_that_fits_says_so():
    with pytest.raises(UserError, match="no setting of the params fits.*smaller model"):
        memory.preflight_train(LLAMA_8B, QLORA, PLAIN, device_free_bytes=1 * GIB)


@pytest.mark.parametrize("model, train, advice", [
    (BF16, PLAIN, "model.load_in_4bit: true"),
    (QLORA, dataclasses.replace(PLAIN, max_length=1024, gradient_checkpointing=False),
     "train.gradient_checkpointing: true"),
    (QLORA, dataclasses.replace(PLAIN, per_device_train_batch_size=8, max_length=1024),
     "train.per_device_train_batch_size <= "),
    # CUDA graphs need checkpointing off: the advice turns them off with it (and does not crash).
    (QLORA, dataclasses.replace(PLAIN, max_length=1024, gradient_checkpointing=False, torch_compile=True,
                                cuda_graphs=True), "train.gradient_checkpointing: true + train.cuda_graphs: false"),
])
def test_advice_names_the_switch_that_fits(model, train, advice):
    free = train_total(model=QLORA, max_length=1024) + GIB // 10  # the plain recipe at 1024 tokens fits
    found = memory.advise_train(LLAMA_8B, model, train, free)
    assert any(line.startswith(advice) for line in found), found


def test_eval_advice():
    free = 12 * GIB
    found = memory.advise_eval(LLAMA_8B, QLORA, EvaluateParams(batch_size=256, max_new_tokens=512), 320, free)
    batch = int(found[0].removeprefix("evaluate.batch_size <= "))
    fits = lambda n: memory.estimate_eval(LLAMA_8B, QLORA, EvaluateParams(batch_size=n, max_new_tokens=512),
                                          320)["total"] <= free  # noqa: E731
    assert fits(batch) and not fits(batch + 1)


def test_eval_advice_undoes_dequantize():
    evaluate = EvaluateParams(batch_size=8, max_new_tokens=128, dequantize=True)
    free = 12 * GIB  # 4-bit fits, the merged bf16 model (~15 GiB of weights) does not
    with pytest.raises(UserError, match="try: .*evaluate.dequantize: false"):
        memory.preflight_eval(LLAMA_8B, QLORA, evaluate, 160, merged_bf16=True, device_free_bytes=free)


def test_preflight_passes_when_it_fits_and_can_be_skipped(monkeypatch):
    estimate = memory.preflight_train(LLAMA_8B, QLORA, PLAIN, device_free_bytes=80 * GIB)
    assert estimate["total"] < 12 * GIB
    monkeypatch.setenv("QLORA_SKIP_PREFLIGHT", "1")
    assert memory.preflight_train(LLAMA_8B, QLORA, PLAIN, device_free_bytes=1 * GIB)["total"] == estimate["total"]


def test_preflight_without_cuda_only_prints(monkeypatch, capsys):
    monkeypatch.setattr(memory, "cuda_free_bytes", lambda: None)
    memory.preflight_eval(LLAMA_8B, QLORA, EvaluateParams(), 320)
    assert "no CUDA device, not checked" in capsys.readouterr().out


def test_preflight_skips_a_config_it_does_not_know(capsys):
    gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "vocab_size": 50257}
    assert memory.preflight_train(gpt2, QLORA, PLAIN, device_free_bytes=1 * GIB) == {}
    assert "skipping the memory preflight" in capsys.readouterr().out


def test_oom_message_reports_the_peak_and_advice():
    train = dataclasses.replace(PLAIN, max_length=4096)
    line = memory.oom_message("train", LLAMA_8B, QLORA, train, peak_bytes=int(23.5 * GIB), total_bytes=24 * GIB)
    assert "\n" not in line and "peak 23.5 GiB" in line and "train.max_length <= " in line


def test_format_breakdown_is_an_aligned_table():
    table = memory.format_breakdown(memory.estimate_train(LLAMA_8B, QLORA, PLAIN)).splitlines()
    rows = [row for row in table if not row.startswith("-")]
    assert [row.split()[0] for row in rows][:2] == ["weights", "lora"] and rows[-1].startswith("total")
    assert len({row.index("GiB") for row in rows}) == 1


def test_missing_local_model_directory(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        memory.load_model_config(str(tmp_path / "absent"))


def test_cli_exits_2_with_one_line_when_it_does_not_fit(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    small = {**LLAMA_8B, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
             "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32000}
    (model_dir / "config.json").write_text(json.dumps(small))
    params = tmp_path / "params.yaml"
    params.write_text(f"model:\n  name: {model_dir}\ntrain:\n  max_length: 16384\n")
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-m", "stages.memory", "--params", str(params), "--stage", "train",
                          "--free-gib", "1"], cwd=root, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: memory preflight: train needs ~") and "train.max_length <= " in errors[0]
    assert "weights" in run.stdout and "does not fit: 1.0 GiB free" in run.stdout
