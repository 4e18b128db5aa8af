"""Timing evaluation: plain 4-bit `generate` (batch 64) against `stages.evaluate.load_for_generation` +
`stages.evaluate.generate` unchanged, on GSM8K-test-length prompts x 256 new tokens.

EVAL_VARIANTS: "static_b128"/"static_b256"/"static_auto" (the project's engine, stages/decode.py, on the
dequantized model; "static_auto_sdpa": the same with its decoding steps' attention left to SDPA instead of
stages/decode_attention.py's kernel; "..._answers": answers that end at GSM8K-like lengths, bench_model.
make_answer_lengths, where the random weights would run every answer to the budget: the engine's rows
then take the next questions), "generate_b256"/"generate_b128" (transformers' generate on the same
model) and "4bit_b64". A subset of prompts is extrapolated to the whole split's batch count
("extrapolated": true). Where
static_b256 and generate_b256 decoded the same prompts, `engine_agreement` and `engine_checks` say how
far the two engines agree (bf16 near-ties may differ; the checks do not depend on them). Every
variant but the plain baseline loads the base with a LoRA adapter (r=32 on all linear layers, random
weights: bench_model.build_adapter_dir), unmerged, as `evaluate` loads a fine-tuned model.
"""
from __future__ import annotations

import math
import time

from bench_device import sync
from bench_model import as_question, load_plain_4bit

# Run in this order, so that a short budget drops the least needed last. The static_* and generate_*
# variants share one dequantized model; "static" is the project's engine (stages/decode.py, evaluate.engine: static),
# "generate" transformers' generate() on the same model (evaluate.engine: generate).
EVAL_VARIANTS = ("baseline_4bit_b64", "static_b128", "static_auto", "static_auto_sdpa", "static_b256",
                 "static_auto_answers", "static_b256_answers", "generate_b256", "generate_b128", "4bit_b64")


def full_split_wall(wall_s: float, batches_run: int, prompts_run: int, batch_size: int, n_full: int) -> float:
    """Whole-split seconds from a subset: per batch, times the batches the full split needs."""
    if prompts_run >= n_full:
        return wall_s
    return wall_s / batches_run * math.ceil(n_full / batch_size)


def eval_baseline(workdir: str, prompts: list[list[int]], batch_size: int, new_tokens: int, n_full: int) -> dict:
    """Plain 4-bit generate: input order, batches of `batch_size`, left padding, greedy, exactly N new tokens."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir)
    model = load_plain_4bit(workdir)
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id

    def run(batch, n_new):
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
        return out.shape[1] - width

    run(prompts[:2], 4)  # warm-up (CUDA context, cuBLAS): it would be multiplied by the extrapolation
    sync()
    started = time.perf_counter()
    generated, batches = 0, 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        generated += run(batch, new_tokens) * len(batch)
        batches += 1
    sync()
    wall = time.perf_counter() - started
    return {"prompts": len(prompts), "batch_size": batch_size, "batches": batches, "generated_tokens": generated,
            "wall_seconds_measured": round(wall, 2),
            "generated_tokens_per_second": round(generated / wall, 1),
            "wall_seconds_full_split": round(full_split_wall(wall, batches, len(prompts), batch_size, n_full), 1),
            "extrapolated": len(prompts) < n_full}


def load_project_model(workdir: str, dequantize: bool, adapter: str | None = None):
    """Model and tokenizer as stages.evaluate.main loads them: with `adapter` (bench_model.build_adapter_dir)
    the fine-tuned model's `evaluate`, the adapter unmerged on the base and the tokenizer from its
    directory; without, `evaluate_base` (the base alone: a lower bound on `evaluate`'s time)."""
    from stages.config import ModelParams
    from stages.evaluate import load_for_generation
    from stages.modeling import load_tokenizer

    tokenizer = load_tokenizer(adapter or workdir)
    tokenizer.padding_side = "left"  # as stages.evaluate.main does
    return load_for_generation(ModelParams(name=workdir), adapter=adapter, dequantize=dequantize), tokenizer


def auto_batch(workdir: str, model, prompts: list[list[int]], new_tokens: int, n_full: int) -> int:
    """evaluate.batch_size: auto as the stage computes it (stages.memory.auto_eval_batch) for the
    dequantized model, on the memory free before the model was loaded (free now + what torch holds)."""
    import dataclasses

    import torch

    from stages import memory
    from stages.config import EvaluateParams, ModelParams

    free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved()
    eval_p = EvaluateParams(max_new_tokens=new_tokens, batch_size="auto", stop=[])
    return memory.auto_eval_batch(model.config.to_dict(), ModelParams(name=workdir), eval_p,
                                  max(map(len, prompts)), free, n_full, merged_bf16=True)


def eval_project(model, tokenizer, prompts: list[list[int]], batch_size: int, new_tokens: int, engine: str,
                 n_full: int, warm_up: bool, answer_lengths: list[int] | None = None) -> dict:
    """stages.evaluate.generate unchanged; prompts go in as questions that encode to exactly their ids.
    `answer_lengths` (static engine): question i's answer counts as ended once it has that many tokens,
    as an EOS would end it, at the engine's next look."""
    import stages.decode
    import stages.evaluate
    from stages.config import EvaluateParams, PromptParams
    from stages.modeling import encode_prompt, render_prompt

    # generate() on bare questions, as the stage builds prompts, stops and budget (the evaluation
    # protocols' refactor names it generate_questions; before it, generate took the questions).
    generate = getattr(stages.evaluate, "generate_questions", stages.evaluate.generate)

    prompt_p = PromptParams(template="{question}", chat=False)
    # No stop strings: every row runs exactly `new_tokens` steps, in both engines.
    eval_p = EvaluateParams(max_new_tokens=new_tokens, batch_size=batch_size, dequantize=False, engine=engine, stop=[])
    questions = [as_question(p) for p in prompts]
    encoded = encode_prompt(tokenizer, render_prompt(tokenizer, prompt_p, questions[0]), prompt_p)
    if encoded != prompts[0]:
        raise RuntimeError("benchmark tokenizer does not round-trip the prompt ids")
    # Seconds per engine call (the static engine: one for the whole split; generate: per batch).
    owner, attr = (stages.decode, "greedy_decode") if engine == "static" else (model, "generate")
    original = getattr(owner, attr)
    batch_seconds, decoded = [], []

    def timed(*args, **kwargs):
        if answer_lengths is not None:
            args = list(args)
            ended = args[5]
            args[5] = lambda i, ids: len(ids) >= answer_lengths[i] or ended(i, ids)
        sync()
        t = time.perf_counter()
        out = original(*args, **kwargs)
        sync()
        batch_seconds.append(round(time.perf_counter() - t, 3))
        if answer_lengths is not None:
            decoded.extend(len(ids) for ids in out)
        return out

    if warm_up:  # the subset will be extrapolated: keep one-off start-up costs out of it
        generate(model, tokenizer, prompt_p, EvaluateParams(max_new_tokens=4, batch_size=2, engine=engine),
                 questions[:2], show_progress=False)
    setattr(owner, attr, timed)
    try:
        sync()
        started = time.perf_counter()
        texts, generated = generate(model, tokenizer, prompt_p, eval_p, questions, show_progress=False)
        sync()
        wall = time.perf_counter() - started
    finally:
        setattr(owner, attr, original)
    if answer_lengths is not None:
        # As the stage counts an answer's tokens: up to its end (the rest, up to the look that saw the
        # end, was decoded and is cut).
        generated = sum(answer_lengths[:len(prompts)])
    # The static engine runs the split through `batch_size` rows in one call; as batches, for extrapolating.
    batches = math.ceil(len(prompts) / batch_size) if engine == "static" else len(batch_seconds)
    figures = {"prompts": len(prompts), "batch_size": batch_size, "engine": engine, "batches": batches,
               "batch_seconds": batch_seconds, "generated_tokens": generated,
               "generated_tokens_expected": len(prompts) * new_tokens,
               "wall_seconds_measured": round(wall, 2),
               "generated_tokens_per_second": round(generated / wall, 1),
               "wall_seconds_full_split": round(full_split_wall(wall, batches, len(prompts), batch_size, n_full), 1),
               "extrapolated": len(prompts) < n_full, "texts": texts}
    if answer_lengths is not None:
        figures.update(generated_tokens_expected=generated, decoded_tokens=sum(decoded))
    if engine != "static" and batches > 1 and sum(batch_seconds[1:]) > 0:  # without the first call's one-off costs
        rest_tokens = generated - min(batch_size, len(prompts)) * new_tokens
        figures["tokens_per_second_after_first_batch"] = round(rest_tokens / sum(batch_seconds[1:]), 1)
    return figures


def engine_checks(model, tokenizer, prompts: list[list[int]], texts: dict, rows: int = 16) -> dict:
    """With random weights the logits are nearly flat, so bf16 rounding alone flips the argmax
    between two correct engines after a few tokens (engine_agreement). These checks do not depend
    on that:
    - graph_vs_eager: the static engine with and without CUDA graphs on one batch, token for token
      (the same kernels, so they must be identical);
    - teacher_forced: each engine's completions of the first `rows` prompts, scored by one plain
      forward over prompt + completion: how often the engine's token is that forward's argmax,
      and the largest gap between the argmax logit and the chosen one, in units of the logits'
      standard deviation at that position (a decoding bug gives gaps of whole units, rounding
      gives hundredths)."""
    import torch

    from stages.decode import greedy_decode

    device = next(model.parameters()).device
    checks = {}
    if device.type == "cuda":
        with torch.inference_mode():
            graph, eager = (greedy_decode(model, prompts[:64], 64, 64, tokenizer.pad_token_id, lambda i, ids: False,
                                          use_graph=use_graph) for use_graph in (True, False))
        checks["graph_vs_eager"] = {"rows": 64, "new_tokens": 64,
                                    "identical_rows": sum(a == b for a, b in zip(graph, eager))}
    for engine, completions in texts.items():
        matches, total, worst = 0, 0, 0.0
        for prompt, text in zip(prompts[:rows], completions[:rows]):
            new = tokenizer(text, add_special_tokens=False).input_ids
            ids = torch.tensor([prompt + new], device=device)
            with torch.inference_mode():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            chosen = logits.gather(1, torch.tensor(new, device=device)[:, None])[:, 0]
            gap = (logits.max(dim=1).values - chosen) / logits.std(dim=1)
            matches += int((gap == 0).sum())
            total += len(new)
            worst = max(worst, float(gap.max()))
        checks[f"teacher_forced/{engine}"] = {"rows": rows, "tokens": total, "argmax_match": round(matches / total, 4),
                                              "worst_gap_in_std": round(worst, 4)}
    return checks


def engine_agreement(static: list[str], reference: list[str]) -> dict:
    """How far the static engine's completions match generate()'s on the prompts both decoded."""
    pairs = list(zip(static, reference))
    common = [next((k for k, (a, b) in enumerate(zip(x.split(), y.split())) if a != b), len(y.split()))
              for x, y in pairs]
    return {"prompts": len(pairs), "identical": sum(x == y for x, y in pairs),
            "mean_common_prefix_tokens": round(sum(common) / max(len(common), 1), 1)}

