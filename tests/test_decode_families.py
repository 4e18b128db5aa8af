"""The static engine against transformers' generate on tiny models of each family it claims.

What differs between families is how attention is masked: sliding windows (Mistral, Phi-3,
Qwen2's use_sliding_window), layers of two types (Gemma 2, Gemma 3), eager-only attention with
soft-capping (Gemma 2). The window is smaller than prompt + new tokens in every batch, and one
batch's prompt fits inside it, so that both the prefill's window and the window moving during
decoding are compared. float32: the engines then agree to the last bit that argmax can see.
"""
import pytest

from stages.config import EvaluateParams, PromptParams

PROMPT = PromptParams(template="Question: {question}\nAnswer:", chat=False)
# Lengths 8 to 48 tokens: left-padded batches, and with batch 3 one batch of width 48 and one of 11.
QUESTIONS = ["1+1?", "Natalia sold 48 clips in April and half as many in May. How many in all?",
             "x", "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts?",
             "What is 7 times 8, minus 3?", "Hi"]
NEW_TOKENS = 16
WINDOW = 16
SLIDING, FULL = "sliding_attention", "full_attention"

CASES = {
    "llama": ("llama", {}),
    "llama-eager": ("llama", {"attn_implementation": "eager"}),
    "qwen2": ("qwen2", {}),
    "qwen2-sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": ("qwen3", {}),
    "qwen3-sliding-eager": ("qwen3", {"use_sliding_window": True, "sliding_window": WINDOW,
                                      "layer_types": [SLIDING, FULL], "attn_implementation": "eager"}),
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    "mistral-eager": ("mistral", {"sliding_window": WINDOW, "attn_implementation": "eager"}),
    "gemma3": ("gemma3", {"layer_types": [SLIDING, FULL], "sliding_window": WINDOW}),
    # Gemma 2 soft-caps its attention scores, which only eager attention does.
    "gemma2": ("gemma2", {"sliding_window": WINDOW, "attn_implementation": "eager"}),
    "phi3": ("phi3", {}),
    "phi3-sliding": ("phi3", {"sliding_window": WINDOW}),
}


@pytest.fixture(scope="session")
def tokenizer():
    from stages.tiny_model import build_tokenizer

    tokenizer = build_tokenizer(512)
    tokenizer.padding_side = "left"
    return tokenizer


def build(tokenizer, family, **overrides):
    from stages.tiny_model import tiny_model

    return tiny_model(family, tokenizer, **overrides).eval()


def token_ids(model, tokenizer, engine, batch_size=3, ended=None):
    """Each question's NEW_TOKENS generated ids (no early stop unless `ended` says so: static only),
    and the widths of generate's batches."""
    import torch

    import stages.decode
    from stages.evaluate import make_batches
    from stages.modeling import encode_prompt, render_prompt

    encoded = [encode_prompt(tokenizer, render_prompt(tokenizer, PROMPT, q), PROMPT) for q in QUESTIONS]
    batches = make_batches(encoded, batch_size, tokenizer.pad_token_id, "cpu")
    widths = [batch.width for _, batch in batches]
    if engine == "static":
        with torch.inference_mode():
            return stages.decode.greedy_decode(model, encoded, batch_size, NEW_TOKENS, tokenizer.pad_token_id,
                                               ended or (lambda i, ids: False), use_graph=False), widths
    ids = [None] * len(QUESTIONS)
    for indices, batch in batches:
        mask = torch.tensor([[0] * (batch.width - n) + [1] * n for n in batch.lengths])
        with torch.inference_mode():
            new = model.generate(input_ids=batch.input_ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=None)[:, batch.width:]
        for row, i in zip(new.tolist(), indices):
            ids[i] = row
    return ids, widths


@pytest.mark.parametrize("case", CASES)
def test_static_engine_matches_generate_for_every_family(tokenizer, case):
    """Token for token, every row, against generate's own masks (which build the sliding window)."""
    from stages.decode import layer_kinds

    family, overrides = CASES[case]
    model = build(tokenizer, family, **overrides)
    assert model.config._attn_implementation == overrides.get("attn_implementation", "sdpa")
    static, widths = token_ids(model, tokenizer, "static")
    reference, _ = token_ids(model, tokenizer, "generate")
    if SLIDING in layer_kinds(model):
        # The window is exceeded in every batch: by the prompt itself in the widest batch, only
        # while decoding in the narrowest.
        assert model.config.sliding_window == WINDOW
        assert max(widths) > WINDOW >= min(widths) and min(widths) + NEW_TOKENS > WINDOW
    assert static == reference
    assert all(len(row) == NEW_TOKENS for row in static)
    assert len({tuple(row) for row in static}) > 1, "identical rows would not show a mix-up between rows"


@pytest.mark.parametrize("case", CASES)
def test_questions_taken_as_answers_end_match_generate_for_every_family(tokenizer, case, monkeypatch):
    """Two rows, answers ending at different lengths: questions come into the rows as others end
    (over the keys of the question before them), and the last answer moves to a row of its own, under
    every family's masks; each question's tokens are generate's."""
    import stages.decode

    family, overrides = CASES[case]
    model = build(tokenizer, family, **overrides)
    monkeypatch.setattr(stages.decode, "CHECK_EVERY", 3)
    monkeypatch.setattr(stages.decode, "COMPACT_DOWN_TO", 1)  # the last answer runs on a row of its own
    targets = [5, 16, 2, 11, 8, 14]
    static, _ = token_ids(model, tokenizer, "static", batch_size=2, ended=lambda i, ids: len(ids) >= targets[i])
    reference, _ = token_ids(model, tokenizer, "generate")
    assert all(len(ids) >= targets[i] and ids == reference[i][:len(ids)] for i, ids in enumerate(static))


def test_the_layer_types_are_the_ones_each_case_is_meant_to_test(tokenizer):
    """So that the comparison above covers mixed layer types and all-sliding models as claimed."""
    from stages.decode import layer_kinds

    kinds = {case: layer_kinds(build(tokenizer, family, **overrides))
             for case, (family, overrides) in CASES.items()}
    assert kinds["llama"] == kinds["qwen2"] == kinds["phi3"] == [FULL, FULL]
    assert kinds["mistral"] == kinds["phi3-sliding"] == [SLIDING, SLIDING]
    assert kinds["qwen2-sliding"] == [FULL, SLIDING]
    assert kinds["gemma2"] == kinds["gemma3"] == kinds["qwen3-sliding-eager"] == [SLIDING, FULL]


def refused(model, tokenizer):
    """The one-line UserError of stages.evaluate.generate (static engine), checking that the model
    never ran."""
    from stages.evaluate import generate_questions
    from stages.io import UserError

    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(UserError) as error:
        generate_questions(model, tokenizer, PROMPT, EvaluateParams(max_new_tokens=4, batch_size=2), QUESTIONS[:2],
                           show_progress=False)
    assert not calls, "refused only after generating"
    message = str(error.value)
    assert "\n" not in message and message.startswith("params.yaml: evaluate.engine: static cannot decode")
    return message


def test_flash_attention_is_refused_before_generating(tokenizer):
    """flash_attention_2 takes no 4-D mask and cannot be checked on CPU: refused, not trusted."""
    model = build(tokenizer, "llama")
    model.config._attn_implementation = "flash_attention_2"  # flash-attn is not installed here
    message = refused(model, tokenizer)
    assert "flash_attention_2" in message
    assert message.endswith("set evaluate.engine: generate, or model.attn_implementation: sdpa")


@pytest.mark.parametrize("kind", ["linear_attention", "chunked_attention"])
def test_an_unknown_layer_type_is_refused_before_generating(tokenizer, kind):
    model = build(tokenizer, "qwen3")
    model.config.layer_types = [FULL, kind]
    message = refused(model, tokenizer)
    assert repr(kind) in message and message.endswith("set evaluate.engine: generate")


def test_mixed_layer_types_on_a_forward_without_per_type_masks_are_refused(tokenizer):
    """Llama's forward builds one mask for all layers: it could not give sliding layers their own."""
    model = build(tokenizer, "llama", layer_types=[SLIDING, FULL], sliding_window=WINDOW)
    message = refused(model, tokenizer)
    assert "takes no mask per layer type" in message and message.endswith("set evaluate.engine: generate")


def test_gemma2_under_sdpa_names_attn_implementation(tokenizer, tmp_path):
    """transformers refuses sdpa for Gemma 2 (it soft-caps scores): the message names the param to set."""
    from stages.config import ModelParams
    from stages.io import UserError
    from stages.modeling import load_model

    build(tokenizer, "gemma2", attn_implementation="eager").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    params = ModelParams(name=str(tmp_path), load_in_4bit=False, bnb_4bit_compute_dtype="float32")
    with pytest.raises(UserError) as error:
        load_model(params)
    message = str(error.value)
    assert "\n" not in message and message.startswith("params.yaml: model.attn_implementation: sdpa")
    assert message.endswith("set model.attn_implementation: eager") and "model.name" not in message
    assert load_model(ModelParams(name=str(tmp_path), load_in_4bit=False, bnb_4bit_compute_dtype="float32",
                                  attn_implementation="eager")).config._attn_implementation == "eager"


def test_a_warning_that_eager_is_needed_is_an_error_under_sdpa(tiny_model_dir, monkeypatch):
    """Some transformers versions load such a model under sdpa and only warn: refuse it the same way."""
    import transformers
    from transformers.utils import logging as hf_logging

    from stages.config import ModelParams
    from stages.io import UserError
    from stages.modeling import load_model

    real = transformers.AutoModelForCausalLM.from_pretrained

    def warns(*args, **kwargs):
        hf_logging.get_logger("transformers.models.fake").warning(
            "It is strongly recommended to use the `eager` attention implementation instead of `sdpa` for this model.")
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", warns)
    with pytest.raises(UserError) as error:
        load_model(ModelParams(name=str(tiny_model_dir), load_in_4bit=False, bnb_4bit_compute_dtype="float32"))
    assert "\n" not in str(error.value) and str(error.value).endswith("set model.attn_implementation: eager")
