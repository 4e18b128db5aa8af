"""Model, tokenizer and prompt plumbing shared by train and evaluate (not a stage itself).

Heavy imports live inside the functions so that importing this module stays instant.
"""
from __future__ import annotations

import os
from pathlib import Path

from stages.config import ModelParams, PromptParams
from stages.gsm8k import format_prompt
from stages.io import UserError

# Above this many parameters, 4-bit on a CPU is hours per step: refuse unless asked twice.
CPU_4BIT_PARAM_LIMIT = 1_000_000_000


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _load_error(what: str, name: str, exc: Exception, attn_implementation: str | None = None) -> UserError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = first.lower()
    # transformers refusing the attention kind (Gemma 2 under sdpa, flash-attn not installed) is not
    # a problem with model.name: name the param that fixes it.
    if attn_implementation == "sdpa" and ("scaled_dot_product_attention" in text or "sdpa" in text):
        return UserError(f"params.yaml: model.attn_implementation: sdpa: {first.split('. ')[0].rstrip('.')}; "
                         "set model.attn_implementation: eager")
    if attn_implementation == "flash_attention_2" and ("flashattention" in text or "flash_attn" in text):
        return UserError(f"params.yaml: model.attn_implementation: flash_attention_2: {first.split('. ')[0].rstrip('.')}; "
                         "set model.attn_implementation: sdpa (or eager)")
    if _looks_local(name):
        return UserError(f"params.yaml: model.name: cannot load {what} from local path '{name}': {first}")
    return UserError(
        f"params.yaml: model.name: cannot load {what} '{name}' ({first}). Offline? Download it once "
        f"(`hf download {name}`) and set HF_HUB_OFFLINE=1, or set model.name to a local directory."
    )


def load_config(name: str, revision: str | None = None):
    from transformers import AutoConfig

    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise UserError(f"params.yaml: model.name: '{name}' is not a directory (for the offline demo run `make demo`)")
    try:
        return AutoConfig.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as exc:
        raise _load_error("the model config", name, exc) from None


def load_tokenizer(name: str, revision: str | None = None):
    """The tokenizer of a model (hub id at `revision`, or local directory such as a saved adapter)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as exc:
        raise _load_error("the tokenizer", name, exc) from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"params.yaml: model.name: tokenizer of '{name}' has no EOS token; generation could never stop")
    if tokenizer.pad_token_id is None:
        # Llama-3 ships no pad token. Padding with EOS is safe here because labels come from the
        # completion mask, not from "not pad", so the real EOS stays in the loss.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compute_dtype(model: ModelParams):
    import torch

    return getattr(torch, model.bnb_4bit_compute_dtype)


def quantization_config(model: ModelParams):
    """BitsAndBytesConfig for QLoRA's NF4 base, or None when the base stays in compute dtype."""
    if not model.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(model),
        bnb_4bit_quant_storage=compute_dtype(model),
    )


def check_cpu_4bit(model: ModelParams, n_params: int | None) -> None:
    """4-bit without CUDA works (bitsandbytes' CPU path) but only makes sense for tiny models."""
    import torch

    if model.load_in_4bit and not torch.cuda.is_available() and (n_params or 0) > CPU_4BIT_PARAM_LIMIT \
            and os.environ.get("QLORA_ALLOW_CPU") != "1":
        raise UserError(
            f"params.yaml: model.load_in_4bit: no CUDA GPU found, so bitsandbytes would quantize and run this "
            f"{n_params / 1e9:.1f}B-parameter model on the CPU at hours per step. Run on a GPU, or use a small "
            "model (`make demo` builds one); set QLORA_ALLOW_CPU=1 to run anyway."
        )


def device_map():
    """Each process puts the whole model on its own GPU (one rank per GPU under accelerate)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def process_state():
    """accelerate's view of this process (rank, world size) for the stages run under `stages.launch`.
    Gloo ranks on CPU (tests) are only seen as distributed when accelerate is told `cpu=`."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def load_model(model: ModelParams, *, dtype=None):
    """The base causal LM: NF4-quantized when model.load_in_4bit, else in `dtype` (default compute dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(model.name, model.revision)
    n_params = estimate_param_count(config.to_dict())
    check_cpu_4bit(model, n_params)
    import logging

    class EagerRequired(logging.Handler):
        """Catches transformers warning, while loading, that this model needs eager attention."""
        said: str | None = None

        def emit(self, record):
            text = record.getMessage()
            if "eager" in text and ("sdpa" in text or "scaled_dot_product_attention" in text):
                self.said = self.said or text.strip().splitlines()[0]

    eager_required = EagerRequired(logging.WARNING)
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(eager_required)
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            model.name,
            revision=model.revision,
            quantization_config=quantization_config(model),
            dtype=dtype or compute_dtype(model),
            device_map=device_map(),
            attn_implementation=model.attn_implementation,
        )
    except (OSError, ValueError, ImportError) as exc:
        error = _load_error("the model", model.name, exc, model.attn_implementation)
        if isinstance(exc, ImportError) and "model.attn_implementation" not in str(error):
            raise  # a missing package other than the attention's: its own traceback says more
        raise error from None
    finally:
        hf_logger.removeHandler(eager_required)
    if model.attn_implementation == "sdpa" and eager_required.said:
        # A model that loads under sdpa but computes something else than it was trained with
        # (e.g. without its attention soft-capping) would give numbers that are not the model's.
        raise UserError(f"params.yaml: model.attn_implementation: sdpa: transformers says eager attention is needed "
                        f"({eager_required.said[:200]}); set model.attn_implementation: eager")
    if not torch.cuda.is_available():
        disable_cpu_bf16_repack(lm)
    return lm


def disable_cpu_bf16_repack(lm) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weights on its first no-grad
    eval forward, after which backward silently stops flowing through the frozen base (so a dev
    evaluation mid-training would break training). Opting out keeps one weight layout throughout."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in lm.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def estimate_param_count(config: dict) -> int | None:
    """Parameters of a Llama-style decoder from its config (no weights needed); None for others."""
    from stages.memory import model_shape

    try:
        shape = model_shape(config)
    except UserError:
        return None
    return shape.quantized_params + shape.unquantized_params


def render_prompt(tokenizer, prompt: PromptParams, question: str) -> str:
    """The text the model sees before its answer, identical in training and evaluation."""
    text = format_prompt(prompt.template, question)
    if prompt.chat:
        text = render_chat(tokenizer, prompt, [{"role": "user", "content": text}], add_generation_prompt=True)
    return text


def render_chat(tokenizer, prompt: PromptParams, messages: list[dict], add_generation_prompt: bool) -> str:
    """`messages` through the tokenizer's chat template, with prompt.chat_template_kwargs as template
    variables: every rendering goes through here, so training and evaluation see the same template
    (Qwen3's defaults to thinking mode unless told enable_thinking: false)."""
    import inspect

    from stages.protocols import check_undated

    if not getattr(tokenizer, "chat_template", None):
        raise UserError("params.yaml: prompt.chat: true, but the tokenizer has no chat template")
    kwargs = prompt.chat_template_kwargs
    check_undated(tokenizer, kwargs)
    # A key that names an argument of apply_chat_template would not reach the template (or would
    # fail with "multiple values"): refuse it rather than silently change how the text is rendered.
    clash = sorted(set(kwargs) & (set(inspect.signature(tokenizer.apply_chat_template).parameters) - {"kwargs"}))
    if clash:
        raise UserError(f"params.yaml: prompt.chat_template_kwargs: {clash[0]!r} is an argument of "
                        "apply_chat_template, not a chat template variable")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


def chat_completion(tokenizer, prompt: PromptParams, question: str, answer: str, prompt_text: str) -> str:
    """What the chat template writes after the generation prompt `prompt_text` when the answer is the
    assistant's turn: the answer as the template spaces it and the template's own end of turn
    (Qwen's `<|im_end|>`, Llama 3's `<|eot_id|>`, and whatever follows it), which is what a chat model
    emits to stop. Training on the template's completion rather than on " " + answer + EOS means
    the model learns the turn that evaluation's generation prompt asks it to continue."""
    user = {"role": "user", "content": format_prompt(prompt.template, question)}
    full = render_chat(tokenizer, prompt, [user, {"role": "assistant", "content": answer.strip()}],
                       add_generation_prompt=False)
    completion = full[len(prompt_text):]
    if not full.startswith(prompt_text) or answer.strip() not in completion:
        # E.g. a template whose generation prompt opens a <think> block its assistant turns never
        # show, or one that rewrites the assistant's content: the rendered answer would not be what
        # the model is asked to produce after the prompt.
        why = "the generation prompt is not a prefix of prompt + answer" if not full.startswith(prompt_text) \
            else "the answer is not in what follows the generation prompt"
        raise UserError(f"params.yaml: prompt.chat: the chat template of '{tokenizer.name_or_path}' cannot be used "
                        f"for prompt/completion training ({why}); set prompt.chat: false or use another model")
    return completion


def encode_prompt(tokenizer, text: str, prompt: PromptParams) -> list[int]:
    # A chat template already writes BOS into the text; adding it again would double it.
    return tokenizer(text, add_special_tokens=not prompt.chat)["input_ids"]


def tokenize_example(tokenizer, prompt: PromptParams, question: str, answer: str, max_length: int) -> dict:
    """input_ids = prompt + completion, completion_mask marking the completion.

    Plain prompts: the completion is " " + answer + EOS, EOS appended so the model learns to stop.
    Chat prompts (prompt.chat): the completion is the chat template's own rendering of the answer as
    the assistant's turn, up to and including its end-of-turn text (`chat_completion`): no space the
    template would not write, and the end of turn the chat model stops on instead of the base EOS.
    Prompt and completion are tokenized separately, exactly as at generation time (the model sees the
    prompt's tokens and produces the completion's). Rows longer than max_length are cut at the end
    (`truncated` says so).
    """
    prompt_text = render_prompt(tokenizer, prompt, question)
    prompt_ids = encode_prompt(tokenizer, prompt_text, prompt)
    if prompt.chat:
        completion = chat_completion(tokenizer, prompt, question, answer, prompt_text)
        answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    else:
        answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_length]
    mask = ([0] * len(prompt_ids) + [1] * len(answer_ids))[:max_length]
    return {"input_ids": ids, "completion_mask": mask, "truncated": len(prompt_ids) + len(answer_ids) > max_length}
