"""The report stage: accuracy of the fine-tuned and the base model by solution steps."""
import pytest

from stages.io import UserError
from stages.report import accuracy_by_steps, solution_steps

# Real GSM8K solutions (openai/gsm8k train): one calculation a line, then '#### N'.
NATALIA = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
WENG = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
BETTY = ("In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\nBetty's grandparents gave her 15 * 2 = $<<15*2=30>>30.\n"
         "This means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5")


@pytest.mark.parametrize("answer, steps", [(NATALIA, 2), (WENG, 2), (BETTY, 3), ("#### 4", 1),
                                           ("\n".join(["a"] * 11) + "\n#### 1", 11)])
def test_solution_steps(answer, steps):
    assert solution_steps(answer) == steps


def test_accuracy_by_steps():
    rows = [{"question": q, "answer": a} for q, a in (("n", NATALIA), ("w", WENG), ("b", BETTY))]
    tuned = [{"question": "n", "correct": True}, {"question": "w", "correct": False}, {"question": "b", "correct": True}]
    base = [{"question": "n", "correct": False}, {"question": "w", "correct": False}, {"question": "b", "correct": True}]
    assert accuracy_by_steps(rows, tuned, base, "p") == [
        {"steps": 2, "questions": 2, "fine_tuned": 0.5, "base": 0.0},
        {"steps": 3, "questions": 1, "fine_tuned": 1.0, "base": 1.0}]
    with pytest.raises(UserError, match="a question that is not in the evaluated split"):
        accuracy_by_steps(rows, tuned + [{"question": "other", "correct": True}], base, "p")
    # A stale or hand-made file over other questions (here the fine-tuned one at a limit of 1).
    with pytest.raises(UserError, match=r"^p: the two files score different questions \(1 fine-tuned, 3 base"):
        accuracy_by_steps(rows, tuned[:1], base, "p")
