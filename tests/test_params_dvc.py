"""Every param changes what it should, through DVC itself: a changed key makes exactly the stages that
read it out of date, and none of them can be restored from DVC's run-cache with the old values.

DVC's run-cache key leaves out every dict key named `size` or `nfiles`, at any depth
(dvc/stage/cache.py `_get_cache_hash`, dvc issue 10296): `data.size` once changed nothing, and
`dvc exp run -S data.size=100` silently restored the old data. These tests ask DVC's own code.
"""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.config import SECTIONS, parse_section
from tests.committed import REPO, committed_params, committed_text

# Which params each stage's code reads (its `load_params(...)` sections; the fingerprint stage reads
# only what names the model and the data). The test checks dvc.yaml against this, not against itself.
READS = {
    "fingerprint": {"model.name", "model.revision", "data.source", "data.config", "data.revision"},
    "prepare": {"data"},
    "train": {"model", "prompt", "train"},
    "evaluate": {"model", "prompt", "evaluate"},
    "evaluate_base": {"model", "prompt", "evaluate"},
    "report": {"evaluate.split"},  # only to name the split's file
}
STAGE_MODULES = {"prepare": "stages/prepare.py", "train": "stages/train.py", "evaluate": "stages/evaluate.py"}


def leaf_keys(params: dict) -> list[str]:
    return [f"{section}.{key}" for section, values in params.items() for key in values]


def reads(stage: str, key: str) -> bool:
    return key in READS[stage] or key.split(".")[0] in READS[stage]


# Where dvc.yaml interpolates a value into a path, the other value must name a file that exists.
OTHER_VALUES = {"evaluate.split": "dev"}


def different(key, value):
    """Another value of the same kind (DVC does not validate; the run-cache only hashes)."""
    if key in OTHER_VALUES:
        return OTHER_VALUES[key]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1 if value != -1 else 7
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + ["Z:"]
    if isinstance(value, dict):
        return {**value, "extra": 1}
    if value is None:
        return 3
    raise AssertionError(f"no other value for {value!r}")


def test_dataclass_defaults_are_the_committed_values():
    """One source for defaults: a key left out of params.yaml means its committed value."""
    committed = committed_params()
    assert set(committed) == set(SECTIONS)
    for name, cls in SECTIONS.items():
        assert set(committed[name]) == {f.name for f in dataclasses.fields(cls)}, f"params.yaml: {name} lacks keys"
        assert parse_section(name, committed[name]) == cls(), f"{name}: a dataclass default differs from params.yaml"


def test_no_param_has_a_name_dvc_leaves_out_of_its_run_cache_key():
    def names(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield key
                yield from names(value)
    assert not {"size", "nfiles"} & set(names(committed_params()))


def test_the_stages_read_the_sections_the_table_says():
    for stage, path in STAGE_MODULES.items():
        calls = re.findall(r"load_params\(args\.params, ([^)]*)\)", (REPO / path).read_text())
        assert calls, path
        sections = {s.strip().strip('"') for s in calls[0].split(",")}
        assert sections == READS[stage], f"{path} reads {sections}"


# Modules a stage imports that cannot change what it writes, left out of its deps so that editing them
# does not re-run hours of training: module -> (the stages it is left out of, why). Every other
# `stages/` module a stage's command reaches through its imports (at any depth, inside functions too)
# is one of its deps, and nothing else under stages/ is.
NOT_DEPS = {
    "stages/quiet.py": ({"fingerprint", "prepare", "train", "evaluate", "evaluate_base", "report", "export"},
                        "which library warnings are silenced: the log, not the outputs"),
    "stages/protocols.py": ({"fingerprint", "prepare", "train", "export"},
                            "reached through config.py's check of evaluate.protocol's name, memory.py's "
                            "estimate for evaluation and modeling.py's refusal of a dated chat template"),
    "stages/decode.py": ({"train", "export"}, "reached through memory.py, whose PREFILL_TOKENS sizes evaluation's estimate"),
    "stages/decode_attention.py": ({"train", "export"}, "reached through decode.py, as above"),
}


def stage_imports(path: Path) -> set[str]:
    """The stages/ modules a file imports, wherever the import statement is."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("stages.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "stages":
            names |= {f"stages.{a.name}" for a in node.names}  # from stages import memory
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("stages."):
            names.add(node.module)
    return {name.replace(".", "/") + ".py" for name in names}


def test_each_stage_depends_on_the_code_it_runs():
    """A stage whose code changed must re-run: evaluate once did not list stages/decode.py (the engine
    that decodes every answer) and train did not list stages/gsm8k.py (which builds every training
    prompt), so after an edit there `dvc repro` kept the old exact_match."""
    checked = 0
    for pipeline in ("dvc.yaml", "export/dvc.yaml"):
        for stage, spec in yaml.safe_load(committed_text(pipeline))["stages"].items():
            todo = [f"stages/{m}.py" for m in re.findall(r"\bstages\.(\w+)", spec["cmd"])]
            assert todo, f"{pipeline}: {stage} runs no stages/ module"
            reached = set()
            while todo:
                path = todo.pop()
                if path not in reached:
                    reached.add(path)
                    todo += stage_imports(REPO / path)
            wanted = {p for p in reached if stage not in NOT_DEPS.get(p, ((), ""))[0]}
            listed = {d for d in spec["deps"] if isinstance(d, str) and d.startswith("stages/")}
            assert listed == wanted, (f"{pipeline}: {stage}'s deps lack {sorted(wanted - listed)}, "
                                      f"list beyond its code {sorted(listed - wanted)}")
            checked += 1
    assert checked == 7


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    """This repository's dvc.yaml and code with the committed params, and a placeholder for every
    output, recorded in dvc.lock by `dvc commit` (no stage runs: only DVC's bookkeeping is tested)."""
    root = tmp_path_factory.mktemp("dvc_params")
    for name in subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split():
        if name.startswith(("stages/", "metrics_module/", ".dvc/")) or name in ("dvc.yaml", ".dvcignore"):
            if (REPO / name).is_file():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, root / name)
    (root / "params.yaml").write_text(committed_text("params.yaml"))
    for out in ("fingerprints/model.json", "fingerprints/data.json", "data/gsm8k_train.jsonl", "data/gsm8k_dev.jsonl",
                "data/gsm8k_test.jsonl", "data/gsm8k_fewshot.jsonl", "checkpoints/sft_lora/adapter_config.json",
                "metrics/train.json", "metrics/train_run.json", "metrics/eval.json", "metrics/eval_run.json",
                "metrics/eval_base.json", "metrics/eval_base_run.json", "metrics/predictions.jsonl",
                "metrics/predictions_base.jsonl", "metrics/accuracy_by_steps.csv", "dvclive/train/metrics.json"):
        (root / out).parent.mkdir(parents=True, exist_ok=True)
        (root / out).write_text(json.dumps({"placeholder": out}) + "\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q", "-b", "main"], ["dvc", "commit", "-f", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "placeholders"]):
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout}{proc.stderr}"
    return root


def stage_view(root: Path) -> tuple[set, dict]:
    """(stages whose params changed against dvc.lock, each run-cacheable stage's run-cache key)."""
    from dvc.repo import Repo
    from dvc.stage.cache import _can_hash, _get_stage_hash

    with Repo(str(root)) as repo:
        status = repo.status()
        changed = {name.split(":")[-1] for name, entries in status.items()
                   if any(isinstance(e, dict) and "params.yaml" in e.get("changed deps", {}) for e in entries)}
        keys = {}
        for stage in repo.index.stages:
            stage.save(allow_missing=True, run_cache=False)  # in memory: hashes of deps and params now
            if _can_hash(stage):
                keys[stage.name] = _get_stage_hash(stage)
    return changed, keys


def test_every_param_re_runs_exactly_the_stages_that_read_it(dvc_project):
    root = dvc_project
    committed = committed_params()
    changed, keys_before = stage_view(root)
    assert changed == set()
    # prepare and the evaluations are run-cacheable (train is not: its DVCLive output persists).
    assert {"prepare", "evaluate", "evaluate_base"} <= keys_before.keys()
    failures = []
    try:
        for key in leaf_keys(committed):
            section, name = key.split(".")
            params = json.loads(json.dumps(committed))
            params[section][name] = different(key, params[section][name])
            (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            changed, keys_after = stage_view(root)
            expected = {stage for stage in READS if reads(stage, key)}
            if changed != expected:
                failures.append(f"{key}: out of date {sorted(changed)}, expected {sorted(expected)}")
            for stage in expected & keys_before.keys():
                if keys_after[stage] == keys_before[stage]:
                    failures.append(f"{key}: {stage}'s run-cache key did not change (DVC would restore old outputs)")
            for stage in keys_before.keys() - expected:
                if keys_after[stage] != keys_before[stage]:
                    failures.append(f"{key}: {stage}'s run-cache key changed although it does not read {key}")
    finally:
        (root / "params.yaml").write_text(committed_text("params.yaml"))
    assert not failures, "\n".join(failures)


def test_a_param_named_size_would_have_been_missed(dvc_project):
    """The check above can see the bug: with a key named `size`, the run-cache key stays the same."""
    root = dvc_project
    params = committed_params()
    try:
        params["data"]["size"] = 1000
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        _, before = stage_view(root)
        params["data"]["size"] = 100
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        changed, after = stage_view(root)
    finally:
        (root / "params.yaml").write_text(committed_text("params.yaml"))
    assert "prepare" in changed  # dvc status sees it...
    assert after["prepare"] == before["prepare"]  # ...but the run-cache key does not: old data restored


def test_dvc_repro_re_runs_prepare_for_another_problem_count(tiny_model_dir, tmp_path):
    """The reported bug, through `dvc repro` itself: 40 problems, then 60 (must run, not be restored
    from the run-cache), then 40 again (may be restored: it is the 40-problem data)."""
    root = tmp_path / "project"
    for name in subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.split():
        if name.startswith(("stages/", "metrics_module/", ".dvc/")) or name in ("dvc.yaml", ".dvcignore", ".gitignore"):
            if (REPO / name).is_file():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, root / name)
    params = committed_params()
    params["model"]["name"] = str(tiny_model_dir)
    params["data"].update(source="gsm_symbolic", dev_size=4)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=root, env=env, check=True)
    lines = []
    for count in (40, 60, 40):
        params["data"]["num_problems"] = count
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        proc = subprocess.run(["dvc", "repro", "prepare"], cwd=root, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines.append((root / "data/gsm8k_train.jsonl").read_text().count("\n")
                     + (root / "data/gsm8k_test.jsonl").read_text().count("\n")
                     + (root / "data/gsm8k_dev.jsonl").read_text().count("\n"))
        if count == 60:
            assert "Running stage 'prepare'" in proc.stdout, proc.stdout
    assert lines == [40, 60, 40]


def test_a_bad_value_in_any_section_stops_dvc_repro_with_one_line_naming_the_key(dvc_project):
    """`evaluate.split: validation` once failed inside DVC naming a missing file; the fingerprint
    stage, first in the pipeline, validates every section before anything else runs."""
    root = dvc_project
    params = committed_params()
    params["evaluate"]["split"] = "validation"
    try:
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "DVC_NO_ANALYTICS": "1"}
        proc = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True)
    finally:
        (root / "params.yaml").write_text(committed_text("params.yaml"))
    assert proc.returncode != 0
    assert "error: params.yaml: evaluate.split: must be test, dev or train, got 'validation'" in proc.stdout + proc.stderr
    assert "Running stage 'prepare'" not in proc.stdout
