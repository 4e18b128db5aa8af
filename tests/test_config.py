"""params.yaml validation: every bad value is one line naming the file and the dotted key."""
import subprocess
import sys

import pytest
import yaml

from stages.config import SECTIONS, load_params
from stages.io import UserError
from tests.committed import committed_text


def write_params(tmp_path, **sections):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


def test_defaults_load_and_match_the_committed_params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(committed_text("params.yaml"))
    parsed = load_params(path, *SECTIONS)
    assert {type(p) for p in parsed} == set(SECTIONS.values())
    train = load_params(path, "train")
    # 8 sequences per optimizer step as one padding-free micro-batch: the card's batch 1 × accumulation 8,
    # trained faster (README "Speed").
    assert (train.lora_r, train.per_device_train_batch_size, train.gradient_accumulation_steps) == (32, 8, 1)
    assert train.padding_free and train.optim == "paged_adamw_8bit" and train.gradient_checkpointing


@pytest.mark.parametrize("sections, expected", [
    ({"train": {"lora_rr": 16}}, "train.lora_rr: unknown key (did you mean 'train.lora_r'?)"),
    ({"trian": {"lora_r": 16}}, "trian: unknown section (did you mean 'train'?)"),
    ({"train": {"lora_r": 0}}, "train.lora_r: must be > 0, got 0"),
    ({"train": {"lora_r": "big"}}, "train.lora_r: expected int, got 'big'"),
    ({"train": {"lora_r": 8.5}}, "train.lora_r: expected int"),
    ({"train": {"lora_dropout": 1.0}}, "train.lora_dropout: must be in [0, 1), got 1.0"),
    ({"train": {"gradient_accumulation_steps": 0}}, "train.gradient_accumulation_steps: must be > 0, got 0"),
    ({"train": {"gradient_checkpointing": "yes"}}, "train.gradient_checkpointing: expected bool"),
    ({"train": {"optim": "sgd"}}, "train.optim: must be one of"),
    ({"train": {"lora_target_modules": []}}, "train.lora_target_modules: must be 'all-linear' or a non-empty list"),
    ({"train": {"cuda_graphs": True, "gradient_checkpointing": False}},
     "train.cuda_graphs: true needs train.torch_compile: true"),
    ({"train": {"cuda_graphs": True, "torch_compile": True, "use_liger_kernel": False}},
     "train.cuda_graphs: true needs train.gradient_checkpointing: false"),
    ({"train": {"cuda_graphs": True, "torch_compile": True, "gradient_checkpointing": False, "num_processes": 2}},
     "train.cuda_graphs: true runs on one GPU only; train.num_processes is 2"),
    ({"train": {"torch_compile": "yes"}}, "train.torch_compile: must be true, false or auto, got 'yes'"),
    ({"train": {"use_liger_kernel": 1}}, "train.use_liger_kernel: expected bool | str, got 1"),
    ({"train": {"torch_compile": True, "use_liger_kernel": True}},
     "train.torch_compile: true needs train.use_liger_kernel: false or auto"),
    ({"train": {"cuda_graphs": True, "torch_compile": "auto", "gradient_checkpointing": False}},
     "train.cuda_graphs: true needs train.torch_compile: true"),
    ({"model": {"bnb_4bit_quant_type": "int4"}}, "model.bnb_4bit_quant_type: must be nf4 or fp4"),
    ({"prompt": {"template": "no placeholder"}}, "prompt.template: must contain {question}"),
    ({"prompt": {"template": "{question} {oops}"}}, "prompt.template: is not a valid format string"),
    ({"data": {"dev_size": 0}}, "data.dev_size: must be >= 1, got 0"),
    ({"train": {"learning_rate": float("inf")}}, "train.learning_rate: expected a finite number, got inf"),
    ({"train": {"learning_rate": float("nan")}}, "train.learning_rate: expected a finite number, got nan"),
    ({"train": {"max_grad_norm": float("-inf")}}, "train.max_grad_norm: expected a finite number, got -inf"),
    ({"evaluate": {"temperature": float("inf")}}, "evaluate.temperature: expected a finite number, got inf"),
    ({"prompt": {"chat_template_kwargs": ["enable_thinking"]}}, "prompt.chat_template_kwargs: expected dict"),
    ({"data": {"limit": 0}}, "data.limit: must be > 0 or null, got 0"),
    ({"evaluate": {"split": "validation"}}, "evaluate.split: must be test, dev or train"),
    ({"evaluate": {"batch_size": 0}}, "evaluate.batch_size: must be > 0 or auto, got 0"),
    ({"evaluate": {"batch_size": "max"}}, "evaluate.batch_size: must be > 0 or auto, got 'max'"),
    ({"evaluate": {"protocol": "lm_eval_gsm8"}}, "evaluate.protocol: unknown protocol 'lm_eval_gsm8' (did you mean 'lm_eval_gsm8k'?)"),
    ({"evaluate": {"protocol": "lm_eval_gsm8k", "stop": ["\n\n"]}}, "evaluate.stop: lm_eval_gsm8k stops where lm-eval does"),
    ({"evaluate": {"protocol": "lm_eval_gsm8k", "max_new_tokens": 512}}, "evaluate.max_new_tokens: lm_eval_gsm8k's budget is lm-eval's 256"),
    ({"evaluate": {"protocol": "lm_eval_gsm8k_cot_llama", "greedy": False, "engine": "generate"}},
     "evaluate.greedy: lm_eval_gsm8k_cot_llama decodes greedily"),
    # Its examples come from the train split, which holds dev: a dev question was drawn as an example at once.
    ({"evaluate": {"split": "dev", "protocol": "lm_eval_gsm8k"}},
     "evaluate.split: dev with protocol lm_eval_gsm8k: its few-shot examples are drawn from the train split"),
    ({"evaluate": {"think_end": ""}}, "evaluate.think_end: must be a non-empty marker"),
    ({"evaluate": {"unclosed_thinking": "drop"}}, "evaluate.unclosed_thinking: must be no_answer or keep"),
])
def test_bad_values_name_the_key(tmp_path, sections, expected):
    path = write_params(tmp_path, **sections)
    with pytest.raises(UserError) as info:
        load_params(path, *SECTIONS)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message
    assert "\n" not in message


@pytest.mark.parametrize("train, on_gpu, dtype, compiled, liger", [
    ({}, True, "bfloat16", True, False),                             # the measured fast path
    ({}, False, "bfloat16", False, False),                           # CPU: neither
    ({}, True, "float16", False, True),                              # T4/V100: never measured compiled
    ({"num_processes": 2}, True, "bfloat16", False, True),           # DDP: likewise
    ({"use_liger_kernel": True}, True, "bfloat16", False, True),     # Liger asked for: no compile
    ({"use_liger_kernel": False}, True, "bfloat16", True, False),
    ({"torch_compile": False}, True, "bfloat16", False, True),       # compile off: Liger instead
    ({"torch_compile": False, "use_liger_kernel": False}, True, "bfloat16", False, False),
    ({"torch_compile": True}, False, "bfloat16", True, False),       # asked for: compiled on CPU too
    ({"use_liger_kernel": True}, False, "bfloat16", False, True),    # (the trainer ignores it on CPU, saying so)
])
def test_auto_kernels_resolve_per_machine(tmp_path, train, on_gpu, dtype, compiled, liger):
    resolved = load_params(write_params(tmp_path, train=train), "train").resolved(on_gpu, dtype)
    assert (resolved.torch_compile, resolved.use_liger_kernel) == (compiled, liger)
    assert resolved.resolved(on_gpu, dtype) == resolved  # booleans stay as they are


def test_committed_kernels_are_auto(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(committed_text("params.yaml"))
    train = load_params(path, "train")
    assert (train.torch_compile, train.use_liger_kernel) == ("auto", "auto")


@pytest.mark.parametrize("value, expected", [("2e-4", 2e-4), (1, 1.0), (0.0002, 0.0002)])
def test_learning_rate_accepts_yaml_number_spellings(tmp_path, value, expected):
    assert load_params(write_params(tmp_path, train={"learning_rate": value}), "train").learning_rate == expected


def test_lora_targets_accept_a_list(tmp_path):
    train = load_params(write_params(tmp_path, train={"lora_target_modules": ["q_proj", "v_proj"]}), "train")
    assert train.lora_target_modules == ["q_proj", "v_proj"]


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lora_r: 16\n  bad: [unclosed\n")
    with pytest.raises(UserError, match=r"params.yaml:\d+: not valid YAML"):
        load_params(path, "train")


def test_stage_exits_2_with_one_line_before_loading_anything(tmp_path):
    path = write_params(tmp_path, data={"source": "gsm_symbolic", "num_problem": 10})
    out = tmp_path / "train.jsonl"
    proc = subprocess.run([sys.executable, "-m", "stages.prepare", "--params", str(path), "--train", str(out),
                           "--dev", str(tmp_path / "dev.jsonl"), "--test", str(tmp_path / "test.jsonl"),
                           "--fewshot", str(tmp_path / "fewshot.jsonl")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {path}: data.num_problem: unknown key (did you mean 'data.num_problems'?)"
    assert not out.exists()
