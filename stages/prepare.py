"""python -m stages.prepare --train data/gsm8k_train.jsonl --dev data/gsm8k_dev.jsonl --test data/gsm8k_test.jsonl \
    --fewshot data/gsm8k_fewshot.jsonl

GSM8K (or a local copy, or offline gsm_symbolic problems) → three JSONL splits of
{"question", "answer" (the full reference solution), "final" (the gold number)}.
Dev is carved from train only, with a seeded shuffle, after removing train rows whose question
also appears in test; then train rows whose question is also in dev are removed (the source's
train split may hold a question twice); same params → identical bytes. Questions are kept as the
source writes them (lm-eval puts them into its prompts unstripped; the training prompt strips them).

The fourth file is the few-shot pool of lm-eval's protocols: the source's whole train split, rows
exactly as they come and in their order, because lm-eval draws its examples with
`rnd.sample(train_split, k)` and another order or length would draw others (stages/protocols.py).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from stages.config import DataParams, load_params
from stages.gsm8k import gold_answer
from stages.io import UserError, cli, read_jsonl_numbered, write_jsonl

GSM_SYMBOLIC = "gsm_symbolic"


def load_source(data: DataParams) -> dict[str, list[dict]]:
    """Raw {"train": rows, "test": rows} (and "dev" where a local copy ships one)."""
    if data.source == GSM_SYMBOLIC:
        from stages.gsm_symbolic import generate_rows

        rows = generate_rows(data.num_problems, data.seed)
        rng = random.Random(data.seed)
        rng.shuffle(rows)
        n_test = max(1, round(len(rows) * data.test_fraction))
        return {"train": rows[n_test:], "test": rows[:n_test]}
    path = Path(data.source)
    if path.is_dir() and sorted(path.glob("*.jsonl")):
        return _load_jsonl_dir(path)
    if data.source.startswith((".", "/", "~")) and not path.exists():
        raise UserError(f"params.yaml: data.source: '{data.source}' does not exist "
                        "(a hub id, a local directory, or gsm_symbolic)")
    return _load_with_datasets(data)


def _load_jsonl_dir(path: Path) -> dict[str, list[dict]]:
    splits = {}
    for name in ("train", "dev", "test"):
        files = sorted(path.glob(f"{name}*.jsonl"))
        if len(files) > 1:
            raise UserError(f"{path}: several files for split '{name}': {', '.join(f.name for f in files)}")
        if files:
            splits[name] = [dict(row, _where=f"{files[0]}:{line}") for line, row in read_jsonl_numbered(files[0])]
    for name in ("train", "test"):
        if name not in splits:
            raise UserError(f"{path}: no {name}.jsonl (expected train.jsonl and test.jsonl, dev.jsonl optional)")
    return splits


# The files `datasets` reads by extension; a folder holding some is one config of a hub snapshot.
_DATA_SUFFIXES = {".parquet", ".arrow", ".json", ".jsonl", ".csv"}


def _config_folders(path: Path) -> list[str]:
    """Subfolders of a local dataset directory that hold data files (main/ and socratic/ in a
    snapshot of openai/gsm8k); hidden ones (.cache/, .git/) are the download's, not configs."""
    return sorted(d.name for d in path.iterdir()
                  if d.is_dir() and not d.name.startswith(".")
                  and any(f.suffix in _DATA_SUFFIXES for f in d.rglob("*") if f.is_file()))


def _local_config(path: Path, config: str | None) -> dict:
    """load_dataset's arguments that read one config of a local directory, or a UserError.

    Where the directory's README.md declares no configs, `datasets` reads every data file below it,
    so a snapshot without its README would mix main/ and socratic/ (and repeat every test
    question): there the folders are the configs, and data.config names the one to read."""
    from huggingface_hub.repocard import metadata_load

    readme = path / "README.md"
    declared = (metadata_load(readme) or {}).get("configs") if readme.is_file() else None
    configs = [c.get("config_name", "default") for c in declared] if declared else _config_folders(path)
    if config is None and len(configs) > 1:
        raise UserError(f"params.yaml: data.config: null, but {path} holds several configs "
                        f"({', '.join(configs)}); name one of them")
    if config is not None and configs and config not in configs:
        raise UserError(f"params.yaml: data.config: {config!r} is not a config of {path} "
                        f"(it has {', '.join(configs)})")
    if not declared and config in configs:
        return {"data_dir": config}
    return {"name": config}  # declared configs, a single folder or a flat directory: as before


def _load_with_datasets(data: DataParams) -> dict[str, list[dict]]:
    import datasets

    which = _local_config(Path(data.source), data.config) if Path(data.source).is_dir() else {"name": data.config}
    try:
        ds = datasets.load_dataset(data.source, revision=data.revision, **which)
    except (ConnectionError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"params.yaml: data.source: cannot load '{data.source}' (config {data.config!r}, "
            f"revision {data.revision or 'default branch'}): {first}. "
            "Offline? Point data.source at a local copy (a directory in the hub's layout or with "
            "train.jsonl/test.jsonl), set HF_DATASETS_OFFLINE=1 with a cached copy, or use gsm_symbolic."
        ) from None
    missing = [s for s in ("train", "test") if s not in ds]
    if missing:
        raise UserError(f"{data.source}: no split named {', '.join(missing)} (has {', '.join(ds)})")
    return {name: [dict(row, _where=f"{data.source} {name} row {i}") for i, row in enumerate(ds[name], 1)]
            for name in ds if name in ("train", "dev", "test")}


def clean_rows(rows: list[dict], split: str) -> list[dict]:
    """Validate and normalise raw rows; a row without a '#### N' answer is an error naming it."""
    out = []
    for i, row in enumerate(rows, 1):
        where = row.get("_where", f"{split} row {i}")
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"{where}: missing or empty 'question'")
        if not isinstance(answer, str):
            raise UserError(f"{where}: missing 'answer' (the reference solution ending in '#### N')")
        final = gold_answer(answer)
        if final is None:
            raise UserError(f"{where}: answer has no final '#### N' line: {answer[-60:]!r}")
        out.append({"question": question, "answer": answer.strip(), "final": final})
    if not out:
        raise UserError(f"split '{split}' is empty")
    return out


def fewshot_pool(raw_train: list[dict]) -> list[dict]:
    """lm-eval's few-shot split: every raw train row's question and answer, untouched, in order
    (validated by clean_rows first)."""
    clean_rows(raw_train, "train")
    return [{"question": row["question"], "answer": row["answer"]} for row in raw_train]


def _key(question: str) -> str:
    return " ".join(question.lower().split())


def make_splits(raw: dict[str, list[dict]], data: DataParams) -> tuple[dict[str, list[dict]], dict]:
    """Pure: cleaned, decontaminated, seeded train/dev/test splits plus a report of what was done."""
    train, test = clean_rows(raw["train"], "train"), clean_rows(raw["test"], "test")
    test_keys = {_key(r["question"]) for r in test}
    kept = [r for r in train if _key(r["question"]) not in test_keys]
    report = {"train_rows_duplicating_test": len(train) - len(kept)}
    train = kept
    if "dev" in raw:
        dev = clean_rows(raw["dev"], "dev")
        overlap = sum(_key(r["question"]) in test_keys for r in dev)
        if overlap:
            raise UserError(f"dev split: {overlap} question(s) also appear in test; "
                            "a dev set that overlaps test would leak the test set into model selection")
    else:
        if data.dev_size >= len(train):
            raise UserError(f"params.yaml: data.dev_size: {data.dev_size} leaves no training rows "
                            f"(train has {len(train)}); use a value < {len(train)}")
        order = list(range(len(train)))
        random.Random(data.seed).shuffle(order)
        dev = [train[i] for i in sorted(order[:data.dev_size])]
        train = [train[i] for i in sorted(order[data.dev_size:])]
    # A question twice in the source's train split (or a shipped dev row taken from train) would be
    # trained on and scored in dev_loss. Dropped after the draw, so the dev rows stay those drawn.
    dev_keys = {_key(r["question"]) for r in dev}
    kept = [r for r in train if _key(r["question"]) not in dev_keys]
    report["train_rows_duplicating_dev"] = len(train) - len(kept)
    train = kept
    if not train:
        raise UserError("split 'train' is empty: every train question is also in dev or test")
    if data.limit is not None:
        for name, rows in (("train", train), ("test", test)):
            if data.limit > len(rows):
                raise UserError(f"params.yaml: data.limit: {data.limit} is larger than the {name} split "
                                f"({len(rows)} rows); use a value <= {len(rows)} or null")
        train, test = train[:data.limit], test[:data.limit]
    return {"train": train, "dev": dev, "test": test}, report


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    for name in ("train", "dev", "test"):
        parser.add_argument(f"--{name}", required=True, help=f"output JSONL for the {name} split")
    parser.add_argument("--fewshot", required=True, help="output JSONL: the few-shot pool (raw train split)")
    args = parser.parse_args(argv)
    data = load_params(args.params, "data")
    raw = load_source(data)
    splits, report = make_splits(raw, data)
    pool = fewshot_pool(raw["train"])
    for name, rows in splits.items():
        write_jsonl(getattr(args, name), rows)
    write_jsonl(args.fewshot, pool)
    sizes = ", ".join(f"{name} {len(rows)}" for name, rows in splits.items())
    print(f"prepare: {data.source}: {sizes} rows, few-shot pool {len(pool)} "
          f"(train rows dropped as duplicates of test questions: {report['train_rows_duplicating_test']}, "
          f"of dev questions: {report['train_rows_duplicating_dev']})")
    if "dev" in raw:
        print(f"prepare: dev is the source's own dev.jsonl; data.dev_size ({data.dev_size}) and data.seed "
              f"({data.seed}) draw nothing")


if __name__ == "__main__":
    main()
