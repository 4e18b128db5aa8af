"""Killing train with SIGKILL mid-run and starting it again resumes from the newest complete
checkpoint and ends with the same adapter as a run that was never interrupted."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml


def train_cmd(params, data_dir, out):
    return [sys.executable, "-m", "stages.train", "--params", str(params),
            "--train-file", str(data_dir / "train.jsonl"), "--dev-file", str(data_dir / "dev.jsonl"),
            "--output-dir", str(out / "adapter"), "--resume-dir", str(out / "resume"),
            "--metrics", str(out / "train.json"), "--live-dir", str(out / "live")]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = root / "data"
    data.mkdir()
    for split, n in (("train", 48), ("dev", 4)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(
            {"question": f"Ann has {i} cards and gets {i + 3} more. How many cards?",
             "answer": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"}) + "\n" for i in range(n)))
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)},
        "train": {"max_steps": 6, "save_steps": 2, "eval_steps": 3, "logging_steps": 1, "max_length": 384,
                  "learning_rate": 5e-3, "warmup_ratio": 0.0}}))
    return params, data, root


def adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(setup):
    params, data, root = setup
    straight = root / "straight"
    subprocess.run(train_cmd(params, data, straight), check=True, capture_output=True)

    killed = root / "killed"
    proc = subprocess.Popen(train_cmd(params, data, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = killed / "resume" / "checkpoint-4" / "CHECKPOINT_COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "training should have reached checkpoint-4 before the kill"
    assert not (killed / "adapter").exists() and not (killed / "train.json").exists()

    # A checkpoint that was being written when the power went: newer, but never marked complete.
    half = killed / "resume" / "checkpoint-5"
    half.mkdir(exist_ok=True)
    (half / "adapter_model.safetensors").write_bytes(b"truncated")

    rerun = subprocess.run(train_cmd(params, data, killed), check=True, capture_output=True, text=True)
    assert "resuming from" in rerun.stdout and "checkpoint-4" in rerun.stdout
    metrics = json.loads((killed / "train.json").read_text())
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 6
    a, b = adapter_tensors(straight), adapter_tensors(killed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-5)
    assert not (killed / "resume").exists(), "checkpoints are removed once the adapter is saved"


def test_checkpoints_of_other_params_are_not_resumed(setup, tmp_path):
    from stages.train import COMPLETE_MARKER, find_resume_checkpoint

    resume = tmp_path / "resume"
    assert find_resume_checkpoint(resume, "fingerprint-a") is None
    (resume / "checkpoint-2").mkdir()
    (resume / "checkpoint-2" / COMPLETE_MARKER).write_text("2")
    (resume / "checkpoint-4").mkdir()  # incomplete
    assert find_resume_checkpoint(resume, "fingerprint-a").name == "checkpoint-2"
    assert find_resume_checkpoint(resume, "fingerprint-b") is None
    assert not (resume / "checkpoint-2").exists()
