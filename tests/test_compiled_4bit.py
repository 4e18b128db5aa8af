"""train.torch_compile with gradient checkpointing writes each 4-bit projection as bitsandbytes'
dequantize + F.linear (stages.train.recomputable_4bit_matmuls), so that the compiled backward
recomputes it instead of keeping its output. It must compute what bitsandbytes' own 4-bit matmul
computes: the same outputs and the same input gradients, module by module, and the same training."""
import pytest
import torch

from stages.config import ModelParams
from tests.test_train import make_trainer, step_losses


def linear4bit_modules(model):
    import bitsandbytes as bnb

    return [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_dequantize_linear_equals_bitsandbytes_matmul_outputs_and_gradients(tiny_model_dir):
    from stages.modeling import load_model
    from stages.train import recomputable_4bit_matmuls

    model = load_model(ModelParams(name=str(tiny_model_dir)))
    modules = linear4bit_modules(model)
    assert modules
    torch.manual_seed(0)
    inputs = {name: torch.randn(3, 5, m.in_features, dtype=torch.bfloat16) for name, m in modules}
    reference = {}
    for name, module in modules:
        module.support_avx512bf16_for_cpu = False  # the training path, not the CPU inference repacking
        x = inputs[name].clone().requires_grad_()
        out = module(x)
        out.float().square().sum().backward()
        reference[name] = (out.detach(), x.grad)
    assert recomputable_4bit_matmuls(model) == len(modules)
    for name, module in modules:
        x = inputs[name].clone().requires_grad_()
        out = module(x)
        out.float().square().sum().backward()
        assert out.dtype == reference[name][0].dtype
        assert torch.equal(out.detach(), reference[name][0]), name
        assert torch.equal(x.grad, reference[name][1]), name


@pytest.mark.parametrize("checkpointing", [True, False])
def test_compiling_installs_it_only_inside_checkpointing(tiny_model_dir, tmp_path, checkpointing):
    from stages.train import _dequantize_linear_forward

    trainer, _ = make_trainer(tiny_model_dir, tmp_path, max_steps=1, torch_compile=True,
                              gradient_checkpointing=checkpointing)
    forwards = [m.forward for _, m in linear4bit_modules(trainer.model)]
    assert forwards and all((getattr(f, "__func__", None) is _dequantize_linear_forward) == checkpointing
                            for f in forwards)


def test_compiled_checkpointed_padding_free_trains_what_eager_trains(tiny_model_dir, tmp_path):
    """Two optimizer steps of the default padding-free batch, compiled and eager, from the same init."""
    common = dict(max_steps=2, per_device_train_batch_size=8, gradient_accumulation_steps=1, padding_free=True)
    eager, _ = make_trainer(tiny_model_dir, tmp_path / "eager", **common)
    compiled, _ = make_trainer(tiny_model_dir, tmp_path / "compiled", torch_compile=True, **common)
    assert step_losses(compiled) == pytest.approx(step_losses(eager), rel=2e-3)


def run_train_stage(model_dir, tmp_path, name: str, **train) -> dict:
    """`python -m stages.train` as dvc.yaml runs it: a dev pass and a checkpoint mid-run, then the adapter."""
    import json
    import subprocess
    import sys

    import yaml

    from tests.test_logs import rows as stage_rows

    (tmp_path / "train.jsonl").write_text(stage_rows(16))
    (tmp_path / "dev.jsonl").write_text(stage_rows(2))
    params = tmp_path / f"{name}.yaml"
    params.write_text(yaml.safe_dump({"model": {"name": str(model_dir)}, "train": {
        "max_steps": 4, "save_steps": 2, "eval_steps": 2, "logging_steps": 1, "max_length": 128, "warmup_ratio": 0.0,
        **train}}))
    out = tmp_path / name
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train", "--params", str(params),
         "--train-file", str(tmp_path / "train.jsonl"), "--dev-file", str(tmp_path / "dev.jsonl"),
         "--output-dir", str(out / "adapter"), "--resume-dir", str(out / "resume"), "--metrics", str(out / "train.json"),
         "--run-info", str(out / "train_run.json")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    return {**json.loads((out / "train_run.json").read_text()), "stdout": proc.stdout}


def test_the_train_stage_compiled_runs_dev_passes_and_checkpoints_and_says_what_ran(tiny_model_dir, tmp_path):
    """What `torch_compile: auto` does on a bf16 GPU, run through the stage on CPU (where auto does not
    compile, so the test asks for it): the dev passes (no gradients: a second compilation), a checkpoint
    mid-run, the adapter; the run file records the kernels that ran, and the losses are the eager stage's."""
    compiled = run_train_stage(tiny_model_dir, tmp_path, "compiled", torch_compile=True)
    eager = run_train_stage(tiny_model_dir, tmp_path, "eager")  # auto on CPU: neither compiled nor Liger
    assert (compiled["torch_compile"], compiled["use_liger_kernel"]) == (True, False)
    assert (eager["torch_compile"], eager["use_liger_kernel"]) == (False, False)
    assert "compiling the 2 decoder layers" in compiled["stdout"] and "compiling" not in eager["stdout"]
    assert compiled["steps"] == eager["steps"] == 4
    for key in ("dev_loss", "train_loss", "train_loss_mean"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-3), key
