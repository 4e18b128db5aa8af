"""The train stage never saves or reports a wrong result: a diverging run stops at its first non-finite
step, a bad target module or output location stops before the model loads (and wipes no curves), a
full disk while checkpointing is one line and leaves no checkpoint marked complete, and two trainers
cannot share a checkpoint directory. Most tests run `stages.train.main` in this process."""
import errno
import json
import math

import pytest
import torch
import yaml

from stages.io import UserError


def rows(n):
    return "".join(json.dumps({"question": f"Ann has {i} cards and gets {i + 3} more. How many cards?",
                               "answer": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"}) + "\n" for i in range(n))


@pytest.fixture
def stage(tiny_model_dir, tmp_path):
    """(argv for stages.train.main, output dir) for a few-step training of the tiny model."""

    def make(**train):
        (tmp_path / "train.jsonl").write_text(rows(16))
        (tmp_path / "dev.jsonl").write_text(rows(2))
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({
            "model": {"name": str(tiny_model_dir)},
            "train": {"max_steps": 2, "save_steps": 100, "eval_steps": 100, "logging_steps": 1,
                      "max_length": 384, "warmup_ratio": 0.0, **train}}))
        out = tmp_path / "out"
        return ["--params", str(tmp_path / "params.yaml"), "--train-file", str(tmp_path / "train.jsonl"),
                "--dev-file", str(tmp_path / "dev.jsonl"), "--output-dir", str(out / "adapter"),
                "--resume-dir", str(out / "resume"), "--metrics", str(out / "train.json"),
                "--run-info", str(out / "train_run.json"), "--live-dir", str(out / "live")], out

    return make


def run_main(argv, capsys):
    """Run the stage in this process; returns the one line it printed on stderr (exit status 2)."""
    from stages.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " in last
    return last[last.index("error: "):]  # after a progress bar's unterminated line, if any


def completed_checkpoints(resume_dir):
    from stages.train import COMPLETE_MARKER

    return sorted(int(p.parent.name.split("-")[-1]) for p in resume_dir.glob(f"checkpoint-*/{COMPLETE_MARKER}"))


def test_a_diverging_run_stops_at_its_first_non_finite_step_and_saves_nothing(stage, capsys):
    # learning_rate 1e30: step 1 is finite, its update makes every LoRA weight ~1e30, step 2's loss is NaN.
    # Logged every 4 steps, with NaN losses replaced in the logs (logging_nan_inf_filter): only a per-step
    # check sees it. Before, this run wrote an adapter and metrics from NaN weights.
    argv, out = stage(max_steps=4, learning_rate=1e30, save_steps=1, logging_steps=4)
    line = run_main(argv, capsys)
    assert line == ("error: train: training diverged: the training loss is nan at step 2, so nothing is saved; "
                    "lower train.learning_rate (now 1e+30)")
    assert not (out / "adapter").exists() and not (out / "train.json").exists()
    assert completed_checkpoints(out / "resume") == [1], "no checkpoint from the diverged step or after"


def test_a_non_finite_gradient_norm_or_dev_loss_stops_training(tiny_model_dir, tmp_path):
    from test_train import make_trainer

    from stages.train import stop_on_non_finite

    # Logged every 10 steps: the NaN gradient of step 2 is seen at step 2 all the same.
    trainer, _ = make_trainer(tiny_model_dir, tmp_path, max_steps=4, logging_steps=10)
    stop_on_non_finite(trainer, learning_rate=2e-4, max_grad_norm=0.0)
    lora = next(p for n, p in trainer.model.named_parameters() if "lora_B" in n)
    # The loss stays finite; one gradient turns NaN in the backward of step 2 (global_step 1 done).
    lora.register_hook(lambda g: torch.full_like(g, math.nan) if trainer.state.global_step == 1 else g)
    with pytest.raises(UserError) as info:
        trainer.train()
    assert str(info.value) == ("train: training diverged: the gradient norm is nan at step 2, so nothing is saved; "
                               "lower train.learning_rate (now 0.0002), or set train.max_grad_norm > 0 to clip "
                               "gradients")
    assert trainer.state.global_step == 1, "the optimizer never applied the NaN step"

    # A NaN dev loss, at a mid-training evaluation or the final one, stops the run the same way.
    with pytest.raises(UserError, match=r"the dev loss is nan at step 1, "):
        trainer.callback_handler.on_evaluate(trainer.args, trainer.state, trainer.control,
                                             metrics={"eval_loss": math.nan})


def test_an_unknown_lora_target_module_is_named_before_the_model_loads(stage, capsys, monkeypatch):
    import stages.modeling

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the params were checked")

    monkeypatch.setattr(stages.modeling, "load_model", no_loading)
    argv, out = stage(lora_target_modules=["q_proj", "foo_proj"])
    curves = out / "live" / "plots" / "metrics" / "loss.tsv"  # an earlier run's curves
    curves.parent.mkdir(parents=True)
    curves.write_text("step\tloss\n1\t6.2\n")
    line = run_main(argv, capsys)
    assert line == ("error: params.yaml: train.lora_target_modules: no module of the model is named foo_proj; "
                    "its linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj "
                    "(or use all-linear)")
    assert curves.read_text() == "step\tloss\n1\t6.2\n", "a run that fails its checks must not wipe the curves"
    assert not (out / "resume").exists() and not (out / "adapter").exists()


@pytest.mark.parametrize("flag", ["--metrics", "--run-info", "--output-dir", "--live-dir", "--resume-dir"])
def test_an_unwritable_output_location_is_named_before_anything_loads(stage, capsys, monkeypatch, flag, tmp_path):
    import stages.modeling

    def no_loading(*args, **kwargs):
        raise AssertionError("the model config was loaded before the outputs were checked")

    monkeypatch.setattr(stages.modeling, "load_config", no_loading)
    argv, out = stage()
    blocker = tmp_path / "a-file"  # a regular file where a directory is needed: fails for root too
    blocker.write_text("")
    target = blocker / "sub" / ("train.json" if flag in ("--metrics", "--run-info") else "dir")
    argv[argv.index(flag) + 1] = str(target)
    line = run_main(argv, capsys)
    assert line == f"error: {flag} {target}: cannot write there: {blocker} is not a directory"
    assert not out.exists()


def test_disk_full_while_checkpointing_is_one_line_and_leaves_no_checkpoint(stage, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4352 vs 4240")

    monkeypatch.setattr(torch, "save", full_disk)  # the optimizer state, after the adapter's safetensors
    argv, out = stage(save_steps=1)
    line = run_main(argv, capsys)
    ckpt = out / "resume" / "checkpoint-1"
    assert line == (f"error: train: cannot write {ckpt} ([enforce fail at inline_container.cc:664] . unexpected pos "
                    "4352 vs 4240); the disk may be full: free space there and run again (training resumes from "
                    "the last complete checkpoint)")
    assert not ckpt.exists(), "the half-written checkpoint is removed"
    assert completed_checkpoints(out / "resume") == []
    assert not (out / "adapter").exists() and not (out / "train.json").exists()


def test_disk_full_while_saving_the_adapter_leaves_no_adapter_and_keeps_the_checkpoints(stage, capsys, monkeypatch):
    import os

    import peft.peft_model

    argv, out = stage()
    save = peft.peft_model.safe_save_file

    def full_disk_outside_checkpoints(tensors, filename, *args, **kwargs):
        if str(out / "resume") not in str(filename):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk_outside_checkpoints)
    line = run_main(argv, capsys)
    assert line.startswith(f"error: train: cannot write {out / 'adapter'} ([Errno 28] No space left on device")
    assert line.endswith(f"the disk is full: free space there and run again (the checkpoints in {out / 'resume'} "
                         "are kept: the next run resumes from the last one)")
    assert not (out / "adapter").exists() and not (out / "train.json").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [], "no temporary directory left"
    assert completed_checkpoints(out / "resume") == [2], "the final checkpoint is there to resume from"


def test_the_resume_dir_lock_names_its_holder_and_goes_with_it(tmp_path):
    import os

    from stages.train import LOCK_FILE, find_resume_checkpoint, resume_dir_lock

    resume = tmp_path / "resume"
    with resume_dir_lock(resume) as lock:
        assert lock.read_text() == f"{os.getpid()}\n"
        # flock is per open file: a second open of it, even in this process, is a second holder.
        with pytest.raises(UserError, match=rf"another training run \(PID {os.getpid()}\) is using it"):
            with resume_dir_lock(resume):
                pass
        # Checkpoints of other params are deleted, the lock stays.
        (resume / "checkpoint-2").mkdir()
        assert find_resume_checkpoint(resume, "other") is None
        assert sorted(p.name for p in resume.iterdir()) == ["fingerprint.json", LOCK_FILE]
    assert not lock.exists()
    with resume_dir_lock(resume):
        pass


def test_an_fp16_compute_dtype_trains_float32_master_weights(stage, tmp_path):
    """bnb_4bit_compute_dtype: float16 (T4, V100): TRL casts the adapter to bf16, which fp16's
    GradScaler cannot unscale on a GPU; the stage trains float32 LoRA weights instead, with finite
    losses, and saves them as float32."""
    from safetensors import safe_open

    from stages.train import main

    argv, out = stage()
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["model"]["bnb_4bit_compute_dtype"] = "float16"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    main(argv)
    run = json.loads((out / "train_run.json").read_text())
    assert math.isfinite(run["train_loss"]) and math.isfinite(run["dev_loss"]) and run["steps"] == 2
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
