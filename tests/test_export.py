"""stages/export.py: the merged model a user serves is the model that was trained and evaluated.

A short QLoRA run on the tiny model, exported, reloaded with a bare AutoModelForCausalLM.from_pretrained,
and compared on logits with evaluate's model (the NF4 base dequantized exactly, the adapter unmerged in
bf16: bit for bit the training-time model, tests/test_evaluate_model.py). Errors are a share of the
adapter's effect, |logits - evaluated| / |evaluated - base|, on fixed random inputs, CPU.

Measured here (tiny model, 28 steps, the adapter moves the logits by 5.5%):
- float32 export vs the same weights unmerged in float32: ~4e-6 (the merge itself loses nothing);
- float32 export vs evaluate: 0.085, all of it evaluate's own bf16 arithmetic: the unmerged model in
  float32 is as far (to 1e-6); measured once against the same model computed in float64, the float32
  export is 4e-6 off and evaluate 0.085;
- bfloat16 export vs evaluate: 0.104 (each merged weight rounded once to bf16, and bf16 arithmetic).
A smaller update has a larger share: after 10 steps (2% of the logits) they are 0.23 and 0.28.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stages.config import ModelParams
from tests.committed import REPO, committed_params
from tests.test_evaluate_inputs import read_only_dir  # noqa: F401  (a fixture: a directory root cannot write to)
from tests.test_evaluate_model import train_adapter

MERGE_BOUND = 1e-4       # float32 export vs the same weights unmerged in float32 (measured ~4e-6)
FLOAT32_BOUND = 0.10     # float32 export vs evaluate (measured 0.085: evaluate's bf16 arithmetic)
BFLOAT16_BOUND = 0.12    # bfloat16 export vs evaluate (measured 0.104)
INPUTS = torch.randint(3, 300, (4, 48), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=INPUTS).logits.float()


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A saved adapter (with its tokenizer, as the train stage saves it) after 28 QLoRA steps."""
    model_p, _, adapter = train_adapter(tmp_path_factory.mktemp("export_trained"), tiny_model_dir, 28)
    return model_p, adapter


def write_params(path: Path, model_p: ModelParams, dtype: str = "float32") -> Path:
    path.write_text(yaml.safe_dump({"model": {"name": model_p.name}, "export": {"dtype": dtype}}))
    return path


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory):
    """{dtype: export directory} written by the stage's main()."""
    from stages.export import main

    model_p, adapter = trained
    tmp = tmp_path_factory.mktemp("exports")
    out = {}
    for dtype in ("float32", "bfloat16"):
        params = write_params(tmp / f"params_{dtype}.yaml", model_p, dtype)
        main(["--params", str(params), "--adapter", adapter, "--out", str(tmp / dtype / "model")])
        out[dtype] = tmp / dtype / "model"
    return out


@pytest.fixture(scope="module")
def references(trained):
    """Logits of evaluate's model, of the base, and of the adapter unmerged over the float32 base."""
    from peft import PeftModel

    from stages.evaluate import load_for_generation
    from stages.modeling import load_model

    model_p, adapter = trained
    evaluated = logits(load_for_generation(model_p, adapter, dequantize=True))
    base = logits(load_for_generation(model_p, None, dequantize=True))
    unmerged32 = logits(PeftModel.from_pretrained(load_model(model_p).dequantize(dtype=torch.bfloat16).float(), adapter))
    assert (evaluated - base).norm() > 0.02 * evaluated.norm(), "the adapter should change the logits visibly"
    return {"evaluated": evaluated, "base": base, "unmerged32": unmerged32}


def share(a, b, refs) -> float:
    return ((a - b).norm() / (refs["evaluated"] - refs["base"]).norm()).item()


def test_the_export_is_a_plain_checkpoint_with_tokenizer_generation_config_and_provenance(trained, exports):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.fingerprint import directory_sha256

    model_p, adapter = trained
    out = exports["float32"]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "export.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(type(m).__name__ != "Linear4bit" for m in model.modules())
    assert model.generation_config.eos_token_id == AutoTokenizer.from_pretrained(adapter).eos_token_id
    served, trained_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(adapter)
    text = "Question: Sam has 3 pens.\nAnswer: 3 + 2 = 5\n#### 5"
    assert served(text)["input_ids"] == trained_tok(text)["input_ids"]
    assert (served.pad_token, served.chat_template) == (trained_tok.pad_token, trained_tok.chat_template)
    record = json.loads((out / "export.json").read_text())
    assert record["base_model"] == model_p.name and record["adapter"] == adapter and record["dtype"] == "float32"
    assert record["adapter_sha256"] == directory_sha256(Path(adapter), {})[0]
    assert record["base_loading"]["load_in_4bit"] and record["base_loading"]["bnb_4bit_quant_type"] == "nf4"
    assert record["base_loading"]["dequantized_to"] == model_p.bnb_4bit_compute_dtype
    from stages.export import provenance

    unquantized = provenance(dataclasses.replace(model_p, load_in_4bit=False), adapter, "float32", None)
    assert unquantized["base_loading"]["dequantized_to"] is None  # never quantized, so never dequantized
    assert not [p for p in out.parent.iterdir() if p.name != "model"], "a temporary directory was left behind"
    bf16 = json.loads((exports["bfloat16"] / "config.json").read_text())
    assert bf16["dtype"] == "bfloat16"
    size = {d: (exports[d] / "model.safetensors").stat().st_size for d in exports}
    assert size["bfloat16"] < 0.51 * size["float32"]


def test_the_float32_export_computes_the_trained_model(exports, references):
    from transformers import AutoModelForCausalLM

    exported = logits(AutoModelForCausalLM.from_pretrained(exports["float32"]))
    merge_error = share(exported, references["unmerged32"], references)
    vs_evaluated = share(exported, references["evaluated"], references)
    arithmetic = share(references["unmerged32"], references["evaluated"], references)
    print(f"float32 export: vs unmerged float32 {merge_error:.2e}, vs evaluate {vs_evaluated:.4f} "
          f"(evaluate's bf16 arithmetic alone: {arithmetic:.4f})")
    assert merge_error <= MERGE_BOUND
    assert vs_evaluated <= FLOAT32_BOUND
    # What is left is evaluate computing in bf16, not the export: the unmerged model is as far.
    assert abs(vs_evaluated - arithmetic) <= MERGE_BOUND


def test_the_bfloat16_export_is_the_float32_one_rounded_once(exports, references):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    exported = logits(AutoModelForCausalLM.from_pretrained(exports["bfloat16"]))
    vs_evaluated = share(exported, references["evaluated"], references)
    float32 = share(logits(AutoModelForCausalLM.from_pretrained(exports["float32"])), references["evaluated"], references)
    print(f"bfloat16 export: vs evaluate {vs_evaluated:.4f} (float32 export {float32:.4f})")
    assert vs_evaluated <= BFLOAT16_BOUND
    assert vs_evaluated > float32  # the size is paid for: keep float32 where fidelity matters
    # What a bf16 server makes of the float32 export: the same weights, so nothing is lost by
    # exporting float32 and casting at load time.
    w32, w16 = load_file(exports["float32"] / "model.safetensors"), load_file(exports["bfloat16"] / "model.safetensors")
    assert w32.keys() == w16.keys()
    assert all(torch.equal(w32[k].to(torch.bfloat16), w16[k]) for k in w32)


def error_lines(capsys) -> list[str]:
    """What main() said about the error (transformers' loading bars and warnings share stderr)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines
    return [line for line in lines if line.startswith("error: ")]


def run_export(params, adapter, out, extra=()):
    from stages.export import main

    with pytest.raises(SystemExit) as exc:
        main(["--params", str(params), "--adapter", str(adapter), "--out", str(out), *extra])
    return exc.value.code


@pytest.mark.parametrize("case, message", [
    ("no adapter", "{adapter}: no LoRA adapter here (adapter_config.json missing); run the train stage first"),
    ("no tokenizer", "{adapter}: no tokenizer beside the adapter (tokenizer_config.json missing)"),
    ("other base", "adapter_config.json: base_model_name_or_path is '{other}' but params.yaml: model.name is"),
    ("out is a file", "--out {out}: is a file, not a directory"),
    ("out in adapter", "--out {out}: overlaps the adapter directory {adapter}"),
    ("adapter in out", "--out {out}: overlaps the adapter directory {adapter}"),
    ("out below a file", "--out {out}: cannot be created ({tmp}/exported is not a directory)"),
    ("bad dtype", "params.yaml: export.dtype: must be float32 or bfloat16, got 'int8'"),
    ("no fingerprint", "--fingerprint {fingerprint}: file not found"),
])
def test_bad_inputs_are_one_line_exit_2_and_leave_nothing(trained, tmp_path, capsys, case, message):
    model_p, trained_adapter = trained
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_adapter, adapter)
    out = tmp_path / "exported" / "model"
    params = write_params(tmp_path / "params.yaml", model_p, "int8" if case == "bad dtype" else "float32")
    fingerprint = tmp_path / "fingerprints" / "model.json"
    other = str(tmp_path / "another-model")
    if case == "no adapter":
        (adapter / "adapter_config.json").unlink()
    elif case == "no tokenizer":
        (adapter / "tokenizer_config.json").unlink()
    elif case == "other base":
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": other}))
    elif case == "out is a file":
        out.parent.mkdir()
        out.write_text("not a model")
    elif case == "out in adapter":
        out = adapter / "merged"
    elif case == "adapter in out":
        out = tmp_path
    elif case == "out below a file":
        out.parent.write_text("a file where the directory should be")
    extra = ("--fingerprint", str(fingerprint)) if case == "no fingerprint" else ()
    assert run_export(params, adapter, out, extra) == 2
    err = error_lines(capsys)
    assert len(err) == 1, err
    expected = message.format(adapter=adapter, out=out, other=other, fingerprint=fingerprint, tmp=tmp_path)
    if case == "bad dtype":
        expected = expected.replace("params.yaml", str(params))
    assert err[0].startswith("error: ") and expected in err[0], err[0]
    if case == "out is a file":
        assert out.read_text() == "not a model"
    elif case == "out below a file":
        assert out.parent.read_text() == "a file where the directory should be"
    elif case == "adapter in out":
        assert (adapter / "adapter_config.json").is_file()
    else:
        assert not out.exists() and not (tmp_path / "exported").exists()


def test_an_unwritable_place_is_named_before_loading_anything(trained, read_only_dir, tmp_path, capsys):
    model_p, adapter = trained
    out = read_only_dir / "model"
    assert run_export(write_params(tmp_path / "params.yaml", model_p), adapter, out) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"error: --out {out}: cannot be written ({read_only_dir}: "), err
    assert not list(read_only_dir.iterdir())


def test_a_write_that_fails_leaves_no_export_that_looks_finished(trained, tmp_path, capsys, monkeypatch):
    """Disk full while writing the weights: one line, no export directory, no temporary one left."""
    import errno

    from transformers import PreTrainedModel

    model_p, adapter = trained
    out = tmp_path / "exported" / "model"

    def full_disk(self, save_directory, **kwargs):
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / "config.json").write_text("{}")  # what a real write gets to first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    assert run_export(write_params(tmp_path / "params.yaml", model_p), adapter, out) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"error: export: cannot write {out} (") and "disk is full" in err[0]
    assert not out.exists() and list((tmp_path / "exported").iterdir()) == []


def test_dvc_runs_the_export_only_when_asked_and_declares_it_as_an_artifact(trained, tmp_path):
    """A copy of this project: a plain `dvc repro` and `dvc exp run` leave the export stage out (they
    reproduce ./dvc.yaml), `dvc checkout` is not upset by its never-produced output, `dvc repro` of
    export/dvc.yaml runs it, and the artifact `gsm8k-qlora` names its output."""
    model_p, adapter = trained
    root = tmp_path / "project"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if name.startswith(("stages/", "metrics_module/", ".dvc/", "export/")) or name in ("dvc.yaml", ".dvcignore",
                                                                                         ".gitignore"):
            if (REPO / name).is_file():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, root / name)
    assert (root / "export/dvc.yaml").is_file()
    params = committed_params()
    params["model"]["name"] = model_p.name
    params["data"]["source"] = "gsm_symbolic"  # the fingerprint stage asks the hub about openai/gsm8k
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}

    def dvc(*args, cwd=root):
        proc = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=root, env=env, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, env=env, check=True)
    subprocess.run(["git", "commit", "-qm", "project"], cwd=root, env=env, check=True)
    # The trained adapter in place of a train run, the real fingerprints, and a placeholder for every
    # other output of ./dvc.yaml, so that DVC plans the whole pipeline (--dry) without running it.
    shutil.copytree(adapter, root / "checkpoints/sft_lora")
    dvc("repro", "--single-item", "fingerprint")
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        outs = [Path(out.fs_path) for stage in repo.stage.collect(str(root / "dvc.yaml")) for out in stage.outs]
    assert outs and all(root in path.parents for path in outs), outs  # never a placeholder in this repository
    for path in outs:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n")
    # `dvc exp run` plans in a copy of the commit: the placeholders must be in it.
    subprocess.run(["git", "add", "-A"], cwd=root, env=env, check=True)
    subprocess.run(["git", "commit", "-qm", "placeholders"], cwd=root, env=env, check=True)
    for plan in (dvc("repro", "--dry"), dvc("exp", "run", "--dry")):
        assert "Running stage 'train'" in plan and "Running stage 'evaluate'" in plan, plan
        assert "export" not in plan, plan
    # The export's output is not cached (export/dvc.yaml says why), so its never-produced output does
    # not make `dvc checkout`, nor `dvc pull` in a fresh clone, fail for want of a hash.
    dvc("checkout", "export/dvc.yaml")
    out = dvc("repro", "--single-item", "export/dvc.yaml:export")
    assert "Running stage 'export/dvc.yaml:export'" in out, out
    assert (root / "export/model/model.safetensors").is_file() and (root / "export/dvc.lock").is_file()
    record = json.loads((root / "export/model/export.json").read_text())
    assert record["base_fingerprint"] == json.loads((root / "fingerprints/model.json").read_text())
    with Repo(str(root)) as repo:
        artifact = repo.artifacts.read()["dvc.yaml"]["gsm8k-qlora"]
    assert (artifact.path, artifact.type) == ("export/model", "model")
    ignored = subprocess.run(["git", "check-ignore", "-q", "export/model/model.safetensors"], cwd=root, env=env)
    assert ignored.returncode == 0, "the merged weights must never enter git"
