"""`python -m stages.evaluate` refuses a missing adapter and unwritable output locations before it
loads the model: one line, exit status 2, no output files (an 8B evaluation is hours of generation
that a read-only metrics/ must not throw away at the end)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def stage(tiny_model_dir, tmp_path):
    """Runs the stage on a valid setup (tiny model, one question), with the given flags changed."""
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "final": "2"}) + "\n")
    params = tmp_path / "params.yaml"
    params.write_text(f"model:\n  name: {tiny_model_dir}\n  load_in_4bit: false\n"
                      "evaluate:\n  max_new_tokens: 4\n  batch_size: 1\n  dequantize: false\n")

    def run(**flags):
        args = {"--params": str(params), "--data-file": str(data), "--metrics": str(tmp_path / "out" / "eval.json"),
                "--predictions": str(tmp_path / "out" / "predictions.jsonl"), **flags}
        proc = subprocess.run([sys.executable, "-m", "stages.evaluate", *[x for kv in args.items() for x in kv]],
                              cwd=REPO, capture_output=True, text=True)
        return proc, Path(args["--metrics"]), Path(args["--predictions"])

    return run


def assert_refused(proc, metrics, predictions, line):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"error: {line}"
    assert not metrics.exists() and not predictions.exists()


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_a_missing_adapter_is_named_before_anything_loads(stage, tmp_path, kind):
    adapter = tmp_path / "checkpoints" / "sft_lora"
    if kind == "empty":
        adapter.mkdir(parents=True)
    proc, metrics, predictions = stage(**{"--adapter": str(adapter)})
    assert_refused(proc, metrics, predictions, f"{adapter}: no LoRA adapter here (adapter_config.json missing); "
                                               "run the train stage first (`dvc repro train`)")


@pytest.fixture
def read_only_dir():
    """A directory nothing can be created in: mode 0555, and immutable (chattr +i) when running as root,
    whom modes do not stop. Skips where neither works."""
    path = Path(tempfile.mkdtemp(prefix="read-only-"))
    path.chmod(0o555)
    immutable = False

    def writable():
        try:
            Path(tempfile.mkdtemp(dir=path)).rmdir()
            return True
        except OSError:
            return False

    if writable() and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        if writable():
            pytest.skip("cannot make a directory read-only here")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)
        shutil.rmtree(path)


@pytest.mark.parametrize("flag", ["--metrics", "--predictions"])
def test_an_unwritable_output_is_named_before_generating(stage, read_only_dir, flag):
    target = read_only_dir / ("eval.json" if flag == "--metrics" else "predictions.jsonl")
    proc, metrics, predictions = stage(**{flag: str(target)})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: {flag} {target}: cannot be written ({read_only_dir}: ")
    assert not metrics.exists() and not predictions.exists() and not list(read_only_dir.iterdir())


def test_an_output_below_a_file_is_named(stage, tmp_path):
    (tmp_path / "metrics").write_text("a file where the directory should be")
    target = tmp_path / "metrics" / "eval.json"
    proc, metrics, predictions = stage(**{"--metrics": str(target)})
    assert_refused(proc, metrics, predictions,
                   f"--metrics {target}: cannot be created ({tmp_path / 'metrics'} is not a directory)")


def test_outputs_in_directories_yet_to_be_created_are_fine(stage, tmp_path):
    """The check creates nothing itself; the stage writes into new directories as before."""
    proc, metrics, predictions = stage(**{"--metrics": str(tmp_path / "new" / "deeper" / "eval.json")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(metrics.read_text())["n"] == 1 and predictions.is_file()
    assert not [p for p in metrics.parent.iterdir() if p.name.startswith(".")]
    assert os.listdir(tmp_path / "new") == ["deeper"]
