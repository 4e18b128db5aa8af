"""The static decoding engine (stages/decode.py) against transformers' generate on the tiny model.

On CPU the engine runs the same loop without CUDA graphs; what a graph replays is exactly this
step, so token equality here is the check that the engine decodes what the model says.
"""
import dataclasses
import math

import pytest

from stages.config import EvaluateParams, ModelParams, PromptParams
from stages.evaluate import answer_length, generate_questions, load_for_generation

PROMPT = PromptParams(template="Question: {question}\nAnswer:", chat=False)
# Questions of very different lengths, so that batches are left-padded.
QUESTIONS = ["1+1?", "Natalia sold 48 clips in April and half as many in May. How many in all?",
             "x", "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts?",
             "What is 7 times 8, minus 3?", "Hi"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    import torch

    from stages.modeling import load_tokenizer

    torch.manual_seed(0)
    # float32: both engines then agree to the last bit that argmax can see.
    model = load_for_generation(ModelParams(name=str(tiny_model_dir), load_in_4bit=False,
                                            bnb_4bit_compute_dtype="float32"), adapter=None)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.padding_side = "left"
    return model, tokenizer


def token_ids(model, tokenizer, eval_p, questions, ended=None):
    """Each question's generated ids: the static engine's rows (refilled as answers end), or
    generate's batches as stages.evaluate makes them."""
    import torch

    from stages.decode import greedy_decode
    from stages.evaluate import make_batches
    from stages.modeling import encode_prompt, render_prompt

    encoded = [encode_prompt(tokenizer, render_prompt(tokenizer, PROMPT, q), PROMPT) for q in questions]
    if eval_p.engine == "static":
        with torch.inference_mode():
            return greedy_decode(model, encoded, eval_p.batch_size, eval_p.max_new_tokens, tokenizer.pad_token_id,
                                 ended or (lambda i, ids: False), use_graph=False)
    ids = [None] * len(questions)
    for indices, batch in make_batches(encoded, eval_p.batch_size, tokenizer.pad_token_id, "cpu"):
        mask = torch.tensor([[0] * (batch.width - n) + [1] * n for n in batch.lengths])
        with torch.inference_mode():
            new = model.generate(input_ids=batch.input_ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=eval_p.max_new_tokens, min_new_tokens=eval_p.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=None)[:, batch.width:]
        for row, i in zip(new.tolist(), indices):
            ids[i] = row
    return ids


@pytest.mark.parametrize("batch_size", [1, 4, 6])
def test_static_engine_matches_generate_token_for_token(model_and_tokenizer, batch_size):
    """Same greedy tokens as transformers' generate, for every row, whatever the padding and
    batching (batch 4 leaves a smaller last batch, which reuses the first batch's cache)."""
    model, tokenizer = model_and_tokenizer
    eval_p = EvaluateParams(max_new_tokens=12, batch_size=batch_size, stop=[])
    static = token_ids(model, tokenizer, eval_p, QUESTIONS)
    reference = token_ids(model, tokenizer, dataclasses.replace(eval_p, engine="generate"), QUESTIONS)
    assert static == reference
    assert all(len(row) == 12 for row in static)
    assert len({tuple(row) for row in static}) > 1, "identical rows would not show a mix-up between rows"


@pytest.mark.parametrize("batch_size", [4, 6])
def test_prefill_in_chunks_of_their_own_width_matches_generate(model_and_tokenizer, monkeypatch, batch_size):
    """With a prefill budget of a few dozen tokens, each forward covers a row or two, padded only to
    its own longest prompt: the slots left of it stay unwritten (or hold the previous batch's keys)
    and masked, and the tokens are still generate's."""
    import stages.decode

    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(stages.decode, "PREFILL_TOKENS", 40)
    eval_p = EvaluateParams(max_new_tokens=12, batch_size=batch_size, stop=[])
    static = token_ids(model, tokenizer, eval_p, QUESTIONS)
    assert static == token_ids(model, tokenizer, dataclasses.replace(eval_p, engine="generate"), QUESTIONS)


def test_prefill_chunks_pad_each_chunk_to_its_own_longest_prompt(monkeypatch):
    import stages.decode
    from stages.decode import prefill_chunks

    monkeypatch.setattr(stages.decode, "PREFILL_TOKENS", 100)
    lengths = [60, 50, 40, 30, 20, 20, 20, 20, 120, 5]
    chunks = prefill_chunks(lengths)
    assert chunks == [(slice(0, 1), 60), (slice(1, 3), 50), (slice(3, 6), 30), (slice(6, 8), 20),
                      (slice(8, 9), 120), (slice(9, 10), 5)]
    assert all(max(lengths[s]) == w and (s.stop - s.start) * w <= 100 or s.stop - s.start == 1 for s, w in chunks)


@pytest.fixture(scope="module")
def eager_model(tiny_model_dir):
    # Eager attention adds the mask to the scores: a boolean mask there adds 0/1 and masks nothing.
    return load_for_generation(ModelParams(name=str(tiny_model_dir), load_in_4bit=False,
                                           bnb_4bit_compute_dtype="float32", attn_implementation="eager"), adapter=None)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_static_engine_matches_generate_under_eager_attention(eager_model, model_and_tokenizer, batch_size):
    _, tokenizer = model_and_tokenizer
    assert eager_model.config._attn_implementation == "eager"
    eval_p = EvaluateParams(max_new_tokens=12, batch_size=batch_size, stop=[])
    static = token_ids(eager_model, tokenizer, eval_p, QUESTIONS)
    assert static == token_ids(eager_model, tokenizer, dataclasses.replace(eval_p, engine="generate"), QUESTIONS)
    assert len({tuple(row) for row in static}) > 1


def test_stage_generate_agrees_across_engines(model_and_tokenizer):
    """Through stages.evaluate.generate (stop strings, EOS, early stop, text cut): same texts and
    the same token count from both engines."""
    model, tokenizer = model_and_tokenizer
    eval_p = EvaluateParams(max_new_tokens=24, batch_size=4)
    static = generate_questions(model, tokenizer, PROMPT, eval_p, QUESTIONS, show_progress=False)
    reference = generate_questions(model, tokenizer, PROMPT, dataclasses.replace(eval_p, engine="generate"), QUESTIONS,
                         show_progress=False)
    assert static == reference
    assert static[1] > 0


def test_the_host_looks_every_check_every_steps_and_stops_once_every_row_has_ended(model_and_tokenizer, monkeypatch):
    """The host looks after the prefill, then every CHECK_EVERY steps; once every question has
    ended, no further step runs, and each question's ids are those up to the look that saw it end."""
    import torch

    import stages.decode as decode
    from stages.modeling import encode_prompt, render_prompt

    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(decode, "CHECK_EVERY", 3)
    encoded = [encode_prompt(tokenizer, render_prompt(tokenizer, PROMPT, q), PROMPT) for q in QUESTIONS[:2]]
    seen = []

    def ended(i, ids):
        seen.append((i, len(ids)))
        return len(ids) >= 7 - 3 * i  # question 1 ends at the second look, question 0 at the third

    with torch.inference_mode():
        out = decode.greedy_decode(model, encoded, 2, 20, tokenizer.pad_token_id, ended, use_graph=False)
        full = decode.greedy_decode(model, encoded, 2, 20, tokenizer.pad_token_id, lambda i, ids: False,
                                    use_graph=False)
    # The first token comes from the prefill, then 3 steps between looks.
    assert sorted(seen) == [(0, 1), (0, 4), (0, 7), (1, 1), (1, 4)]
    assert [len(ids) for ids in out] == [7, 4] and [len(ids) for ids in full] == [20, 20]
    assert out[0] == full[0][:7] and out[1] == full[1][:4]


def watch_layer_0_writes(monkeypatch, record) -> None:
    """Call record(cache, key_states) whenever the engine writes layer 0's keys (prefill or step)."""
    import stages.decode as decode

    update = decode.SlotCache.update

    def spy(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            record(self, key_states)
        return update(self, key_states, value_states, layer_idx, *args, **kwargs)

    monkeypatch.setattr(decode.SlotCache, "update", spy)


def decode_ending_at(model, tokenizer, eval_p, targets) -> None:
    """Question i's answer ends at targets[i] tokens: each question runs to the first look at or past
    its end, and its tokens up to there are generate's."""
    static = token_ids(model, tokenizer, eval_p, QUESTIONS, ended=lambda i, ids: len(ids) >= targets[i])
    reference = token_ids(model, tokenizer, dataclasses.replace(eval_p, engine="generate"), QUESTIONS)
    assert all(len(ids) >= targets[i] and ids == reference[i][:len(ids)] for i, ids in enumerate(static))


def test_rows_take_the_next_questions_as_answers_end(model_and_tokenizer, monkeypatch):
    """Two rows, six questions whose answers end at different lengths: a row takes the next question
    when its answer ends, while the other row goes on, and the question's prompt goes to slots 0.. of
    that row. Every question's tokens are still generate's, whichever row it had."""
    import stages.decode as decode

    writes = []
    watch_layer_0_writes(monkeypatch, lambda cache, keys: cache.prefill_rows is not None and writes.append(
        (cache.prefill_rows.tolist(), cache.prefill_slots.tolist())))
    monkeypatch.setattr(decode, "CHECK_EVERY", 2)
    decode_ending_at(*model_and_tokenizer, EvaluateParams(max_new_tokens=12, batch_size=2, stop=[]),
                     targets=[3, 12, 5, 9, 1, 7])
    assert len(writes) >= 4, "questions came in one by one, as rows freed up"
    for rows, slots in writes:  # per row of a prefill: its prompt's slots, from 0
        assert all([s for r, s in zip(rows, slots) if r == row] == list(range(rows.count(row))) for row in set(rows))
    assert {row for rows, _ in writes for row in rows} == {0, 1}


@pytest.mark.parametrize("copy_rows", [1, 3])
def test_answers_still_running_move_into_fewer_rows_once_no_question_is_left(model_and_tokenizer, monkeypatch,
                                                                             copy_rows):
    """With nothing left to take, the answers still running are moved to the first rows whenever they
    fill half of the rows or less, and the steps run on those rows alone: 4 rows, then 2, then 1,
    and every question's tokens are still generate's. Moved one row per copy (the order of the moves
    matters), and 3 per copy, which 2 rows moved do not fill (run 20 on an H100 failed there)."""
    import stages.decode as decode

    step_rows = []
    watch_layer_0_writes(monkeypatch, lambda cache, keys: cache.prefill_rows is None and step_rows.append(
        keys.shape[0]))
    monkeypatch.setattr(decode, "CHECK_EVERY", 2)
    monkeypatch.setattr(decode, "COMPACT_DOWN_TO", 1)
    monkeypatch.setattr(decode, "COMPACT_COPY_ROWS", copy_rows)
    decode_ending_at(*model_and_tokenizer, EvaluateParams(max_new_tokens=16, batch_size=4, stop=[]),
                     targets=[3, 16, 4, 9, 2, 12])
    assert [n for k, n in enumerate(step_rows) if k == 0 or step_rows[k - 1] != n] == [4, 2, 1]


def test_the_last_questions_go_right_after_the_answers_still_running(model_and_tokenizer, monkeypatch):
    """Seven questions through 4 rows, every answer running the whole budget (as the benchmark's
    random weights do): the 3 questions left after the first 4 go into the first 3 rows and the steps
    run on 3 rows, not on 4 with one idle; every question's tokens are still generate's."""
    import stages.decode as decode

    model, tokenizer = model_and_tokenizer
    step_rows = []
    watch_layer_0_writes(monkeypatch, lambda cache, keys: cache.prefill_rows is None and step_rows.append(
        keys.shape[0]))
    monkeypatch.setattr(decode, "CHECK_EVERY", 2)
    monkeypatch.setattr(decode, "COMPACT_DOWN_TO", 1)
    questions = QUESTIONS + ["What is 12 divided by 4?"]
    eval_p = EvaluateParams(max_new_tokens=6, batch_size=4, stop=[])
    static = token_ids(model, tokenizer, eval_p, questions)
    assert static == token_ids(model, tokenizer, dataclasses.replace(eval_p, engine="generate"), questions)
    assert [n for k, n in enumerate(step_rows) if k == 0 or step_rows[k - 1] != n] == [4, 3]


def test_a_row_with_nothing_to_decode_attends_to_its_first_slots_only(model_and_tokenizer, monkeypatch):
    """Rows whose answer ended, with no question left to take and too few to compact, still run with
    the others: each look puts them back at position 0, so they write (and the attention reads) their
    first slots only, not a whole row of cache. The answer still running is generate's."""
    import stages.decode as decode

    writes = []
    watch_layer_0_writes(monkeypatch, lambda cache, keys: cache.prefill_rows is None and writes.append(
        cache.write_slots.tolist()))
    monkeypatch.setattr(decode, "CHECK_EVERY", 2)
    monkeypatch.setattr(decode, "COMPACT_DOWN_TO", 100)
    decode_ending_at(*model_and_tokenizer, EvaluateParams(max_new_tokens=12, batch_size=6, stop=[]),
                     targets=[1, 12, 1, 1, 1, 1])
    # The last steps: one row writes past its prompt, the five others within the first CHECK_EVERY slots.
    assert sorted(slot >= 2 for slot in writes[-1]) == [False] * 5 + [True]
    assert max(writes[-1]) > 12


def test_a_stop_string_ends_decoding_at_the_look_after_it(model_and_tokenizer, monkeypatch):
    """The engine's looks find a stop string in the text of the ids since the last look (and a few
    before): decoding ends there instead of running the budget, and the texts are generate's."""
    import stages.decode as decode

    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(decode, "CHECK_EVERY", 2)
    eval_p = EvaluateParams(max_new_tokens=40, batch_size=2, stop=[])
    # A piece of what the model writes for the first question around its 7th-9th tokens: a stop
    # string that spans tokens, completed between two looks.
    free = token_ids(model, tokenizer, eval_p, QUESTIONS[:1])[0]
    text, before = tokenizer.decode(free[:9], skip_special_tokens=True), tokenizer.decode(free[:6])
    stop = text[len(before) - 1:].strip()
    assert len(stop) >= 2 and stop not in before
    eval_p = dataclasses.replace(eval_p, stop=[stop])
    steps = []
    step_model = model.forward

    def counting(*args, **kwargs):
        steps.append(kwargs["input_ids"].shape[1] == 1)
        return step_model(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    prompt = PromptParams(template=PROMPT.template, chat=False)
    static = generate_questions(model, tokenizer, prompt, eval_p, QUESTIONS[:1], show_progress=False)
    monkeypatch.setattr(model, "forward", step_model)
    reference = generate_questions(model, tokenizer, prompt, dataclasses.replace(eval_p, engine="generate"),
                                   QUESTIONS[:1], show_progress=False)
    assert static == reference and stop in static[0][0]  # the answer runs up to its stop string (cut later)
    assert sum(steps) <= 10, "decoding stopped at the look after the stop string, not at the budget"


END = {2, 3}  # eos, pad


@pytest.mark.parametrize("ids, expected", [
    ([5, 6, 7], (3, False)),           # ran to the limit
    ([5, 2, 3, 3], (2, True)),          # EOS counts, the padding after it does not
    ([5, 6, 9, 7], (3, True)),          # "Q" completes "Question:" at the third token
    ([9, 5, 6], (1, True)),
    ([], (0, False)),
])
def test_answer_length(ids, expected):
    pieces = {5: "12", 6: " Question", 7: " more", 9: ":"}
    decoded = []

    def decode(ids):
        decoded.append(ids)
        return "".join(pieces.get(t, "") for t in ids)

    # Three stop strings that never show: each text is decoded once, not once per stop string.
    stop = (["Question:"] if ids[:1] != [9] else [":"]) + ["</s>", "<|im_end|>", "Q:"]
    assert answer_length(ids, decode, stop, END) == expected
    assert len(decoded) <= 1 + math.ceil(math.log2(len(ids) + 1)), "one decode per text, and a bisection"


def scripted_model(tokenizer, prompt_ids: list[int], *pieces):
    """A tiny Llama that writes `pieces` (texts or token ids) after the prompt, whatever the prompt: each
    token's embedding is a one-hot direction and the LM head maps it to the next token of the chain;
    attention and MLP add nothing."""
    import torch

    from stages.tiny_model import tiny_model

    chain = [prompt_ids[-1]]
    for piece in pieces:
        chain += [piece] if isinstance(piece, int) else tokenizer(piece, add_special_tokens=False)["input_ids"]
    assert len(set(chain)) == len(chain), "a token twice in the chain has two successors"
    model = tiny_model("llama", tokenizer, seed=0).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (token, following) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token].zero_()
            model.model.embed_tokens.weight[token, k] = 1.0
            model.lm_head.weight[following, k] = 10.0
    return model


@pytest.mark.parametrize("engine", ["static", "generate"])
def test_a_stop_string_that_is_a_special_token_ends_the_answer(engine):
    """`<|im_end|>` is a special token: a model that does not list it as EOS (Qwen base models; Llama-3's
    `<|eot_id|>` under the chat protocol) writes it and goes on. Stops are found in the text with special
    tokens kept, as lm-eval's stop check and transformers' StopStringCriteria see it: the static engine
    once looked in the text without them, went on past the end of turn and scored the `#### 18` after it."""
    from stages.evaluate import generate
    from stages.tiny_model import build_tokenizer

    tokenizer = build_tokenizer(512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer("Question: Natalia sold 48 clips. How many?\nAnswer:")["input_ids"]
    model = scripted_model(tokenizer, prompt, " I think so.", end_of_turn, "\n#### 18", tokenizer.eos_token_id)
    stop = ["Question:", "</s>", "<|im_end|>"]  # the train_prompt protocol's
    texts, n_tokens = generate(model, tokenizer, EvaluateParams(engine=engine, batch_size=2, max_new_tokens=40),
                               [prompt, prompt], stop, 40, show_progress=False)
    assert texts == [" I think so."] * 2  # up to the end of turn, decoded without special tokens
    assert n_tokens == 2 * (len(tokenizer(" I think so.", add_special_tokens=False)["input_ids"]) + 1)


LLAMA3_LIKE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.mark.parametrize("engine", ["static", "generate"])
def test_a_chat_answer_ends_at_the_templates_end_of_turn(engine):
    """prompt.chat trains the template's own end of turn after the answer (`<|eot_id|>` for Llama 3),
    which a base model's generation config does not list as EOS: it is among the stops, else the next
    turn the model writes after it (here one holding 42) was scored with the answer."""
    from stages import protocols as P
    from stages.evaluate import generate
    from stages.modeling import chat_completion, render_prompt
    from stages.tiny_model import build_tokenizer

    tokenizer = build_tokenizer(512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|start_header_id|>",
                                                                "<|end_header_id|>"]})
    tokenizer.chat_template = LLAMA3_LIKE
    prompt_p = dataclasses.replace(PROMPT, chat=True)
    question, answer = "Ann has 3 pens and buys 5. How many?", "#### 8"
    completion = chat_completion(tokenizer, prompt_p, question, answer, render_prompt(tokenizer, prompt_p, question))
    assert completion == answer + "<|eot_id|>"  # what training teaches
    protocol = P.get_protocol(P.TRAIN_PROMPT, prompt_p, EvaluateParams())
    plan = P.plan(protocol, tokenizer, {}, [{"question": question, "answer": answer}], [])
    assert "<|eot_id|>" in plan.stop
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    model = scripted_model(tokenizer, plan.input_ids[0], answer, eot, "user: 42", tokenizer.eos_token_id)
    texts, _ = generate(model, tokenizer, EvaluateParams(engine=engine, batch_size=1, max_new_tokens=60),
                        plan.input_ids, plan.stop, 60, show_progress=False)
    record = P.prediction_record(protocol, {"question": question, "answer": answer}, texts[0], plan.stop)
    assert (record["response"].strip(), record["extracted"], record["extracted_flexible"]) == (answer, "8", "8")


def test_an_end_of_turn_glued_to_what_follows_it_is_its_special_token():
    """Phi-3's kind writes `<|end|>` then EOS with nothing between: the stop is `<|end|>`, not `<|end|></s>`
    (a stop string the model's text would not hold until it wrote the EOS too)."""
    from stages import protocols as P
    from stages.tiny_model import build_tokenizer

    tokenizer = build_tokenizer(512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>"
                               "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    protocol = P.get_protocol(P.TRAIN_PROMPT, dataclasses.replace(PROMPT, chat=True), EvaluateParams())
    assert P.end_of_turn(protocol, tokenizer) == "<|end|>"
    assert "<|end|>" in P.stop_strings(protocol, tokenizer)


def test_greedy_changes_are_the_settings_that_change_an_argmax():
    from transformers import GenerationConfig

    from stages.evaluate import greedy_changes

    assert greedy_changes(GenerationConfig(repetition_penalty=1.05, no_repeat_ngram_size=0, num_beams=1)) == \
        {"repetition_penalty": 1.05}
    # What DeepSeek-R1-Distill and Llama-3.1-Instruct ship: sampling settings, which greedy decoding ignores.
    assert greedy_changes(GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, bos_token_id=1,
                                           eos_token_id=[2, 3])) == {}
    assert greedy_changes(GenerationConfig(suppress_tokens=[], no_repeat_ngram_size=3)) == {"no_repeat_ngram_size": 3}
    # transformers applies these to a decoder-only model too, against the prompt
    assert greedy_changes(GenerationConfig(encoder_repetition_penalty=1.2)) == {"encoder_repetition_penalty": 1.2}


def test_a_generation_config_the_static_engine_cannot_apply_is_decoded_with_generate(tiny_model_dir, tmp_path,
                                                                                    model_and_tokenizer):
    """transformers' generate, and so lm-eval, applies a model's repetition_penalty under greedy decoding; the
    static engine takes the plain argmax, so the stage decodes such a model with generate and says so."""
    import json
    import shutil
    import subprocess
    import sys

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.3}))
    question = QUESTIONS[1]
    data, params, out = tmp_path / "test.jsonl", tmp_path / "params.yaml", tmp_path / "out"
    data.write_text(json.dumps({"question": question, "answer": "48+24=72\n#### 72"}) + "\n")
    params.write_text(f"model:\n  name: {model_dir}\n  load_in_4bit: false\n  bnb_4bit_compute_dtype: float32\n"
                      f"prompt:\n  template: {json.dumps(PROMPT.template)}\n"
                      "evaluate:\n  max_new_tokens: 24\n  batch_size: 1\n  dequantize: false\n")
    proc = subprocess.run([sys.executable, "-m", "stages.evaluate", "--params", str(params), "--data-file", str(data),
                           "--metrics", str(out / "eval.json"), "--run-info", str(out / "run.json"),
                           "--predictions", str(out / "predictions.jsonl")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (f"evaluate: {model_dir}'s generation config sets repetition_penalty=1.3, which greedy decoding applies "
            "in transformers' generate and lm-eval and the static engine does not: decoding with evaluate.engine: "
            "generate instead (slower)") in proc.stdout
    run = json.loads((out / "run.json").read_text())
    assert (run["engine"], run["engine_param"]) == ("generate", "static")
    (record,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]

    # What the two engines decode for this model in this process: the penalty changes the answer here.
    model, tokenizer = model_and_tokenizer
    model.generation_config.repetition_penalty = 1.3
    try:
        eval_p = EvaluateParams(max_new_tokens=24, batch_size=1)
        with_penalty = generate_questions(model, tokenizer, PROMPT, dataclasses.replace(eval_p, engine="generate"),
                                          [question], show_progress=False)[0]
        argmax = generate_questions(model, tokenizer, PROMPT, eval_p, [question], show_progress=False)[0]
    finally:
        model.generation_config.repetition_penalty = None
    assert with_penalty != argmax
    assert record["generated"] == with_penalty[0]


def test_a_step_that_cannot_be_recorded_as_a_cuda_graph_stops_with_one_line(model_and_tokenizer, monkeypatch):
    """On a GPU a model whose step talks to the host fails to record. The engine once printed a line and
    decoded on eagerly, from the state a failed capture leaves (torch.cuda.graph's exit raises before it
    restores the stream), which no run ever checked. CUDA's graph API is stood in for on CPU."""
    import contextlib

    import torch

    from stages.decode import greedy_decode
    from stages.io import UserError

    class Stream:
        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def failing_capture(graph):
        yield
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", failing_capture)
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer("Question: 1+1?\nAnswer:")["input_ids"]] * 2
    with pytest.raises(UserError, match=r"^params\.yaml: evaluate\.engine: static cannot record this model's "
                                        r"decoding step as a CUDA graph \(operation not permitted when stream is "
                                        r"capturing\); set evaluate\.engine: generate$"), torch.inference_mode():
        greedy_decode(model, prompts, 2, 8, tokenizer.pad_token_id, lambda i, ids: False, use_graph=True)

    # Out of memory while recording is the stage's memory error to report, not "use generate" (which needs more).
    @contextlib.contextmanager
    def out_of_memory(graph):
        yield
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.cuda, "graph", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError), torch.inference_mode():
        greedy_decode(model, prompts, 2, 8, tokenizer.pad_token_id, lambda i, ids: False, use_graph=True)


def test_sampling_needs_the_generate_engine():
    from stages.config import ParamError

    with pytest.raises(ParamError, match="with greedy: false set engine: generate"):
        EvaluateParams(greedy=False)
    assert EvaluateParams(greedy=False, engine="generate").engine == "generate"
    with pytest.raises(ParamError, match="must be static or generate"):
        EvaluateParams(engine="vllm")


def test_a_model_the_engine_cannot_drive_gets_a_one_line_error(model_and_tokenizer, monkeypatch):
    """E.g. an architecture whose attention asks its cache for more than `update`."""
    import stages.decode as decode
    from stages.io import UserError

    def missing(self, *args, **kwargs):
        raise AttributeError("'SlotCache' object has no attribute 'get_seq_length'")

    monkeypatch.setattr(decode.SlotCache, "update", missing)
    model, tokenizer = model_and_tokenizer
    with pytest.raises(UserError) as error:
        generate_questions(model, tokenizer, PROMPT, EvaluateParams(max_new_tokens=4, batch_size=2), QUESTIONS[:2],
                 show_progress=False)
    message = str(error.value)
    assert "\n" not in message and "evaluate.engine: static cannot decode LlamaForCausalLM" in message
    assert message.endswith("set evaluate.engine: generate") and "get_seq_length" in message


def test_a_failure_in_the_engine_itself_is_not_called_the_models(model_and_tokenizer, monkeypatch):
    """An error raised by stages/decode.py's own code, not inside the model's forward, keeps its
    traceback: it is a bug to report, not a model to decode with evaluate.engine: generate (run 20's
    compaction error read "cannot decode LlamaForCausalLM")."""
    import stages.decode as decode

    def broken(lengths):
        raise RuntimeError("The expanded size of the tensor (64) must match the existing size (30)")

    monkeypatch.setattr(decode, "prefill_chunks", broken)
    model, tokenizer = model_and_tokenizer
    with pytest.raises(RuntimeError, match="expanded size") as error:
        generate_questions(model, tokenizer, PROMPT, EvaluateParams(max_new_tokens=4, batch_size=2), QUESTIONS[:2],
                           show_progress=False)
    assert type(error.value) is RuntimeError


def test_static_engine_drives_a_4bit_base_with_an_unmerged_adapter(tiny_model_dir, tmp_path):
    """evaluate.dequantize: false keeps the NF4 base and the PeftModel wrapper; the engine decodes
    through them as generate does."""
    from peft import LoraConfig, get_peft_model

    from stages.modeling import load_model, load_tokenizer

    model_p = ModelParams(name=str(tiny_model_dir), bnb_4bit_compute_dtype="float32")
    lora = get_peft_model(load_model(model_p), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                          init_lora_weights=False))  # non-zero B: it shows
    lora.save_pretrained(tmp_path / "adapter")
    model = load_for_generation(model_p, str(tmp_path / "adapter"), dequantize=False)
    assert type(model).__name__.startswith("Peft")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.padding_side = "left"
    eval_p = EvaluateParams(max_new_tokens=8, batch_size=4)
    static = generate_questions(model, tokenizer, PROMPT, eval_p, QUESTIONS, show_progress=False)
    reference = generate_questions(model, tokenizer, PROMPT, dataclasses.replace(eval_p, engine="generate"), QUESTIONS,
                         show_progress=False)
    assert static == reference and static[1] > 0
