"""Build a tiny, randomly initialised Llama model and tokenizer, for the offline demo and the tests.

    python -m stages.tiny_model models/tiny-llama [--vocab-size 512] [--seed 0]

The directory loads like any Hub checkpoint (`AutoModelForCausalLM.from_pretrained(OUT_DIR)`,
`AutoTokenizer.from_pretrained(OUT_DIR)`), so the pipeline runs end to end on a machine with no
Hub access, in seconds, on CPU. It knows nothing about arithmetic: it exists to exercise the code
paths (tokenization, chat template, padding, LoRA, generation, scoring), not to score well.

- tokenizer: byte-level BPE trained on a few hundred GSM8K-style problems from reasoning-gym plus
  the prompt words; `<s>` bos, `</s>` eos and a separate `<pad>`: padding with eos would hide the
  eos that ends each training example from the loss;
- model: 2 layers, hidden size 64, grouped-query attention (4 heads, 2 KV heads), untied
  embeddings, as in Llama 3, so that LoRA's "all-linear" targets the same kinds of modules.

Deterministic: the same --seed writes byte-identical files.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from stages.config import DEFAULT_TEMPLATE
from stages.io import UserError, atomic_path, cli

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
# Fixed, so that every seed gets the same tokenizer and only the weights differ.
CORPUS_SEED = 1234
CORPUS_SIZE = 300
MAX_LENGTH = 2048
# "role: content" lines. The prompt rendered with add_generation_prompt is a prefix of prompt plus
# answer, which TRL relies on for prompt-completion chat data; the assistant's turn ends with eos
# and nothing after it, so a trained model stops there.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    # A literal newline after a tag would be eaten: transformers renders with trim_blocks.
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def training_corpus() -> list[str]:
    from stages.gsm_symbolic import generate_rows

    # Repeated so that BPE merges the prompt words: shorter prompts, faster demo and tests.
    lines = [DEFAULT_TEMPLATE, "system: user: assistant: Question: Answer: ####"] * 50
    for row in generate_rows(CORPUS_SIZE, seed=CORPUS_SEED):
        lines += [row["question"], row["answer"]]
    return lines


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # All 256 bytes, so any text (£, €, emoji) encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    # Like Llama: `tokenizer(text)` starts with bos; the chat template writes bos itself.
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
    )


# Every family gets the same small shape; what differs is each family's own attention layout
# (sliding windows, layer types, soft-capping, fused projections), which is what the tests exercise.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}


def tiny_config(family: str, tokenizer, **overrides):
    """A tiny config of `family` (a FAMILIES key) for `tokenizer`; `overrides` are config fields
    (e.g. num_hidden_layers=4, sliding_window=8, layer_types=[...])."""
    import transformers

    if family not in FAMILIES:
        raise UserError(f"unknown model family {family!r}; one of {', '.join(FAMILIES)}")
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if family != "llama":
        # Gemma and Qwen3 default to head_dim 256/128 whatever the hidden size: keep it 64 / 4 heads.
        fields["head_dim"] = 16
    fields.update(overrides)
    return getattr(transformers, FAMILIES[family][0])(**fields)


def tiny_model(family: str, tokenizer, seed: int = 0, **overrides):
    """A randomly initialised model of `family` in memory (see tiny_config)."""
    import torch
    import transformers

    config = tiny_config(family, tokenizer, **overrides)
    torch.manual_seed(seed)
    return getattr(transformers, FAMILIES[family][1])(config)


def build_tiny_model(out_dir: str | Path, vocab_size: int = 512, seed: int = 0, family: str = "llama",
                     **overrides) -> Path:
    """Write tokenizer and model to `out_dir` (replacing it), atomically; return the path."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (all bytes + specials), "
                        f"got {vocab_size}")
    tokenizer = build_tokenizer(vocab_size)
    model = tiny_model(family, tokenizer, seed=seed, **overrides)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for writing one 0.5 MB file is noise
    out_dir = build_tiny_model(args.out_dir, vocab_size=args.vocab_size, seed=args.seed)
    print(f"built a tiny random Llama (2 layers, hidden 64, vocab {args.vocab_size}, seed {args.seed}) "
          f"and its tokenizer in {out_dir}")


if __name__ == "__main__":
    main()
