"""Killing train with SIGKILL mid-run and starting it again resumes from the newest complete
checkpoint and ends with the same adapter, metrics and curves as a run that was never interrupted;
a second trainer on the same checkpoints is refused; retraining gives a byte-identical adapter."""
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
            "--metrics", str(out / "losses.json"), "--run-info", str(out / "train.json"), "--live-dir", str(out / "live")]


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


def hash_seed_env(seed):
    # Python's string hashing, and so peft's set of target modules, is randomized per process.
    return {**os.environ, "PYTHONHASHSEED": str(seed)}


@pytest.fixture(scope="module")
def straight(setup):
    """The uninterrupted run the others are compared with."""
    params, data, root = setup
    out = root / "straight"
    subprocess.run(train_cmd(params, data, out), check=True, capture_output=True, env=hash_seed_env(1))
    return out


def curve(live_dir, name):
    lines = (live_dir / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
    assert lines[0] == f"step\t{name}"
    return [(int(step), float(value)) for step, value in (line.split("\t") for line in lines[1:])]


def dvc_dir_md5(path):
    """The directory hash DVC records for an output (its .dir md5), computed by DVC's own code."""
    import tempfile

    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as odb_dir:
        _, _, obj = build(HashFileDB(fs, odb_dir), str(path), fs, "md5", dry_run=True)
    return obj.hash_info.value


def adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(setup, straight):
    params, data, root = setup
    killed = root / "killed"
    proc = subprocess.Popen(train_cmd(params, data, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=hash_seed_env(2))
    marker = killed / "resume" / "checkpoint-4" / "CHECKPOINT_COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # Stopped, the first trainer keeps its lock and takes no further step while a second one tries
    # the same checkpoints (as a second `dvc repro` after only `dvc` was killed would).
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        second = subprocess.run(train_cmd(params, data, killed), capture_output=True, text=True, timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert marker.exists(), "training should have reached checkpoint-4 before the kill"
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: --resume-dir {killed / 'resume'}: another training run (PID {proc.pid}) is using it; "
        f"wait for it to finish or stop it (kill {proc.pid}), then run again")
    assert not (killed / "adapter").exists() and not (killed / "train.json").exists()
    progress = json.loads((killed / "resume" / "checkpoint-4" / "progress.json").read_text())
    seconds_at_checkpoint = progress["train_seconds"]
    assert seconds_at_checkpoint > 0

    # A checkpoint that was being written when the power went: newer, but never marked complete.
    half = killed / "resume" / "checkpoint-5"
    half.mkdir(exist_ok=True)
    (half / "adapter_model.safetensors").write_bytes(b"truncated")

    # The killed trainer's lock went with it: the rerun is not refused.
    rerun = subprocess.run(train_cmd(params, data, killed), check=True, capture_output=True, text=True)
    assert "resuming from" in rerun.stdout and "checkpoint-4" in rerun.stdout
    assert rerun.stdout.splitlines()[-1].startswith("train: 6 steps (resumed from step 4) in ")
    metrics = json.loads((killed / "train.json").read_text())
    assert json.loads((killed / "losses.json").read_text()) == {"dev_loss": metrics["dev_loss"]}
    reference = json.loads((straight / "train.json").read_text())
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == reference["steps"] == 6
    a, b = adapter_tensors(straight), adapter_tensors(killed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-5)
    assert not (killed / "resume").exists(), "checkpoints are removed once the adapter is saved"

    # The metrics and curves describe the whole run, not the part after the resume.
    assert metrics["train_loss_mean"] == pytest.approx(reference["train_loss_mean"], rel=1e-3)
    assert metrics["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-3)
    assert metrics["train_tokens"] == reference["train_tokens"] > 0
    losses, reference_losses = curve(killed / "live", "loss"), curve(straight / "live", "loss")
    assert [s for s, _ in losses] == [s for s, _ in reference_losses] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in losses] == pytest.approx([v for _, v in reference_losses], rel=1e-3)
    assert curve(killed / "live", "num_tokens") == curve(straight / "live", "num_tokens")
    assert curve(killed / "live", "num_tokens")[-1][1] == metrics["train_tokens"]
    # Throughput is over the accumulated training time, which includes the seconds before the kill.
    train_seconds = metrics["seconds_per_step"] * metrics["steps"]
    assert metrics["train_tokens_per_second"] * train_seconds == pytest.approx(metrics["train_tokens"], rel=1e-2)
    assert train_seconds > seconds_at_checkpoint and metrics["runtime_s"] > seconds_at_checkpoint


def test_retraining_gives_a_byte_identical_adapter_directory(setup, straight):
    params, data, root = setup
    again = root / "again"
    subprocess.run(train_cmd(params, data, again), check=True, capture_output=True, env=hash_seed_env(3))
    first, second = straight / "adapter", again / "adapter"
    files = sorted(p.relative_to(first) for p in first.rglob("*"))
    assert files == sorted(p.relative_to(second) for p in second.rglob("*"))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {str(f) for f in files}
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), f"{name} differs"
    assert dvc_dir_md5(first) == dvc_dir_md5(second)
    config = json.loads((first / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"])


def test_checkpoints_of_other_params_are_not_resumed(setup, tmp_path):
    from stages.train import COMPLETE_MARKER, find_resume_checkpoint, mark_checkpoint_complete

    resume = tmp_path / "resume"
    assert find_resume_checkpoint(resume, "fingerprint-a") is None
    (resume / "checkpoint-2").mkdir()
    mark_checkpoint_complete(resume / "checkpoint-2", {"step": 2, "train_seconds": 1.0, "num_tokens": 10})
    (resume / "checkpoint-4").mkdir()  # incomplete
    (resume / "checkpoint-6").mkdir()  # marked by a version that wrote no progress file: its run time is unknown
    (resume / "checkpoint-6" / COMPLETE_MARKER).write_text("6")
    assert find_resume_checkpoint(resume, "fingerprint-a").name == "checkpoint-2"
    assert find_resume_checkpoint(resume, "fingerprint-b") is None
    assert not (resume / "checkpoint-2").exists()


def test_a_model_rebuilt_at_the_same_path_is_another_configuration(tiny_model_dir, tmp_path):
    """Same params, same data, other weights behind model.name (a directory rebuilt in place, a hub branch
    that moved): DVC re-runs train, and train must not resume the old model's checkpoint into the new one."""
    import shutil

    from safetensors.torch import load_file, save_file

    from stages.config import ModelParams, PromptParams, TrainParams
    from stages.fingerprint import model_fingerprint
    from stages.io import UserError
    from stages.train import fingerprint, read_model_identity

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    model_p = ModelParams(name=str(model_dir))
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q", "answer": "a\\n#### 1"}\n')

    def resume_fingerprint(identity):
        return fingerprint(model_p, PromptParams(), TrainParams(), [str(data)], identity)

    before = read_model_identity(None, model_p)  # hashed here when no fingerprint file is given
    weights = model_dir / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(weights), metadata={"format": "pt"})
    after = read_model_identity(None, model_p)
    assert resume_fingerprint(before) != resume_fingerprint(after)

    # The pipeline passes the fingerprint stage's file instead of hashing again.
    stage_file = tmp_path / "model.json"
    stage_file.write_text(json.dumps(model_fingerprint(model_p.name, None, {})))
    assert read_model_identity(str(stage_file), model_p) == after
    with pytest.raises(UserError, match=r"^--model-fingerprint .*model.json: it describes 'other', not model.name"):
        stage_file.write_text(json.dumps({"name": "other"}))
        read_model_identity(str(stage_file), model_p)
