"""Scaling out, on CPU: `python -m stages.launch 2 …` trains and evaluates in two gloo ranks and
matches one process; `dvc exp run --queue` + `dvc queue start -j 2` runs a sweep in parallel; a
shared DVC remote lets a fresh clone pull the results instead of re-running the pipeline."""
import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from tests.dvc_project import REPO, project, run  # noqa: F401 (project: the DVC project fixture)

# One thread per process: two ranks (or two queued experiments) on a small CPU otherwise
# oversubscribe its cores; two queued experiments took 30 s per tiny training step instead of 0.5 s.
CPU_ENV = {"OMP_NUM_THREADS": "1", "QLORA_ALLOW_CPU_DDP": "1"}

# Measured on CPU (tiny Llama, 4 steps of effective batch 8, lora_dropout 0), against one process at
# batch 1 × accumulation 8: two processes at 1 × 4 each agree to 1.0e-4 (step 1 exactly; after that
# the all-reduce sums two 4-micro-batch halves instead of one 8-micro-batch sum and the bf16 adapter
# rounds the difference); two at padding-free 4 × 1 each (params.yaml's 8 × 1 split) to 2.6e-4.
# Training the 2-process run with an effective batch of 16 instead moves step 1 by 2e-3 and step 3
# by 5e-2, so 1e-3 still tells a wrong effective batch apart.
LOSS_ATOL = 1e-3
# lora_B starts at zero, so it is the learned update itself. Its relative difference to the 1-process
# run measured 0.018 (1 × 4 per rank) and 0.026 (padding-free 4 × 1 per rank): Adam's first steps are
# ~lr·sign(grad), and near-zero gradients flip sign under the reordered sum. An effective batch of
# 16 instead gives 0.53.
LORA_B_RTOL = 0.1
# name: (processes, train params). The per-rank split follows stages.train.per_rank_batch.
TRAIN_RUNS = {
    "1 process, 1 x 8": (1, {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8,
                             "padding_free": False}),
    "2 processes, 1 x 4 each": (2, {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8,
                                    "padding_free": False}),
    "2 processes, padding-free 4 x 1 each": (2, {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                                                 "padding_free": True}),
}
BASELINE = "1 process, 1 x 8"


def launch(num_processes, module, args):
    return run([sys.executable, "-m", "stages.launch", str(num_processes), module, *map(str, args)], REPO,
               {**os.environ, **CPU_ENV})


def addition_rows(n, start=0):
    # Question lengths vary with i, so a length-sorted evaluation reorders them.
    return [{"question": f"Ann has {i} cards and gets {i * 37 + 3} more. " + "Then she counts them. " * (i % 3)
             + "How many cards?", "answer": f"{i} + {i * 37 + 3} = {i * 38 + 3}\n#### {i * 38 + 3}",
             "final": str(i * 38 + 3)} for i in range(start, start + n)]


@pytest.fixture(scope="module")
def ddp(tiny_model_dir, tmp_path_factory):
    """The same 4 training steps for each of TRAIN_RUNS; returns (root, {name: out dir}, {name: stdout})."""
    root = tmp_path_factory.mktemp("ddp")
    for split, rows in (("train", addition_rows(40)), ("dev", addition_rows(4, 100)), ("test", addition_rows(7, 200))):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    outs, stdouts = {}, {}
    for i, (name, (num_processes, batch)) in enumerate(TRAIN_RUNS.items()):
        out = outs[name] = root / f"run{i}"
        out.mkdir()
        (out / "params.yaml").write_text(yaml.safe_dump({
            "model": {"name": str(tiny_model_dir)},
            "train": {"max_steps": 4, "lora_dropout": 0.0, "learning_rate": 5e-3, "warmup_ratio": 0.0,
                      "max_length": 384, "logging_steps": 1, "eval_steps": 100, "save_steps": 100, **batch},
            "evaluate": {"max_new_tokens": 12, "batch_size": 1}}))
        stdouts[name] = launch(num_processes, "stages.train", [
            "--params", out / "params.yaml", "--train-file", root / "train.jsonl", "--dev-file", root / "dev.jsonl",
            "--output-dir", out / "results/adapter", "--resume-dir", out / "results/resume",
            "--metrics", out / "results/losses.json", "--run-info", out / "results/train.json",
            "--live-dir", out / "results/live"])
    return root, outs, stdouts


def loss_curve(live_dir):
    lines = (live_dir / "plots/metrics/loss.tsv").read_text().splitlines()
    assert lines[0] == "step\tloss"
    return [(int(step), float(loss)) for step, loss in (line.split("\t") for line in lines[1:])]


@pytest.mark.parametrize("name", [n for n in TRAIN_RUNS if n != BASELINE])
def test_two_process_training_matches_one_and_only_rank_zero_writes(ddp, name):
    from safetensors.torch import load_file

    _, outs, stdouts = ddp
    one, two = outs[BASELINE] / "results", outs[name] / "results"
    metrics_one, metrics_two = (json.loads((d / "train.json").read_text()) for d in (one, two))
    assert metrics_two["world_size"] == 2 and metrics_one["world_size"] == 1
    assert metrics_two["effective_batch"] == metrics_one["effective_batch"] == 8
    assert metrics_two["steps"] == 4

    # Rank 0 alone saves, logs and reports: one summary line, one set of outputs, no leftover
    # temporary directories from a second rank's atomic write, each step logged once.
    assert sum(line.startswith("train: 4 steps") for line in stdouts[name].splitlines()) == 1
    assert sorted(p.name for p in two.iterdir()) == ["adapter", "live", "losses.json", "train.json"]
    curve_one, curve_two = loss_curve(one / "live"), loss_curve(two / "live")
    assert [step for step, _ in curve_two] == [1, 2, 3, 4]

    losses_one, losses_two = [loss for _, loss in curve_one], [loss for _, loss in curve_two]
    assert losses_one[0] - losses_one[-1] > 10 * LOSS_ATOL, "the curve must move more than the tolerance"
    assert losses_two == pytest.approx(losses_one, abs=LOSS_ATOL, rel=0)
    assert metrics_two["dev_loss"] == pytest.approx(metrics_one["dev_loss"], abs=LOSS_ATOL, rel=0)

    adapter_one, adapter_two = (load_file(str(d / "adapter/adapter_model.safetensors")) for d in (one, two))
    assert adapter_one.keys() == adapter_two.keys()
    learned = [k for k in adapter_one if "lora_B" in k]
    diff = sum((adapter_one[k].float() - adapter_two[k].float()).norm() ** 2 for k in learned) ** 0.5
    size = sum(adapter_one[k].float().norm() ** 2 for k in learned) ** 0.5
    assert size > 0 and diff / size < LORA_B_RTOL, f"lora_B differs by {diff / size:.3f} of its norm"


def test_two_process_evaluation_gathers_the_same_predictions_in_question_order(ddp):
    root, outs, _ = ddp
    results = {}
    for n in (1, 2):
        # evaluate.batch_size is 1: each rank batches its own shard by prompt length, so with larger
        # batches the two runs would pad different rows together, and padded bf16 attention can flip
        # a greedy token. Unpadded rows make the outputs comparable exactly.
        stdout = launch(n, "stages.evaluate", [
            "--params", outs[BASELINE] / "params.yaml", "--data-file", root / "test.jsonl",
            "--adapter", outs[BASELINE] / "results/adapter",
            "--metrics", root / f"eval{n}.json", "--run-info", root / f"run{n}.json",
            "--predictions", root / f"predictions{n}.jsonl"])
        assert stdout.count("evaluate: fine-tuned, train_prompt: exact_match") == 1, "only rank 0 reports"
        metrics = json.loads((root / f"eval{n}.json").read_text())
        run_info = json.loads((root / f"run{n}.json").read_text())
        predictions = [json.loads(line) for line in (root / f"predictions{n}.jsonl").read_text().splitlines()]
        results[n] = metrics, predictions, run_info
    (metrics1, predictions1, run1), (metrics2, predictions2, run2) = results[1], results[2]
    # 7 questions: shards of 4 and 3, gathered back in the file's order.
    assert [p["question"] for p in predictions2] == [r["question"] for r in addition_rows(7, 200)]
    assert predictions2 == predictions1
    assert any(p["generated"] for p in predictions1), "empty generations would make the comparison vacuous"
    assert run2.pop("num_processes") == 2 and run1.pop("num_processes") == 1
    for timing in ("generated_tokens_per_second", "wall_seconds"):
        run1.pop(timing), run2.pop(timing)
    assert metrics2 == metrics1 and run1["n"] == 7 and run2 == run1


@pytest.fixture(scope="module")
def small_project(project):
    """tests.dvc_project's project at the smallest sizes, reproduced once and committed."""
    root, env = project
    env = {**env, **CPU_ENV}
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(num_problems=40)
    params["train"].update(max_steps=2, eval_steps=100, save_steps=100)
    params["evaluate"].update(max_new_tokens=8, batch_size=4, limit=4)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "baseline"], root, env)
    return root, env


def queue_status(root, env):
    """{experiment name: Queued | Running | Success | Failed …} from the table above the worker summary."""
    table = run(["dvc", "queue", "status"], root, env).split("\n\n")[0].splitlines()[1:]
    return {fields[1]: fields[-1] for fields in map(str.split, table)}


def test_queued_sweep_runs_in_parallel_workers(small_project, tmp_path):
    """The queue runs each experiment in a git clone under .dvc/tmp/exps: model.name is absolute here (a
    relative, git-ignored models/… path would not exist there), and the workers inherit `dvc queue
    start`'s environment, PATH with this venv's python included."""
    root, env = small_project
    for r in (8, 4):
        run(["dvc", "exp", "run", "--queue", "-n", f"sweep-r{r}", "-S", f"train.lora_r={r}"], root, env)
    # The workers it daemonizes inherit its stdout: captured into a pipe, `run` would wait for them to exit.
    with open(tmp_path / "queue_start.log", "w") as log:
        started = subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=root, env=env, stdout=log, stderr=log)
    assert started.returncode == 0, (tmp_path / "queue_start.log").read_text()
    try:
        deadline = time.time() + 300
        status = queue_status(root, env)
        most_running = 0
        while {"Queued", "Running"} & set(status.values()) and time.time() < deadline:
            time.sleep(5)  # each `dvc queue status` costs a second of CPU the workers need
            status = queue_status(root, env)
            most_running = max(most_running, list(status.values()).count("Running"))
    finally:
        run(["dvc", "queue", "stop"], root, env)
    for name in ("sweep-r8", "sweep-r4"):
        logs = subprocess.run(["dvc", "queue", "logs", name], cwd=root, env=env, capture_output=True, text=True)
        assert status.get(name) == "Success", f"{name}: {status.get(name)}\n{logs.stdout[-3000:]}{logs.stderr[-2000:]}"
    assert most_running == 2, "the two workers never ran their experiments at the same time"

    shown = json.loads(run(["dvc", "exp", "show", "--json"], root, env))
    experiments = {exp["name"]: exp["revs"][0]["data"] for commit in shown for exp in commit.get("experiments") or []}
    assert {"sweep-r8", "sweep-r4"} <= experiments.keys()
    for r in (8, 4):
        data = experiments[f"sweep-r{r}"]
        assert data["params"]["params.yaml"]["data"]["train"]["lora_r"] == r
        evaluation = data["metrics"]["metrics/eval.json"]["data"]
        assert evaluation.keys() == {"exact_match", "n"} and 0 <= evaluation["exact_match"] <= 1


def only_the_fingerprint_ran(out: str) -> bool:
    return "Running stage 'fingerprint'" in out and "Running stage" not in out.replace("Running stage 'fingerprint'", "")


def test_fresh_clone_pulls_results_from_the_shared_remote_instead_of_rerunning(small_project, tmp_path):
    root, env = small_project
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], root, env)
    assert only_the_fingerprint_ran(run(["dvc", "repro"], root, env))
    run(["git", "commit", "-qam", "shared remote"], root, env)
    run(["dvc", "push"], root, env)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert not (clone / "checkpoints/sft_lora").exists()
    run(["dvc", "pull"], clone, env)
    # The fingerprint stage is always out of date by design (it looks at what model.name points to).
    assert json.loads(run(["dvc", "status", "dvc.yaml", "--json"], clone, env)) == {"fingerprint": ["always changed"]}
    assert only_the_fingerprint_ran(run(["dvc", "repro"], clone, env))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (clone / "checkpoints/sft_lora" / name).read_bytes() == (root / "checkpoints/sft_lora" / name).read_bytes()
    assert (clone / "data/gsm8k_train.jsonl").read_bytes() == (root / "data/gsm8k_train.jsonl").read_bytes()
