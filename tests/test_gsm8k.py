import pytest

from stages.config import DEFAULT_TEMPLATE
from stages.gsm8k import (clean_number, flexible_answer, format_prompt, gold_answer, is_correct, score,
                          strict_answer)

NATALIA = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize("text, strict, flexible", [
    (NATALIA, "72", "72"),
    ("So the total is 1,234.\n#### 1,234", "1234", "1234"),
    ("It costs $5.", None, "5"),                       # strict has no '$' in its class
    ("#### $5", None, "5"),
    ("The balance is -7\n#### -7", "-7", "-7"),
    ("Each costs 3.50\n#### 3.50", "3.50", "3.50"),   # kept: "3.50" != "3.5", as in lm-eval
    ("#### 42.", "42", "42"),                          # one trailing period dropped
    ("#### 42\n\nQuestion: Tom has 3 apples", "42", "3"),
    ("#### 3\n#### 5", "3", "5"),                      # strict: first '####'; flexible: last number
    ("First 12 then 7 and finally 100 apples", None, "100"),
    ("The answer is 8. Hope that helps!", None, "8"),
    ("####42", None, "42"),                            # strict needs the space
    ("I do not know", None, None),
    ("", None, None),
    ("Hmm... let me think", None, ".."),               # lm-eval's pattern also matches dot runs
])
def test_answer_extraction(text, strict, flexible):
    assert strict_answer(text) == strict
    assert flexible_answer(text) == flexible


@pytest.mark.parametrize("raw, cleaned", [
    ("1,234", "1234"),
    ("$1,000.", "1000"),
    ("-7", "-7"),
    ("3.50", "3.50"),
    ("42..", "42."),          # only one trailing period
    (" 18 ", "18"),
    ("he earned #### 18", "18"),  # everything through the last '#### '
])
def test_clean_number(raw, cleaned):
    assert clean_number(raw) == cleaned


@pytest.mark.parametrize("solution, gold", [
    (NATALIA, "72"),
    ("#### 1,000", "1000"),
    ("x\n#### 5\ny\n#### -3.", "-3"),  # the last '#### ' wins
    ("#### $18", "18"),
    ("#### 0.5\n", "0.5"),
    ("no marker 72", None),
    ("#### seventy-two", None),
    ("#### ", None),
])
def test_gold_answer(solution, gold):
    assert gold_answer(solution) == gold


@pytest.mark.parametrize("prediction, gold, correct", [
    ("72", "72", True),
    ("1,234", "1234", True),
    ("72", NATALIA, True),       # a whole reference solution works as the gold
    ("72.", "72", True),
    ("3.50", "3.5", False),      # string match, not numeric
    ("-7", "7", False),
    ("", "0", False),
    (None, "72", False),
])
def test_is_correct(prediction, gold, correct):
    assert is_correct(prediction, gold) is correct


def test_score_counts_strict_and_flexible_separately():
    texts = ["...\n#### 72", "The answer is 1,234.", "#### 5\nno, 9", "I do not know"]
    golds = ["72", "1234", "9", "3"]
    assert score(texts, golds) == {
        "exact_match": 0.25, "exact_match_flexible": 0.75, "n": 4,
        "correct": 1, "correct_flexible": 3, "no_answer_rate": 0.5,
    }


def test_score_cuts_each_completion_at_the_stops_as_the_evaluate_stage_does():
    """A completion that runs on into a next question is scored on its own answer: the flexible match
    once read the last number of the run-on text."""
    from stages import protocols as P
    from stages.config import EvaluateParams, PromptParams

    texts = ["#### 5\n\nQuestion: x #### 9", "So 5.\nQuestion: Tom has 8 apples", "#### 7</s>#### 8"]
    assert score(texts, ["5", "5", "7"])["correct_flexible"] == 3
    protocol = P.get_protocol(P.TRAIN_PROMPT, PromptParams(), EvaluateParams())
    records = [P.prediction_record(protocol, {"question": "q", "answer": f"#### {g}"}, t, P.TRAIN_PROMPT_STOP)
               for t, g in zip(texts, ["5", "5", "7"])]
    assert score(texts, ["5", "5", "7"]) == P.score(records)


def test_score_of_nothing_is_zero_not_a_crash():
    assert score([], []) == {"exact_match": 0.0, "exact_match_flexible": 0.0, "n": 0,
                             "correct": 0, "correct_flexible": 0, "no_answer_rate": 0.0}


def test_score_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 golds"):
        score(["#### 1", "#### 2"], ["1"])


@pytest.mark.parametrize("template, question, prompt", [
    ("Question: {question}\nAnswer:", "  What is 2+2?\n", "Question: What is 2+2?\nAnswer:"),
    ("{question}", "Braces {x} stay", "Braces {x} stay"),
    (DEFAULT_TEMPLATE, "Q?", DEFAULT_TEMPLATE.replace("{question}", "Q?")),
])
def test_format_prompt(template, question, prompt):
    assert format_prompt(template, question) == prompt


def test_importing_the_task_loads_no_heavy_library():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, stages.gsm8k; print(sorted({'torch', 'transformers', 'evaluate'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
