"""Bad inputs around the model and the stage commands: one line, exit status 2, nothing left behind."""
import json
import subprocess
import sys

import pytest

from stages.config import ModelParams
from stages.io import UserError, atomic_path

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False}


def test_missing_local_model_path_is_named():
    from stages.modeling import load_config

    with pytest.raises(UserError, match=r"model.name: './no/such/model' is not a directory"):
        load_config("./no/such/model")


def test_unreachable_hub_says_how_to_run_offline(monkeypatch):
    from stages.modeling import load_config

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the variable when it was imported: without this it would try the network
    # until a timeout (~20 s here) and only then fail.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as info:
        load_config("some-org/some-model-that-is-not-cached")
    assert "HF_HUB_OFFLINE=1" in str(info.value) and "local directory" in str(info.value)


def test_4bit_8b_model_on_a_cpu_is_refused_before_loading_weights(tmp_path, monkeypatch):
    import torch

    from stages.modeling import load_model

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.delenv("QLORA_ALLOW_CPU", raising=False)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))  # no weights at all: must not get that far
    with pytest.raises(UserError, match=r"no CUDA GPU found, so bitsandbytes would quantize and run this 8\.0B"):
        load_model(ModelParams(name=str(tmp_path)))


def test_a_failing_stage_leaves_no_output(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a\n#### 1"}) + "\n")
    params = tmp_path / "params.yaml"
    params.write_text(f"model:\n  name: {tmp_path / 'missing-model'}\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "stages.train", "--params", str(params), "--train-file", str(data),
                           "--dev-file", str(data), "--output-dir", str(out / "adapter"), "--resume-dir",
                           str(out / "resume"), "--metrics", str(out / "train.json")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: params.yaml: model.name:")
    assert not (out / "adapter").exists() and not (out / "train.json").exists()


def test_malformed_data_file_is_named_by_line(tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "#### 1", "final": "1"}) + "\n{broken\n")
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  limit: 1\n")
    proc = subprocess.run([sys.executable, "-m", "stages.evaluate", "--params", str(params), "--data-file", str(data),
                           "--metrics", str(tmp_path / "eval.json"), "--predictions", str(tmp_path / "p.jsonl")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {data}:2: malformed JSON (Expecting property name enclosed in double quotes)"
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("limit, message", [(5, "evaluate.limit: 5 is larger than")])
def test_evaluate_limit_larger_than_the_split(tmp_path, limit, message):
    from stages.config import EvaluateParams
    from stages.evaluate import select_rows

    with pytest.raises(UserError, match=message):
        select_rows([{"question": "q", "answer": "#### 1", "final": "1"}], EvaluateParams(limit=limit), "test.jsonl")


def test_atomic_path_keeps_the_old_output_when_the_write_fails(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_launcher_refuses_more_processes_than_gpus(monkeypatch):
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("enough GPUs here")
    monkeypatch.delenv("QLORA_ALLOW_CPU_DDP", raising=False)
    proc = subprocess.run([sys.executable, "-m", "stages.launch", "2", "stages.train"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "num_processes is 2 but this machine has 0 CUDA GPU(s)" in proc.stderr.strip().splitlines()[-1]
