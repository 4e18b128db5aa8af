"""benchmarks/bench.py: the real script, end to end on CPU with a tiny model (~15 s), and its pure parts."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    # One compiled variant: compiling takes ~30 s on 2 CPU cores, and the others compile the same way.
    variants = "padding_free,card,padding_free+liger,card+liger,card+compile,card+cudagraphs"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--workdir", str(tmp / "model"), "--out", str(out),
                           "--train-variants", variants],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_writes_every_section_and_variant(result):
    data, stdout = result
    assert set(data["train"]) == {"baseline", "padding_free", "card", "padding_free+liger", "card+liger", "card+compile",
                                  "card+cudagraphs"}
    assert set(data["eval"]) == {"baseline_4bit_b64", "static_b128", "static_b256", "generate_b256", "generate_b128",
                                 "4bit_b64"}
    for key in ("gpu", "versions", "shape", "lengths", "settings", "ratios", "goals", "table_markdown"):
        assert key in data
    assert data["lengths"]["train"]["mean"] == 240 and data["lengths"]["eval"]["mean"] == 160
    assert data["table_markdown"] in stdout


def test_padding_free_trains_the_same_thing_as_the_plain_loop(result):
    train = result[0]["train"]
    pf = train["padding_free"]
    assert pf["lora_a_identical"] and pf["data_order_sequential"]
    assert pf["loss_check"] == "PASS" and pf["loss_check_strict"] == "PASS"
    assert pf["first_step_loss_rel_diff"] < 1e-3
    assert len(pf["losses"]) == len(train["baseline"]["losses"]) == result[0]["settings"]["train_steps"]
    assert train["card"]["loss_check_strict"] == "PASS"  # Trainer's accumulation normalises like the plain loop
    # train.torch_compile: the compiled layers (same dropout masks as eager) train the same thing.
    assert train["card+compile"]["lora_a_identical"] and train["card+compile"]["loss_check_strict"] == "PASS"
    # train.cuda_graphs (on CPU: padded rows, compiled layers, gradient hooks; no graphs): the same training.
    graphs = train["card+cudagraphs"]
    assert graphs["lora_a_identical"] and graphs["loss_check_strict"] == "PASS"
    assert graphs["cuda_graph_recording_steps"] == [] and graphs["compile_counters"]["unique_graphs"] >= 1
    assert graphs["steady_state"]["steps"] == list(range(result[0]["settings"]["warmup_steps_untimed"],
                                                         result[0]["settings"]["train_steps"]))


def test_figures_are_positive_and_generation_is_full_length(result):
    data = result[0]
    for name, v in data["train"].items():
        if "skipped" in v:
            continue
        assert "error" not in v, (name, v)
        assert v["train_tokens_per_second"] > 0 and v["seconds_per_step"] > 0 and v["tokens_per_step"] > 0
    for name, v in data["eval"].items():
        assert "error" not in v, (name, v)
        assert v["generated_tokens_per_second"] > 0 and v["wall_seconds_full_split"] > 0
        assert v["generated_tokens"] == v["prompts"] * data["settings"]["new_tokens"]  # no row stopped early
        assert v["extrapolated"] == (v["prompts"] < 1319)
    assert all(r > 0 for r in data["ratios"].values())
    # The tiny model in bf16 on CPU: the two engines decode the same prompts to the same text.
    agreement = data["engine_agreement"]
    assert agreement["prompts"] == data["eval"]["generate_b256"]["prompts"] > 0
    assert agreement["identical"] == agreement["prompts"]
    for engine in ("static", "generate"):
        teacher = data["engine_checks"][f"teacher_forced/{engine}"]
        assert teacher["tokens"] > 0 and teacher["argmax_match"] > 0.9 and teacher["worst_gap_in_std"] < 0.1


@pytest.mark.parametrize("vocab_size", [512, 128256])
def test_tokenizer_encodes_questions_back_to_their_ids(vocab_size):
    from stages.config import PromptParams
    from stages.modeling import encode_prompt, render_prompt

    bench = load_bench()
    tokenizer = bench.build_tokenizer(vocab_size)
    assert len(tokenizer) == vocab_size
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    reserved = bench.reserved_tokens(vocab_size)
    lo, hi = bench.word_id_range(vocab_size)
    assert not set(range(lo, hi)) & set(reserved)
    prompt_p = PromptParams(template="{question}")
    for ids in bench.make_eval_prompts(5, vocab_size, seed=0):
        assert encode_prompt(tokenizer, render_prompt(tokenizer, prompt_p, bench.as_question(ids)), prompt_p) == ids


def test_sequences_follow_the_gsm8k_length_distribution():
    bench = load_bench()
    rows = bench.make_train_rows(400, 512, seed=0)
    lengths = [len(r["input_ids"]) for r in rows]
    assert 225 < sum(lengths) / len(lengths) < 255 and min(lengths) >= 120 and max(lengths) <= 450
    assert all(len(r["completion_mask"]) == len(r["input_ids"]) and r["completion_mask"][0] == 0 for r in rows)
    prompts = bench.make_eval_prompts(1319, 512, seed=0)
    assert 150 < sum(map(len, prompts)) / 1319 < 170 and min(map(len, prompts)) >= 90
    # seeded, row by row: every path and every run read the same rows, and a subset is a prefix
    assert bench.make_train_rows(8, 512, seed=0) == rows[:8]
    assert bench.make_eval_prompts(128, 512, seed=0) == prompts[:128]


@pytest.mark.parametrize("losses, check, strict", [
    ([6.2540, 6.2596, 6.2457], "PASS", "PASS"),  # same rows, float noise
    ([6.2596, 6.2457, 6.2540], "PASS", "FAIL"),  # other rows: within rtol, but the strict check sees it
    ([6.2540 / 8, 6.2596 / 8, 6.2457 / 8], "FAIL", "FAIL"),  # loss divided by the accumulation steps
])
def test_loss_agreement(losses, check, strict):
    bench = load_bench()
    baseline = {"losses": [6.25401, 6.25958, 6.24572], "grad_norms": [0.068, 0.072, 0.073]}
    got = bench.loss_agreement(baseline, {"losses": losses}, warmup=1, rtol=0.02)
    assert (got["loss_check"], got["loss_check_strict"]) == (check, strict)


def test_module_patches_are_undone():
    """Liger rewrites transformers' Llama module; later variants must get the stock classes back."""
    from transformers.models.llama import modeling_llama

    bench = load_bench()
    stock = modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaForCausalLM.forward
    with bench.undo_module_patches():
        modeling_llama.LlamaRMSNorm = modeling_llama.apply_rotary_pos_emb = object
        modeling_llama.LlamaForCausalLM.forward = lambda self: None
    assert (modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb,
            modeling_llama.LlamaForCausalLM.forward) == stock


def test_profile_train_runs_the_project_path_under_the_profiler(tmp_path):
    """benchmarks/profile_train.py in --tiny mode: the profiled step is the bench's project path."""
    script = ROOT / "benchmarks" / "profile_train.py"
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--workdir", str(tmp_path / "model"),
                           "--out", str(tmp_path), "--warmup", "1", "--variants", "card"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result_file,) = tmp_path.glob("profile_train_*.json")
    card = json.loads(result_file.read_text())["variants"]["card"]
    assert len(card["step_seconds"]) == 2 and 0 < card["profiled_step_wall_s"] <= card["step_seconds"][1] * 1.5
    assert "bitsandbytes::gemm_4bit" in card["top_host"] or "aten::mm" in card["top_host"]


@pytest.mark.parametrize("card, fast, fast_in_memory", [
    (dict(train_tokens_per_second=700.0, peak_allocated_gib=9.3, allocated_at_start_gib=1.0), True, True),
    (dict(train_tokens_per_second=700.0, peak_allocated_gib=9.3, allocated_at_start_gib=0.0), True, False),
    (dict(train_tokens_per_second=590.0, peak_allocated_gib=8.0, allocated_at_start_gib=0.0), False, False),
])
def test_card_goal_with_and_without_the_memory_clause(card, fast, fast_in_memory):
    """2x the plain recipe at batch 1 x 8 with the same loss; the memory clause counts the variant's own
    peak, not what earlier variants of the process left allocated."""
    bench = load_bench()
    results = {"train": {"baseline": {"train_tokens_per_second": 300.0, "peak_allocated_gib": 8.9},
                         "card+compile-checkpointing": {**card, "loss_check": "PASS"}}}
    _, goals = bench.ratios_and_goals(results, tiny=False)
    assert goals["train_card_batch_1x8_>=2x_same_loss"] is fast
    assert goals["train_card_batch_1x8_>=2x_same_loss_no_more_memory"] is fast_in_memory
    assert goals["train_effective_batch_8_>=5x_same_loss_no_more_memory"] is None  # no padding-free variant ran


def test_train_variants_run_in_the_order_asked():
    """A compiled variant that follows another one ran faster (bench runs 9 and 10): the order is the caller's."""
    bench = load_bench()
    args = bench.parse_args(["--sections", "train", "--train-variants", "card+compile-checkpointing,card"])
    assert bench.wanted_variants(args, "train") == ["baseline", "card+compile-checkpointing", "card"]


def test_release_frees_what_the_trainer_registered_with_bitsandbytes():
    """The Trainer registers each nn.Embedding with bitsandbytes' process-wide optimizer manager (32-bit
    states); without release() a later variant still held the earlier model's embedding (1 GiB at 8B)."""
    import gc
    import weakref

    import bitsandbytes as bnb
    import torch

    bench = load_bench()
    embedding = torch.nn.Embedding(16, 4)
    bnb.optim.GlobalOptimManager.get_instance().register_module_override(embedding, "weight", {"optim_bits": 32})
    alive = weakref.ref(embedding)
    del embedding
    gc.collect()
    assert alive() is not None  # the manager holds it
    bench.release({})
    assert alive() is None


def test_steady_state_leaves_out_the_steps_that_recorded_graphs():
    bench = load_bench()
    baseline = {"step_seconds": [9.0, 6.0, 6.0, 6.0, 6.0]}
    graphs = {"step_seconds": [70.0, 1.0, 15.0, 1.0, 2.0], "cuda_graph_recording_steps": [0, 2]}
    got = bench.steady_state(baseline, graphs, warmup=1)
    assert got["steps"] == [1, 3, 4]  # step 0 is warm-up, step 2 recorded graphs
    assert got["speedup"] == pytest.approx(18.0 / 4.0) and got["seconds_per_step"] == pytest.approx(4.0 / 3, abs=1e-4)
