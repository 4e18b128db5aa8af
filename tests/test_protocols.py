"""stages/protocols.py on its own: prompts, few-shot draws, encoding, cut, extraction, scoring and
the one-line errors. What lm-eval itself does with the same inputs is tests/test_lmeval_parity.py."""
import dataclasses
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from stages import protocols as P
from stages.config import DEFAULT_TEMPLATE, EvaluateParams, PromptParams
from stages.io import UserError, read_jsonl
HERE = Path(__file__).parent
TRAIN = read_jsonl(HERE / "gsm8k_rows_train.jsonl")  # real GSM8K rows (train[0..9])
TEST = read_jsonl(HERE / "gsm8k_rows_test.jsonl")    # and test[0..4]
NATALIA = TRAIN[0]["answer"]
GSM8K, COT = P.LM_EVAL_GSM8K, P.LM_EVAL_GSM8K_COT_LLAMA
STOP = list(GSM8K.until)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from stages.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_lm_eval_gsm8k_prompt_is_examples_then_the_question():
    prompt = P.render_prompt(GSM8K, None, "How many? ", [("Q1?", NATALIA), ("Q2?", "B\n#### 2")])
    assert prompt == ("Question: Q1?\nAnswer: " + NATALIA + "\n\n"
                      "Question: Q2?\nAnswer: B\n#### 2\n\n"
                      "Question: How many? \nAnswer:")  # lm-eval does not strip the question


def test_cot_llama_prompt_is_multiturn_chat(tokenizer):
    one_shot = dataclasses.replace(COT, num_fewshot=1)
    (examples,) = P.fewshot_examples(one_shot, [], 1)
    prompt = P.render_prompt(one_shot, tokenizer, "Q?", examples)
    instruction = "Given the following problem, reason and give a final answer to the problem.\nProblem: "
    ending = ("\nYour response should end with \"The final answer is [answer]\" where [answer] is the response "
              "to the problem.\n")
    # The tiny template: "<s>", then "role: content" + "\n" (user) or "</s>" (assistant).
    assert prompt == (f"<s>user: {instruction}{P.COT_LLAMA_EXEMPLARS[0][0]}{ending}\n"
                      f"assistant: {P.COT_LLAMA_EXEMPLARS[0][1]}</s>"
                      f"user: {instruction}Q?{ending}\nassistant: ")


def test_default_sampler_gives_question_i_the_ith_seeded_draw():
    pool = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(50)]
    draws = P.fewshot_examples(GSM8K, pool, 4)
    rnd = random.Random(1234)
    assert draws == [[(r["question"], r["answer"]) for r in rnd.sample(pool, 5)] for _ in range(4)]
    assert len({tuple(d) for d in draws}) == 4
    assert P.fewshot_examples(GSM8K, pool, 2) == draws[:2]  # evaluate.limit keeps the same examples


def test_first_n_sampler_gives_every_question_the_fixed_exemplars():
    draws = P.fewshot_examples(COT, [], 3)
    assert draws == [list(P.COT_LLAMA_EXEMPLARS)] * 3 and len(draws[0]) == 8


@pytest.mark.parametrize("chat, kwargs", [(False, {}), (True, {}), (True, {"enable_thinking": False})])
def test_train_prompt_is_what_training_saw(tokenizer, chat, kwargs):
    from stages.modeling import encode_prompt, render_prompt

    prompt_p = PromptParams(chat=chat, chat_template_kwargs=kwargs)
    protocol = P.get_protocol("train_prompt", prompt_p, EvaluateParams())
    question = "  Natalia sold 48 clips. How many?\n"
    text = P.render_prompt(protocol, tokenizer, question, [])
    assert text == render_prompt(tokenizer, prompt_p, question)
    assert P.encode_context(tokenizer, text, protocol, 10_000) == encode_prompt(tokenizer, text, prompt_p)
    assert (protocol.until, protocol.max_new_tokens) == (P.TRAIN_PROMPT_STOP, P.TRAIN_PROMPT_MAX_NEW_TOKENS)


def test_train_prompt_template_keeps_literal_braces():
    protocol = P.train_prompt("{{x}} {question} and {question}", False, {}, [], 8)
    assert P.render_text(protocol, " q ") == "{x} q and q"


def test_encode_context_adds_bos_once_and_truncates_on_the_left(tokenizer):
    bos = tokenizer.bos_token_id
    plain = P.encode_context(tokenizer, "Question: x\nAnswer:", GSM8K, 10_000)
    chat_text = P.render_prompt(COT, tokenizer, "x", [])
    chat = P.encode_context(tokenizer, chat_text, COT, 10_000)
    assert plain[0] == bos and plain[1] != bos
    assert chat[0] == bos and chat[1] != bos  # the template wrote it; none added
    assert P.encode_context(tokenizer, chat_text, COT, 5) == chat[-5:]


@pytest.mark.parametrize("config, model_max_length, limit", [
    ({"max_position_embeddings": 2048}, 10, 1792),
    ({"n_positions": 1024, "max_position_embeddings": 2048}, 10, 768),   # lm-eval's order
    ({"text_config": {"max_position_embeddings": 4096}, "max_position_embeddings": 1200}, 10, 3840),
    ({}, 512, 256),                                                       # the tokenizer's
    ({}, P.TOKENIZER_INFINITY, 1792),                                     # nobody says: 2048
])
def test_context_limit(config, model_max_length, limit):
    assert P.context_limit(config, SimpleNamespace(model_max_length=model_max_length), GSM8K) == limit


def test_stop_strings_add_eos_once(tokenizer):
    assert P.stop_strings(GSM8K, tokenizer) == ["Question:", "</s>", "<|im_end|>"]
    assert P.stop_strings(dataclasses.replace(GSM8K, until=("Q:",)), tokenizer) == ["Q:", "</s>"]


THINK = P.with_thinking(GSM8K, "</think>", 4096)
KEEP = P.with_thinking(GSM8K, "</think>", 4096, unclosed_thinking="keep")


@pytest.mark.parametrize("protocol, text, response", [
    (GSM8K, "#### 18\n\nQuestion: Tom has", "#### 18\n\n"),
    (GSM8K, "a</s>b<|im_end|>c", "a"),
    (THINK, "<think>so 17?</think>\n\n#### 18", "#### 18"),                 # after the marker, lstripped
    (THINK, "a</think>b</think>  #### 18", "#### 18"),                      # after the LAST marker
    (THINK, "thinking about 17 and never closing", ""),                     # unclosed: no answer
    (KEEP, "thinking about 17 and never closing", "thinking about 17 and never closing"),  # lm-eval's way
    (THINK, "Question: in thought</think>#### 3", "#### 3"),                # thinking first, then the stops
    (dataclasses.replace(GSM8K, until=("Yc", "bXY")), "abXYc", "abX"),       # each stop in turn, not earliest
])
def test_cut_generation(protocol, text, response):
    assert P.cut_generation(protocol, text, list(protocol.until)) == response


@pytest.mark.parametrize("protocol, text, strict, flexible", [
    (GSM8K, NATALIA, "72", "72"),
    (GSM8K, "#### 1,234.\nso $1,234.", "1,234.", "$1,234."),   # cleaning is the metric's job
    (GSM8K, "#### 3\n#### 5", "3", "5"),
    (GSM8K, "no number", P.INVALID, P.INVALID),
    (GSM8K, "Hmm... ", P.INVALID, "..."),
    (COT, "So 3. The final answer is 4. The final answer is $5", "$5", "$5"),  # strict: the LAST one
    (COT, "The final answer is -7\n", "-7", "-7"),
    (COT, "The answer is 8", P.INVALID, "8"),
])
def test_extract(protocol, text, strict, flexible):
    assert P.extract(protocol, text) == (strict, flexible)


@pytest.mark.parametrize("protocol, answer, row, correct", [
    (GSM8K, "18", TEST[0], True),
    (GSM8K, "70,000.", TEST[2], True),
    (GSM8K, "$70000", TEST[2], True),
    (GSM8K, "7000", TEST[2], False),
    (GSM8K, P.INVALID, TEST[0], False),
    (COT, "18", TEST[0], True),
    (COT, "18.0", TEST[0], False),   # string match, as lm-eval
    (GSM8K, "3.50", {"answer": "#### 3.5"}, False),
])
def test_is_correct(protocol, answer, row, correct):
    assert P.is_correct(protocol, answer, row) is correct


@pytest.mark.parametrize("text", [NATALIA, "So the total is 1,234.\n#### 1,234", "It costs $5.", "#### $5",
                                  "The balance is -7\n#### -7", "Each costs 3.50\n#### 3.50", "#### 42.",
                                  "#### 3\n#### 5", "The answer is 8. Hope that helps!", "I do not know", ""])
@pytest.mark.parametrize("gold", ["72", "1234", "5", "-7", "3.50", "42", "8"])
def test_train_prompt_scores_as_stages_gsm8k(text, gold):
    from stages.gsm8k import flexible_answer, is_correct, strict_answer

    protocol = P.get_protocol("train_prompt", PromptParams(), EvaluateParams())
    strict, flexible = P.extract(protocol, text)
    row = {"answer": f"...\n#### {gold}"}
    assert P.is_correct(protocol, strict, row) == is_correct(strict_answer(text), gold)
    assert P.is_correct(protocol, flexible, row) == is_correct(flexible_answer(text), gold)


def test_prediction_records_and_score():
    records = [P.prediction_record(THINK, TEST[0], "<think>17?</think>#### 18\n\nQuestion: x", STOP),
               P.prediction_record(THINK, TEST[1], "I think 3", STOP),
               P.prediction_record(THINK, TEST[1], "</think>It is 3", STOP)]
    assert records[0] == {"question": TEST[0]["question"], "gold": "18",
                          "generated": "<think>17?</think>#### 18\n\nQuestion: x", "response": "#### 18\n\n",
                          "extracted": "18", "extracted_flexible": "18", "correct": True, "correct_flexible": True,
                          "thinking_closed": True}
    assert (records[1]["response"], records[1]["correct_flexible"], records[1]["thinking_closed"]) == ("", False, False)
    assert P.score(records) == {"exact_match": 1 / 3, "exact_match_flexible": 2 / 3, "n": 3, "correct": 1,
                                "correct_flexible": 2, "no_answer_rate": 2 / 3}


def test_plan_builds_every_prompt(tokenizer):
    plan = P.plan(GSM8K, tokenizer, {"max_position_embeddings": 2048}, TEST, TRAIN)
    assert len(plan.prompts) == len(TEST) and plan.prompts[0].endswith("Question: " + TEST[0]["question"] + "\nAnswer:")
    assert plan.prompts[0].count("Question: ") == 6 and plan.max_new_tokens == 256
    assert plan.input_ids[0] == P.encode_context(tokenizer, plan.prompts[0], GSM8K, 1792)
    assert plan.stop == ["Question:", "</s>", "<|im_end|>"]
    assert plan.truncated == 0


def test_plan_counts_the_prompts_it_cut(tokenizer):
    """A prompt of exactly the limit keeps every token: it is not counted as cut; one token more is."""
    lengths = [len(P.encode_context(tokenizer, P.render_prompt(GSM8K, tokenizer, row["question"], []), GSM8K, None))
               for row in TEST[:2]]
    zero_shot = dataclasses.replace(GSM8K, num_fewshot=0)
    for limit, cut in ((max(lengths), 0), (max(lengths) - 1, 1)):
        plan = P.plan(zero_shot, tokenizer, {"max_position_embeddings": limit + 256}, TEST[:2], [])
        assert plan.context_limit == limit and plan.truncated == cut
        assert max(len(ids) for ids in plan.input_ids) == limit


# Qwen3's template in short: enable_thinking false writes a closed, empty thinking block after the question.
QWEN3_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n"
              "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
              "{% endif %}")


def test_think_end_that_the_prompt_already_closes_is_refused(tokenizer):
    """With enable_thinking: false the model never writes </think> (the template did): every answer
    would have been an unclosed thinking, exact match 0."""
    import copy

    qwen = copy.deepcopy(tokenizer)
    qwen.chat_template = QWEN3_LIKE
    thinking = P.with_thinking(P.train_prompt(DEFAULT_TEMPLATE, True, {}, P.TRAIN_PROMPT_STOP, 64), "</think>", 64)
    assert len(P.plan(thinking, qwen, {}, TEST, []).prompts) == len(TEST)  # thinking on: the model closes it
    closed = P.with_thinking(P.train_prompt(DEFAULT_TEMPLATE, True, {"enable_thinking": False}, P.TRAIN_PROMPT_STOP,
                                            64), "</think>", 64)
    with pytest.raises(UserError, match=r"^params\.yaml: evaluate\.think_end: the prompt itself already holds "
                                        r"'</think>' \(the chat template closed the thinking"):
        P.plan(closed, qwen, {}, TEST, [])


def test_a_chat_template_that_writes_todays_date_needs_a_fixed_one(tokenizer):
    """Llama 3.2's template writes strftime_now's date unless given date_string: training and evaluation on
    other days rendered other prompts from the same params."""
    import copy

    from stages.modeling import render_prompt

    dated = copy.deepcopy(tokenizer)
    dated.chat_template = ("{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}"
                           "{% endif %}Today: {{ date_string }}\n" + tokenizer.chat_template)
    message = r"^params\.yaml: prompt\.chat_template_kwargs: the chat template writes today's date into every prompt"
    with pytest.raises(UserError, match=message):
        render_prompt(dated, PromptParams(chat=True), "q")  # training's rendering
    with pytest.raises(UserError, match=message):
        P.plan(P.train_prompt(DEFAULT_TEMPLATE, True, {}, P.TRAIN_PROMPT_STOP, 64), dated, {}, TEST, [])
    fixed = {"date_string": "26 Jul 2024"}
    prompt = render_prompt(dated, PromptParams(chat=True, chat_template_kwargs=fixed), "q")
    assert prompt.startswith("Today: 26 Jul 2024\n")
    assert P.plan(P.train_prompt(DEFAULT_TEMPLATE, True, fixed, P.TRAIN_PROMPT_STOP, 64), dated, {}, TEST, []).prompts
    # A template that writes the date whatever it is given (Granite's kind): date_string does not pin it.
    always = copy.deepcopy(tokenizer)
    always.chat_template = "Today's Date: {{ strftime_now('%B %d, %Y') }}.\n" + tokenizer.chat_template
    with pytest.raises(UserError, match=message):
        render_prompt(always, PromptParams(chat=True, chat_template_kwargs=fixed), "q")


def test_settings_say_what_the_number_depends_on():
    s = P.settings(GSM8K)
    assert (s["name"], s["num_fewshot"], s["fewshot_seed"], s["max_new_tokens"], s["chat"]) == \
        ("lm_eval_gsm8k", 5, 1234, 256, False)
    assert s["filters"][0] == {"name": "strict-match", "regex": r"#### (\-?[0-9\.\,]+)", "group_select": 0,
                               "fallback": "[invalid]"}


class NoTemplate:
    chat_template = None


class SpecialThinkTokenizer:
    """Decoding with skip_special_tokens drops '</think>'."""
    chat_template = "x"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [7]}

    def decode(self, ids, skip_special_tokens=False):
        return "" if skip_special_tokens else "</think>"


OVERLAP = TRAIN[:4] + [dict(TEST[1], question="a ROBE takes 2 bolts of blue fiber and half that much white fiber. "
                                               "How many bolts in total does it take?")]


@pytest.mark.parametrize("call, message", [
    (lambda: P.get_protocol("lm_eval_gsm8", PromptParams(), EvaluateParams()),
     "params.yaml: evaluate.protocol: unknown protocol 'lm_eval_gsm8' (did you mean 'lm_eval_gsm8k'?)"),
    (lambda: P.get_protocol("mmlu", PromptParams(), EvaluateParams()),
     "params.yaml: evaluate.protocol: unknown protocol 'mmlu' (known: train_prompt, lm_eval_gsm8k, "
     "lm_eval_gsm8k_cot_llama)"),
    (lambda: P.plan(COT, NoTemplate(), {}, TEST, TRAIN),
     "params.yaml: evaluate.protocol: lm_eval_gsm8k_cot_llama renders through a chat template, but the tokenizer "
     "has no chat template"),
    (lambda: P.plan(P.train_prompt(DEFAULT_TEMPLATE, True, {}, [], 8), NoTemplate(), {}, TEST, TRAIN),
     "params.yaml: prompt.chat: train_prompt renders through a chat template, but the tokenizer has no chat template"),
    (lambda: P.plan(GSM8K, NoTemplate(), {}, TEST, TRAIN[:4], where="data/gsm8k_fewshot.jsonl"),
     "params.yaml: evaluate.protocol: lm_eval_gsm8k draws 5 few-shot examples but data/gsm8k_fewshot.jsonl has 4 rows"),
    (lambda: P.plan(GSM8K, NoTemplate(), {}, TEST, TRAIN[:5] + [{"question": "q"}], where="pool.jsonl"),
     "pool.jsonl:6: a few-shot row needs string fields 'question' and 'answer'"),
    (lambda: P.plan(GSM8K, NoTemplate(), {}, TEST, OVERLAP),
     "params.yaml: evaluate.protocol: lm_eval_gsm8k: a few-shot example of question 1 is itself an evaluated "
     "question ('a ROBE takes 2 bolts of blue fiber and half that much white '…); evaluated questions must "
     "never be examples: use a few-shot pool without them"),
    (lambda: P.plan(COT, SimpleNamespace(chat_template="x"), {}, [{"question": P.COT_LLAMA_EXEMPLARS[7][0]}], []),
     "params.yaml: evaluate.protocol: lm_eval_gsm8k_cot_llama: a few-shot example of question 1 is itself an "
     "evaluated question ('Olivia has $23. She bought five bagels for $3 each. How much'…); evaluated questions "
     "must never be examples: use a few-shot pool without them"),
    (lambda: P.plan(P.with_thinking(COT, "</think>", 64), SpecialThinkTokenizer(), {}, TEST, TRAIN),
     "params.yaml: evaluate.think_end: '</think>' does not survive decoding with skip_special_tokens (a special "
     "token?), so it could never be found in the text"),
    (lambda: P.context_limit({"max_position_embeddings": 256}, None, GSM8K),
     "params.yaml: evaluate.max_new_tokens: 256 leaves no room for the prompt in the model's 256 tokens; "
     "use a value < 256"),
    (lambda: P.with_thinking(GSM8K, "", 64), "params.yaml: evaluate.think_end: must be a non-empty marker"),
    (lambda: P.with_thinking(GSM8K, "</think>", 0), "params.yaml: evaluate.max_new_tokens: must be > 0, got 0"),
    (lambda: P.with_thinking(GSM8K, "</think>", 9, "drop"),
     "params.yaml: evaluate.unclosed_thinking: must be no_answer or keep, got 'drop'"),
])
def test_bad_input_is_one_line_naming_the_key(call, message):
    with pytest.raises(UserError) as error:
        call()
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_the_overlap_check_looks_at_the_examples_drawn():
    """A pool row equal to an evaluated question is fine as long as it is never drawn."""
    pool = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(40)]
    drawn = {q for exs in P.fewshot_examples(GSM8K, pool, 1) for q, _ in exs}
    never = next(r for r in pool if r["question"] not in drawn)
    P.check_no_overlap(GSM8K, [never], P.fewshot_examples(GSM8K, pool, 1))
    with pytest.raises(UserError, match="a few-shot example of question 1"):
        P.check_no_overlap(GSM8K, [{"question": sorted(drawn)[0]}], P.fewshot_examples(GSM8K, pool, 1))


def test_chat_template_kwargs_reach_chat_protocols_only():
    prompt_p = PromptParams(chat_template_kwargs={"enable_thinking": False})
    assert P.get_protocol("lm_eval_gsm8k_cot_llama", prompt_p, EvaluateParams()).chat_template_kwargs == \
        (("enable_thinking", False),)
    assert P.get_protocol("lm_eval_gsm8k", prompt_p, EvaluateParams()) is GSM8K


def test_importing_protocols_loads_no_heavy_library():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, stages.protocols; "
            "print(sorted({'torch', 'transformers', 'lm_eval', 'numpy', 'jinja2'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
