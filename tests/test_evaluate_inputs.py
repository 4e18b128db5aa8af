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
    data.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2", "final": "2"}) + "\n")
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
    assert json.loads(metrics.read_text()) == {"exact_match": 0.0, "n": 1} and predictions.is_file()
    assert not [p for p in metrics.parent.iterdir() if p.name.startswith(".")]
    assert os.listdir(tmp_path / "new") == ["deeper"]


# ---------------------------------------------------------------- protocols (stages/protocols.py)

GSM8K_ROW = {"question": "1+1?", "answer": "1+1=2\n#### 2"}


def protocol_stage(tiny_model_dir, tmp_path, protocol, pool_rows, model_dir=None):
    """The stage under `protocol` with a few-shot pool of `pool_rows`: (proc, metrics, predictions)."""
    data, pool = tmp_path / "test.jsonl", tmp_path / "fewshot.jsonl"
    data.write_text(json.dumps(GSM8K_ROW) + "\n")
    pool.write_text("".join(json.dumps(r) + "\n" for r in pool_rows))
    params = tmp_path / "params.yaml"
    params.write_text(f"model:\n  name: {model_dir or tiny_model_dir}\n  load_in_4bit: false\n"
                      f"evaluate:\n  protocol: {protocol}\n  batch_size: 1\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "stages.evaluate", "--params", str(params), "--data-file", str(data),
                           "--fewshot-file", str(pool), "--metrics", str(out / "eval.json"),
                           "--run-info", str(out / "run.json"), "--predictions", str(out / "predictions.jsonl")],
                          cwd=REPO, capture_output=True, text=True)
    return proc, out / "eval.json", out / "predictions.jsonl"


def other_rows(n):
    return [{"question": f"Tom has {i} apples and eats one. How many are left?", "answer": f"{i}-1={i - 1}\n#### {i - 1}"}
            for i in range(2, 2 + n)]


def test_a_pool_smaller_than_the_few_shot_count_is_refused(tiny_model_dir, tmp_path):
    proc, metrics, predictions = protocol_stage(tiny_model_dir, tmp_path, "lm_eval_gsm8k", other_rows(3))
    assert_refused(proc, metrics, predictions, "params.yaml: evaluate.protocol: lm_eval_gsm8k draws 5 few-shot "
                                               f"examples but {tmp_path / 'fewshot.jsonl'} has 3 rows")


def test_an_evaluated_question_among_the_examples_is_refused(tiny_model_dir, tmp_path):
    # Every draw of 5 from these 5 rows holds the evaluated question (written with other spacing).
    pool = other_rows(4) + [{"question": " 1+1? ", "answer": GSM8K_ROW["answer"]}]
    proc, metrics, predictions = protocol_stage(tiny_model_dir, tmp_path, "lm_eval_gsm8k", pool)
    assert proc.returncode == 2 and "\n" not in proc.stderr.strip(), proc.stderr[-2000:]
    assert "evaluate.protocol: lm_eval_gsm8k: a few-shot example of question 1 is itself an evaluated question" \
        in proc.stderr and not metrics.exists() and not predictions.exists()


def test_a_chat_protocol_without_a_chat_template_is_refused(tiny_model_dir, tmp_path):
    plain = tmp_path / "no-chat-model"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    proc, metrics, predictions = protocol_stage(tiny_model_dir, tmp_path, "lm_eval_gsm8k_cot_llama", [], plain)
    assert_refused(proc, metrics, predictions, "params.yaml: evaluate.protocol: lm_eval_gsm8k_cot_llama renders "
                                               "through a chat template, but the tokenizer has no chat template")


def test_a_few_shot_protocol_names_its_pool_in_every_output(tiny_model_dir, tmp_path):
    proc, metrics, predictions = protocol_stage(tiny_model_dir, tmp_path, "lm_eval_gsm8k", other_rows(6))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert record["protocol"] == "lm_eval_gsm8k" and record["gold"] == "2" and len(record["prompt_sha256"]) == 16
    run_info = json.loads((metrics.parent / "run.json").read_text())
    assert run_info["protocol"]["name"] == "lm_eval_gsm8k" and run_info["protocol"]["num_fewshot"] == 5 and run_info["fewshot_pool"]["rows"] == 6
    # The file scored, whatever evaluate.split says (run by hand, --data-file may name another split's).
    import hashlib

    data = tmp_path / "test.jsonl"
    assert run_info["data_file"] == str(data)
    assert run_info["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
