"""GSM8K exact match (lm-evaluation-harness strict-match and flexible-extract) as an `evaluate` metric.

    evaluate.load("metrics_module/gsm8k_exact_match").compute(predictions=texts, references=golds)

or `stages.gsm8k.load_metric()`, which passes the absolute path. Works offline: it is loaded
from this directory, never from the Hub.

The scoring itself is `stages.gsm8k.score`; this file only adapts it to `evaluate`. Two things
about how `evaluate.load` treats this file shape the code below:
- it copies the file into its modules cache (~/.cache/huggingface/modules/evaluate_modules/...)
  and imports the copy, so `__file__` is not inside this repository;
- before that, it scans the file for column-0 `import x` / `from x import` lines and imports
  each `x`, failing with "you need to install ['stages']" when the repository is not on
  sys.path. Hence `stages` is imported inside a function, after the repository is found.
"""
import json
import os
import sys
from pathlib import Path

import datasets
import evaluate

# Set this to the repository root to pick which checkout's stages/gsm8k.py scores.
ROOT_ENV = "GSM8K_PROJECT_ROOT"

_DESCRIPTION = """Exact match on GSM8K generations, computed like lm-evaluation-harness's gsm8k task:
strict-match reads the number after the first '#### ', flexible-extract the last number in the
text; both are compared to the gold answer after removing ',', '$' and one trailing '.'."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated texts (the full completion, not an extracted number; it is cut before
        "Question:", "</s>" and "<|im_end|>" first, as the pipeline cuts the training prompt's).
    references: gold answers ("72") or whole reference solutions ("... #### 72").
Returns:
    exact_match, exact_match_flexible, no_answer_rate: fractions in [0, 1];
    n, correct, correct_flexible: counts.
Example:
    >>> metric = evaluate.load("metrics_module/gsm8k_exact_match")
    >>> metric.compute(predictions=["6 * 2 = 12\\n#### 12"], references=["12"])["exact_match"]
    1.0
"""

_CITATION = """@article{cobbe2021gsm8k,
  title={Training Verifiers to Solve Math Word Problems},
  author={Cobbe, Karl and Kosaraju, Vineet and Bavarian, Mohammad and others},
  journal={arXiv preprint arXiv:2110.14168},
  year={2021}
}"""


def _candidate_roots():
    """Where the repository may be, most explicit first."""
    if os.environ.get(ROOT_ENV):
        yield Path(os.environ[ROOT_ENV])
    here = Path(__file__).resolve()
    # Imported straight from the repository (not through evaluate.load).
    yield here.parents[2]
    # evaluate writes <name>.json beside its copy, recording the file it copied from. It is
    # written once per content hash, so with two identical checkouts it names the first.
    meta = here.with_suffix(".json")
    if meta.is_file():
        original = json.loads(meta.read_text(encoding="utf-8")).get("original file path")
        if original:
            yield Path(original).resolve().parents[2]


def _score_function():
    # Already imported (stages.gsm8k.load_metric, the evaluate stage): use that very module.
    if "stages.gsm8k" not in sys.modules:
        for root in _candidate_roots():
            if (root / "stages" / "gsm8k.py").is_file():
                if str(root) not in sys.path:
                    sys.path.insert(0, str(root))
                break
    try:
        from stages.gsm8k import score
    except ImportError as exc:
        raise ImportError(f"gsm8k_exact_match needs this repository's stages/gsm8k.py; "
                          f"set {ROOT_ENV} to the repository root ({exc})") from exc
    return score


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Gsm8kExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Value("string"),
            }),
            reference_urls=["https://github.com/EleutherAI/lm-evaluation-harness/tree/main/lm_eval/tasks/gsm8k"],
        )

    def _compute(self, predictions, references):
        return _score_function()(list(predictions), list(references))
