"""lm-evaluation-harness 0.4.13 itself against stages/protocols.py, offline, on the tiny local model.

lm-eval runs in-process (`lm_eval.simple_evaluate` with its `hf` backend, which loads the model
directory itself: cpu, float32, batch size 1) on its own gsm8k and gsm8k_cot_llama YAMLs, each
`include:`d from the installed package with only the data swapped for tests/gsm8k_rows_*.jsonl
(real GSM8K rows). Per question: our prompt is lm-eval's logged `arguments`, our ids are its
`tok_batch_encode`, our own greedy generation from our ids is its raw `resps`, and our extraction
and correctness are its `filtered_resps` and `exact_match`, filter by filter. A random model never
answers right, so hand-written completions (right, wrong, unclosed thinking, ...) also go through
lm-eval's own filter pipelines, metric and post-processing, in-process.
"""
import dataclasses
import json
from pathlib import Path

import pytest

from stages import protocols as P
from stages.io import read_jsonl

HERE = Path(__file__).parent
TRAIN_FILE, TEST_FILE = HERE / "gsm8k_rows_train.jsonl", HERE / "gsm8k_rows_test.jsonl"
TRAIN, TEST = read_jsonl(TRAIN_FILE), read_jsonl(TEST_FILE)
N = len(TEST)
YAMLS = {"lm_eval_gsm8k": "gsm8k.yaml", "lm_eval_gsm8k_cot_llama": "gsm8k-cot-llama.yaml"}
NAMES = list(YAMLS)


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("lm_eval_tasks")
    package = Path(lm_eval.__file__).parent / "tasks" / "gsm8k"
    for name, yaml_name in YAMLS.items():
        task = {"include": str(package / yaml_name), "task": f"parity_{name}", "dataset_path": "json",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {"train": str(TRAIN_FILE), "test": str(TEST_FILE)},
                                   "cache_dir": str(tmp / "datasets")}}
        (tmp / f"parity_{name}.yaml").write_text(json.dumps(task))  # JSON is YAML
    # Only these tasks are indexed: scanning lm-eval's thousands of YAMLs takes longer than the run.
    return TaskManager(include_path=str(tmp), include_defaults=False)


@pytest.fixture(scope="module")
def tasks(task_manager):
    loaded = task_manager.load([f"parity_{name}" for name in NAMES])["tasks"]
    return {name: loaded[f"parity_{name}"] for name in NAMES}


def run_evaluate(tmp, model_dir, name, **evaluate):
    """stages.evaluate, the stage itself, on the test rows (float32 as lm-eval runs here; batch 1 as
    lm-eval's default unless `batch_size` says): (metrics, predictions, run info)."""
    import yaml

    from stages.evaluate import main

    tmp.mkdir(parents=True, exist_ok=True)
    params = {"model": {"name": str(model_dir), "load_in_4bit": False, "bnb_4bit_compute_dtype": "float32"},
              "evaluate": {"protocol": name, "batch_size": 1, **evaluate}}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    main(["--params", str(tmp / "params.yaml"), "--data-file", str(TEST_FILE), "--fewshot-file", str(TRAIN_FILE),
          "--metrics", str(tmp / "eval.json"), "--run-info", str(tmp / "run.json"),
          "--predictions", str(tmp / "predictions.jsonl")])
    return (json.loads((tmp / "eval.json").read_text()), read_jsonl(tmp / "predictions.jsonl"),
            json.loads((tmp / "run.json").read_text()))


@pytest.fixture(scope="module")
def ours(tiny_model_dir, tmp_path_factory):
    """Per protocol: our plan (stages.protocols.plan, what the stage builds its prompts with) and
    the evaluate stage's own output at batch 1 and with all questions in one padded batch."""
    from transformers import AutoConfig

    from stages.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    config = AutoConfig.from_pretrained(str(tiny_model_dir))
    tmp = tmp_path_factory.mktemp("ours")
    out = {}
    for name in NAMES:
        plan = P.plan(P.LM_EVAL_PROTOCOLS[name], tokenizer, config, TEST, TRAIN)
        out[name] = plan, run_evaluate(tmp / name, tiny_model_dir, name), \
            run_evaluate(tmp / f"{name}-batched", tiny_model_dir, name, batch_size=N)
    return tokenizer, out


def think_marker(text: str) -> str:
    """A marker the random model really wrote (mid-text), so that lm-eval's think_end_token path
    runs on real output; not all digits (lm-eval would read those as a token id)."""
    start = len(text) // 2
    marker = text[start:start + 4]
    assert marker.strip() and not marker.isdigit(), marker
    return marker


@pytest.fixture(scope="module")
def lm_eval_runs(tiny_model_dir, task_manager, ours):
    """{protocol: per question {filter: logged sample}} from lm-eval's own run, plus a gsm8k run
    with `think_end_token`, and the HFLM instance."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    def run(lm, name):
        chat = P.LM_EVAL_PROTOCOLS[name].chat
        # Global seeds left alone (greedy decoding does not use them; other tests' RNG stays theirs);
        # the few-shot seed is lm-eval's default.
        results = lm_eval.simple_evaluate(model=lm, tasks=[f"parity_{name}"], task_manager=task_manager, limit=N,
                                          log_samples=True, apply_chat_template=chat, fewshot_as_multiturn=chat,
                                          bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
                                          torch_random_seed=None)
        by_doc = {}
        for sample in results["samples"][f"parity_{name}"]:
            by_doc.setdefault(sample["doc_id"], {})[sample["filter"]] = sample
        return [by_doc[i] for i in range(N)], results["results"][f"parity_{name}"]

    model_args = {"pretrained": str(tiny_model_dir), "device": "cpu", "dtype": "float32", "batch_size": 1}
    lm = HFLM(**model_args)
    runs = {name: run(lm, name) for name in NAMES}
    marker = think_marker(ours[1]["lm_eval_gsm8k"][1][1][0]["generated"])
    runs["think"] = marker, run(HFLM(**model_args, think_end_token=marker), "lm_eval_gsm8k")
    return lm, runs


# ---------------------------------------------------------------- the recipe is lm-eval's

@pytest.mark.parametrize("name", NAMES)
def test_protocol_data_is_lm_evals_task_config(tasks, name):
    import inspect

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    protocol, task = P.LM_EVAL_PROTOCOLS[name], tasks[name]
    config, fewshot = task.config, task.fewshot_cfg
    assert config.doc_to_text == P.QUESTION.join(protocol.text_pieces)
    assert config.num_fewshot == protocol.num_fewshot
    assert (fewshot.sampler, fewshot.target_delimiter, fewshot.fewshot_delimiter) == \
        (protocol.fewshot_sampler, protocol.target_delimiter, protocol.fewshot_delimiter)
    if protocol.fewshot_sampler == "default":
        assert fewshot.split == "train" and fewshot.split != config.test_split  # so no eval-doc removal
        assert inspect.signature(lm_eval.simple_evaluate).parameters["fewshot_random_seed"].default == \
            protocol.fewshot_seed
    else:
        assert [(s["question"], s["target"]) for s in fewshot.samples] == list(protocol.fewshot_samples)
    generation = config.generation_kwargs
    assert generation["until"] == list(protocol.until) and generation["do_sample"] is False
    assert "max_gen_toks" not in generation and HFLM.max_gen_toks.fget(None) == protocol.max_new_tokens
    assert [(f["name"], [step["function"] for step in f["filter"]], f["filter"][0]["regex_pattern"],
             f["filter"][0].get("group_select", 0)) for f in config.filter_list] == \
        [(f.name, ["regex", "take_first"], f.regex, f.group_select) for f in protocol.filters]
    (metric,) = config.metric_list
    assert (metric["metric"], metric["ignore_case"], metric["ignore_punctuation"], metric["regexes_to_ignore"]) == \
        ("exact_match", protocol.ignore_case, protocol.ignore_punctuation, list(protocol.regexes_to_ignore))
    assert [task.doc_to_target(row) for row in TEST] == [P.target(protocol, row) for row in TEST]


def test_fewshot_draws_are_lm_evals_sampler(tasks):
    from lm_eval.api.samplers import ContextSampler

    task = tasks["lm_eval_gsm8k"]
    task.set_fewshot_seed(P.LM_EVAL_GSM8K.fewshot_seed)
    drawn = [[(d["question"], d["answer"]) for d in task.sampler.sample(n=5)] for _ in range(N)]
    assert drawn == P.fewshot_examples(P.LM_EVAL_GSM8K, TRAIN, N)
    pool = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(200)]
    sampler = ContextSampler(pool, rnd=None).set_rnd(1234)
    assert [[(d["question"], d["answer"]) for d in sampler.sample(n=5)] for _ in range(30)] == \
        P.fewshot_examples(P.LM_EVAL_GSM8K, pool, 30)


# ---------------------------------------------------------------- hand-written completions

def lm_eval_scores(task, row, response):
    """lm-eval's filter pipelines and exact_match on one response: {filter: (answer, exact_match)}."""
    from lm_eval.api.instance import Instance

    instance = Instance("generate_until", doc=row, arguments=("", {}), idx=0, metadata=(task.config.task, 0, 1))
    instance.resps = [response]
    for ensemble in task._filters:
        ensemble.apply([instance])
    return {f: (answer, task.process_results(row, [answer])["exact_match"])
            for f, answer in instance.filtered_resps.items()}


def our_scores(protocol, row, response):
    strict, flexible = P.extract(protocol, response)
    return {"strict-match": (strict, float(P.is_correct(protocol, strict, row))),
            "flexible-extract": (flexible, float(P.is_correct(protocol, flexible, row)))}


# (protocol, test row, completion, (strict right, flexible right))
COMPLETIONS = [
    ("lm_eval_gsm8k", 0, TEST[0]["answer"], (1, 1)),
    ("lm_eval_gsm8k", 2, "So he made a profit of 200,000-130,000=$70,000\n#### 70,000", (1, 1)),
    ("lm_eval_gsm8k", 2, "The profit is $70,000.", (0, 1)),
    ("lm_eval_gsm8k", 2, "#### $70000", (0, 1)),            # strict's class has no '$'
    ("lm_eval_gsm8k", 1, "2 + 1 = 3\n#### 3.", (1, 1)),
    ("lm_eval_gsm8k", 1, "#### 3.0", (0, 0)),               # a string match
    ("lm_eval_gsm8k", 1, "#### 2\nNo wait, it is 3", (0, 1)),
    ("lm_eval_gsm8k", 3, "#### -540", (0, 0)),
    ("lm_eval_gsm8k", 3, "####540", (0, 1)),
    ("lm_eval_gsm8k", 4, "I do not know.", (0, 0)),
    ("lm_eval_gsm8k", 4, "", (0, 0)),
    ("lm_eval_gsm8k", 4, "Hmm... 60-15-25 = 20...", (0, 0)),  # flexible takes the trailing "..."
    ("lm_eval_gsm8k", 5, "He pays $64.00 in total.\n#### $64", (0, 1)),  # flexible: "$64" (last), not "64.00"
    ("lm_eval_gsm8k", 6, "36-10=<<36-10=26>>26\n#### 26", (1, 1)),
    ("lm_eval_gsm8k", 7, "7.5-2.25=5.25\n#### 5.25", (1, 1)),
    ("lm_eval_gsm8k", 7, "#### 5.250", (0, 0)),
    ("lm_eval_gsm8k_cot_llama", 0, "16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The final answer is 18", (1, 1)),
    ("lm_eval_gsm8k_cot_llama", 0, "The final answer is $18.", (1, 1)),
    ("lm_eval_gsm8k_cot_llama", 0, "The final answer is 17. No: The final answer is 18", (1, 1)),
    ("lm_eval_gsm8k_cot_llama", 0, "The final answer is 18. Then 19 more", (1, 0)),
    ("lm_eval_gsm8k_cot_llama", 1, "the final answer is 3", (0, 1)),   # case matters to the regex
    ("lm_eval_gsm8k_cot_llama", 1, "The final answer is: 3", (0, 1)),
    ("lm_eval_gsm8k_cot_llama", 2, "The final answer is 70,000", (1, 1)),
    ("lm_eval_gsm8k_cot_llama", 3, "The final answer is 54O", (0, 0)),
    ("lm_eval_gsm8k_cot_llama", 7, "7.5 - 2.25 = 5.25. The final answer is 5.25", (1, 1)),
    ("lm_eval_gsm8k_cot_llama", 6, "The final answer is -26", (0, 0)),
]


@pytest.mark.parametrize("name, index, completion, right", COMPLETIONS)
def test_hand_written_completions_score_as_in_lm_eval(tasks, name, index, completion, right):
    lm_eval = lm_eval_scores(tasks[name], TEST[index], completion)
    assert our_scores(P.LM_EVAL_PROTOCOLS[name], TEST[index], completion) == lm_eval
    assert (lm_eval["strict-match"][1], lm_eval["flexible-extract"][1]) == right


# Raw decoded generations of a reasoning model (lm-eval: think_end_token=</think>).
THINKING = [
    (0, "<think>16-3-4=9 and 9*2=18</think>\n\n#### 18"),
    (0, "<think>maybe 17</think>#### 17"),
    (0, "<think>first 17</think> no </think>  #### 18"),              # after the LAST marker
    (0, "<think>16-3-4=9 eggs, 9*2=18 dollars"),                      # never closed
    (0, "<think>ok</think>#### 18\n\nQuestion: Tom has 3"),           # stop after the answer
    (1, "<think>Question: is it 3"),                                  # stop inside the thinking
    (1, "<think>3</think>"),                                          # closed, nothing after
]


@pytest.mark.parametrize("index, text", THINKING)
def test_thinking_is_cut_as_lm_evals_hf_backend_does(tasks, ours, index, text):
    from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text

    tokenizer, _ = ours
    until = handle_stop_sequences(list(P.LM_EVAL_GSM8K.until), eos=tokenizer.eos_token)
    stop = P.stop_strings(P.LM_EVAL_GSM8K, tokenizer)
    assert stop == until
    lm_eval_response = postprocess_generated_text(text, until, "</think>")
    keep = P.with_thinking(P.LM_EVAL_GSM8K, "</think>", 256, unclosed_thinking="keep")
    assert P.cut_generation(keep, text, stop) == lm_eval_response
    assert our_scores(keep, TEST[index], lm_eval_response) == lm_eval_scores(tasks["lm_eval_gsm8k"], TEST[index],
                                                                             lm_eval_response)
    no_answer = P.with_thinking(P.LM_EVAL_GSM8K, "</think>", 256)  # the default: unclosed is no answer
    assert P.cut_generation(no_answer, text, stop) == (lm_eval_response if "</think>" in text else "")


@pytest.mark.parametrize("until, text", [
    (P.LM_EVAL_GSM8K.until + ("</s>",), "#### 18\n\nQuestion: next</s>"),
    (P.LM_EVAL_GSM8K_COT_LLAMA.until, "The final answer is 5\nQ: next<|eot_id|>"),
    (P.LM_EVAL_GSM8K_COT_LLAMA.until, "a<|start_header_id|>user<|end_header_id|>b"),
    (("Yc", "bXY"), "abXYc"),   # stops applied in turn: "abX", where the earliest match would give "a"
    (("", "x"), "axb"),         # an empty stop (seq2seq EOS) is skipped
])
def test_stops_cut_as_lm_eval(until, text):
    from lm_eval.models.utils import postprocess_generated_text

    protocol = dataclasses.replace(P.LM_EVAL_GSM8K, until=until)
    assert P.cut_generation(protocol, text, list(until)) == postprocess_generated_text(text, list(until), None)


@pytest.mark.parametrize("prediction, reference", [
    ("72", "... #### 72"), ("72 ", "72"), ("72\n", "72"), ("72\x00", "72"), ("1,000.", "$1000"),
    ("ABC", "abc"), ("3.50", "3.5"), ("[invalid]", "#### 5"), ("5..", "5."), ("-7", "#### 7"),
])
def test_exact_match_is_lm_evals_metric(tasks, prediction, reference):
    from lm_eval.api.metrics import exact_match_hf_evaluate

    (metric,) = tasks["lm_eval_gsm8k"].config.metric_list
    kwargs = {k: v for k, v in metric.items() if k not in ("metric", "aggregation", "higher_is_better")}
    expected = exact_match_hf_evaluate(predictions=[prediction], references=[reference], **kwargs)["exact_match"]
    assert float(P.is_correct(P.LM_EVAL_GSM8K, prediction, {"answer": reference})) == expected


# ---------------------------------------------------------------- the whole chain, run by lm-eval

@pytest.mark.parametrize("name", NAMES)
def test_lm_eval_run_agrees_question_by_question(ours, lm_eval_runs, name):
    """lm-eval's own run against the evaluate stage's predictions file, question by question."""
    from lm_eval.models.utils import handle_stop_sequences

    from stages.evaluate import prompt_digest

    tokenizer, by_protocol = ours
    plan, (metrics, predictions, run_info), batched = by_protocol[name]
    lm, runs = lm_eval_runs
    docs, aggregate = runs[name]
    protocol = plan.protocol
    # How lm-eval's HF backend turns a request into ids and stops, on the instance that ran it.
    assert P.context_limit(lm.model.config, lm.tokenizer, protocol) == lm.max_length - lm.max_gen_toks
    assert plan.stop == handle_stop_sequences(list(protocol.until), eos=lm.tok_decode(lm.eot_token_id,
                                                                                     skip_special_tokens=False))
    agree = {"prompt": 0, "ids": 0, "generation": 0, "strict-match": 0, "flexible-extract": 0}
    for i, (samples, record) in enumerate(zip(docs, predictions)):
        logged = samples["strict-match"]
        context, gen_kwargs = logged["arguments"][0]
        ids, _ = lm.tok_batch_encode([context], left_truncate_len=lm.max_length - lm.max_gen_toks)
        agree["prompt"] += record["prompt_sha256"] == prompt_digest(context) and context == plan.prompts[i] \
            and gen_kwargs["until"] == list(protocol.until) and record["protocol"] == name
        agree["ids"] += ids[0].tolist() == plan.input_ids[i]
        agree["generation"] += record["response"] == logged["resps"][0][0]
        for f, answer, correct in (("strict-match", "extracted", "correct"),
                                   ("flexible-extract", "extracted_flexible", "correct_flexible")):
            agree[f] += (record[answer], float(record[correct])) == \
                (samples[f]["filtered_resps"][0], samples[f]["exact_match"]) \
                and samples[f]["target"] == P.target(protocol, TEST[i])
    limit = P.context_limit(lm.model.config, lm.tokenizer, protocol)
    truncated = sum(len(ids) == limit for ids in plan.input_ids)
    same_batched = sum(a["generated"] == b["generated"] for a, b in zip(predictions, batched[1]))
    print(f"\n{name}: of {N} questions, agree on {agree} ({truncated} prompts left-truncated to {limit} tokens); "
          f"exact_match ours {metrics['exact_match']} / flexible {run_info['exact_match_flexible']}, lm-eval "
          f"{aggregate['exact_match,strict-match']} / {aggregate['exact_match,flexible-extract']}; "
          f"batch {N} vs batch 1: {same_batched} of {N} generations identical")
    assert agree == dict.fromkeys(agree, N)
    assert metrics == {"exact_match": run_info["exact_match"], "n": N}
    assert (run_info["exact_match"], run_info["exact_match_flexible"]) == \
        (aggregate["exact_match,strict-match"], aggregate["exact_match,flexible-extract"])
    assert run_info["protocol"]["name"] == name and run_info["truncated_prompts"] \
        == truncated
    # Padding all questions into one batch moved nothing on the tiny model (float32).
    assert same_batched == N and batched[0] == metrics
    if protocol.chat:
        # The 8 exemplars outgrow the tiny model's 2048 - 256 tokens: lm-eval's left truncation is compared too.
        assert truncated == N


def test_lm_eval_think_end_token_agrees(tiny_model_dir, tmp_path, lm_eval_runs):
    """evaluate.think_end with unclosed_thinking: keep is lm-eval's think_end_token, through the stage."""
    _, runs = lm_eval_runs
    marker, (docs, aggregate) = runs["think"]
    _, predictions, run_info = run_evaluate(tmp_path, tiny_model_dir, "lm_eval_gsm8k", think_end=marker,
                                            unclosed_thinking="keep")
    agree = sum(record["response"] == samples["strict-match"]["resps"][0][0]
                and (record["extracted_flexible"], float(record["correct_flexible"]))
                == (samples["flexible-extract"]["filtered_resps"][0], samples["flexible-extract"]["exact_match"])
                for record, samples in zip(predictions, docs))
    closed = sum(record["thinking_closed"] for record in predictions)
    print(f"\nthink_end_token={marker!r}: closed in {closed} of {N}; agree on {agree} of {N}")
    assert agree == N and closed >= 1
    assert run_info["exact_match_flexible"] == aggregate["exact_match,flexible-extract"]
