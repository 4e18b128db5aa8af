"""prepare: deterministic, decontaminated splits from every kind of source; bad rows named by place."""
import json
import subprocess
import sys

import pytest

from stages.config import DataParams
from stages.io import UserError
from stages.prepare import load_source, make_splits


def row(i, final=None):
    return {"question": f"Tom has {i} apples and eats one. How many are left?",
            "answer": f"He has {i} - 1 = {i - 1} left.\n#### {final if final is not None else i - 1}"}


def raw(n_train=30, n_test=10):
    return {"train": [row(i) for i in range(100, 100 + n_train)], "test": [row(i) for i in range(500, 500 + n_test)]}


def test_splits_are_deterministic_and_dev_comes_from_train():
    data = DataParams(dev_size=5, seed=3)
    a, _ = make_splits(raw(), data)
    b, _ = make_splits(raw(), data)
    assert a == b
    assert (len(a["train"]), len(a["dev"]), len(a["test"])) == (25, 5, 10)
    train_q = {r["question"] for r in raw()["train"]}
    assert {r["question"] for r in a["dev"]} <= train_q
    assert not {r["question"] for r in a["dev"]} & {r["question"] for r in a["train"]}
    assert a["train"][0] == {"question": row(100)["question"], "answer": row(100)["answer"], "final": "99"}


def test_another_seed_gives_another_dev_split():
    a, _ = make_splits(raw(), DataParams(dev_size=5, seed=1))
    b, _ = make_splits(raw(), DataParams(dev_size=5, seed=2))
    assert a["dev"] != b["dev"]


def test_train_rows_that_duplicate_test_are_dropped():
    source = raw()
    source["train"].append(dict(source["test"][0]))
    splits, report = make_splits(source, DataParams(dev_size=5))
    assert report["train_rows_duplicating_test"] == 1
    test_q = {r["question"] for r in splits["test"]}
    assert not test_q & {r["question"] for r in splits["train"] + splits["dev"]}


def gsm8k_row(n, socratic=False):
    """A row in GSM8K's format (its first train question, with n clips), or in the socratic config's."""
    question = (f"Natalia sold clips to {n} of her friends in April, and then she sold half as many clips "
                "in May. How many clips did Natalia sell altogether in April and May?")
    may, total = n // 2, n + n // 2
    steps = [f"Natalia sold {n}/2 = <<{n}/2={may}>>{may} clips in May.",
             f"Natalia sold {n}+{may} = <<{n}+{may}={total}>>{total} clips altogether in April and May."]
    if socratic:
        steps = [f"How many clips did Natalia sell in May? ** {steps[0]}",
                 f"How many clips did Natalia sell altogether in April and May? ** {steps[1]}"]
    return {"question": question, "answer": "\n".join(steps) + f"\n#### {total}"}


def test_the_seeded_dev_draw_stays_the_same():
    """Existing users' dev rows (and so their dev_loss) must not move when prepare changes."""
    splits, _ = make_splits(raw(), DataParams(dev_size=5, seed=3))
    assert [r["final"] for r in splits["dev"]] == ["108", "109", "113", "120", "125"]


def test_train_rows_whose_question_is_in_the_drawn_dev_split_are_dropped():
    """A question twice in the source's train split: the copy left in train after its twin went to
    dev would be trained on, and dev_loss measured on it."""
    unique = [gsm8k_row(n) for n in range(2, 42, 2)]
    source = {"train": unique + [dict(r) for r in unique], "test": [gsm8k_row(n) for n in range(100, 110, 2)]}
    splits, report = make_splits(source, DataParams(dev_size=4, seed=1))
    dev_q = {r["question"] for r in splits["dev"]}
    assert len(splits["dev"]) == 4 and not dev_q & {r["question"] for r in splits["train"]}
    assert report["train_rows_duplicating_dev"] == 40 - 4 - len(splits["train"]) > 0
    # Every other train row stays, duplicates among themselves included (neither is in dev).
    assert len(splits["train"]) == 2 * (20 - len(dev_q))


def test_train_rows_whose_question_is_in_a_shipped_dev_split_are_dropped():
    train = [gsm8k_row(n) for n in range(2, 42, 2)]
    source = {"train": train, "dev": [dict(r) for r in train[3:6]], "test": [gsm8k_row(100)]}
    splits, report = make_splits(source, DataParams(dev_size=4))
    assert report["train_rows_duplicating_dev"] == 3
    assert [r["question"] for r in splits["train"]] == [r["question"] for r in train[:3] + train[6:]]


def test_a_shipped_dev_split_says_the_draw_params_draw_nothing(tmp_path, capsys):
    """data.dev_size and data.seed re-run prepare when changed; with a source that ships dev.jsonl they
    change nothing, which the stage says rather than leave a user to compare two identical runs."""
    from stages.prepare import main

    source = tmp_path / "source"
    source.mkdir()
    for name, rows in (("train", [row(i) for i in range(100, 120)]), ("dev", [row(200)]), ("test", [row(500)])):
        (source / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "params.yaml").write_text(f"data:\n  source: {source}\n  dev_size: 4\n  seed: 9\n")
    main(["--params", str(tmp_path / "params.yaml"),
          *[a for s in ("train", "dev", "test", "fewshot") for a in (f"--{s}", str(tmp_path / f"{s}.out.jsonl"))]])
    said = capsys.readouterr().out
    assert "prepare: dev is the source's own dev.jsonl; data.dev_size (4) and data.seed (9) draw nothing" in said
    assert len((tmp_path / "dev.out.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("change, message", [
    (lambda s: s["train"].__setitem__(3, {"question": "q", "answer": "no final line"}),
     "train row 4: answer has no final '#### N' line"),
    (lambda s: s["test"].__setitem__(0, {"question": "", "answer": "#### 1"}), "test row 1: missing or empty 'question'"),
    (lambda s: s.__setitem__("test", []), "split 'test' is empty"),
    (lambda s: s.__setitem__("dev", [row(500)]), "dev split: 1 question(s) also appear in test"),
    (lambda s: s.__setitem__("dev", [dict(r) for r in s["train"]]),
     "split 'train' is empty: every train question is also in dev or test"),
])
def test_bad_rows_and_splits_are_refused(change, message):
    source = raw()
    change(source)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_splits(source, DataParams(dev_size=5))


@pytest.mark.parametrize("data, message", [
    (DataParams(dev_size=5, limit=11), "data.limit: 11 is larger than the test split (10 rows)"),
    (DataParams(dev_size=30), "data.dev_size: 30 leaves no training rows"),
])
def test_sizes_that_do_not_fit_the_data_are_refused(data, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_splits(raw(), data)


def test_limit_caps_train_and_test():
    splits, _ = make_splits(raw(), DataParams(dev_size=5, limit=7))
    assert (len(splits["train"]), len(splits["dev"]), len(splits["test"])) == (7, 5, 7)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_local_jsonl_directory_names_bad_lines(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [row(i) for i in range(100, 120)])
    (tmp_path / "test.jsonl").write_text(json.dumps(row(500)) + "\n{not json\n")
    with pytest.raises(UserError, match=r"test.jsonl:2: malformed JSON"):
        load_source(DataParams(source=str(tmp_path)))
    write_jsonl(tmp_path / "test.jsonl", [row(500), {"question": "q?", "answer": "42"}])
    with pytest.raises(UserError, match=r"test.jsonl:2: answer has no final '#### N' line"):
        make_splits(load_source(DataParams(source=str(tmp_path))), DataParams(source=str(tmp_path), dev_size=2))


def test_local_directory_in_the_hub_layout_loads_through_datasets(tmp_path):
    """A snapshot of openai/gsm8k: parquet files under main/, configs declared in README.md."""
    import datasets

    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
        "  - split: test\n    path: main/test-*\n---\n")
    for split, rows in raw().items():
        (tmp_path / "main").mkdir(exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "main" / f"{split}-00000-of-00001.parquet"))
    data = DataParams(source=str(tmp_path), config="main", dev_size=5)
    splits, _ = make_splits(load_source(data), data)
    assert (len(splits["train"]), len(splits["test"])) == (25, 10)


def write_hub_snapshot(root, readme):
    """openai/gsm8k's layout: one folder of parquet files per config (main/, socratic/)."""
    import datasets

    for config in ("main", "socratic"):
        for split, numbers in (("train", range(2, 22, 2)), ("test", range(100, 108, 2))):
            (root / config).mkdir(exist_ok=True)
            rows = [gsm8k_row(n, socratic=config == "socratic") for n in numbers]
            datasets.Dataset.from_list(rows).to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
    if readme:
        (root / "README.md").write_text("---\nconfigs:\n" + "".join(
            f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n"
            f"  - split: test\n    path: {c}/test-*\n" for c in ("main", "socratic")) + "---\n")


@pytest.mark.parametrize("readme", [False, True], ids=["no_readme", "readme_configs"])
def test_a_hub_snapshot_loads_only_the_named_config(tmp_path, readme):
    """Without the hub's README the folders are the configs; data.config picks one, never both."""
    write_hub_snapshot(tmp_path, readme)
    for config in ("main", "socratic"):
        source = load_source(DataParams(source=str(tmp_path), config=config))
        assert (len(source["train"]), len(source["test"])) == (10, 4)
        assert {"**" in r["answer"] for r in source["train"] + source["test"]} == {config == "socratic"}


@pytest.mark.parametrize("readme", [False, True], ids=["no_readme", "readme_configs"])
@pytest.mark.parametrize("config, message", [
    (None, "params.yaml: data.config: null, but {d} holds several configs (main, socratic); name one of them"),
    ("mian", "params.yaml: data.config: 'mian' is not a config of {d} (it has main, socratic)"),
])
def test_a_hub_snapshot_with_an_unnamed_or_unknown_config_is_refused(tmp_path, readme, config, message):
    write_hub_snapshot(tmp_path, readme)
    with pytest.raises(UserError) as info:
        load_source(DataParams(source=str(tmp_path), config=config))
    assert str(info.value) == message.format(d=tmp_path)


def test_unreachable_hub_says_how_to_run_offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read the variables when they were imported: without these they would try the
    # network until a timeout (~20 s here) and only then fail.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    with pytest.raises(UserError, match="Offline\\? Point data.source at a local copy"):
        load_source(DataParams(source="openai/gsm8k-not-cached", config="main"))


def test_stage_writes_identical_bytes_for_gsm_symbolic(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  source: gsm_symbolic\n  num_problems: 40\n  dev_size: 4\n  seed: 7\n")
    outputs = []
    for run in ("a", "b"):
        paths = {s: tmp_path / run / f"{s}.jsonl" for s in ("train", "dev", "test", "fewshot")}
        subprocess.run([sys.executable, "-m", "stages.prepare", "--params", str(params),
                        *[a for s, p in paths.items() for a in (f"--{s}", str(p))]], check=True, capture_output=True)
        outputs.append({s: p.read_bytes() for s, p in paths.items()})
    assert outputs[0] == outputs[1]
    test_rows = [json.loads(line) for line in outputs[0]["test"].splitlines()]
    assert len(test_rows) == 8 and all(r["answer"].rstrip().endswith(f"#### {r['final']}") for r in test_rows)
    # The few-shot pool is the whole source train split (dev and train rows, not test), untouched.
    pool = [json.loads(line) for line in outputs[0]["fewshot"].splitlines()]
    split_rows = [json.loads(line) for s in ("train", "dev") for line in outputs[0][s].splitlines()]
    assert len(pool) == 32 and {r["question"] for r in pool} == {r["question"] for r in split_rows}
    assert not {r["question"] for r in pool} & {r["question"] for r in test_rows}
    assert all(set(r) == {"question", "answer"} for r in pool)


def test_fewshot_pool_keeps_the_source_rows_and_order(tmp_path):
    """lm-eval draws from the raw train split by position: the pool keeps every row (also those that
    dev and decontamination take out of train), unstripped, in the source's order."""
    from stages.prepare import fewshot_pool

    raw = [row(i) for i in range(5)] + [{"question": "  Spaced?  ", "answer": "x\n#### 3"}]
    assert fewshot_pool(raw) == [{"question": r["question"], "answer": r["answer"]} for r in raw]


def test_line_numbers_count_blank_lines(tmp_path):
    """A bad row is named by the line an editor shows, also after blank lines."""
    write_jsonl(tmp_path / "train.jsonl", [row(i) for i in range(100, 120)])
    (tmp_path / "test.jsonl").write_text(json.dumps(row(500)) + "\n\n\n" + json.dumps({"question": "q?", "answer": "42"}) + "\n")
    with pytest.raises(UserError, match=r"test.jsonl:4: answer has no final '#### N' line"):
        make_splits(load_source(DataParams(source=str(tmp_path))), DataParams(source=str(tmp_path), dev_size=2))


def test_a_non_utf8_byte_is_named_by_file_and_line(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [row(i) for i in range(100, 120)])
    (tmp_path / "test.jsonl").write_bytes(json.dumps(row(500)).encode() + b"\n" + b'{"question": "caf\xe9"}\n')
    with pytest.raises(UserError) as info:
        load_source(DataParams(source=str(tmp_path)))
    assert str(info.value) == (f"{tmp_path / 'test.jsonl'}:2: not UTF-8 text (byte 0xe9 at column 18); "
                               "re-save the file as UTF-8")
