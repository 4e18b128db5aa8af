"""The evaluate metric, loaded offline by path exactly as users and the evaluate stage load it."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METRIC_DIR = ROOT / "metrics_module" / "gsm8k_exact_match"

# Strict: right, no answer, wrong '####', nothing, right with trailing period.
PREDICTIONS = ["48/2 = 24\n48+24 = 72\n#### 72", "The answer is 1,234.", "#### 5\nno, it is 9",
               "I do not know", "#### -7."]
REFERENCES = ["Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "1234", "9", "3", "-7"]
EXPECTED = {"exact_match": 0.4, "exact_match_flexible": 0.8, "n": 5, "correct": 2,
            "correct_flexible": 4, "no_answer_rate": 0.4}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.parametrize("how", ["relative path from the repo root", "absolute path", "load_metric"])
def test_metric_gives_the_known_numbers(how, offline, monkeypatch, tmp_path):
    import evaluate

    from stages.gsm8k import load_metric

    monkeypatch.chdir(ROOT)
    kwargs = {"keep_in_memory": True, "cache_dir": str(tmp_path)}
    metric = {
        "relative path from the repo root": lambda: evaluate.load("metrics_module/gsm8k_exact_match", **kwargs),
        "absolute path": lambda: evaluate.load(str(METRIC_DIR), **kwargs),
        "load_metric": lambda: load_metric(**kwargs),
    }[how]()
    assert metric.compute(predictions=PREDICTIONS, references=REFERENCES) == pytest.approx(EXPECTED)
    assert metric.compute(predictions=[], references=[])["n"] == 0


def test_metric_finds_the_repo_from_evaluates_cache_copy(tmp_path):
    """A fresh process elsewhere, `stages` not importable: the copy must find this repo by itself."""
    script = f"""
import importlib.util, json, evaluate
assert importlib.util.find_spec("stages") is None, "stages must not be importable up front"
metric = evaluate.load({str(METRIC_DIR)!r}, keep_in_memory=True)
print(json.dumps(metric.compute(predictions={PREDICTIONS!r}, references={REFERENCES!r})))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GSM8K_PROJECT_ROOT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == pytest.approx(EXPECTED)
    # It really ran from evaluate's copy, not from the repository.
    assert list((tmp_path / "modules").rglob("gsm8k_exact_match.py"))


def _candidate_roots_of_a_copy(tmp_path: Path) -> list[Path]:
    """Copy the script as evaluate does and ask the copy where it would look for the repository."""
    copy = tmp_path / "cache" / "gsm8k_exact_match.py"
    copy.parent.mkdir(exist_ok=True)
    copy.write_text((METRIC_DIR / "gsm8k_exact_match.py").read_text())
    spec = importlib.util.spec_from_file_location("gsm8k_exact_match_copy", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module._candidate_roots())


def test_env_var_is_tried_first(tmp_path, monkeypatch):
    monkeypatch.setenv("GSM8K_PROJECT_ROOT", str(tmp_path / "checkout"))
    assert _candidate_roots_of_a_copy(tmp_path)[0] == tmp_path / "checkout"


def test_evaluates_sidecar_json_leads_back_to_the_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("GSM8K_PROJECT_ROOT", raising=False)
    assert ROOT not in _candidate_roots_of_a_copy(tmp_path)
    # What evaluate writes beside its copy.
    (tmp_path / "cache" / "gsm8k_exact_match.json").write_text(json.dumps({
        "original file path": str(METRIC_DIR / "gsm8k_exact_match.py"),
        "local file path": str(tmp_path / "cache" / "gsm8k_exact_match.py")}))
    assert _candidate_roots_of_a_copy(tmp_path)[-1] == ROOT
