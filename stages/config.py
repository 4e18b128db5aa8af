"""Validated parameters: one dataclass per section of params.yaml.

`load_params("params.yaml", "train")` returns a `TrainParams`; an unknown key (with the closest
valid one suggested), a wrong type or an out-of-range value raises a one-line `UserError` naming
the file and the dotted key, before any model or dataset is touched.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from stages.io import UserError
from stages.protocols import DRAWS_FROM_TRAIN, PROTOCOL_NAMES

DEFAULT_TEMPLATE = (
    "You are a patient math tutor. Solve the problem step by step, then write the final answer "
    "on its own line as '#### <number>', for example '#### 42'.\n\n"
    "Question: {question}\nAnswer:"
)


class ParamError(UserError):
    """Raised by a section's __post_init__; `load_params` prefixes it with file and section."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ParamError(key, message)


@dataclass(frozen=True)
class DataParams:
    # Hub dataset id ("openai/gsm8k"), a local directory (hub layout, or *.jsonl files named
    # train/test), or "gsm_symbolic" for offline GSM8K-style problems from reasoning-gym.
    source: str = "openai/gsm8k"
    # Hub config name ("main" for openai/gsm8k); ignored for local JSONL and gsm_symbolic.
    config: Optional[str] = "main"
    # Hub dataset revision (a commit sha, tag or branch) passed to load_dataset; null = the default
    # branch as it is today. Pin a sha for a number that can be reproduced next year.
    revision: Optional[str] = None
    # gsm_symbolic only: how many problems to generate (split into train/test by test_fraction).
    # Not called "size": DVC's run-cache key leaves out every param named size or nfiles (dvc issue
    # 10296), so a change of it would restore the old data from the run-cache.
    num_problems: int = 1000
    test_fraction: float = 0.2
    # Rows carved from the train split (never from test) for validation loss.
    dev_size: int = 200
    seed: int = 42
    # Optional cap per split, for quick runs. Larger than a split is an error, not a silent no-op.
    limit: Optional[int] = None

    def __post_init__(self):
        _check(bool(self.source.strip()), "source", "must not be empty")
        _check(self.num_problems > 0, "num_problems", f"must be > 0, got {self.num_problems}")
        _check(0 < self.test_fraction < 1, "test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        # Training reports dev loss (and checkpoints are chosen by nothing else): a dev split is needed.
        _check(self.dev_size >= 1, "dev_size", f"must be >= 1, got {self.dev_size}")
        _check(self.limit is None or self.limit > 0, "limit", f"must be > 0 or null, got {self.limit}")


@dataclass(frozen=True)
class ModelParams:
    # Hub id or local directory of any causal LM.
    name: str = "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
    # Hub revision (commit sha, tag or branch) passed to from_pretrained; null = the default branch.
    # The `fingerprint` stage records the commit it resolves to, so a moved branch re-runs training.
    revision: Optional[str] = None
    load_in_4bit: bool = True
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "bfloat16"
    # sdpa works everywhere and handles padding-free batches (transformers derives the
    # block-diagonal mask from position_ids); "eager" is the slow fallback.
    attn_implementation: str = "sdpa"

    def __post_init__(self):
        _check(bool(self.name.strip()), "name", "must not be empty")
        _check(self.bnb_4bit_quant_type in ("nf4", "fp4"), "bnb_4bit_quant_type",
               f"must be nf4 or fp4, got {self.bnb_4bit_quant_type!r}")
        _check(self.bnb_4bit_compute_dtype in ("bfloat16", "float16", "float32"),
               "bnb_4bit_compute_dtype",
               f"must be bfloat16, float16 or float32, got {self.bnb_4bit_compute_dtype!r}")
        _check(self.attn_implementation in ("sdpa", "eager", "flash_attention_2"),
               "attn_implementation",
               f"must be sdpa, eager or flash_attention_2, got {self.attn_implementation!r}")


@dataclass(frozen=True)
class PromptParams:
    # Must contain {question}; the completion is the reference solution ending in '#### N'.
    template: str = DEFAULT_TEMPLATE
    # true: wrap prompt/completion in the tokenizer's chat template (instruct models).
    chat: bool = False
    # Extra variables for the chat template, e.g. {enable_thinking: false} for Qwen3 (whose template
    # otherwise defaults to thinking mode). Used in training and evaluation alike.
    chat_template_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        _check("{question}" in self.template, "template", "must contain {question}")
        try:
            self.template.format(question="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ParamError("template", f"is not a valid format string ({exc!r}); "
                             "write literal braces as {{ and }}") from None


# train.cuda_graphs: a CUDA graph replays one sequence length, so rows are padded up to a multiple of
# this many tokens (GSM8K's rows, ~100-500 tokens, then need ~6 recordings per layer instead of one
# per distinct length). Padding adds ~13% of tokens at GSM8K's mean length, which at batch 1 the GPU,
# mostly idle, absorbs; pads are masked out of attention and carry no loss.
CUDA_GRAPH_LENGTH_MULTIPLE = 64
OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adamw_torch_fused")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


@dataclass(frozen=True)
class TrainParams:
    lora_r: int = 32
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # "all-linear" or a list of module names such as [q_proj, v_proj].
    lora_target_modules: Any = "all-linear"
    learning_rate: float = 2e-4
    num_train_epochs: float = 1.0
    # > 0 overrides num_train_epochs.
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = True
    optim: str = "paged_adamw_8bit"
    # Prompt + completion tokens; longer rows are truncated (the count is printed).
    max_length: int = 512
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int = 100
    save_steps: int = 100
    # Concatenate the micro-batch's rows into one row (no pad tokens; attention kept per row via
    # position_ids). Same loss as padding, less work: see README "Speed".
    padding_free: bool = True
    # torch.compile each decoder layer in place (regional compilation: one compilation serves every
    # layer): fewer, fused kernels. "auto": on one CUDA GPU with bf16 compute, unless Liger is asked
    # for (the measured fast path: README "Speed"); not on CPU, where compiling a short run costs
    # more than it saves, nor where it was never measured (fp16 cards, several processes).
    torch_compile: bool | str = "auto"
    # Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy); CUDA only.
    # "auto": on CUDA when the layers are not compiled (compiling fuses the same kernels).
    use_liger_kernel: bool | str = "auto"
    # With torch_compile: replay each compiled decoder layer as CUDA graphs instead of launching its
    # kernels one by one from Python, which is most of a batch-1 step's time. Rows are padded to a
    # multiple of 64 tokens (pads are masked out of attention and loss) so that a handful of lengths
    # is recorded. Needs gradient_checkpointing: false. CUDA only (ignored on CPU).
    cuda_graphs: bool = False
    # GPUs (processes) `accelerate launch` starts for this stage, one DDP rank each. The effective
    # batch stays per_device_train_batch_size × gradient_accumulation_steps: each rank accumulates
    # gradient_accumulation_steps / num_processes micro-batches (or, when that does not divide,
    # takes per_device_train_batch_size / num_processes rows per micro-batch).
    num_processes: int = 1

    def __post_init__(self):
        _check(self.lora_r > 0, "lora_r", f"must be > 0, got {self.lora_r}")
        # Inductor fuses what Liger's layer kernels fuse (TRL fuses the LM head either way), and
        # dynamo cannot trace through Liger's kernels: one or the other.
        for key in ("torch_compile", "use_liger_kernel"):
            _check(getattr(self, key) in (True, False, "auto"), key,
                   f"must be true, false or auto, got {getattr(self, key)!r}")
        _check(not (self.torch_compile is True and self.use_liger_kernel is True), "torch_compile",
               "true needs train.use_liger_kernel: false or auto (compiling fuses the same kernels)")
        _check(not self.cuda_graphs or self.torch_compile is True, "cuda_graphs",
               "true needs train.torch_compile: true (the graphs are recorded from the compiled layers)")
        # Checkpointing reruns each layer's forward inside backward with a saved RNG state, which a
        # CUDA graph cannot replay (inductor refuses run_with_rng_state).
        _check(not (self.cuda_graphs and self.gradient_checkpointing), "cuda_graphs",
               "true needs train.gradient_checkpointing: false")
        # Never run under DDP: its gradient hooks and the graphs' reused output memory were not measured together.
        _check(not (self.cuda_graphs and self.num_processes > 1), "cuda_graphs",
               f"true runs on one GPU only; train.num_processes is {self.num_processes}")
        _check(self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
        _check(0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        targets = self.lora_target_modules
        _check(targets == "all-linear" or (isinstance(targets, list) and targets
                                           and all(isinstance(t, str) and t for t in targets)),
               "lora_target_modules", f"must be 'all-linear' or a non-empty list of module names, got {targets!r}")
        _check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        _check(self.num_train_epochs > 0, "num_train_epochs", f"must be > 0, got {self.num_train_epochs}")
        _check(self.max_steps == -1 or self.max_steps > 0, "max_steps", f"must be -1 or > 0, got {self.max_steps}")
        _check(self.per_device_train_batch_size > 0, "per_device_train_batch_size",
               f"must be > 0, got {self.per_device_train_batch_size}")
        _check(self.gradient_accumulation_steps > 0, "gradient_accumulation_steps",
               f"must be > 0, got {self.gradient_accumulation_steps}")
        _check(self.optim in OPTIMIZERS, "optim", f"must be one of {', '.join(OPTIMIZERS)}; got {self.optim!r}")
        _check(self.max_length >= 16, "max_length", f"must be >= 16, got {self.max_length}")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(self.lr_scheduler_type in SCHEDULERS, "lr_scheduler_type",
               f"must be one of {', '.join(SCHEDULERS)}; got {self.lr_scheduler_type!r}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        _check(self.num_processes >= 1, "num_processes", f"must be >= 1, got {self.num_processes}")
        _check(self.gradient_accumulation_steps % self.num_processes == 0
               or self.per_device_train_batch_size % self.num_processes == 0, "num_processes",
               f"{self.num_processes} processes cannot share the effective batch of "
               f"{self.per_device_train_batch_size} × {self.gradient_accumulation_steps}: make "
               "per_device_train_batch_size or gradient_accumulation_steps a multiple of it")
        for key in ("logging_steps", "eval_steps", "save_steps"):
            _check(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")

    def resolved(self, on_gpu: bool, compute_dtype: str = "bfloat16") -> "TrainParams":
        """These params with torch_compile and use_liger_kernel as the booleans that run here.

        auto compiles on one CUDA GPU with bf16 compute unless use_liger_kernel is true: the path
        measured fastest, with the same losses as the plain recipe and less memory (README "Speed";
        benchmarks/results/). Elsewhere it is off: on CPU (compiling costs more than a short run
        saves), with fp16 compute (T4/V100: never measured compiled) and under DDP (likewise).
        Liger's auto is on CUDA whenever the layers are not compiled."""
        compile_ = self.torch_compile
        if compile_ == "auto":
            compile_ = (on_gpu and compute_dtype == "bfloat16" and self.num_processes == 1
                        and self.use_liger_kernel is not True)
        liger = self.use_liger_kernel
        if liger == "auto":
            liger = on_gpu and not compile_
        return dataclasses.replace(self, torch_compile=compile_, use_liger_kernel=liger)


@dataclass(frozen=True)
class EvaluateParams:
    # Which prepared split to score: test (the published number) or dev.
    split: str = "test"
    # The recipe the number is measured under (stages/protocols.py): train_prompt (the fine-tuning
    # prompt, zero-shot: what our adapters learned), lm_eval_gsm8k (lm-evaluation-harness gsm8k,
    # 5-shot: base models' published numbers) or lm_eval_gsm8k_cot_llama (8-shot chat, "The final
    # answer is N": instruct models'). evaluate and evaluate_base always share it.
    protocol: str = "train_prompt"
    # Token budget; null: the protocol's own (train_prompt 512, lm-eval's 256). An lm-eval
    # protocol takes another budget only with think_end (a reasoning model's thinking budget).
    max_new_tokens: Optional[int] = None
    # Questions decoded together; "auto": the largest batch the memory estimate admits for the
    # GPU's free memory (stages/memory.py), at most the number of questions, printed before generating.
    batch_size: int | str = "auto"
    # Optional cap on the number of questions, for quick runs.
    limit: Optional[int] = None
    # Generation stops at EOS or at the first of these strings; null: the protocol's own
    # (train_prompt: lm-evaluation-harness gsm8k's set). Fixed for the lm-eval protocols.
    stop: Optional[list] = None
    # Reasoning models (DeepSeek-R1-Distill, Qwen3 thinking): the end-of-thinking marker, e.g.
    # "</think>"; the answer is extracted from what follows its last occurrence (lm-eval's
    # think_end_token). A completion that never closes its thinking: no_answer (counted in
    # no_answer_rate) or keep (lm-eval 0.4.13: the whole text is scored).
    think_end: Optional[str] = None
    unclosed_thinking: str = "no_answer"
    # Greedy decoding, as published GSM8K numbers use; false samples with temperature.
    greedy: bool = True
    temperature: float = 1.0
    # Dequantize the NF4 base to the compute dtype before generating: the same weights the adapter
    # was trained against (the adapter stays unmerged), plain bf16 matmuls instead of 4-bit kernels
    # (faster decoding), at twice the weight memory (~16 GB for 8B). The memory preflight checks it fits.
    dequantize: bool = True
    # static: greedy decoding on a preallocated KV cache, each step replayed as a CUDA graph on GPU
    # (stages/decode.py; several times faster than generate, same tokens). generate: transformers'
    # generate(), needed for sampling (greedy: false).
    engine: str = "static"
    # GPUs (processes) `accelerate launch` starts: the questions are sharded and gathered in order.
    num_processes: int = 1

    def __post_init__(self):
        _check(self.split in ("test", "dev", "train"), "split", f"must be test, dev or train, got {self.split!r}")
        close = difflib.get_close_matches(str(self.protocol), PROTOCOL_NAMES, n=1)
        _check(self.protocol in PROTOCOL_NAMES, "protocol",
               f"unknown protocol {self.protocol!r} (" + (f"did you mean '{close[0]}'?" if close else
                                                        f"known: {', '.join(PROTOCOL_NAMES)}") + ")")
        _check(not (self.split in ("dev", "train") and self.protocol in DRAWS_FROM_TRAIN), "split",
               f"{self.split} with protocol {self.protocol}: its few-shot examples are drawn from the train split, "
               f"which holds the {self.split} questions, so a question would be drawn as its own example; evaluate "
               f"test with it, or {self.split} with {', '.join(n for n in PROTOCOL_NAMES if n not in DRAWS_FROM_TRAIN)}")
        _check(self.max_new_tokens is None or self.max_new_tokens > 0, "max_new_tokens",
               f"must be > 0 or null, got {self.max_new_tokens}")
        _check(self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size > 0), "batch_size",
               f"must be > 0 or auto, got {self.batch_size!r}")
        _check(self.limit is None or self.limit > 0, "limit", f"must be > 0 or null, got {self.limit}")
        _check(self.stop is None or all(isinstance(s, str) and s for s in self.stop), "stop",
               "must be a list of non-empty strings or null")
        _check(self.think_end is None or (isinstance(self.think_end, str) and self.think_end.strip() != ""),
               "think_end", "must be a non-empty marker such as '</think>', or null")
        _check(self.unclosed_thinking in ("no_answer", "keep"), "unclosed_thinking",
               f"must be no_answer or keep, got {self.unclosed_thinking!r}")
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _check(self.num_processes >= 1, "num_processes", f"must be >= 1, got {self.num_processes}")
        _check(self.engine in ("static", "generate"), "engine", f"must be static or generate, got {self.engine!r}")
        _check(self.greedy or self.engine == "generate", "engine",
               "static decodes greedily only; with greedy: false set engine: generate")

    def check_written(self):
        """What params.yaml may not say (parse_section): an lm-eval protocol is lm-eval's recipe, so
        its stops, budget and greedy decoding are not knobs. The stage itself derives copies with the
        protocol's budget and stops filled in, which these checks would refuse."""
        if self.protocol != "train_prompt":
            _check(self.stop is None, "stop", f"{self.protocol} stops where lm-eval does; set evaluate.stop: null")
            _check(self.max_new_tokens is None or self.think_end is not None, "max_new_tokens",
                   f"{self.protocol}'s budget is lm-eval's 256 tokens; set null (or set evaluate.think_end "
                   "for a reasoning model's thinking budget)")
            _check(self.greedy, "greedy", f"{self.protocol} decodes greedily (lm-eval's do_sample: false)")


# The dtypes an export is saved in: float32 holds the merged W + BA as trained; bfloat16 is half the
# size, each merged weight rounded once (stages/export.py, tests/test_export.py).
EXPORT_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ExportParams:
    # dtype of the merged model that `dvc repro export/dvc.yaml` writes. float32: the trained model
    # to float32 precision, 4 bytes per parameter (32 GB for 8B). bfloat16: 2 bytes per parameter,
    # and the same weights a bf16 server makes of the float32 export.
    dtype: str = "float32"

    def __post_init__(self):
        _check(self.dtype in EXPORT_DTYPES, "dtype", f"must be float32 or bfloat16, got {self.dtype!r}")

SECTIONS = {
    "data": DataParams,
    "model": ModelParams,
    "prompt": PromptParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
}


def _type_ok(value: Any, annotation: Any) -> bool:
    """Is `value` acceptable for a field annotated `annotation` (as a string, from __future__)?"""
    hint = eval(annotation, {"Optional": Optional, "Any": Any}) if isinstance(annotation, str) else annotation
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:  # YAML writes 1 for 1.0 and 2e-4 as a string unless it has a dot: accept ints
        # .inf and .nan are YAML floats; no knob of this pipeline means anything with them (an
        # infinite learning rate trains an all-NaN adapter), so they are refused with the key.
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def parse_section(name: str, raw: Any, source: str = "params.yaml"):
    """Build the dataclass for section `name` from its raw mapping, or raise a one-line UserError."""
    cls = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {name}: expected a mapping of keys, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{name}.{close[0]}'?)" if close else f" (valid keys: {', '.join(fields)})"
            raise UserError(f"{source}: {name}.{key}: unknown key{hint}")
        value = _coerce_float(value, fields[key].type)
        if not _type_ok(value, fields[key].type):
            expected = "a finite number" if fields[key].type in ("float", float) else fields[key].type
            raise UserError(f"{source}: {name}.{key}: expected {expected}, got {value!r} "
                            f"({type(value).__name__})")
        raw = {**raw, key: value}
    try:
        section = cls(**raw)
        if hasattr(section, "check_written"):
            section.check_written()
        return section
    except ParamError as exc:
        raise UserError(f"{source}: {name}.{exc.key}: {exc.message}") from None


def _coerce_float(value: Any, annotation: Any) -> Any:
    # YAML 1.1 reads `2e-4` (no dot) as a string; people write learning rates that way.
    if annotation in ("float", float) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def read_params_file(path: str | Path = "params.yaml") -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load_params(path: str | Path, *names: str):
    """Parse and validate the named sections of the params file; returns one object or a tuple.

    Every top-level section is checked for misspelt names too, so `trian:` is caught by any stage.
    """
    raw = read_params_file(path)
    for section in raw:
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), SECTIONS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid sections: {', '.join(SECTIONS)})"
            raise UserError(f"{path}: {section}: unknown section{hint}")
    parsed = tuple(parse_section(name, raw.get(name), str(path)) for name in names)
    return parsed[0] if len(parsed) == 1 else parsed
