"""python -m stages.report --data data/gsm8k_test.jsonl --predictions metrics/predictions.jsonl \
    --base-predictions metrics/predictions_base.jsonl --out metrics/accuracy_by_steps.csv

Accuracy of the fine-tuned model and of the base model by difficulty, for `dvc plots show`:
difficulty is the number of steps of the gold solution (its lines before `#### N`; GSM8K writes
one calculation a line, 2 to 8 of them). One CSV row per step count: steps, questions, and the
strict exact match of each model on those questions. Pure bookkeeping over the evaluations'
per-question files; no model is loaded.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from stages.io import UserError, atomic_path, cli, read_jsonl_numbered

# Solutions with more steps than this are few; they share the last row (8 means 8 or more).
MAX_STEPS = 8


def solution_steps(answer: str) -> int:
    """Lines of a GSM8K reference solution before its `#### N` line (at least 1)."""
    body = answer.split("####")[0]
    return max(1, sum(1 for line in body.splitlines() if line.strip()))


def accuracy_by_steps(rows: list[dict], tuned: list[dict], base: list[dict], where: str) -> list[dict]:
    """Rows of the CSV: per step count, how many questions and each model's share correct."""
    steps_of = {r["question"]: min(solution_steps(r["answer"]), MAX_STEPS) for r in rows}
    buckets: dict[int, dict] = {}
    for name, predictions in (("fine_tuned", tuned), ("base", base)):
        seen = set()
        for i, p in enumerate(predictions, 1):
            if p.get("question") not in steps_of:
                raise UserError(f"{where} (line {i}): a question that is not in the evaluated split; "
                                "re-run the evaluate stages (`dvc repro`)")
            seen.add(p["question"])
            bucket = buckets.setdefault(steps_of[p["question"]], {"fine_tuned": [0, 0], "base": [0, 0]})
            bucket[name][0] += bool(p.get("correct"))
            bucket[name][1] += 1
        if not seen:
            raise UserError(f"{where}: no predictions of the {name.replace('_', '-')} model")
    # Side by side only over the same questions: a stale or hand-made file of another limit or split
    # would put one model's share over some questions beside the other's over others.
    questions = [sorted(p["question"] for p in predictions) for predictions in (tuned, base)]
    if questions[0] != questions[1]:
        raise UserError(f"{where}: the two files score different questions ({len(tuned)} fine-tuned, {len(base)} "
                        "base, or other ones); re-run the evaluate stages (`dvc repro`)")
    return [{"steps": s, "questions": b["fine_tuned"][1] or b["base"][1],
             "fine_tuned": round(b["fine_tuned"][0] / b["fine_tuned"][1], 4) if b["fine_tuned"][1] else "",
             "base": round(b["base"][0] / b["base"][1], 4) if b["base"][1] else ""}
            for s, b in sorted(buckets.items())]


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the evaluated split (with full solutions)")
    parser.add_argument("--predictions", required=True)
    parser.add_argument("--base-predictions", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rows = [r for _, r in read_jsonl_numbered(args.data)]
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise UserError(f"{args.data}: row {i} needs string fields 'question' and 'answer' (run the prepare stage)")
    tuned = [p for _, p in read_jsonl_numbered(args.predictions)]
    base = [p for _, p in read_jsonl_numbered(args.base_predictions)]
    table = accuracy_by_steps(rows, tuned, base, f"{args.predictions} / {args.base_predictions}")
    columns = ["steps", "questions", "fine_tuned", "base"]
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text("\n".join([",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in table])
                             + "\n", encoding="utf-8")
    # One line whatever the number of step counts: the totals here, the rows in the CSV.
    correct = {name: sum(bool(p.get("correct")) for p in predictions) for name, predictions in
               (("fine_tuned", tuned), ("base", base))}
    steps = f"{table[0]['steps']}-{table[-1]['steps']}" if len(table) > 1 else str(table[0]["steps"])
    print(f"report: exact match {correct['fine_tuned']}/{len(tuned)} fine-tuned vs {correct['base']}/{len(base)} "
          f"base; by solution steps ({steps}) in {args.out}")


if __name__ == "__main__":
    main()
