"""Chat and reasoning models (prompt.chat: true): the training row's completion is the chat template's
own assistant turn (no leading space, its end-of-turn token), prompt.chat_template_kwargs reach every
rendering, and evaluation stops on every end id the model's generation_config lists."""

import pytest

from stages.config import EvaluateParams, ModelParams, PromptParams
from stages.io import UserError

# Qwen3's shape: ChatML turns ending in <|im_end|> (not the tokenizer's EOS); the last assistant turn
# starts with an empty think block, which the generation prompt writes only with enable_thinking false.
QWEN_STYLE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# DeepSeek-R1's shape: the generation prompt opens a think block that the rendered answer lacks.
OPENS_THINKING = (
    "{%- for message in messages %}{{- message['role'] + ': ' + message['content'] + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'assistant: <think>\\n' }}{%- endif %}"
)
ROW = {"question": "Sam has 3 pens and buys 5 more. How many pens?", "answer": "3 + 5 = 8 pens.\n#### 8"}


@pytest.fixture(scope="module")
def chatml_dir(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model with Qwen-style chat tokens and template, and Qwen's generation_config
    listing [<|im_end|>, eos] as end ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("chatml") / "model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN_STYLE
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chat_tokenizer(chatml_dir):
    from stages.modeling import load_tokenizer

    return load_tokenizer(str(chatml_dir))


@pytest.mark.parametrize("kwargs", [{"enable_thinking": False}, {}])
def test_chat_row_ends_with_the_templates_end_of_turn(chat_tokenizer, kwargs):
    from stages.modeling import render_prompt, tokenize_example

    tok = chat_tokenizer
    prompt_p = PromptParams(template="Question: {question}\nAnswer:", chat=True, chat_template_kwargs=kwargs)
    row = tokenize_example(tok, prompt_p, ROW["question"], ROW["answer"], 512)
    ids, mask = row["input_ids"], row["completion_mask"]
    prompt_ids, completion = ids[:mask.index(1)], ids[mask.index(1):]
    assert all(mask[mask.index(1):]) and not row["truncated"]
    # The prompt is evaluation's prompt, token for token.
    assert prompt_ids == tok(render_prompt(tok, prompt_p, ROW["question"]), add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tok.eos_token_id and tok.eos_token_id not in completion
    # <|im_end|> and the template's newline after it; before it the answer, with no leading space.
    assert completion[-2:] == [im_end, tok("\n", add_special_tokens=False)["input_ids"][0]]
    text = tok.decode(completion)
    assert not text.startswith(" ")
    thinking = "<think>\n\n</think>\n\n"
    if kwargs:  # the kwarg reached the generation prompt: the think block is part of the prompt
        assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n" + thinking)
        assert text == ROW["answer"] + "<|im_end|>\n"
    else:  # thinking mode: the template's (empty) thinking is part of what the model learns to write
        assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")
        assert text == thinking + ROW["answer"] + "<|im_end|>\n"


def test_tiny_template_row_has_no_leading_space_and_ends_with_eos(tiny_model_dir):
    from stages.modeling import load_tokenizer, tokenize_example

    tok = load_tokenizer(str(tiny_model_dir))
    chat = tokenize_example(tok, PromptParams(chat=True), ROW["question"], ROW["answer"], 512)
    plain = tokenize_example(tok, PromptParams(), ROW["question"], ROW["answer"], 512)
    completion = lambda r: r["input_ids"][r["completion_mask"].index(1):]  # noqa: E731
    assert completion(chat) == tok(ROW["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # Plain prompts keep " " + answer + EOS.
    assert completion(plain) == tok(" " + ROW["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_a_template_whose_prompt_is_not_a_prefix_is_refused(chat_tokenizer):
    from stages.modeling import tokenize_example

    tok = chat_tokenizer
    original = tok.chat_template
    tok.chat_template = OPENS_THINKING
    try:
        with pytest.raises(UserError) as error:
            tokenize_example(tok, PromptParams(chat=True), ROW["question"], ROW["answer"], 512)
    finally:
        tok.chat_template = original
    message = str(error.value)
    assert "\n" not in message and message.startswith("params.yaml: prompt.chat: ")
    assert tok.name_or_path in message and "cannot be used for prompt/completion training" in message


def test_chat_template_kwargs_reach_the_evaluation_prompt(chat_tokenizer):
    from stages.modeling import render_prompt

    off = render_prompt(chat_tokenizer, PromptParams(chat=True, chat_template_kwargs={"enable_thinking": False}), "q")
    on = render_prompt(chat_tokenizer, PromptParams(chat=True), "q")
    assert off == on + "<think>\n\n</think>\n\n"


def test_a_kwarg_that_is_an_apply_chat_template_argument_is_refused(chat_tokenizer):
    from stages.modeling import render_prompt

    with pytest.raises(UserError, match=r"prompt.chat_template_kwargs: 'tokenize' is an argument"):
        render_prompt(chat_tokenizer, PromptParams(chat=True, chat_template_kwargs={"tokenize": True}), "q")


@pytest.fixture
def eager_to_end(monkeypatch):
    """A forward hook that makes the model emit `end` from its STEPS-th generated token on."""
    import torch

    def install(model, end: int, steps: int = 3):
        calls = {"generated": 0}

        def hook(module, args, kwargs, output):
            if kwargs["input_ids"].shape[1] > 1:  # a prefill: a new batch starts
                calls["generated"] = 0
            calls["generated"] += 1
            calls["forwards"] = calls.get("forwards", 0) + 1
            if calls["generated"] >= steps:
                output.logits[:, -1, end] = torch.finfo(output.logits.dtype).max
            return output

        model.register_forward_hook(hook, with_kwargs=True)
        return calls

    return install


@pytest.mark.parametrize("engine", ["static", "generate"])
def test_generation_stops_on_every_end_id_of_the_generation_config(chatml_dir, chat_tokenizer, eager_to_end,
                                                                    engine, monkeypatch):
    import stages.decode as decode
    from stages.evaluate import generate_questions, load_for_generation

    # float32: the token ids are compared exactly.
    model = load_for_generation(ModelParams(name=str(chatml_dir), load_in_4bit=False,
                                            bnb_4bit_compute_dtype="float32"), adapter=None)
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == [im_end, chat_tokenizer.eos_token_id]
    assert chat_tokenizer.eos_token_id != im_end
    tok = chat_tokenizer
    tok.padding_side = "left"
    calls = eager_to_end(model, im_end, steps=3)
    monkeypatch.setattr(decode, "CHECK_EVERY", 2)
    questions = ["1+1?", "What is 7 times 8, minus 3?", "x"]
    eval_p = EvaluateParams(max_new_tokens=40, batch_size=4, stop=[], engine=engine)
    texts, n_tokens = generate_questions(model, tok, PromptParams(chat=True), eval_p, questions, show_progress=False)
    assert n_tokens == 3 * len(questions)  # every answer ended at its third token, <|im_end|>
    assert all("<|im_end|>" not in t for t in texts)
    # And decoding stopped there rather than running the 40-token budget.
    assert calls["forwards"] <= 5


def test_peft_model_forwards_the_generation_config(chatml_dir):
    from peft import LoraConfig, get_peft_model

    from stages.evaluate import end_token_ids
    from stages.modeling import load_model, load_tokenizer

    base = load_model(ModelParams(name=str(chatml_dir), load_in_4bit=False, bnb_4bit_compute_dtype="float32"))
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    tok = load_tokenizer(str(chatml_dir))
    assert lora.generation_config is base.generation_config
    assert end_token_ids(lora, tok) == end_token_ids(base, tok) and len(end_token_ids(base, tok)) == 2
