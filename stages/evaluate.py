"""python -m stages.evaluate --data-file data/gsm8k_test.jsonl --adapter checkpoints/sft_lora \
    --metrics metrics/eval.json --predictions metrics/predictions.jsonl

Greedy generation on a GSM8K split, scored with lm-evaluation-harness's strict ('#### N') and
flexible (last number) exact match. Without --adapter it scores the base model, so the two metric
files say what fine-tuning bought. Under `accelerate launch` the questions are sharded across GPUs
and gathered back in order; the metrics are the same as on one GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from stages.config import EvaluateParams, ModelParams, PromptParams, load_params
from stages.io import UserError, check_writable, cli, read_jsonl, write_json, write_jsonl


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar prompt length, longest first (so an OOM shows at once
    and padding is minimal)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class Batch:
    """One left-padded batch for `generate`: its prompts end at the same column."""
    input_ids: object   # [rows, width] long
    lengths: list       # real prompt tokens per row
    width: int


def make_batches(encoded: list[list[int]], batch_size: int, pad_id: int, device) -> list[tuple[list[int], Batch]]:
    """(question indices, left-padded Batch) per batch, in length_sorted_batches' order: the batches
    `evaluate.engine: generate` runs (the static engine refills its rows instead)."""
    import torch

    batches = []
    for indices in length_sorted_batches([len(e) for e in encoded], batch_size):
        rows = [encoded[i] for i in indices]
        width = max(map(len, rows))
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
        batches.append((indices, Batch(ids, [len(r) for r in rows], width)))
    return batches


def load_for_generation(model_p: ModelParams, adapter: str | None, dequantize: bool = False):
    """The model as training computed it: base (+ LoRA adapter, unmerged, in the dtype it was trained in).

    With `dequantize`, the NF4 weights become compute-dtype tensors holding exactly the values the
    4-bit matmuls multiply with in training (transformers' `dequantize` returns bitsandbytes'
    `dequantize_4bit`), so dense matmuls replace the 4-bit kernels. The adapter is never merged:
    W + BA rounded to bf16 loses ~6% of a small update's norm to rounding (~9% of its effect on the
    logits, tiny model after 28 steps), while unmerged the logits equal the training-time model's
    (bit for bit on CPU, tests/test_evaluate_model.py).
    """
    from stages.modeling import compute_dtype, load_model

    model = load_model(model_p)
    if dequantize and model_p.load_in_4bit:
        model = model.dequantize(dtype=compute_dtype(model_p))
    if adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (OSError, ValueError) as exc:
            raise UserError(f"{adapter}: cannot load the LoRA adapter ({str(exc).splitlines()[0]}); "
                            "run the train stage first (`dvc repro train`)") from None
        restore_adapter_dtypes(model, adapter)
    model.eval()
    return model


SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def restore_adapter_dtypes(model, adapter: str) -> None:
    """peft upcasts a bf16 adapter to float32 on loading; training computed the LoRA path in the dtype
    it saved (bf16 on a 4-bit base), and in float32 the logits move by a few percent of the update's
    effect. Casting back is exact: the float32 values came from the saved ones."""
    import torch
    from safetensors import safe_open

    path = Path(adapter) / "adapter_model.safetensors"
    if not path.is_file():  # a .bin adapter: nothing says what it was trained in
        return
    with safe_open(str(path), "pt") as f:
        saved = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    suffix = f".{model.active_adapter}."  # peft saves the keys without the adapter's name
    for name, param in model.named_parameters():
        dtype = SAFETENSORS_DTYPES.get(saved.get(name.replace(suffix, "."), ""))
        if dtype and param.dtype != getattr(torch, dtype):
            param.data = param.data.to(getattr(torch, dtype))


def end_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and each id of the model's
    generation_config.eos_token_id (an int or a list: chat models list their end of turn there, Qwen
    [<|im_end|>, <|endoftext|>], which the tokenizer's single EOS may not be)."""
    config_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *([config_ids] if isinstance(config_ids, int) else config_ids or [])}
    return sorted(i for i in ids if i is not None)


# Tokens before the ones since the last look that the engine's look decodes with them for stop
# strings (a stop string is a few tokens; decoding each whole answer at each look cost ~0.15 s per
# look for 1,319 answers of 200 tokens on a CPU core, with the GPU idle).
STOP_CONTEXT = 8


def holds_stop(text: str, stop: list[str]) -> bool:
    """Whether `text` contains one of the stop strings. The caller decodes the text once:
    `any(s in decode(ids) for s in stop)` decodes it again for each stop string (4 with the default
    protocol), about two thirds of the host time of the engine's looks, while the GPU waits
    (benchmarks/look_host_time.py)."""
    return any(s in text for s in stop)


def answer_length(ids: list[int], decode, stop: list[str], end_ids: set) -> tuple[int, bool]:
    """(tokens up to and including where the answer ended, whether it ended): at the first end id
    (EOS), or at the token that completes the first stop string; else all of `ids`."""
    first_end = next((k for k, t in enumerate(ids) if t in end_ids), None)
    n = len(ids) if first_end is None else first_end + 1
    if not holds_stop(decode(ids[:n]), stop):
        return n, first_end is not None
    lo, hi = 1, n  # the text only grows with k, so "contains a stop string" flips once
    while lo < hi:
        mid = (lo + hi) // 2
        if holds_stop(decode(ids[:mid]), stop):
            hi = mid
        else:
            lo = mid + 1
    return lo, True


def looks_ended(decode, stop: list[str], end_ids: set):
    """The static engine's `ended(question, ids)`: whether an answer has ended, asked at each look
    (the GPU waits meanwhile). Only the ids since the question's last look can hold a new EOS, and a
    stop string completed since then ends in their text: the whole answer is decoded and checked
    only when the text of those ids and STOP_CONTEXT before them holds a stop string. A stop string
    that this window missed (one spread over more tokens) is cut afterwards all the same, by
    answer_length over the whole answer: only decoding it longer costs."""
    looked: dict[int, int] = {}  # per question, the ids seen at its last look

    def ended(question: int, ids: list[int]) -> bool:
        start, looked[question] = looked.get(question, 0), len(ids)
        if not end_ids.isdisjoint(ids[start:]):
            return True
        if not stop or not holds_stop(decode(ids[max(start - STOP_CONTEXT, 0):]), stop):
            return False
        return answer_length(ids, decode, stop, end_ids)[1]

    return ended


# Settings of a model's generation config that change greedy decoding under transformers' generate,
# and so under lm-eval, which decodes with it (Qwen2.5's instruct models ship repetition_penalty 1.05),
# each with the value that changes nothing. The static engine takes the plain argmax. Sampling settings
# (temperature, top_p, ...) are not here: greedy decoding ignores them in both.
GREEDY_CHANGING = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
    "min_new_tokens": 0, "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "sequence_bias": None, "exponential_decay_length_penalty": None, "guidance_scale": 1.0,
    "watermarking_config": None, "num_beams": 1, "penalty_alpha": 0.0, "dola_layers": None,
    # applied to decoder-only models too (against the prompt), and generate's own stops and time limit
    "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0, "stop_strings": None, "max_time": None,
}


def greedy_changes(generation_config) -> dict:
    """The settings of GREEDY_CHANGING that `generation_config` sets to something that changes decoding."""
    found = {}
    for key, neutral in GREEDY_CHANGING.items():
        value = getattr(generation_config, key, None)
        if not (value is None or value == neutral or (isinstance(value, (list, dict)) and not value)):
            found[key] = value
    return found


def load_generation_config(model_p: ModelParams, config):
    """The generation config `from_pretrained` gives the model: its generation_config.json, else the
    one transformers derives from config.json."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_p.name, revision=model_p.revision)
    except OSError:
        return GenerationConfig.from_model_config(config)


def engine_for(eval_p: EvaluateParams, model_p: ModelParams, generation_config) -> EvaluateParams:
    """evaluate.engine, unless the model's generation config sets what the static engine does not
    apply: then transformers' generate, with one line saying why (the number stays lm-eval's)."""
    changes = greedy_changes(generation_config)
    if eval_p.engine != "static" or not changes:
        return eval_p
    listed = ", ".join(f"{k}={v!r}" for k, v in changes.items())
    print(f"evaluate: {model_p.name}'s generation config sets {listed}, which greedy decoding applies in "
          "transformers' generate and lm-eval and the static engine does not: decoding with "
          "evaluate.engine: generate instead (slower)")
    return dataclasses.replace(eval_p, engine="generate")


def raised_in_model_code(exc: BaseException) -> bool:
    """Whether the traceback passes through the model's code (transformers' forward, attention and
    mask builders, a hub model's own module, peft's layers), where an architecture the static engine
    cannot drive fails."""
    import traceback
    from pathlib import PurePath

    model_code = {"transformers", "transformers_modules", "peft"}
    return any(model_code & set(PurePath(frame.filename).parts) for frame in traceback.extract_tb(exc.__traceback__))


def generate(model, tokenizer, eval_p: EvaluateParams, encoded: list[list[int]], stop: list[str],
             max_new_tokens: int, show_progress: bool = True) -> tuple[list[str], int]:
    """Completions of the prompts `encoded` (token ids, in input order), decoded with
    skip_special_tokens up to where each answer ended (EOS, or the token completing a stop string;
    the stop itself is cut by stages.protocols.cut_generation), and the number of tokens generated
    up to those ends."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    eos_ids = end_token_ids(model, tokenizer)
    # Not the pad id: a model that writes the pad token mid-answer goes on, as in generate() and
    # lm-eval (after an answer's EOS, both fill with pad, which the EOS precedes).
    end_ids = set(eos_ids)
    # Stop strings are looked for in the text with special tokens kept, as lm-eval's stop check and
    # transformers' StopStringCriteria see it: `<|im_end|>` or `<|eot_id|>` is a special token that a
    # model which does not list it as EOS writes and goes on past; decoded without it, the answer ran on
    # to the budget or an EOS and the text after the end of turn was scored. The scored text is decoded
    # without special tokens, as lm-eval decodes it.
    find_stops = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    new_ids: list = [None] * len(encoded)
    if eval_p.engine == "static":
        from stages.decode import greedy_decode

        with torch.inference_mode(), tqdm(total=len(encoded), desc="evaluate", unit="question",
                                          disable=not show_progress) as bar:
            try:
                new_ids = greedy_decode(model, encoded, eval_p.batch_size, max_new_tokens, pad_id,
                                        looks_ended(find_stops, stop, end_ids), use_graph=device.type == "cuda",
                                        progress=bar.update)
            except (torch.OutOfMemoryError, torch.AcceleratorError):
                raise
            except (AttributeError, TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
                if not raised_in_model_code(exc):
                    # The engine's own code failed, not the model's forward: a bug to report with its
                    # traceback, not a model to decode otherwise (run 20: a compaction's shape error read
                    # "cannot decode LlamaForCausalLM").
                    raise
                # An architecture whose forward wants more of transformers' Cache than
                # stages/decode.py provides: say which setting avoids it.
                raise UserError(f"params.yaml: evaluate.engine: static cannot decode {type(model).__name__} "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                "set evaluate.engine: generate") from exc
    else:
        # Built once: generate(stop_strings=…) rebuilds this per call, seconds each on a 128k vocabulary.
        from transformers import StoppingCriteriaList, StopStringCriteria

        stopping = StoppingCriteriaList([StopStringCriteria(tokenizer, stop)]) if stop else None
        for indices, batch in tqdm(make_batches(encoded, eval_p.batch_size, pad_id, device), desc="evaluate",
                                   unit="batch", disable=not show_progress):
            attention_mask = torch.tensor([[0] * (batch.width - n) + [1] * n for n in batch.lengths], device=device)
            with torch.inference_mode():
                out = model.generate(
                    input_ids=batch.input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=not eval_p.greedy,
                    temperature=None if eval_p.greedy else eval_p.temperature,
                    top_p=None, top_k=None,
                    stopping_criteria=stopping,
                    pad_token_id=pad_id,
                    eos_token_id=eos_ids,
                )
            for row, i in zip(out[:, batch.width:].tolist(), indices):
                new_ids[i] = row
    texts: list[str] = []
    generated_tokens = 0
    for row in new_ids:
        n, _ = answer_length(row, find_stops, stop, end_ids)
        generated_tokens += n
        texts.append(decode(row[:n]))
    return texts, generated_tokens


def generate_questions(model, tokenizer, prompt_p: PromptParams, eval_p: EvaluateParams, questions: list[str],
                       show_progress: bool = True) -> tuple[list[str], int]:
    """`generate` on bare questions under a zero-shot `evaluate.protocol` (train_prompt by default),
    prompts, stops and budget as the stage builds them: for benchmarks and tests."""
    from stages import protocols as P

    plan = P.plan(P.get_protocol(eval_p.protocol, prompt_p, eval_p), tokenizer, model.config,
                  [{"question": q} for q in questions], [])
    return generate(model, tokenizer, eval_p, plan.input_ids, plan.stop, plan.max_new_tokens, show_progress)


def check_adapter(adapter: str) -> None:
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: no LoRA adapter here (adapter_config.json missing); "
                        "run the train stage first (`dvc repro train`)")


def select_rows(rows: list[dict], eval_p: EvaluateParams, where: str) -> list[dict]:
    if not rows:
        raise UserError(f"{where}: no rows (empty split)")
    if eval_p.limit is not None:
        if eval_p.limit > len(rows):
            raise UserError(f"params.yaml: evaluate.limit: {eval_p.limit} is larger than {where} "
                            f"({len(rows)} rows); use a value <= {len(rows)} or null")
        rows = rows[:eval_p.limit]
    for i, row in enumerate(rows, 1):
        # 'answer' (the reference solution ending in '#### N') is what lm-eval compares with.
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise UserError(f"{where}:{i}: row needs string fields 'question' and 'answer' (run the prepare stage)")
    return rows


def load_fewshot_pool(protocol, path: str | None) -> list[dict]:
    """The rows a `default`-sampler protocol draws its examples from (prepare's raw train split)."""
    if not (protocol.num_fewshot and protocol.fewshot_sampler == "default"):
        return []
    if path is None:
        raise UserError(f"params.yaml: evaluate.protocol: {protocol.name} draws few-shot examples from the train "
                        "split: pass --fewshot-file (dvc.yaml passes the prepare stage's few-shot pool)")
    if not Path(path).is_file():
        raise UserError(f"--fewshot-file {path}: no such file; run the prepare stage first (`dvc repro prepare`)")
    return read_jsonl(path)


def prompt_digest(text: str) -> str:
    """A short fingerprint of the exact prompt text, kept per question (the 8-shot prompts would
    make predictions files megabytes): equal digests, equal prompts (tests/test_lmeval_parity.py)."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="GSM8K exact-match evaluation")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data-file", required=True)
    parser.add_argument("--fewshot-file", default=None, help="few-shot pool (prepare's), for protocols that draw one")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory; omit to score the base model")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--run-info", default=None, help="JSON of how it ran: the protocol's settings, speed")
    parser.add_argument("--predictions", required=True)
    parser.add_argument("--metric-prefix", default="",
                        help="prefix of the metric's key (evaluate_base: base_), so that the fine-tuned and the base "
                             "number are two columns of `dvc exp show`, not two files' `path:exact_match`")
    args = parser.parse_args(argv)

    from stages import protocols as P

    model_p, prompt_p, eval_p = load_params(args.params, "model", "prompt", "evaluate")
    protocol = P.get_protocol(eval_p.protocol, prompt_p, eval_p)
    rows = select_rows(read_jsonl(args.data_file), eval_p, args.data_file)
    pool = load_fewshot_pool(protocol, args.fewshot_file)
    if args.adapter is not None:
        check_adapter(args.adapter)
    outputs = [(args.metrics, "--metrics"), (args.predictions, "--predictions")]
    for path, flag in outputs + ([(args.run_info, "--run-info")] if args.run_info else []):
        check_writable(path, flag)

    from stages import memory
    from stages.modeling import load_config, load_tokenizer

    config = load_config(model_p.name, model_p.revision)
    # The adapter directory holds the tokenizer training used; the base's is read at model.revision.
    tokenizer = load_tokenizer(args.adapter) if args.adapter else load_tokenizer(model_p.name, model_p.revision)
    tokenizer.padding_side = "left"
    # Every prompt, its ids, the stops and the budget, checked (chat template, few-shot pool, no
    # evaluated question among the examples) before the model is loaded.
    plan = P.plan(protocol, tokenizer, config, rows, pool, where=args.fewshot_file or "the few-shot pool")
    limit = plan.context_limit
    truncated = plan.truncated
    if truncated:
        print(f"evaluate: warning: {truncated} of {len(rows)} prompts were cut to their last {limit} tokens "
              f"(the model's length minus the {plan.max_new_tokens}-token budget), as lm-eval cuts them")
    longest_prompt = max(len(ids) for ids in plan.input_ids)
    # What the memory estimate and generation use: the protocol's budget and stops, and the engine that
    # decodes what transformers' generate would for this model.
    eval_run = engine_for(dataclasses.replace(eval_p, max_new_tokens=plan.max_new_tokens, stop=plan.stop),
                          model_p, load_generation_config(model_p, config))
    # merged_bf16 means "the base is in the compute dtype": the adapter stays unmerged beside it, and its
    # weights (~1% of the dequantized base's: 0.17 GB for the 8B model at r=32) are within the margin.
    estimate = memory.preflight_eval(config.to_dict(), model_p, eval_run, longest_prompt,
                                     merged_bf16=eval_p.dequantize, n_questions=len(rows))
    if eval_run.batch_size == "auto":  # the preflight picked it from the free memory, and said so
        eval_run = dataclasses.replace(eval_run, batch_size=estimate["batch_size"])

    import torch
    from accelerate.utils import gather_object

    from stages.modeling import process_state

    state = process_state()
    model = load_for_generation(model_p, args.adapter, eval_p.dequantize)
    started = time.perf_counter()
    indices = list(range(len(rows)))
    with state.split_between_processes(indices) as mine:
        try:
            texts, n_tokens = generate(model, tokenizer, eval_run, [plan.input_ids[i] for i in mine], plan.stop,
                                       plan.max_new_tokens, show_progress=state.is_main_process)
        except torch.OutOfMemoryError:
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            raise UserError(memory.oom_message("evaluate", config.to_dict(), model_p, eval_run,
                                               torch.cuda.max_memory_allocated(), total, longest_prompt,
                                               eval_p.dequantize, batch=eval_run.batch_size)) from None
        shard = [(i, t) for i, t in zip(mine, texts)]
    gathered = gather_object(shard) if state.num_processes > 1 else shard
    tokens = gather_object([n_tokens]) if state.num_processes > 1 else [n_tokens]
    wall = time.perf_counter() - started
    if not state.is_main_process:
        return

    from stages.fingerprint import file_sha256

    by_index = dict(gathered)
    records = [{"protocol": protocol.name, "prompt_sha256": prompt_digest(plan.prompts[i]),
                **P.prediction_record(protocol, rows[i], by_index[i], plan.stop)} for i in indices]
    scores = P.score(records)
    # The DVC metrics: the score and the number of questions it is over (`dvc metrics diff` of a run at
    # evaluate.limit 50 against a full one shows both), so that `dvc metrics show` and `dvc exp show
    # --only-changed` fit a terminal beside the loss and the changed params. The rest (flexible match,
    # no-answer rate, counts, the protocol's every setting) is in --run-info.
    metrics = {f"{args.metric_prefix}exact_match": scores["exact_match"], f"{args.metric_prefix}n": scores["n"]}
    run_info = {
        **scores,
        "generated_tokens": sum(tokens),
        "generated_tokens_per_second": round(sum(tokens) / wall, 1),
        "wall_seconds": round(wall, 1),
        "truncated_prompts": truncated,
        # The settings the number depends on: compare two exact_match values only when these agree.
        "protocol": P.settings(protocol),
        # The file scored (the split's, under dvc.yaml; by hand, whatever --data-file named).
        "split": eval_p.split, "data_file": args.data_file, "data_sha256": file_sha256(Path(args.data_file), {}),
        "model": model_p.name, "revision": model_p.revision, "adapter": bool(args.adapter),
        "load_in_4bit": model_p.load_in_4bit, "dequantize": eval_p.dequantize, "engine": eval_run.engine,
        "engine_param": eval_p.engine,
        "batch_size": eval_run.batch_size, "batch_size_param": eval_p.batch_size, "num_processes": state.num_processes,
        "fewshot_pool": {"file": args.fewshot_file, "rows": len(pool)} if pool else None,
    }
    write_jsonl(args.predictions, records)
    if args.run_info:
        write_json(args.run_info, run_info)
    write_json(args.metrics, metrics)  # last: the file that says "done"
    print(f"evaluate: {'fine-tuned' if args.adapter else 'base'}, {protocol.name}: exact_match "
          f"{scores['exact_match']:.4f} (flexible {scores['exact_match_flexible']:.4f}, no answer "
          f"{scores['no_answer_rate']:.4f}) on {scores['n']} questions in {wall:.1f} s "
          f"({run_info['generated_tokens_per_second']:,.0f} generated tokens/s) -> {args.metrics}")


if __name__ == "__main__":
    main()
