"""End to end, with the real `dvc` commands on a copy of this repository: `dvc repro`, then
`dvc exp run -S train.lora_r=16`, then `dvc metrics diff`, then `dvc repro` has nothing to do; a
model rebuilt at the same path re-runs what used it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.committed import REPO, committed_text


def run(args, cwd, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def project(tiny_model_dir, tmp_path_factory):
    """A fresh git + DVC project holding this repository's tracked files and the demo-sized params."""
    root = tmp_path_factory.mktemp("project")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file() and not name.startswith(("tests/", "benchmarks/")):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = yaml.safe_load(committed_text("params.yaml"))
    # A copy of the tiny model: one test rebuilds it with other weights at the same path.
    shutil.copytree(tiny_model_dir, root / "models" / "tiny")
    params["model"]["name"] = str(root / "models" / "tiny")
    params["data"].update(source="gsm_symbolic", num_problems=60, dev_size=4)
    params["train"].update(max_steps=3, max_length=384, logging_steps=1, eval_steps=2, save_steps=2)
    params["evaluate"].update(max_new_tokens=16, batch_size=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    run(["git", "init", "-q", "-b", "main"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "project"], root, env)
    return root, env


def test_repro_experiment_diff_and_nothing_left_to_do(project):
    root, env = project
    out = run(["dvc", "repro"], root, env)
    for stage in ("fingerprint", "prepare", "train", "evaluate", "evaluate_base"):
        assert f"Running stage '{stage}'" in out
    evaluation = json.loads((root / "metrics/eval.json").read_text())
    assert evaluation["n"] == 12 and 0 <= evaluation["exact_match"] <= 1
    assert evaluation["protocol"] == "train_prompt"
    run_info = json.loads((root / "metrics/eval_run.json").read_text())
    assert run_info["protocol"]["max_new_tokens"] == 16 and run_info["adapter"] is True
    assert json.loads((root / "metrics/train.json").read_text()).keys() == {"train_loss", "dev_loss"}
    train = json.loads((root / "metrics/train_run.json").read_text())
    assert train["steps"] == 3 and train["effective_batch"] == 8
    assert (root / "checkpoints/sft_lora/adapter_config.json").is_file()
    assert not (root / "checkpoints/resume").exists()
    assert (root / "dvclive/train/plots/metrics/loss.tsv").read_text().startswith("step\tloss\n1\t")
    predictions = (root / "metrics/predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 12 and {"question", "gold", "generated", "extracted", "correct"} <= json.loads(predictions[0]).keys()
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "baseline"], root, env)

    out = run(["dvc", "exp", "run", "-S", "train.lora_r=16"], root, env)
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'prepare'" not in out and "Running stage 'evaluate_base'" not in out
    adapter = json.loads((root / "checkpoints/sft_lora/adapter_config.json").read_text())
    assert adapter["r"] == 16

    diff = json.loads(run(["dvc", "metrics", "diff", "--all", "--json"], root, env))
    assert "exact_match" in diff["metrics/eval.json"]
    params_diff = json.loads(run(["dvc", "params", "diff", "--json"], root, env))
    assert params_diff["params.yaml"]["train.lora_r"] == {"old": 32, "new": 16, "diff": -16}

    shown = json.loads(run(["dvc", "exp", "show", "--json"], root, env))
    assert len(json.dumps(shown)) > 0 and "lora_r" in json.dumps(shown)
    # The fingerprint stage always runs (it looks at what model.name points to); nothing else does.
    out = run(["dvc", "repro"], root, env)
    assert "Running stage" not in out.replace("Running stage 'fingerprint'", ""), out
    plots = json.loads(run(["dvc", "plots", "show", "--json"], root, env))
    points = plots["data"]["Loss"][0]["content"]["data"]["values"]
    assert {p["step"] for p in points} >= {"1", "2", "3"} or {p["step"] for p in points} >= {1, 2, 3}


def test_a_model_rebuilt_at_the_same_path_re_runs_training_and_both_evaluations(project):
    root, env = project
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "experiment", "--allow-empty"], root, env)
    run(["dvc", "repro"], root, env)  # whatever the experiment left: in sync before the rebuild
    from stages.tiny_model import build_tiny_model

    build_tiny_model(root / "models" / "tiny", seed=1)  # other weights, same model.name
    out = run(["dvc", "repro"], root, env)
    for stage in ("train", "evaluate", "evaluate_base"):
        assert f"Running stage '{stage}'" in out, out
    assert "Running stage 'prepare'" not in out
