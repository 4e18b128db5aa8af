"""Padding-free training leaves PyTorch's cuDNN attention backend out while train() runs (it builds a
plan per packed length: stages.train.train_without_cudnn_attention), and puts the process's setting
back afterwards; the card's padded path keeps the default. On the CPU no backend is picked, so what
is checked here is the switch; the H200 run compared the losses (benchmarks/results/)."""
import torch
from transformers import TrainerCallback

from tests.test_train import make_trainer


class RecordBackend(TrainerCallback):
    def __init__(self):
        self.cudnn = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.cudnn.append(torch.backends.cuda.cudnn_sdp_enabled())


def backend_during_training(model_dir, tmp_path, **train_kwargs) -> list[bool]:
    trainer, _ = make_trainer(model_dir, tmp_path, max_steps=1, **train_kwargs)
    recorder = RecordBackend()
    trainer.add_callback(recorder)
    trainer.train()
    return recorder.cudnn


def test_padding_free_training_runs_without_cudnn_attention_and_restores_it(tiny_model_dir, tmp_path):
    assert torch.backends.cuda.cudnn_sdp_enabled()
    during = backend_during_training(tiny_model_dir, tmp_path, padding_free=True, per_device_train_batch_size=8,
                                     gradient_accumulation_steps=1)
    assert during == [False]
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the process's setting is back


def test_the_padded_path_keeps_the_default_backends(tiny_model_dir, tmp_path):
    assert backend_during_training(tiny_model_dir, tmp_path) == [True]
