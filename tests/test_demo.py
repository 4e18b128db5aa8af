"""The README's command sequence as a new user runs it, in a fresh clone of the committed state, with
the real `make` and `dvc` commands: `make demo`; then, in demo/, `dvc exp run -n lora16 -S
train.lora_r=16`, `dvc exp show --only-changed`, `dvc metrics show`, `dvc exp diff demo lora16`,
`dvc metrics diff demo`, `dvc plots diff demo lora16` (opened in headless Chromium with the network
off); what each prints, and what `git status` says afterwards. Then, in the same project: a plain
`dvc repro` has nothing to do, and a model rebuilt at the same path re-runs what used it.

One module-scoped project, the tests in the order of the README (pytest keeps file order)."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest

from tests.committed import REPO
from tests.test_plots_offline import chromium

WIDTH = 160  # a terminal's columns the tables must fit in (issue 14)
STAMP = ".venv/.installed-requirements"
# The Makefile's DEMO_SIZES made smaller (CI's time): the same commands, fewer rows and steps.
SIZES = ("data.num_problems=60 data.dev_size=8 train.max_length=384 train.max_steps=4 train.logging_steps=1 "
         "train.eval_steps=2 train.save_steps=2 evaluate.max_new_tokens=16 evaluate.batch_size=16")


def run(args, cwd, env, expect=0):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == expect, f"{' '.join(args)}: exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def widest(text: str) -> int:
    return max(map(len, text.splitlines()))


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """`git clone` of this repository's commit and `make demo` in it, with this test run's virtualenv as
    the clone's .venv (make's install step is told it is done: the same requirements are installed)."""
    root = tmp_path_factory.mktemp("user") / "gsm8k-qlora"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "DVC_"))}
    # No git identity: `make demo` has to cope on a machine that has none (CI's), and COLUMNS wide
    # enough that rich prints each table at its natural width instead of folding it.
    env.update(HOME=str(root.parent), GIT_CONFIG_NOSYSTEM="1", DVC_NO_ANALYTICS="1", COLUMNS="1000")
    run(["git", "clone", "-q", str(REPO), str(root)], root.parent, env)
    (root / ".venv").symlink_to(sys.prefix)
    env["PATH"] = f"{root / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"  # the README's `source .venv/bin/activate`
    demo = run(["make", "-o", STAMP, "demo", f"DEMO_SIZES={SIZES}"], root, env)
    return root, env, demo


def test_make_demo_runs_every_stage_in_demo_and_leaves_the_checkout_as_it_was(clone):
    root, env, out = clone
    for stage in ("fingerprint", "prepare", "train", "evaluate", "evaluate_base", "report"):
        assert f"Running stage '{stage}'" in out, out[-3000:]
    assert run(["git", "status", "--porcelain"], root, env) == ""  # demo/ is ignored; nothing else changed
    demo = root / "demo"
    # In demo/, one commit on top of the project's: the demo values (params.yaml), the lock, and the
    # .gitignore files DVC writes beside its cached outputs.
    changed = run(["git", "diff", "--name-only", "HEAD~1", "HEAD"], demo, env).split()
    assert {"dvc.lock", "params.yaml"} <= set(changed) and \
        all(name in ("dvc.lock", "params.yaml") or name.endswith("/.gitignore") for name in changed), changed
    assert "demo" in run(["dvc", "exp", "list", "--name-only"], demo, env).split()
    # `dvc metrics show`, as make demo printed it: the three numbers and the question counts, in a terminal's width.
    table = out[out.index("Path "):out.index("make demo: done")]
    assert widest(table) <= WIDTH and {"exact_match", "n", "base_exact_match", "base_n", "dev_loss"} <= set(table.split())
    assert json.loads((demo / "metrics/train.json").read_text()).keys() == {"dev_loss"}
    assert json.loads((demo / "metrics/eval.json").read_text()).keys() == {"exact_match", "n"}
    assert json.loads((demo / "metrics/eval_base.json").read_text()).keys() == {"base_exact_match", "base_n"}
    run_info = json.loads((demo / "metrics/eval_run.json").read_text())
    assert run_info["adapter"] is True and run_info["protocol"]["name"] == "train_prompt" and run_info["n"] == 12
    assert (demo / "checkpoints/sft_lora/adapter_config.json").is_file()
    assert not (demo / "checkpoints/resume").exists()
    # A second `make demo` does not overwrite the first one's experiments.
    again = run(["make", "-o", STAMP, "demo"], root, env, expect=2)
    assert "demo/ exists" in again


def test_an_experiment_re_runs_training_and_its_evaluation_only(clone):
    root, env, _ = clone
    out = run(["dvc", "exp", "run", "-n", "lora16", "-S", "train.lora_r=16"], root / "demo", env)
    for stage in ("train", "evaluate", "report"):
        assert f"Running stage '{stage}'" in out
    assert "Running stage 'prepare'" not in out and "Running stage 'evaluate_base'" not in out
    assert json.loads((root / "demo/checkpoints/sft_lora/adapter_config.json").read_text())["r"] == 16


def test_exp_show_only_changed_fits_a_terminal_with_the_scores_side_by_side(clone):
    root, env, _ = clone
    shown = run(["dvc", "exp", "show", "--only-changed", "--no-pager"], root / "demo", env)
    print("\n" + shown)
    assert widest(shown) <= WIDTH, f"{widest(shown)} columns"
    header = next(line for line in shown.splitlines() if "Experiment" in line).split()
    for column in ("dev_loss", "exact_match", "base_exact_match", "train.lora_r"):
        assert column in header, header
    # The values, from the same command as CSV (the table's Created cell is two words).
    table = run(["dvc", "exp", "show", "--only-changed", "--csv"], root / "demo", env).splitlines()
    rows = {row["Experiment"]: row for row in csv.DictReader(table)}
    assert rows["demo"]["train.lora_r"] == "32" and rows["lora16"]["train.lora_r"] == "16"
    for name in ("demo", "lora16"):
        assert all(0 <= float(rows[name][key]) <= 1 for key in ("exact_match", "base_exact_match"))
        assert float(rows[name]["dev_loss"]) > 0
    metrics = run(["dvc", "metrics", "show"], root / "demo", env)
    assert widest(metrics) <= WIDTH


def test_the_comparisons_the_readme_names(clone):
    root, env, _ = clone
    demo = root / "demo"
    diff = json.loads(run(["dvc", "exp", "diff", "demo", "lora16", "--json"], demo, env))
    assert diff["params"]["params.yaml"]["train.lora_r"] == {"old": 32, "new": 16, "diff": -16}
    assert "dev_loss" in diff["metrics"]["metrics/train.json"]
    # The workspace holds lora16's results now; `dvc metrics diff demo` compares them with demo's.
    metrics = json.loads(run(["dvc", "metrics", "diff", "demo", "--all", "--json"], demo, env))
    assert metrics["metrics/eval.json"]["exact_match"].keys() >= {"old", "new"}
    assert metrics["metrics/eval_base.json"]["base_exact_match"]["diff"] == 0  # the base is the same model


def test_plots_diff_draws_both_experiments_offline(clone, tmp_path):
    root, env, _ = clone
    demo = root / "demo"
    run(["dvc", "plots", "diff", "demo", "lora16"], demo, env)
    page = demo / "dvc_plots" / "index.html"
    html = page.read_text()
    assert not re.search(r"<script[^>]+src=", html), "a script is loaded from elsewhere"
    proc = chromium(["--dump-dom", page.as_uri()], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert dom.count('class="marks"') == 2 and "steps in the gold solution" in dom
    assert "demo" in dom and "lora16" in dom  # one curve per experiment, named in the legend
    # The dev loss is logged once per evaluation: no step twice (the final pass repeated the last one).
    steps = (demo / "dvclive/train/plots/metrics/eval/loss.tsv").read_text().split("\n")[1:]
    steps = [line.split("\t")[0] for line in steps if line]
    assert len(steps) == len(set(steps)) >= 2, steps


def test_nothing_left_to_do_and_the_checkout_still_clean(clone):
    root, env, _ = clone
    out = run(["dvc", "repro"], root / "demo", env)
    # The fingerprint stage always runs (it looks at what model.name points to); nothing else does.
    assert "Running stage" not in out.replace("Running stage 'fingerprint'", ""), out
    assert run(["git", "status", "--porcelain"], root, env) == ""


def test_a_model_rebuilt_at_the_same_path_re_runs_training_and_both_evaluations(clone):
    root, env, _ = clone
    from stages.tiny_model import build_tiny_model

    build_tiny_model(root / "demo" / "models" / "tiny-llama", seed=1)  # other weights, same model.name
    out = run(["dvc", "repro"], root / "demo", env)
    for stage in ("train", "evaluate", "evaluate_base"):
        assert f"Running stage '{stage}'" in out, out
    assert "Running stage 'prepare'" not in out
