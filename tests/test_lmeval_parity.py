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


@pytest.fixture(scope="module")
def ours(tiny_model_dir):
    """Our plan for each protocol and our own greedy generation from our ids (transformers'
    generate, float32, lm-eval's stops and budget)."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    out = {}
    for name in NAMES:
        plan = P.plan(P.LM_EVAL_PROTOCOLS[name], tokenizer, model.config, TEST, TRAIN)
        out[name] = plan, [generate(model, tokenizer, ids, plan) for ids in plan.input_ids]
    return tokenizer, out


def generate(model, tokenizer, ids, plan) -> str:
    import torch
    from transformers import StoppingCriteriaList, StopStringCriteria

    with torch.inference_mode():
        new = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             max_new_tokens=plan.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id,
                             stopping_criteria=StoppingCriteriaList([StopStringCriteria(tokenizer, plan.stop)]))
    return tokenizer.decode(new[0, len(ids):].tolist(), skip_special_tokens=True)


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
        return [by_doc[i] for i in range(N)]

    model_args = {"pretrained": str(tiny_model_dir), "device": "cpu", "dtype": "float32", "batch_size": 1}
    lm = HFLM(**model_args)
    runs = {name: run(lm, name) for name in NAMES}
    marker = think_marker(ours[1]["lm_eval_gsm8k"][1][0])
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
    ("lm_eval_gsm8k_cot_llama", 0, "16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The final answer is 18", (1, 1)),
    ("lm_eval_gsm8k_cot_llama", 0, "The final answer is $18.", (1, 1)),
    ("lm_eval_gsm8k_cot_llama", 0, "The final answer is 17. No: The final answer is 18", (1, 1)),
    ("lm_eval_gsm8k_cot_llama", 0, "The final answer is 18. Then 19 more", (1, 0)),
    ("lm_eval_gsm8k_cot_llama", 1, "the final answer is 3", (0, 1)),   # case matters to the regex
    ("lm_eval_gsm8k_cot_llama", 1, "The final answer is: 3", (0, 1)),
    ("lm_eval_gsm8k_cot_llama", 2, "The final answer is 70,000", (1, 1)),
    ("lm_eval_gsm8k_cot_llama", 3, "The final answer is 54O", (0, 0)),
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
    from lm_eval.models.utils import handle_stop_sequences

    tokenizer, by_protocol = ours
    plan, generated = by_protocol[name]
    lm, runs = lm_eval_runs
    protocol = plan.protocol
    # How lm-eval's HF backend turns a request into ids and stops, on the instance that ran it.
    assert P.context_limit(lm.model.config, lm.tokenizer, protocol) == lm.max_length - lm.max_gen_toks
    assert plan.stop == handle_stop_sequences(list(protocol.until), eos=lm.tok_decode(lm.eot_token_id,
                                                                                     skip_special_tokens=False))
    agree = {"prompt": 0, "ids": 0, "generation": 0, "strict-match": 0, "flexible-extract": 0}
    for i, samples in enumerate(runs[name]):
        logged = samples["strict-match"]
        context, gen_kwargs = logged["arguments"][0]
        response = logged["resps"][0][0]
        ids, _ = lm.tok_batch_encode([context], left_truncate_len=lm.max_length - lm.max_gen_toks)
        agree["prompt"] += context == plan.prompts[i] and gen_kwargs["until"] == list(protocol.until)
        agree["ids"] += ids[0].tolist() == plan.input_ids[i]
        agree["generation"] += P.cut_generation(protocol, generated[i], plan.stop) == response
        ours_scored = our_scores(protocol, TEST[i], P.cut_generation(protocol, response, plan.stop))
        for f in ("strict-match", "flexible-extract"):
            agree[f] += ours_scored[f] == (samples[f]["filtered_resps"][0], samples[f]["exact_match"]) \
                and samples[f]["target"] == P.target(protocol, TEST[i])
    limit = P.context_limit(lm.model.config, lm.tokenizer, protocol)
    truncated = sum(len(ids) == limit for ids in plan.input_ids)
    print(f"\n{name}: of {N} questions, agree on {agree} ({truncated} prompts left-truncated to {limit} tokens)")
    assert agree == dict.fromkeys(agree, N)
    if protocol.chat:
        # The 8 exemplars outgrow the tiny model's 2048 - 256 tokens: lm-eval's left truncation is compared too.
        assert truncated == N


def test_lm_eval_think_end_token_agrees(ours, lm_eval_runs):
    tokenizer, by_protocol = ours
    plan, generated = by_protocol["lm_eval_gsm8k"]
    _, runs = lm_eval_runs
    marker, run = runs["think"]
    keep = P.with_thinking(P.LM_EVAL_GSM8K, marker, P.LM_EVAL_GSM8K.max_new_tokens, unclosed_thinking="keep")
    agree = sum(P.cut_generation(keep, text, plan.stop) == samples["strict-match"]["resps"][0][0]
                and our_scores(keep, row, P.cut_generation(keep, text, plan.stop))["flexible-extract"]
                == (samples["flexible-extract"]["filtered_resps"][0], samples["flexible-extract"]["exact_match"])
                for text, samples, row in zip(generated, run, TEST))
    closed = sum(marker in text for text in generated)
    print(f"\nthink_end_token={marker!r}: closed in {closed} of {N}; agree on {agree} of {N}")
    assert agree == N and closed >= 1
