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
