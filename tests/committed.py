"""The committed state of the repository, for tests: `dvc exp run -S …` rewrites the workspace's
params.yaml, so a test that read it would test the last experiment, not the project."""
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def committed_text(name: str) -> str:
    """A file as committed at HEAD (the workspace file only where this is not a git checkout)."""
    proc = subprocess.run(["git", "show", f"HEAD:{name}"], cwd=REPO, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else (REPO / name).read_text()


def committed_params() -> dict:
    import yaml

    return yaml.safe_load(committed_text("params.yaml"))
