"""A fresh git + DVC project on a tmp path, holding this checkout's files (tracked and untracked,
not ignored) and the committed params at demo sizes, for tests that drive the real `dvc` commands (queues, remotes)."""
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
    # A copy of the tiny model inside the project: queued experiments run in copies of it.
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

