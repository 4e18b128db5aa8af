"""evaluate.dequantize (the default) scores the model that was trained: the NF4 base dequantized to
exactly the values the 4-bit matmuls use, the LoRA adapter unmerged and in the dtype it was trained
in. Merging W + BA into bf16 weights, as the stage used to, rounds away a visible part of a small
update."""
import pytest
import torch

from stages.config import ModelParams, PromptParams, TrainParams

# |evaluation logits - training logits| / |training logits - base logits|: the error as a share of
# what the adapter changes. CPU gives exactly 0 for the unmerged path; a GPU's 4-bit kernels and
# dense matmuls round differently, which stays at bf16 noise, far below the merged path's error.
BOUND = 0.01


def rows(n=16):
    return [{"question": f"Sam has {i} pens and buys {i + 2} more. How many pens does he have now?",
             "answer": f"Sam has {i} + {i + 2} = {2 * i + 2} pens.\n#### {2 * i + 2}"} for i in range(n)]


def train_adapter(tmp, model_dir, steps: int):
    """A short QLoRA run of the tiny model through stages.train.build_trainer, its adapter saved with
    the tokenizer (as the train stage saves it): (ModelParams, trained model, adapter dir)."""
    from datasets import Dataset
    from transformers import set_seed

    from stages.modeling import load_tokenizer
    from stages.train import build_trainer, tokenize_rows

    model_p = ModelParams(name=str(model_dir))
    train_p = TrainParams(max_steps=steps, max_length=384, warmup_ratio=0.0, logging_steps=steps)
    tokenizer = load_tokenizer(model_p.name)
    tokenized, _ = tokenize_rows(tokenizer, PromptParams(), rows(), train_p.max_length, "rows")
    set_seed(0)
    trainer = build_trainer(model_p, train_p, tokenizer, Dataset.from_list(tokenized),
                            Dataset.from_list(tokenized[:4]), str(tmp / "run"), eval_strategy="no",
                            save_strategy="no", disable_tqdm=True)
    trainer.train()
    trainer.model.save_pretrained(tmp / "adapter")
    tokenizer.save_pretrained(tmp / "adapter")
    return model_p, trainer.model.eval(), str(tmp / "adapter")


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A short QLoRA run in bf16 compute dtype (the default), its trainer and its saved adapter."""
    model_p, model, adapter = train_adapter(tmp_path_factory.mktemp("trained"), tiny_model_dir, 10)
    assert model_p.load_in_4bit and model_p.bnb_4bit_compute_dtype == "bfloat16"
    return model_p, model, adapter


INPUTS = torch.randint(3, 300, (4, 48), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=INPUTS).logits.float()


def test_dequantize_gives_the_values_the_4bit_matmul_multiplies_with(tiny_model_dir):
    import bitsandbytes as bnb

    from stages.modeling import load_model

    quantized = load_model(ModelParams(name=str(tiny_model_dir)))
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    nf4 = {n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state) for n, m in layers.items()}
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for name, layer in layers.items():
        with torch.no_grad():
            inp = x if layer.in_features == 64 else torch.randn(3, layer.in_features).to(torch.bfloat16)
            assert torch.equal(layer(inp), torch.nn.functional.linear(inp, nf4[name])), name
    dense = quantized.dequantize(dtype=torch.bfloat16)
    assert len(layers) == 14  # 7 linear layers x 2 decoder layers
    for name, weight in nf4.items():
        assert dense.get_submodule(name).weight.dtype == torch.bfloat16
        assert torch.equal(dense.get_submodule(name).weight.data, weight.to(torch.bfloat16)), name


def test_the_evaluated_model_is_the_trained_model(trained):
    from peft import PeftModel

    from stages.evaluate import load_for_generation
    from stages.modeling import load_model

    model_p, training_model, adapter = trained
    base = logits(load_model(model_p))
    train = logits(training_model)
    update = (train - base).norm()
    assert update > 0.01 * train.norm(), "the adapter should change the logits visibly"

    def error(model):
        return ((logits(model) - train).norm() / update).item()

    # The training-time model rebuilt from the files: 4-bit base + adapter as saved (bf16).
    reloaded = PeftModel.from_pretrained(load_model(model_p), adapter, autocast_adapter_dtype=False)
    assert error(reloaded) == 0.0

    evaluated = load_for_generation(model_p, adapter, dequantize=True)
    assert isinstance(evaluated, PeftModel) and not any(isinstance(m, __import__("bitsandbytes").nn.Linear4bit)
                                                        for m in evaluated.modules())
    assert {p.dtype for n, p in evaluated.named_parameters() if "lora_" in n} == {torch.bfloat16}
    new = error(evaluated)
    # What evaluate did before: the adapter merged into the dequantized bf16 weights.
    merged = error(PeftModel.from_pretrained(load_model(model_p).dequantize(dtype=torch.bfloat16), adapter)
                   .merge_and_unload())
    # And peft's default loading, which runs the LoRA path in float32 unlike training.
    upcast = error(PeftModel.from_pretrained(load_model(model_p).dequantize(dtype=torch.bfloat16), adapter))
    print(f"logit error / adapter's effect: unmerged {new:.4f}, merged {merged:.4f}, fp32 adapter {upcast:.4f}")
    assert new <= BOUND
    assert merged > BOUND and upcast > BOUND


def test_the_4bit_path_keeps_the_trained_adapter_dtype_too(trained):
    from stages.evaluate import load_for_generation

    model_p, training_model, adapter = trained
    assert torch.equal(logits(load_for_generation(model_p, adapter, dequantize=False)), logits(training_model))
