"""Evaluation protocols: each a complete, named GSM8K recipe held as data, as lm-eval's task YAMLs are.

    python -c "from stages.protocols import LM_EVAL_GSM8K, render_text; print(render_text(LM_EVAL_GSM8K, 'Q?'))"

A protocol says everything a number depends on: the prompt (template, few-shot examples and how
they are drawn, chat template or not), how the prompt is tokenized, the stop strings, the token
budget, how the answer is extracted (strict and flexible filters) and how it is compared with the
gold. Three exist (`evaluate.protocol`):

- `train_prompt`: what the model was fine-tuned on: `prompt.template`, zero-shot, chat when
  `prompt.chat`; `evaluate.stop` and `evaluate.max_new_tokens`; lm-eval's gsm8k filters.
- `lm_eval_gsm8k`: lm-evaluation-harness 0.4.13 `gsm8k` (tasks/gsm8k/gsm8k.yaml, version 3.0):
  5 examples from the train split, plain text, 256 new tokens. One real prompt's tail:

      Question: James writes a 3-page letter to 2 different friends twice a week.  How many pages ...
      Answer: He writes each friend 3*2=<<3*2=6>>6 pages a week
      ...
      #### 624

      Question: Janet’s ducks lay 16 eggs per day. ...
      Answer:

- `lm_eval_gsm8k_cot_llama`: lm-eval's `gsm8k_cot_llama` (gsm8k-cot-llama.yaml, version 4.0) run
  with `--apply_chat_template --fewshot_as_multiturn`: the instruction, 8 fixed exemplars as
  user/assistant turns of the tokenizer's chat template, "The final answer is N".

`with_thinking` turns any of them into a reasoning-model protocol: text up to the last
`think_end` marker is dropped before extraction, and the budget is the thinking budget.

What lm-eval 0.4.13 does, found in its source, and what this module reproduces:

| step | lm-eval 0.4.13 (file: function) | here |
|---|---|---|
| question text | Jinja, `keep_trailing_newline=True`, question not stripped (utils.py: apply_template) | `render_text` |
| few-shot draw, `default` sampler | ONE `random.Random(1234)` per task (evaluator: simple_evaluate's `fewshot_random_seed`, task.set_fewshot_seed); docs are visited in split order and doc i gets the i-th `rnd.sample(train_rows, k)`, so its examples depend on its position; the eval doc is removed only when fewshot split == test split (api/samplers.py: ContextSampler.sample; api/task.py: fewshot_context) | `fewshot_examples` (one pass over the questions, in order) |
| few-shot, `first_n` sampler | the first k of `fewshot_config.samples`, the same for every doc (samplers.py: FirstNSampler) | same |
| plain-text layout | per example `doc_to_text + target_delimiter(" ") + target + fewshot_delimiter("\\n\\n")`, then `doc_to_text` of the question, nothing after it (task.py: build_qa_turn, Message.to_text) | `render_prompt` |
| chat, multiturn | messages user/assistant per example then user; no system message unless `--system_instruction` or a task `description`; delimiters dropped; `tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, continue_final_message=False, **chat_template_args)` (models/huggingface.py: apply_chat_template) | `render_prompt` |
| BOS | `tok_batch_encode`: no special tokens when the (batch's first) text starts with `tokenizer.bos_token`, else the tokenizer's default (`add_bos_token=None`) | `encode_context` |
| truncation | left: the last `max_length - max_gen_toks` tokens, `max_length` from the config (`n_positions`, `max_position_embeddings`, `n_ctx`, text_config first), else `tokenizer.model_max_length`, else 2048 (models/utils.py: resolve_max_length) | `context_limit`, `encode_context` |
| padding, dtype, batch | left padding (pad token: the tokenizer's, else unk, else EOS); `dtype=auto`; `batch_size=1` by default, longest request first | evaluate's batching: identical tokens at batch 1; padded batches can flip a near-tie argmax |
| budget | `max_gen_toks` from generation_kwargs, else 256 (HFLM.max_gen_toks); greedy (`do_sample: false`) | `Protocol.max_new_tokens` |
| stops, EOS | `until` + the EOS text (`decode(eos_token_id, skip_special_tokens=False)`) if absent (models/utils.py: handle_stop_sequences); generation ends at the generation config's EOS, or when a stop string shows in the last len(stop ids)+2 tokens (utils_hf.py: MultiTokenEOSCriteria, not thinking-aware: a stop inside the thinking ends it too) | `stop_strings` |
| cut | decode with `skip_special_tokens=True`; if `think_end_token`: keep text after its LAST occurrence, `lstrip()`, an absent marker keeps all; then `text = text.split(stop)[0]` for each stop in order (models/utils.py: postprocess_generated_text) | `cut_generation` |
| extract | per filter: `re.findall`, take match `[group_select]`, first non-empty group of a tuple, `.strip()`, "[invalid]" when none; then take_first (filters/extraction.py: RegexFilter) | `extract` |
| score | `exact_match`: each of `regexes_to_ignore` removed with `re.sub` from prediction and target, then lower-cased; numpy string equality (trailing NULs ignored) (api/metrics.py: exact_match_hf_evaluate) against `doc_to_target` | `is_correct` |

Not reproduced: lm-eval's integer `think_end_token` (a token id instead of text), several GPUs
(each lm-eval rank draws its own few-shot sequence), and `MultiTokenEOSCriteria` missing a stop
string spread over more tokens than its own encoding + 2 (the cut text is the same; only a
`think_end` after such a missed stop would differ).

Pure: only the standard library at import time; the tokenizer is passed in.
"""
from __future__ import annotations

import dataclasses
import difflib
import random
import re
import string
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from stages.gsm8k import STOP, cut_at_stops
from stages.io import UserError

TRAIN_PROMPT = "train_prompt"
INVALID = "[invalid]"  # lm-eval RegexFilter's fallback: what "no answer" looks like
# transformers' "no limit" model_max_length (lm-eval's TOKENIZER_INFINITY)
TOKENIZER_INFINITY = 1000000000000000019884624838656
DEFAULT_MAX_LENGTH = 2048  # lm-eval's when neither config nor tokenizer says
QUESTION = "{{question}}"


@dataclass(frozen=True)
class Filter:
    """One lm-eval filter pipeline: `regex` then `take_first`."""
    name: str
    regex: str
    group_select: int = 0
    fallback: str = INVALID


@dataclass(frozen=True)
class Protocol:
    name: str
    origin: str                        # where the recipe comes from
    # The question's text around the question, e.g. ("Question: ", "\nAnswer:"): lm-eval's
    # doc_to_text, or prompt.template, split at the question.
    text_pieces: tuple[str, ...]
    strip_question: bool               # prompt.template strips it; lm-eval does not
    target: str                        # key of TARGETS: what the answer is compared with
    filters: tuple[Filter, Filter]     # (strict, flexible)
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    # "default": a seeded draw from the few-shot pool (lm-eval's fewshot_split: train, the whole split
    # in its original order); "first_n": the first num_fewshot of fewshot_samples.
    fewshot_sampler: str = "default"
    fewshot_seed: int = 1234
    fewshot_samples: tuple[tuple[str, str], ...] = ()  # (question, target) for first_n
    chat: bool = False                 # chat template, few-shot as multiturn
    chat_template_kwargs: tuple[tuple[str, Any], ...] = ()
    bos: str = "unless_text_starts_with_bos"  # or "unless_chat" (stages.modeling.encode_prompt)
    until: tuple[str, ...] = ("Question:", "</s>", "<|im_end|>")
    max_new_tokens: int = 256
    regexes_to_ignore: tuple[str, ...] = (",", "\\$", "(?s).*#### ", "\\.$")
    ignore_case: bool = True
    ignore_punctuation: bool = False
    think_end: str | None = None
    unclosed_thinking: str = "no_answer"  # "no_answer", or "keep" (lm-eval 0.4.13: the whole text)


# doc_to_target of the evaluated row (and of the train rows used as examples).
TARGETS = {
    # gsm8k.yaml "{{answer}}": the whole solution; exact_match's "(?s).*#### " leaves the number.
    "answer": lambda row: row["answer"],
    # gsm8k-cot-llama.yaml "{{answer.split('####')[-1].strip() if answer is defined else target}}"
    "final_number": lambda row: row["answer"].split("####")[-1].strip() if "answer" in row else row["target"],
}

GSM8K_STRICT = Filter("strict-match", r"#### (\-?[0-9\.\,]+)", 0)
GSM8K_FLEXIBLE = Filter("flexible-extract", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)

LM_EVAL_GSM8K = Protocol(
    name="lm_eval_gsm8k",
    origin="lm-evaluation-harness 0.4.13 tasks/gsm8k/gsm8k.yaml (version 3.0), hf model defaults",
    text_pieces=("Question: ", "\nAnswer:"),
    strip_question=False,
    target="answer",
    num_fewshot=5,
    fewshot_sampler="default",
    fewshot_seed=1234,
    until=("Question:", "</s>", "<|im_end|>"),
    max_new_tokens=256,
    filters=(GSM8K_STRICT, GSM8K_FLEXIBLE),
)

COT_LLAMA_EXEMPLARS = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The final answer is 6"),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The final answer is 5"),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The final answer is 39"),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The final answer is 8"),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The final answer is 9"),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The final answer is 29"),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The final answer is 33"),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The final answer is 8"),
)

LM_EVAL_GSM8K_COT_LLAMA = Protocol(
    name="lm_eval_gsm8k_cot_llama",
    origin="lm-evaluation-harness 0.4.13 tasks/gsm8k/gsm8k-cot-llama.yaml (version 4.0), "
           "--apply_chat_template --fewshot_as_multiturn, hf model defaults",
    text_pieces=("Given the following problem, reason and give a final answer to the problem.\nProblem: ",
                 "\nYour response should end with \"The final answer is [answer]\" where [answer] is the "
                 "response to the problem.\n"),
    strip_question=False,
    target="final_number",
    target_delimiter="",
    num_fewshot=8,
    fewshot_sampler="first_n",
    fewshot_samples=COT_LLAMA_EXEMPLARS,
    chat=True,
    until=("<|eot_id|>", "<|start_header_id|>user<|end_header_id|>", "Q:", "</s>", "<|im_end|>"),
    max_new_tokens=256,
    filters=(Filter("strict-match", r"The final answer is ((-?[$0-9.,]{2,})|(-?[0-9]+))", -1), GSM8K_FLEXIBLE),
)

LM_EVAL_PROTOCOLS = {p.name: p for p in (LM_EVAL_GSM8K, LM_EVAL_GSM8K_COT_LLAMA)}
PROTOCOL_NAMES = (TRAIN_PROMPT, *LM_EVAL_PROTOCOLS)
# The protocols that draw their examples from the source's train split (prepare's few-shot pool), of
# which dev is a part: evaluated on dev or train, a question would be drawn as its own example.
DRAWS_FROM_TRAIN = tuple(p.name for p in LM_EVAL_PROTOCOLS.values() if p.num_fewshot and p.fewshot_sampler == "default")
# train_prompt's stops and budget when evaluate.stop / evaluate.max_new_tokens are null: lm-eval
# gsm8k's stop set, and room for a step-by-step solution.
TRAIN_PROMPT_STOP = STOP
TRAIN_PROMPT_MAX_NEW_TOKENS = 512


def train_prompt(template: str, chat: bool, chat_template_kwargs: Mapping[str, Any], stop: Sequence[str],
                 max_new_tokens: int) -> Protocol:
    """The fine-tuning prompt (stages.modeling.render_prompt / encode_prompt) as a protocol."""
    marker = "\x00question\x00"  # cannot occur in a YAML template
    return Protocol(
        name=TRAIN_PROMPT,
        origin="params.yaml prompt.template, prompt.chat, evaluate.stop, evaluate.max_new_tokens",
        text_pieces=tuple(template.format(question=marker).split(marker)),
        strip_question=True,
        target="answer",
        chat=chat,
        chat_template_kwargs=tuple(sorted(chat_template_kwargs.items())),
        bos="unless_chat",
        until=tuple(stop),
        max_new_tokens=max_new_tokens,
        filters=(GSM8K_STRICT, GSM8K_FLEXIBLE),
    )


def with_thinking(protocol: Protocol, think_end: str, max_new_tokens: int,
                  unclosed_thinking: str = "no_answer") -> Protocol:
    """`protocol` for a reasoning model: the answer is what follows the last `think_end`, and the
    budget covers thinking and answer (lm-eval: `think_end_token=…`, `--gen_kwargs max_gen_toks=…`).
    lm-eval scores an unclosed thinking as if it were the answer ("keep"); the default here counts
    it as no answer."""
    if not think_end:
        raise UserError("params.yaml: evaluate.think_end: must be a non-empty marker such as '</think>'")
    if max_new_tokens <= 0:
        raise UserError(f"params.yaml: evaluate.max_new_tokens: must be > 0, got {max_new_tokens}")
    if unclosed_thinking not in ("no_answer", "keep"):
        raise UserError(f"params.yaml: evaluate.unclosed_thinking: must be no_answer or keep, got {unclosed_thinking!r}")
    return dataclasses.replace(protocol, think_end=think_end, max_new_tokens=max_new_tokens,
                               unclosed_thinking=unclosed_thinking)


def get_protocol(name: str, prompt, evaluate) -> Protocol:
    """The protocol `evaluate.protocol` names, as params set it; `prompt`/`evaluate` are the params
    sections (PromptParams, EvaluateParams). Null `evaluate.stop`/`max_new_tokens` are the
    protocol's own; `evaluate.think_end` makes it a reasoning-model protocol (`with_thinking`).
    prompt.chat_template_kwargs go to every chat template (lm-eval's `chat_template_args`, e.g.
    enable_thinking)."""
    if name == TRAIN_PROMPT:
        budget = evaluate.max_new_tokens or TRAIN_PROMPT_MAX_NEW_TOKENS
        protocol = train_prompt(prompt.template, prompt.chat, prompt.chat_template_kwargs,
                                TRAIN_PROMPT_STOP if evaluate.stop is None else evaluate.stop, budget)
    elif name in LM_EVAL_PROTOCOLS:
        protocol = LM_EVAL_PROTOCOLS[name]
        if protocol.chat and prompt.chat_template_kwargs:
            protocol = dataclasses.replace(protocol,
                                           chat_template_kwargs=tuple(sorted(prompt.chat_template_kwargs.items())))
    else:
        close = difflib.get_close_matches(str(name), PROTOCOL_NAMES, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(PROTOCOL_NAMES)}"
        raise UserError(f"params.yaml: evaluate.protocol: unknown protocol {name!r} ({hint})")
    if getattr(evaluate, "think_end", None):
        protocol = with_thinking(protocol, evaluate.think_end, evaluate.max_new_tokens or protocol.max_new_tokens,
                                 evaluate.unclosed_thinking)
    return protocol


def settings(protocol: Protocol) -> dict:
    """Everything the number depends on, for metrics' `generation` block: compare two numbers only
    when these agree."""
    return dataclasses.asdict(protocol)


# ---------------------------------------------------------------- prompt

def render_text(protocol: Protocol, question: str) -> str:
    """doc_to_text: the question inside the protocol's text."""
    return (question.strip() if protocol.strip_question else question).join(protocol.text_pieces)


def fewshot_examples(protocol: Protocol, pool: Sequence[Mapping], n_questions: int) -> list[list[tuple[str, str]]]:
    """(question, target) examples for each of `n_questions` questions, drawn as lm-eval draws them:
    the `default` sampler makes one seeded generator and the i-th question gets its i-th draw from
    `pool` (the whole train split, in its original order), so pass every question at once."""
    k = protocol.num_fewshot
    if k == 0:
        return [[] for _ in range(n_questions)]
    if protocol.fewshot_sampler == "first_n":
        return [list(protocol.fewshot_samples[:k]) for _ in range(n_questions)]
    target = TARGETS[protocol.target]
    rnd = random.Random(protocol.fewshot_seed)
    return [[(row["question"], target(row)) for row in rnd.sample(pool, k)] for _ in range(n_questions)]


def render_prompt(protocol: Protocol, tokenizer, question: str, examples: Sequence[tuple[str, str]]) -> str:
    """The whole prompt text: examples then the question, as plain text or through the chat template."""
    turns = [(render_text(protocol, q), a) for q, a in examples]
    final = render_text(protocol, question)
    if not protocol.chat:
        return "".join(q + protocol.target_delimiter + a + protocol.fewshot_delimiter for q, a in turns) + final
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    messages.append({"role": "user", "content": final})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         continue_final_message=False, **dict(protocol.chat_template_kwargs))


def context_limit(config, tokenizer, protocol: Protocol) -> int:
    """Most prompt tokens kept (from the right): the model's length minus the budget, as lm-eval.
    `config` is the model config (object or `to_dict()`)."""
    get = (lambda c, k: c.get(k)) if isinstance(config, Mapping) else (lambda c, k: getattr(c, k, None))
    cfg = get(config, "text_config") or config
    length = next((int(v) for v in (get(cfg, k) for k in ("n_positions", "max_position_embeddings", "n_ctx"))
                   if v is not None), None)
    if length is None:
        model_max = getattr(tokenizer, "model_max_length", None)
        length = int(model_max) if model_max is not None and model_max != TOKENIZER_INFINITY else DEFAULT_MAX_LENGTH
    if protocol.max_new_tokens >= length:
        raise UserError(f"params.yaml: evaluate.max_new_tokens: {protocol.max_new_tokens} leaves no room for the "
                        f"prompt in the model's {length} tokens; use a value < {length}")
    return length - protocol.max_new_tokens


def encode_context(tokenizer, text: str, protocol: Protocol, limit: int | None) -> list[int]:
    """Prompt token ids: BOS as the protocol says, then only the last `limit` (`context_limit`; None: all)."""
    if protocol.bos == "unless_chat":  # what training saw (stages.modeling.encode_prompt)
        add_special = not protocol.chat
    else:  # lm-eval's tok_batch_encode: a text that already starts with BOS gets none added
        bos = getattr(tokenizer, "bos_token", None)
        add_special = not (bos is not None and text.startswith(bos))
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    return ids if limit is None else ids[-limit:]


@dataclass(frozen=True)
class Plan:
    """What evaluate generates from: one prompt per question, its ids, the stops and the budget."""
    protocol: Protocol
    prompts: list[str]
    input_ids: list[list[int]]
    stop: list[str]
    max_new_tokens: int
    context_limit: int  # most prompt tokens kept (context_limit())
    truncated: int  # prompts longer than that, cut on the left to it


def plan(protocol: Protocol, tokenizer, config, rows: Sequence[Mapping], fewshot_pool: Sequence[Mapping],
         where: str = "the few-shot pool") -> Plan:
    """Check everything, then build every prompt, before any model is loaded or output written."""
    check(protocol, tokenizer, rows, fewshot_pool, where)
    examples = fewshot_examples(protocol, fewshot_pool, len(rows))
    check_no_overlap(protocol, rows, examples)
    prompts = [render_prompt(protocol, tokenizer, row["question"], ex) for row, ex in zip(rows, examples)]
    if protocol.think_end and any(protocol.think_end in p for p in prompts):
        # Qwen3's template with enable_thinking: false writes an empty, closed <think></think> into the
        # generation prompt: the model never writes the marker, and every answer would count as unclosed.
        raise UserError(f"params.yaml: evaluate.think_end: the prompt itself already holds {protocol.think_end!r} "
                        "(the chat template closed the thinking before the answer: enable_thinking: false?), so no "
                        "answer would contain it; unset evaluate.think_end")
    limit = context_limit(config, tokenizer, protocol)
    encoded = [encode_context(tokenizer, p, protocol, None) for p in prompts]
    return Plan(protocol, prompts, [ids[-limit:] for ids in encoded], stop_strings(protocol, tokenizer),
                protocol.max_new_tokens, limit, sum(len(ids) > limit for ids in encoded))


# (template, its kwargs) that check_undated rendered and found undated: render_chat asks for every training
# row's prompt and completion, and the two renders as on two days need not be redone for each.
_UNDATED: set = set()


def check_undated(tokenizer, chat_template_kwargs: Mapping[str, Any]) -> None:
    """A chat template that writes today's date (Llama 3.2/3.3's system header, through strftime_now unless
    given date_string; Granite's whatever it is given) makes the same params render other prompts on another
    day: training's prompts would not be evaluation's, and DVC would not see the change. Rendered as on two
    days (transformers' strftime_now reads the clock through its module's `datetime`), the prompt must not
    change."""
    template = str(getattr(tokenizer, "chat_template", None) or "")
    key = (template, repr(sorted(chat_template_kwargs.items())))
    if "strftime_now" not in template or key in _UNDATED:
        return
    from datetime import datetime
    from unittest import mock

    from transformers.utils import chat_template_utils

    renders = []
    for day in (datetime(2001, 2, 3), datetime(2011, 12, 13)):
        clock = type("Clock", (datetime,), {"now": classmethod(lambda cls, tz=None, day=day: day)})
        with mock.patch.object(chat_template_utils, "datetime", clock):
            renders.append(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                         add_generation_prompt=True, **chat_template_kwargs))
    if renders[0] != renders[1]:
        raise UserError("params.yaml: prompt.chat_template_kwargs: the chat template writes today's date into every "
                        "prompt (strftime_now), so training and evaluation on other days would see other prompts; "
                        "set prompt.chat_template_kwargs: {date_string: '26 Jul 2024'} where the template reads it "
                        "(Llama 3.2/3.3), else use a template without the date")
    _UNDATED.add(key)


def check(protocol: Protocol, tokenizer, rows: Sequence[Mapping], fewshot_pool: Sequence[Mapping],
          where: str = "the few-shot pool") -> None:
    """One-line UserErrors naming the key, for what would otherwise fail (or silently differ) later."""
    key = "prompt.chat" if protocol.name == TRAIN_PROMPT else "evaluate.protocol"
    if protocol.chat and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"params.yaml: {key}: {protocol.name} renders through a chat template, "
                        "but the tokenizer has no chat template")
    if protocol.chat:
        check_undated(tokenizer, dict(protocol.chat_template_kwargs))
    if protocol.num_fewshot and protocol.fewshot_sampler == "default":
        if protocol.num_fewshot > len(fewshot_pool):
            raise UserError(f"params.yaml: evaluate.protocol: {protocol.name} draws {protocol.num_fewshot} few-shot "
                            f"examples but {where} has {len(fewshot_pool)} rows")
        for i, row in enumerate(fewshot_pool, 1):
            if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
                raise UserError(f"{where}:{i}: a few-shot row needs string fields 'question' and 'answer'")
    if protocol.num_fewshot > len(protocol.fewshot_samples) and protocol.fewshot_sampler == "first_n":
        raise UserError(f"params.yaml: evaluate.protocol: {protocol.name} needs {protocol.num_fewshot} exemplars, "
                        f"has {len(protocol.fewshot_samples)}")
    if protocol.think_end:
        ids = tokenizer(protocol.think_end, add_special_tokens=False)["input_ids"]
        if tokenizer.decode(ids, skip_special_tokens=True) != protocol.think_end:
            raise UserError(f"params.yaml: evaluate.think_end: {protocol.think_end!r} does not survive decoding "
                            "with skip_special_tokens (a special token?), so it could never be found in the text")


def _key(question: str) -> str:
    return " ".join(question.lower().split())  # as stages.prepare compares questions


def check_no_overlap(protocol: Protocol, rows: Sequence[Mapping], examples: Sequence[Sequence[tuple[str, str]]]) -> None:
    """An evaluated question must never be shown as a solved example (lm-eval would not notice)."""
    evaluated = {_key(row["question"]) for row in rows}
    for i, exs in enumerate(examples, 1):
        for question, _ in exs:
            if _key(question) in evaluated:
                raise UserError(f"params.yaml: evaluate.protocol: {protocol.name}: a few-shot example of question "
                                f"{i} is itself an evaluated question ({question[:60]!r}…); evaluated questions "
                                "must never be examples: use a few-shot pool without them")


# ---------------------------------------------------------------- generation and scoring

def stop_strings(protocol: Protocol, tokenizer) -> list[str]:
    """The protocol's stops plus the EOS text, as lm-eval hands them to generation and the cut, and
    under train_prompt with a chat template, the template's end of turn (`end_of_turn`)."""
    stop = list(protocol.until)
    eos = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
    for end in (eos, end_of_turn(protocol, tokenizer)):
        if end and end not in stop:
            stop.append(end)
    return stop


def end_of_turn(protocol: Protocol, tokenizer) -> str | None:
    """train_prompt through a chat template: what the template writes right after an assistant's answer
    (Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`, Qwen's `<|im_end|>`), which training teaches the
    model to write after its answer (stages.modeling.chat_completion). A model whose generation config
    does not list it as EOS (Llama-3.1 and Gemma 2 base models) writes it and goes on with a next turn:
    without it among the stops, that turn's numbers were scored. The lm-eval protocols keep lm-eval's
    stops."""
    if protocol.name != TRAIN_PROMPT or not protocol.chat:
        return None
    answer = "#### 0"
    messages = [{"role": "user", "content": render_text(protocol, "x")}, {"role": "assistant", "content": answer}]
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                         **dict(protocol.chat_template_kwargs))
    if answer not in full:
        return None
    after = full.rsplit(answer, 1)[-1]
    # Its first special token (`<|end|>` of `<|end|></s>`, glued to what follows it); else its first word.
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    for token in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token in special:
            return tokenizer.decode([token], skip_special_tokens=False)
    return next(iter(after.split()), None)


def cut_generation(protocol: Protocol, text: str, stop: Sequence[str]) -> str:
    """The response lm-eval scores, from the text decoded with skip_special_tokens=True: after the
    last `think_end` (an unclosed thinking is "" for unclosed_thinking no_answer), then before each
    stop string in turn (split, not earliest match: lm-eval's order)."""
    if protocol.think_end:
        if protocol.think_end not in text and protocol.unclosed_thinking == "no_answer":
            return ""
        text = text.split(protocol.think_end)[-1].lstrip()
    return cut_at_stops(text, stop)


def apply_filter(f: Filter, text: str) -> str:
    matches = re.findall(f.regex, text)
    if not matches:
        return f.fallback
    match = matches[f.group_select]
    if isinstance(match, tuple):  # several groups: the first that matched
        match = next((g for g in match if g), f.fallback)
    return match.strip()


def extract(protocol: Protocol, response: str) -> tuple[str, str]:
    """(strict, flexible) answers as lm-eval's filters write them ("[invalid]" = none)."""
    strict, flexible = protocol.filters
    return apply_filter(strict, response), apply_filter(flexible, response)


def normalize(protocol: Protocol, s: str) -> str:
    """exact_match's view of a string: `regexes_to_ignore` removed in order, case, punctuation."""
    for pattern in protocol.regexes_to_ignore:
        s = re.sub(pattern, "", s)
    if protocol.ignore_case:
        s = s.lower()
    if protocol.ignore_punctuation:
        s = s.translate(str.maketrans("", "", string.punctuation))
    return s.rstrip("\x00")  # numpy's str arrays, which lm-eval compares, drop trailing NULs


def target(protocol: Protocol, row: Mapping) -> str:
    return TARGETS[protocol.target](row)


def is_correct(protocol: Protocol, answer: str, row: Mapping) -> bool:
    """lm-eval exact_match of an extracted answer against the row's target."""
    return normalize(protocol, answer) == normalize(protocol, target(protocol, row))


def prediction_record(protocol: Protocol, row: Mapping, generated: str, stop: Sequence[str]) -> dict:
    """One line of metrics/predictions*.jsonl, from the text decoded after the prompt."""
    response = cut_generation(protocol, generated, stop)
    strict, flexible = extract(protocol, response)
    record = {
        "question": row["question"], "gold": normalize(protocol, target(protocol, row)),
        "generated": generated, "response": response,
        "extracted": strict, "extracted_flexible": flexible,
        "correct": is_correct(protocol, strict, row), "correct_flexible": is_correct(protocol, flexible, row),
    }
    if protocol.think_end:
        record["thinking_closed"] = protocol.think_end in generated
    return record


def score(records: Sequence[Mapping]) -> dict:
    """exact_match (strict-match) and exact_match_flexible over prediction records."""
    n = len(records)
    correct = sum(r["correct"] for r in records)
    correct_flexible = sum(r["correct_flexible"] for r in records)
    no_answer = sum(r["extracted"] == INVALID for r in records)
    rate = (lambda k: k / n) if n else (lambda k: 0.0)
    return {"exact_match": rate(correct), "exact_match_flexible": rate(correct_flexible), "n": n,
            "correct": correct, "correct_flexible": correct_flexible, "no_answer_rate": rate(no_answer)}
