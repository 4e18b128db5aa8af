"""GSM8K, the task: prompt formatting, answer extraction and scoring, as lm-evaluation-harness does it.

    python -c "from stages.gsm8k import score; print(score(['... #### 72'], ['72']))"

One real row of openai/gsm8k (train[0]); the reference solution ends in `#### <answer>`:

    question: Natalia sold clips to 48 of her friends in April, and then she sold half as many
              clips in May. How many clips did Natalia sell altogether in April and May?
    answer:   Natalia sold 48/2 = <<48/2=24>>24 clips in May.
              Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.
              #### 72

A generation is scored two ways, both lm-evaluation-harness's gsm8k filters, so our numbers are
comparable to published ones:
- strict-match: the number after the FIRST `#### ` (the format the model was fine-tuned to write);
- flexible-extract: the LAST number-looking token anywhere in the text (credits a right answer
  written in the wrong format).
Both are then compared to the gold as strings after `clean_number` (lm-eval's `regexes_to_ignore`):
"3.50" does not equal "3.5", exactly as in lm-eval.

Pure: only `re` at import time, so the stages and tests can import it without loading torch.
"""
from __future__ import annotations

import re
from pathlib import Path

# lm-evaluation-harness gsm8k.yaml's `until`: the training prompt's stops too (stages/protocols.py). The
# evaluate stage cuts a completion before each, in turn, before extracting an answer; so does `score`.
STOP = ("Question:", "</s>", "<|im_end|>")
# lm-evaluation-harness gsm8k.yaml, filter "strict-match" (take_first).
STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
# lm-evaluation-harness gsm8k.yaml, filter "flexible-extract" (group_select: -1).
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# lm-eval's exact_match regexes_to_ignore for gsm8k, applied in this order to prediction and
# target alike. "(?s).*#### " is what turns a whole reference solution into its final number.
IGNORE_RES = tuple(re.compile(p) for p in (r",", r"\$", r"(?s).*#### ", r"\.$"))
# What a cleaned gold must look like; anything else means the solution has no usable answer.
NUMBER_RE = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")

METRIC_DIR = Path(__file__).resolve().parent.parent / "metrics_module" / "gsm8k_exact_match"


def clean_number(s: str) -> str:
    """lm-eval's clean-up: drop `,` and `$`, everything up to a last `#### `, one trailing `.`."""
    s = s.strip()
    for pattern in IGNORE_RES:
        s = pattern.sub("", s)
    # lm-eval also lower-cases (ignore_case); a no-op on digits, so left out.
    return s.strip()


def strict_answer(text: str) -> str | None:
    """The number after the first `#### `, cleaned; None when the text has none."""
    match = STRICT_RE.search(text)
    return clean_number(match.group(1)) if match else None


def flexible_answer(text: str) -> str | None:
    """The last number-looking token in the text, cleaned; None when there is none.

    Faithful to lm-eval, quirks included: the pattern also matches runs of dots or commas, so
    "Hmm..." yields ".." rather than None (it can never equal a gold number).
    """
    matches = FLEXIBLE_RE.findall(text)
    if not matches:
        return None
    last = next(group for group in matches[-1] if group)
    return clean_number(last)


def gold_answer(solution: str) -> str | None:
    """The final answer of a reference solution (text after the last `#### `), cleaned."""
    if "#### " not in solution:
        return None
    gold = clean_number(solution)
    return gold if NUMBER_RE.fullmatch(gold) else None


def is_correct(prediction: str | None, gold: str) -> bool:
    """lm-eval exact_match: string equality after `clean_number`; no answer is never right."""
    return prediction is not None and clean_number(prediction) == clean_number(gold)


def format_prompt(template: str, question: str) -> str:
    return template.format(question=question.strip())


def cut_at_stops(text: str, stop=STOP) -> str:
    """The text before each stop string in turn (split, not earliest match: lm-eval's order)."""
    for s in stop:
        if s:
            text = text.split(s)[0]
    return text


def score(predictions_texts: list[str], golds: list[str], stop=STOP) -> dict:
    """Exact match of generated texts against gold answers, strict and flexible, as the evaluate stage
    scores the training prompt's completions: each is cut at the stops first (a completion that runs on
    into a next "Question:" is scored on its answer, not on the numbers after it).

    `golds` may be bare answers ("72") or whole reference solutions ("... #### 72").
    """
    if len(predictions_texts) != len(golds):
        raise ValueError(f"{len(predictions_texts)} predictions but {len(golds)} golds")
    predictions_texts = [cut_at_stops(text, stop) for text in predictions_texts]
    n = len(golds)
    strict = [strict_answer(text) for text in predictions_texts]
    flexible = [flexible_answer(text) for text in predictions_texts]
    correct = sum(is_correct(p, g) for p, g in zip(strict, golds))
    correct_flexible = sum(is_correct(p, g) for p, g in zip(flexible, golds))
    no_answer = sum(p is None for p in strict)

    def rate(k: int) -> float:
        return k / n if n else 0.0

    return {
        "exact_match": rate(correct),
        "exact_match_flexible": rate(correct_flexible),
        "n": n,
        "correct": correct,
        "correct_flexible": correct_flexible,
        "no_answer_rate": rate(no_answer),
    }


def load_metric(**kwargs):
    """The same scorer as an `evaluate` metric, loaded offline from this repository.

    `evaluate.load` copies the script into its modules cache and imports it from there; the
    script finds this package again (see metrics_module/gsm8k_exact_match).
    """
    import evaluate

    return evaluate.load(str(METRIC_DIR), **kwargs)
