import re

import pytest

from stages.gsm8k import gold_answer
from stages.gsm_symbolic import INSTRUCTION, convert_entry, generate_rows


def entry(answer, cot, question="How many pebbles are left?"):
    return {"question": question + INSTRUCTION, "answer": answer, "metadata": {"answer_cot": cot}}


@pytest.mark.parametrize("given, expected", [
    (entry("44", "72-28=44\n#### 44"), {"question": "How many pebbles are left?", "answer": "72-28=44\n#### 44"}),
    # reasoning-gym's float arithmetic: the answer is 36 but the solution says 36.0.
    (entry("36", "6*6.0=36.0\n#### 36.0"), {"question": "How many pebbles are left?", "answer": "6*6.0=36.0\n#### 36"}),
    (entry("1687.5", "750*2.25=1687.5\n#### 1687.5"),
     {"question": "How many pebbles are left?", "answer": "750*2.25=1687.5\n#### 1687.5"}),
    (entry("36", "oops\n#### 37"), None),          # disagrees: skipped, not emitted
    (entry("36", "6*6=36.5\n#### 36.5"), None),     # not a whole-number float: not "repaired"
    (entry("36", "no final line"), None),
])
def test_convert_entry(given, expected):
    assert convert_entry(given) == expected


@pytest.fixture(scope="module")
def rows():
    return generate_rows(200, seed=3)


def test_rows_look_like_gsm8k(rows):
    assert len(rows) == 200
    for row in rows:
        assert set(row) == {"question", "answer"}
        assert re.search(r"\n#### -?[0-9.]+$", row["answer"]), row["answer"]
        assert gold_answer(row["answer"]) is not None
        assert "Give the result" not in row["question"] and "include units" not in row["question"]
        assert row["question"] == row["question"].strip()
    # Not 200 copies of one template.
    assert len({row["question"] for row in rows}) == 200


def test_rows_are_deterministic_and_prefix_stable(rows):
    assert generate_rows(200, seed=3) == rows
    assert generate_rows(50, seed=3) == rows[:50]
    assert generate_rows(50, seed=4) != rows[:50]
