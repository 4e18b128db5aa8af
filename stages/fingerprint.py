"""python -m stages.fingerprint --model fingerprints/model.json --data fingerprints/data.json

What `model.name` and `data.source` point to right now, written as two small JSON files that the
other stages depend on. DVC sees a param change, but not a change *behind* a param: a local model
directory rebuilt with other weights at the same path, or a hub branch that moved. This stage runs
on every `dvc repro` (`always_changed` in dvc.yaml) and rewrites its files; when what they point to
is unchanged the files are byte-identical, so nothing downstream re-runs; when it changed, train
and both evaluations (model) or prepare (data) do.

- a local directory: a sha256 over every file's relative path and contents. Hashes are cached by
  (size, mtime, inode) in .dvc/tmp, so a 16 GB checkpoint is read once, not on every repro;
- a hub id: the commit that `model.revision` / `data.revision` (default branch when null)
  resolves to, asked of the hub, or read from the local hub cache when offline;
- gsm_symbolic: the installed reasoning-gym version (the params already name the problems).

The stage also validates every params section first, so that a bad value anywhere (e.g.
`evaluate.split: validation`) is reported as one line naming the key before any stage runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from pathlib import Path

from stages.config import SECTIONS, load_params
from stages.io import UserError, cli, write_json

STAT_CACHE = Path(".dvc/tmp/qlora-fingerprint-cache.json")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
GSM_SYMBOLIC = "gsm_symbolic"


def file_sha256(path: Path, cache: dict) -> str:
    """Content hash of one file, reused while its size, mtime and inode are unchanged."""
    st = path.stat()
    key = str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    hit = cache.get(key)
    if hit and hit["stamp"] == stamp:
        return hit["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    cache[key] = {"stamp": stamp, "sha256": h.hexdigest()}
    return cache[key]["sha256"]


def directory_sha256(root: Path, cache: dict) -> tuple[str, int]:
    """(sha256 over sorted relative paths and file hashes, number of files) of a directory tree."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.relative_to(root).parts)
    if not files:
        raise UserError(f"{root}: empty directory")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{file_sha256(p, cache)}\n".encode())
    return h.hexdigest(), len(files)


def hub_commit(repo_id: str, revision: str | None, repo_type: str, key: str) -> str:
    """The commit `revision` of a hub repo resolves to: from the hub, else from the local cache."""
    if revision and COMMIT_RE.fullmatch(revision):
        return revision
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or (
        repo_type == "dataset" and os.environ.get("HF_DATASETS_OFFLINE") == "1")
    if not offline:
        try:
            from huggingface_hub import HfApi

            info = (HfApi().model_info if repo_type == "model" else HfApi().dataset_info)(repo_id, revision=revision)
            return info.sha
        except Exception as exc:  # no network, no such repo, gated: try the cache, then say which
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    else:
        reason = "offline"
    cached = cached_commit(repo_id, revision, repo_type)
    if cached:
        return cached
    raise UserError(
        f"params.yaml: {key}: cannot tell which commit of '{repo_id}' (revision {revision or 'default branch'}) "
        f"would be used ({reason[:160]}), and it is not in the local hub cache; download it once, "
        f"or set {key.split('.')[0]}.revision to a 40-character commit sha")


def cached_commit(repo_id: str, revision: str | None, repo_type: str) -> str | None:
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = folder / "refs" / (revision or "main")
    if ref.is_file():
        return ref.read_text().strip() or None
    return None


def looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def model_fingerprint(name: str, revision: str | None, cache: dict) -> dict:
    if looks_local(name):
        root = Path(name).expanduser()
        if not root.is_dir():
            raise UserError(f"params.yaml: model.name: '{name}' is not a directory (for the offline demo run `make demo`)")
        digest, n = directory_sha256(root, cache)
        return {"name": name, "local_sha256": digest, "files": n}
    return {"name": name, "revision": revision, "commit": hub_commit(name, revision, "model", "model.name")}


def data_fingerprint(source: str, config: str | None, revision: str | None, cache: dict) -> dict:
    if source == GSM_SYMBOLIC:
        from importlib.metadata import version

        return {"source": source, "reasoning_gym": version("reasoning-gym")}
    if looks_local(source):
        root = Path(source).expanduser()
        if not root.exists():
            raise UserError(f"params.yaml: data.source: '{source}' does not exist "
                            "(a hub id, a local directory, or gsm_symbolic)")
        digest, n = directory_sha256(root, cache) if root.is_dir() else (file_sha256(root, cache), 1)
        return {"source": source, "local_sha256": digest, "files": n}
    return {"source": source, "config": config, "revision": revision,
            "commit": hub_commit(source, revision, "dataset", "data.source")}


def load_stat_cache() -> dict:
    try:
        return json.loads(STAT_CACHE.read_text())
    except (OSError, ValueError):
        return {}


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True, help="output: what model.name points to")
    parser.add_argument("--data", required=True, help="output: what data.source points to")
    args = parser.parse_args(argv)
    sections = dict(zip(SECTIONS, load_params(args.params, *SECTIONS)))  # every section, so any bad key stops here
    model_p, data_p = sections["model"], sections["data"]
    cache = load_stat_cache()
    model = model_fingerprint(model_p.name, model_p.revision, cache)
    data = data_fingerprint(data_p.source, data_p.config, data_p.revision, cache)
    try:
        STAT_CACHE.parent.mkdir(parents=True, exist_ok=True)
        write_json(STAT_CACHE, cache)
    except OSError:
        pass  # only a speed-up: the next run hashes again
    write_json(args.model, model)
    write_json(args.data, data)
    print(f"fingerprint: model {model.get('commit') or model['local_sha256'][:12]}, "
          f"data {data.get('commit') or data.get('local_sha256', data.get('reasoning_gym'))[:12]}")


if __name__ == "__main__":
    main()
