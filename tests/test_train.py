"""train on the tiny 4-bit model: LoRA learns, the base stays frozen, the adapter reloads and generates;
the padding-free fast path trains the same thing as the card's batch 1 × accumulation 8."""
import json

import pytest
import torch

from stages.config import ModelParams, PromptParams, TrainParams
from stages.train import build_trainer, per_rank_batch, tokenize_rows


def rows(n=16):
    return [{"question": f"Sam has {i} pens and buys {i + 2} more. How many pens does he have now?",
             "answer": f"Sam has {i} + {i + 2} = {2 * i + 2} pens.\n#### {2 * i + 2}"} for i in range(n)]


def make_trainer(model_dir, tmp_path, **train_kwargs):
    from datasets import Dataset
    from transformers import set_seed

    from stages.modeling import load_tokenizer

    model_p, prompt_p = ModelParams(name=str(model_dir)), PromptParams()
    # The card's recipe unless a test says otherwise (batch 1 × 8, padded, no Liger).
    train_p = TrainParams(**{"max_length": 384, "logging_steps": 1, "eval_steps": 100, "save_steps": 100,
                             "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8,
                             "padding_free": False, "use_liger_kernel": False, **train_kwargs})
    tokenizer = load_tokenizer(model_p.name)
    tokenized, _ = tokenize_rows(tokenizer, prompt_p, rows(), train_p.max_length, "rows")
    set_seed(train_p.seed)
    trainer = build_trainer(model_p, train_p, tokenizer, Dataset.from_list(tokenized), Dataset.from_list(tokenized[:4]),
                            str(tmp_path / "run"), eval_strategy="no", save_strategy="no",
                            train_sampling_strategy="sequential")
    return trainer, tokenizer


def test_lora_learns_base_stays_frozen_and_adapter_reloads(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from stages.modeling import load_model

    trainer, tokenizer = make_trainer(tiny_model_dir, tmp_path, max_steps=3, learning_rate=1e-2, warmup_ratio=0.0)
    params = dict(trainer.model.named_parameters())
    lora_before = {n: p.detach().clone() for n, p in params.items() if "lora_" in n}
    frozen_before = {n: p.detach().clone() for n, p in params.items() if "lora_" not in n}
    assert lora_before and all(not p.requires_grad for n, p in params.items() if "lora_" not in n)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = [n for n in lora_before if not torch.equal(lora_before[n], after[n].detach())]
    assert len(changed) == len(lora_before), "every LoRA matrix should move (B from step 1, A once B is non-zero)"
    # Compare bytes: NF4 weights are packed into bf16 storage, where some bit patterns are NaN.
    moved = [n for n in frozen_before
             if not torch.equal(frozen_before[n].view(torch.uint8), after[n].detach().view(torch.uint8))]
    assert not moved, moved

    trainer.model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_model(ModelParams(name=str(tiny_model_dir))), tmp_path / "adapter")
    for name, value in reloaded.named_parameters():
        if "lora_B" in name:
            key = name.replace(".default", "")
            saved = {n.replace(".default", ""): p for n, p in after.items()}[key]
            assert torch.allclose(value.float(), saved.detach().float())
    ids = tokenizer("Question: 2 + 3?\nAnswer:", return_tensors="pt")
    out = reloaded.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


def step_losses(trainer):
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_padding_free_trains_the_same_as_batch_one_with_accumulation(tiny_model_dir, tmp_path):
    # Dropout off: its random masks differ between the two batch layouts by design.
    card, _ = make_trainer(tiny_model_dir, tmp_path / "card", max_steps=2, lora_dropout=0.0,
                           per_device_train_batch_size=1, gradient_accumulation_steps=8)
    fast, _ = make_trainer(tiny_model_dir, tmp_path / "fast", max_steps=2, lora_dropout=0.0,
                           per_device_train_batch_size=8, gradient_accumulation_steps=1, padding_free=True)
    card_losses, fast_losses = step_losses(card), step_losses(fast)
    assert len(card_losses) == len(fast_losses) == 2
    assert fast_losses == pytest.approx(card_losses, rel=2e-3)
    # The dev pass too (eval mode): packed rows must not attend across sequence boundaries.
    assert fast.evaluate()["eval_loss"] == pytest.approx(card.evaluate()["eval_loss"], rel=1e-3)


def test_padding_free_rows_do_not_attend_to_each_other(tiny_model_dir, tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    # transformers finds the sequences of a packed row from position_ids only when no KV cache is in
    # play; the Trainer switches the cache off (TrainingArguments.use_cache=False), in eval mode too.
    trainer, _ = make_trainer(tiny_model_dir, tmp_path, max_steps=1, per_device_train_batch_size=2,
                              gradient_accumulation_steps=1, padding_free=True, gradient_checkpointing=False)
    model = trainer.model.eval()
    first, second = list(range(10, 30)), list(range(40, 55))
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": first, "completion_mask": [1] * 20}, {"input_ids": second, "completion_mask": [1] * 15}])
    with torch.no_grad():
        together = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0, 20:]
        alone = model(input_ids=torch.tensor([second])).logits[0]
    torch.testing.assert_close(together, alone, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("world, batch, accumulation, expected", [
    (1, 1, 8, (1, 8)), (2, 1, 8, (1, 4)), (4, 1, 8, (1, 2)), (8, 1, 8, (1, 1)),
    (1, 8, 1, (8, 1)), (2, 8, 1, (4, 1)), (4, 8, 1, (2, 1)), (2, 2, 4, (2, 2)), (4, 2, 4, (2, 1)),
])
def test_per_rank_batch_keeps_the_effective_batch(world, batch, accumulation, expected):
    micro, accum = per_rank_batch(world, batch, accumulation)
    assert (micro, accum) == expected and micro * accum * world == batch * accumulation


def test_a_batch_that_cannot_be_split_is_refused():
    from stages.io import UserError

    with pytest.raises(UserError, match="cannot be split over 3 processes"):
        per_rank_batch(3, 1, 8)


def test_cuda_graphs_path_pads_rows_and_trains_the_same_as_the_card(tiny_model_dir, tmp_path):
    # train.cuda_graphs on CPU: no graphs (CUDA only), but the same padded rows, compiled layers and
    # gradient hooks as on a GPU. Dropout off: padding shifts which random numbers each row draws.
    card, _ = make_trainer(tiny_model_dir, tmp_path / "card", max_steps=2, lora_dropout=0.0,
                           per_device_train_batch_size=1, gradient_accumulation_steps=8)
    graphs, _ = make_trainer(tiny_model_dir, tmp_path / "graphs", max_steps=2, lora_dropout=0.0,
                             per_device_train_batch_size=1, gradient_accumulation_steps=8, torch_compile=True,
                             gradient_checkpointing=False, cuda_graphs=True)
    batch = next(iter(graphs.get_train_dataloader()))
    real = int(batch["attention_mask"].sum())
    assert batch["input_ids"].shape[1] % 64 == 0 and real < batch["input_ids"].shape[1]
    assert (batch["labels"][0, real:] == -100).all()  # pads carry no loss
    assert step_losses(graphs) == pytest.approx(step_losses(card), rel=2e-3)
    # The dev pass runs uncompiled (no graphs for no_grad forwards): nothing new is compiled for it.
    from torch._dynamo.utils import counters

    compiled = counters["stats"]["unique_graphs"]
    assert graphs.evaluate()["eval_loss"] == pytest.approx(card.evaluate()["eval_loss"], rel=1e-3)
    assert counters["stats"]["unique_graphs"] == compiled


class PoolGrad(torch.autograd.Function):
    """Returns its gradient in one buffer that every backward overwrites, as a replayed CUDA graph does."""
    buffer = torch.zeros(3)

    @staticmethod
    def forward(ctx, weight, x):
        ctx.save_for_backward(x)
        return (weight * x).sum()

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        PoolGrad.buffer.copy_(grad_out * x)
        return PoolGrad.buffer.view_as(PoolGrad.buffer), None  # a fresh tensor on the shared memory


@pytest.mark.parametrize("hooked, expected", [(False, 4.0), (True, 3.0)])
def test_gradient_accumulation_survives_graph_memory_reuse(hooked, expected):
    from stages.train import copy_grads_out_of_graph_memory

    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.zeros(3))
    if hooked:
        copy_grads_out_of_graph_memory(model)
    for micro_batch in (1.0, 2.0):  # gradients 1 and 2: accumulated, 3
        PoolGrad.apply(model.weight, torch.full((3,), micro_batch)).backward()
    # Unhooked, autograd adopted the buffer as .grad, and the second backward overwrote it (pytorch#169545).
    assert model.weight.grad.tolist() == [expected] * 3
