"""The fingerprint stage: what model.name / data.source point to, so that a change behind an
unchanged param re-runs what used it, and an unchanged one re-runs nothing."""
import json
import os

import pytest

from stages import fingerprint as fp
from stages.io import UserError


def test_a_local_directory_is_fingerprinted_by_its_contents(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights-a")
    cache = {}
    first = fp.model_fingerprint(str(model), None, cache)
    assert first == fp.model_fingerprint(str(model), None, {})  # same files, same fingerprint, cache or not
    (model / "model.safetensors").write_bytes(b"weights-b")      # rebuilt in place, same name
    assert fp.model_fingerprint(str(model), None, cache)["local_sha256"] != first["local_sha256"]
    (model / "model.safetensors").write_bytes(b"weights-a")
    assert fp.model_fingerprint(str(model), None, cache) == first


def test_hashes_are_reused_while_size_mtime_and_inode_are_unchanged(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    cache = {}
    digest = fp.file_sha256(f, cache)
    cache[str(f.resolve())]["sha256"] = "from-cache"  # proves the second call does not read the file
    assert fp.file_sha256(f, cache) == "from-cache"
    os.utime(f, ns=(1, 1))
    assert fp.file_sha256(f, cache) == digest


def test_a_hub_model_is_fingerprinted_by_its_commit(monkeypatch, tmp_path):
    sha = "a" * 40
    assert fp.model_fingerprint("org/model", sha, {}) == {"name": "org/model", "revision": sha, "commit": sha}
    # Offline: the commit the local hub cache has for that revision.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refs = tmp_path / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("b" * 40)
    assert fp.model_fingerprint("org/model", None, {})["commit"] == "b" * 40
    with pytest.raises(UserError) as info:
        fp.model_fingerprint("org/model", "v2", {})
    message = str(info.value)
    assert message.startswith("params.yaml: model.name: cannot tell which commit of 'org/model' (revision v2)")
    assert "model.revision to a 40-character commit sha" in message and "\n" not in message


def test_data_sources(tmp_path):
    assert fp.data_fingerprint("gsm_symbolic", None, None, {})["reasoning_gym"]
    (tmp_path / "train.jsonl").write_text("{}\n")
    local = fp.data_fingerprint(str(tmp_path), "main", None, {})
    (tmp_path / "test.jsonl").write_text("{}\n")
    assert fp.data_fingerprint(str(tmp_path), "main", None, {})["local_sha256"] != local["local_sha256"]
    with pytest.raises(UserError, match="data.source: './nowhere' does not exist"):
        fp.data_fingerprint("./nowhere", None, None, {})


def test_the_stage_writes_identical_files_when_nothing_changed(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  source: gsm_symbolic\n")
    args = ["--model", "fp/model.json", "--data", "fp/data.json"]
    fp.main(args)
    first = (tmp_path / "fp/model.json").read_bytes(), (tmp_path / "fp/data.json").read_bytes()
    fp.main(args)
    assert ((tmp_path / "fp/model.json").read_bytes(), (tmp_path / "fp/data.json").read_bytes()) == first
    assert json.loads(first[0])["files"] >= 3


def test_the_revisions_reach_the_hub_loaders(monkeypatch):
    """model.revision and data.revision are what from_pretrained and load_dataset are asked for."""
    import datasets
    import transformers

    from stages.config import DataParams, ModelParams
    from stages.modeling import load_config, load_tokenizer
    from stages.prepare import load_source

    seen = []

    def record(what):
        def loader(*args, **kwargs):
            seen.append((what, args[0], kwargs.get("revision")))
            raise OSError("stop here")
        return loader

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", record("config"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("tokenizer"))
    monkeypatch.setattr(datasets, "load_dataset", record("dataset"))
    model = ModelParams(name="org/model", revision="v1.2")
    for call in (lambda: load_config(model.name, model.revision), lambda: load_tokenizer(model.name, model.revision),
                 lambda: load_source(DataParams(source="org/data", revision="c" * 40))):
        with pytest.raises(UserError):
            call()
    assert seen == [("config", "org/model", "v1.2"), ("tokenizer", "org/model", "v1.2"), ("dataset", "org/data", "c" * 40)]
