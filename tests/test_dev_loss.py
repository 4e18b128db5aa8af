"""dev_loss (the Trainer's eval_loss) is the loss per answer token over all dev rows, whatever the batch
layout: the card's padded batch 1, padding-free micro-batches, a partial last batch, two processes.

`python -m stages.launch 2 tests.test_dev_loss MODEL_DIR WORK_DIR OUT_JSON` runs the ranks' side of
test_two_processes_give_the_dev_loss_of_one."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from stages.config import ModelParams, PromptParams, TrainParams
from stages.train import build_trainer, tokenize_rows

# name: (per_device_train_batch_size, gradient_accumulation_steps, padding_free), over 10 dev rows
LAYOUTS = {
    "card: padded 1 x 8": (1, 8, False),
    "padding-free 8 x 1, last batch 2 rows": (8, 1, True),
    "padding-free 4 x 2, last batch 2 rows": (4, 2, True),
    "padded 4 x 2, last batch 2 rows": (4, 2, False),
}
# Over 9 rows on 2 ranks (stages.train.per_rank_batch: 1 x 4 and padding-free 4 x 1 per rank), neither fits
# whole batches: accelerate would repeat rows, which rows without answer tokens replace, and some batches hold
# only those.
TWO_PROCESS_LAYOUTS = {
    "padded 1 x 8": (1, 8, False),
    "padding-free 8 x 1": (8, 1, True),
}
TWO_PROCESS_ROWS = 9
# One thread per rank, as in tests/test_scale.py: two ranks on a small CPU otherwise oversubscribe it.
CPU_ENV = {"OMP_NUM_THREADS": "1", "QLORA_ALLOW_CPU_DDP": "1"}


def dev_rows(n):
    # Prompts and answers of different lengths, so that averaging per-row or per-batch means would weigh
    # the tokens unequally.
    return [{"question": f"Ann has {i} cards and gets {i * 37 + 3} more. " + "Then she counts them. " * (i % 4)
             + "How many cards?",
             "answer": f"{i} + {i * 37 + 3} = {i * 38 + 3}. " + "She checks the sum. " * (i % 3) + f"\n#### {i * 38 + 3}"}
            for i in range(n)]


@pytest.fixture(scope="module")
def peaky_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its LM head × 8. The random model's logits are nearly flat, every token's loss is
    about ln(vocab), and any way of averaging gives the same number; sharpened, the rows' losses differ."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("peaky") / "model"
    shutil.copytree(tiny_model_dir, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    model.save_pretrained(out)
    return out


def dev_trainer(model_dir, out_dir, batch, accumulation, padding_free, n_rows=10, world_size=1):
    """A trainer of the float32 model (no 4-bit base: bf16 rounding would hide a 1e-5 difference) whose dev
    set is n_rows of dev_rows, and those rows tokenized."""
    from datasets import Dataset
    from transformers import set_seed

    from stages.modeling import load_tokenizer

    model_p = ModelParams(name=str(model_dir), load_in_4bit=False, bnb_4bit_compute_dtype="float32")
    train_p = TrainParams(max_length=384, eval_steps=100, save_steps=100, use_liger_kernel=False, lora_dropout=0.0,
                          per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                          padding_free=padding_free)
    tokenizer = load_tokenizer(model_p.name)
    tokenized, _ = tokenize_rows(tokenizer, PromptParams(), dev_rows(n_rows), train_p.max_length, "dev")
    set_seed(train_p.seed)
    trainer = build_trainer(model_p, train_p, tokenizer, Dataset.from_list(tokenized), Dataset.from_list(tokenized),
                            str(out_dir), world_size, eval_strategy="no", save_strategy="no")
    return trainer, tokenized


def direct_dev_losses(model, tokenized) -> tuple[float, float]:
    """(loss per answer token over all rows, mean of the rows' per-token means), one plain forward per row."""
    model.eval()
    total, count, row_means = 0.0, 0, []
    with torch.no_grad():
        for row in tokenized:
            ids = torch.tensor([row["input_ids"]])
            scored = torch.tensor(row["completion_mask"][1:], dtype=torch.bool)
            logits = model(input_ids=ids).logits[0, :-1].double()
            losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")[scored]
            total, count = total + losses.sum().item(), count + len(losses)
            row_means.append(losses.mean().item())
    return total / count, sum(row_means) / len(row_means)


def test_dev_loss_is_the_loss_per_answer_token_whatever_the_batch_layout(peaky_model_dir, tmp_path):
    losses = {}
    for i, (name, layout) in enumerate(LAYOUTS.items()):
        trainer, tokenized = dev_trainer(peaky_model_dir, tmp_path / f"run{i}", *layout)
        losses[name] = trainer.evaluate()["eval_loss"]
    per_token, per_row = direct_dev_losses(trainer.model, tokenized)
    assert abs(per_row / per_token - 1) > 1e-3, "the rows' losses must differ for the averaging to matter"
    assert losses == pytest.approx({name: per_token for name in LAYOUTS}, rel=1e-5)


def test_two_processes_give_the_dev_loss_of_one(peaky_model_dir, tmp_path):
    from tests.dvc_project import REPO, run

    out = tmp_path / "two.json"
    run([sys.executable, "-m", "stages.launch", "2", "tests.test_dev_loss", str(peaky_model_dir), str(tmp_path),
         str(out)], REPO, {**os.environ, **CPU_ENV})
    trainer, tokenized = dev_trainer(peaky_model_dir, tmp_path / "one", 1, 8, False, n_rows=TWO_PROCESS_ROWS)
    one = trainer.evaluate()["eval_loss"]
    per_token, _ = direct_dev_losses(trainer.model, tokenized)
    assert one == pytest.approx(per_token, rel=1e-5)
    assert json.loads(out.read_text()) == pytest.approx({name: per_token for name in TWO_PROCESS_LAYOUTS}, rel=1e-5)


if __name__ == "__main__":  # one rank of test_two_processes_give_the_dev_loss_of_one
    model_dir, work_dir, out = sys.argv[1:4]
    world_size = int(os.environ["WORLD_SIZE"])
    two = {name: dev_trainer(model_dir, Path(work_dir) / "two", *layout, n_rows=TWO_PROCESS_ROWS,
                             world_size=world_size)[0].evaluate()["eval_loss"]
           for name, layout in TWO_PROCESS_LAYOUTS.items()}
    if int(os.environ["RANK"]) == 0:
        Path(out).write_text(json.dumps(two))
