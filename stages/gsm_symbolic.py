"""GSM8K-style problems generated offline by reasoning-gym's `gsm_symbolic` (GSM-Symbolic templates).

    python -c "from stages.gsm_symbolic import generate_rows; print(generate_rows(2, seed=0))"

Each row has the shape of an openai/gsm8k row, so the rest of the pipeline cannot tell them apart:
{"question": "...?", "answer": "worked solution ...\\n#### 44"}.

reasoning-gym's entries differ from GSM8K in two ways that are undone here:
- every question ends in " Give the result as your final answer. Do not include units.";
- for about 4% of problems the solution's last line is "#### 36.0" while the answer is 36
  (the template computed in floats). Left alone, the model would learn to write "36.0", which
  exact match scores wrong against "36"; such a last line is rewritten to "#### 36".
A row whose solution still disagrees with the answer is skipped, never emitted. So is a repeated
question (about 1 in 200: some templates have few free variables): a problem in both the train
and the test split would inflate the test score.
"""
from __future__ import annotations

import re
import sys

from stages.gsm8k import clean_number, gold_answer

INSTRUCTION = " Give the result as your final answer. Do not include units."
# "#### 36.0", "#### 36.00": a whole number written as a float.
FLOAT_WHOLE_RE = re.compile(r"(-?[0-9]+)\.0+")


def convert_entry(entry: dict) -> dict | None:
    """A reasoning-gym gsm_symbolic entry as a GSM8K row, or None when its solution is inconsistent."""
    question = entry["question"].removesuffix(INSTRUCTION).strip()
    gold = clean_number(str(entry["answer"]))
    solution = entry["metadata"]["answer_cot"].rstrip()
    head, marker, last = solution.rpartition("#### ")
    whole = FLOAT_WHOLE_RE.fullmatch(last.strip())
    if marker and whole and whole.group(1) == gold:
        solution = f"{head}#### {gold}"
    if gold_answer(solution) != gold:
        return None
    return {"question": question, "answer": solution}


def generate_rows(size: int, seed: int) -> list[dict]:
    """`size` GSM8K-style rows, the same ones for the same (size, seed).

    Rows are generated in index order and skipped ones are replaced by the next index, so the
    result for a smaller size is a prefix of the result for a larger one.
    """
    import reasoning_gym

    # The dataset is lazy (an entry is built when indexed) and its first N entries do not depend
    # on its size, so asking for twice as many costs nothing and leaves room to replace skips.
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=2 * size + 16, seed=seed)
    rows, seen, inconsistent, repeated = [], set(), 0, 0
    for index in range(len(dataset)):
        if len(rows) == size:
            break
        row = convert_entry(dataset[index])
        if row is None:
            inconsistent += 1
        elif row["question"] in seen:
            repeated += 1
        else:
            seen.add(row["question"])
            rows.append(row)
    if len(rows) < size:
        raise RuntimeError(f"gsm_symbolic: only {len(rows)} usable problems among {len(dataset)} generated "
                           f"({inconsistent} inconsistent, {repeated} repeated); the reasoning-gym "
                           f"version may have changed")
    if inconsistent or repeated:
        print(f"gsm_symbolic: skipped {inconsistent} problems whose solution disagrees with the answer "
              f"and {repeated} repeated questions", file=sys.stderr)
    return rows
