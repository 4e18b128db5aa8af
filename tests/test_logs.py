"""What a person running the train stage reads: no library warnings, no log dicts, one progress bar
with the losses in its postfix, and one summary line; the DVC metric holds the dev loss alone.
The known-warning filters (stages/quiet.py) hide exactly their messages, each for a stated reason."""
import json
import logging
import re
import subprocess
import sys
import warnings

import pytest
import yaml

from stages.quiet import KNOWN, silence_known_warnings
from stages.train import summary_line


def rows(n):
    return "".join(json.dumps({"question": f"Ann has {i} cards and gets {i + 3} more. How many cards?",
                               "answer": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"}) + "\n" for i in range(n))


def test_the_train_stage_prints_one_bar_and_one_summary_line(tiny_model_dir, tmp_path):
    import torch

    # One train row longer than max_length: cut, and said so, in the log and in the run file.
    long_row = {"question": "Ann has 3 cards. How many?", "answer": "3 + 0 = 3. " * 40 + "\n#### 3"}
    (tmp_path / "train.jsonl").write_text(rows(16) + json.dumps(long_row) + "\n")
    (tmp_path / "dev.jsonl").write_text(rows(2))
    # A dev pass and a checkpoint mid-run: the two places where the Trainer printed the most.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)},
        "train": {"max_steps": 3, "save_steps": 2, "eval_steps": 2, "logging_steps": 1, "max_length": 128,
                  "warmup_ratio": 0.0}}))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train", "--params", str(tmp_path / "params.yaml"),
         "--train-file", str(tmp_path / "train.jsonl"), "--dev-file", str(tmp_path / "dev.jsonl"),
         "--output-dir", str(out / "adapter"), "--resume-dir", str(out / "resume"), "--metrics", str(out / "train.json"),
         "--run-info", str(out / "train_run.json"), "--live-dir", str(out / "live")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A progress bar redraws itself with \r: each redraw is a line here.
    lines = [line for line in re.split(r"[\r\n]", proc.stdout + proc.stderr) if line.strip()]
    assert not [line for line in lines if "Warning" in line], "\n".join(lines)
    assert not [line for line in lines if "{'loss'" in line or "'grad_norm'" in line or "'eval_loss'" in line]
    assert not [line for line in lines if "Loading weights" in line or "Building labels" in line]
    # One bar, for the 3 steps (no inner bar for the dev passes), showing both losses by the end.
    bars = [line for line in lines if re.search(r"\| *\d+/\d+ \[", line)]
    assert bars and {re.search(r"\| *\d+/(\d+) \[", line).group(1) for line in bars} == {"3"}
    assert "loss=" in bars[-1] and "dev_loss=" in bars[-1]

    run = json.loads((out / "train_run.json").read_text())
    assert {"train_loss", "train_loss_mean", "dev_loss", "steps", "train_tokens_per_second"} <= run.keys()
    assert run["rows_cut_at_max_length"] == {"train": 1, "dev": 0}
    assert "train: 1 of 17 train rows are longer than train.max_length=128 and were cut" in proc.stdout
    if not torch.cuda.is_available():
        assert run["use_liger_kernel"] is False  # what ran: Liger's kernels need CUDA
    assert json.loads((out / "train.json").read_text()) == {"dev_loss": run["dev_loss"]}
    said = proc.stdout.splitlines()
    summaries = [line for line in said if re.match(r"train: \d+ steps? ", line)]
    assert summaries == [said[-1]], said
    assert said[-1].startswith("train: 3 steps in ")
    assert f"dev loss {run['dev_loss']:.4g} -> {out / 'adapter'}" in said[-1]
    assert len(said[-1]) < 200
    if not torch.cuda.is_available():  # bitsandbytes' own warning is filtered; ours is said once
        assert proc.stdout.count("paged_adamw_8bit runs unpaged on CPU") == 1


RUN = {"steps": 28, "resumed_from_step": 0, "train_tokens_per_second": 1170.4, "world_size": 1,
       "peak_memory_gib": None, "train_loss": 6.26912, "dev_loss": 6.25311}


@pytest.mark.parametrize("changes, expected", [
    ({}, "train: 28 steps in 57.9 s (1,170 train tokens/s), train loss 6.269, dev loss 6.253 -> checkpoints/sft_lora"),
    ({"resumed_from_step": 20, "peak_memory_gib": 5.234},
     "train: 28 steps (resumed from step 20) in 57.9 s (1,170 train tokens/s, peak GPU memory 5.2 GiB), "
     "train loss 6.269, dev loss 6.253 -> checkpoints/sft_lora"),
    ({"steps": 1, "world_size": 2, "peak_memory_gib": 60.0},
     "train: 1 step in 57.9 s (1,170 train tokens/s, 2 processes, peak GPU memory 60.0 GiB), "
     "train loss 6.269, dev loss 6.253 -> checkpoints/sft_lora"),
])
def test_summary_line(changes, expected):
    assert summary_line({**RUN, **changes}, 57.93, "checkpoints/sft_lora") == expected


# The text each KNOWN entry was written for, as its library emits it (bitsandbytes 0.50.2, Liger 0.8.5,
# TRL 1.16, torch, transformers 5.23): one sample per entry.
SAMPLES = [
    (FutureWarning, "The pynvml package is deprecated. Please install nvidia-ml-py instead."),
    (FutureWarning, "`is_gradient_checkpointing` is deprecated and will be removed in v6."),
    (DeprecationWarning, "`torch.jit.script_method` is deprecated. Please switch to `torch.compile`."),
    (UserWarning, "Paged optimizers are not supported on CPU. Falling back to non-paged optimizer behavior."),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: No module "
     "named 'kernels'. Please make sure you already `pip install kernels` and the kernels >= 0.11.1"),
    # Seen on the H200 (triton 3.6), with the CuTe DSL one below, at the first training step.
    ("liger_kernel.backends.registry", "Backend impl 'liger_kernel.ops.backends._ascend.rope' for op 'rope' could not "
     "be imported: ImportError: cannot import name 'tanh' from 'triton.language.math'"),
    ("transformers.trainer_utils", "mtime may not be reliable on this filesystem, falling back to numerical ordering"),
    ("transformers.integrations.bitsandbytes", "The modules are dequantized in torch.bfloat16 and casted to "
     "torch.bfloat16."),
    (FutureWarning, "`use_liger_kernel=True` is deprecated and will be removed in v2.0.0. Use the Hub kernels "
     "instead, with `model_init_kwargs={\"use_kernels\": True}`."),
]
# Known messages for other backends or ops than the samples above.
SAMPLES_TOO = [
    ("liger_kernel.backends.registry", "Backend impl 'liger_kernel.ops.backends._cutedsl.rope' for op 'rope' could not "
     "be imported: ImportError: cutedsl backend requires the NVIDIA CUTLASS Python DSL (CuTe DSL)."),
    ("liger_kernel.backends.registry", "Backend impl 'liger_kernel.ops.backends._cutile.rms_norm' for op 'rms_norm' "
     "could not be imported: ModuleNotFoundError: No module named 'cuda.tile'"),
]
# Near misses that must still show: another message of the same library, the same text from elsewhere.
STILL_SHOWN = [
    (UserWarning, "Paged optimizers are not supported on CPU. And something else happened."),
    (UserWarning, "The pynvml package is deprecated."),  # another category than the known one
    ("bitsandbytes.backends.cpu.ops", "Something else went wrong in bitsandbytes' CPU backend"),
    # Its other message (no dtype given to dequantize) says something the stage did not ask for.
    ("transformers.integrations.bitsandbytes", "The modules are dequantized in torch.float16. If you want to change "
     "the dtype, please specify `dtype` in `dequantize`. "),
    ("bitsandbytes.other", "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'"),
    # The Triton backend is the one Liger runs on a GPU: its failure matters.
    ("liger_kernel.backends.registry", "Backend impl 'liger_kernel.ops.backends._triton.rms_norm' for op 'rms_norm' "
     "could not be imported: ImportError: cannot import name 'libdevice'"),
    ("liger_kernel.backends.registry", "Backend impl 'liger_kernel.ops.backends._cutedsl.rms_norm' for op 'rms_norm' "
     "could not be imported: RuntimeError: CUDA driver too old"),
]


def test_every_known_warning_says_why_and_has_a_sample():
    for source, message, why in KNOWN:
        assert isinstance(source, str) or issubclass(source, Warning), source
        re.compile(message)
        assert why.strip(), f"no reason given for silencing {message!r}"
    assert len(SAMPLES) == len(KNOWN)
    for (source, message, _), (sample_source, text) in zip(KNOWN, SAMPLES):
        assert source == sample_source and re.match(message, text), (message, text)


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__()
        self.texts = []

    def emit(self, record):
        self.texts.append(record.getMessage())


def emitted(source, text) -> bool:
    """Whether `text` reaches the user, once the known filters are in place."""
    if isinstance(source, str):
        # A handler on the logger itself, as the libraries' own (or Python's last-resort one) would see it.
        logger, recorder = logging.getLogger(source), Recorder()
        logger.addHandler(recorder)
        try:
            logger.warning("%s", text)
        finally:
            logger.removeHandler(recorder)
        return recorder.texts == [text]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()  # inside catch_warnings: the filters go when the block ends
        warnings.warn(text, source)
    return [str(w.message) for w in caught] == [text]


@pytest.mark.parametrize("source, text", SAMPLES + SAMPLES_TOO)
def test_a_known_warning_is_silenced(source, text):
    silence_known_warnings()
    assert not emitted(source, text)


@pytest.mark.parametrize("source, text", STILL_SHOWN)
def test_any_other_warning_still_shows(source, text):
    silence_known_warnings()
    silence_known_warnings()  # twice, as two stages' mains in one process: one filter per logger
    assert emitted(source, text)
    for name in {s for s, _, _ in KNOWN if isinstance(s, str)}:
        assert [type(f).__name__ for f in logging.getLogger(name).filters].count("_KnownRecords") == 1
