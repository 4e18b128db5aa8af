"""benchmarks/bench.py: the real script, end to end on CPU with a tiny model (~15 s), its peer's handoff
(bench_unsloth.py, against a stand-in Unsloth), the wheel pruning, and the pure parts of each file."""
import importlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench.py"


def load(name: str):
    """One of benchmarks/'s files (bench, bench_model, bench_train, ...), as its siblings import it."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module(name)


# A stand-in for Unsloth on CPU: FastLanguageModel with the arguments bench_unsloth.py passes to the real
# one (a changed name fails here as it would there), loading the model in bf16 and LoRA through peft.
FAKE_UNSLOTH = """
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

__version__ = "0+stand-in"
calls = []


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name, max_seq_length, dtype, load_in_4bit, fix_tokenizer):
        assert max_seq_length >= 64 and dtype is torch.bfloat16 and not load_in_4bit and not fix_tokenizer
        return AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype), None

    @staticmethod
    def get_peft_model(model, r, lora_alpha, lora_dropout, target_modules, bias, use_gradient_checkpointing,
                       random_state):
        assert use_gradient_checkpointing == "unsloth" and len(target_modules) == 7
        torch.manual_seed(random_state)
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                 target_modules=target_modules, bias=bias, task_type="CAUSAL_LM"))
        forward = model.forward

        def packed_forward(input_ids, position_ids, labels):
            # Unsloth's padding-free input: one row, positions restarting at each of the step's rows
            assert input_ids.shape[0] == 1 and (position_ids == 0).sum() == 8
            return forward(input_ids=input_ids, position_ids=position_ids, labels=labels)

        model.forward = packed_forward
        return model
"""


@pytest.fixture(scope="module")
def fake_unsloth_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site_unsloth")
    (site / "unsloth").mkdir()
    (site / "unsloth" / "__init__.py").write_text(FAKE_UNSLOTH)
    return site


@pytest.fixture(scope="module")
def result(tmp_path_factory, fake_unsloth_site):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    # One compiled variant: compiling takes ~30 s on 2 CPU cores, and the others compile the same way.
    variants = "unsloth,padding_free,card,padding_free+liger,card+liger,card+compile,card+cudagraphs"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--workdir", str(tmp / "model"), "--out", str(out),
                           "--train-variants", variants, "--unsloth-site", str(fake_unsloth_site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_writes_every_section_and_variant(result):
    data, stdout = result
    assert set(data["train"]) == {"baseline", "unsloth", "padding_free", "card", "padding_free+liger", "card+liger",
                                  "card+compile", "card+cudagraphs"}
    assert set(data["eval"]) == {"baseline_4bit_b64", "static_b128", "static_auto", "static_auto_sdpa", "static_b256",
                                 "static_auto_answers", "static_b256_answers", "generate_b256", "generate_b128",
                                 "4bit_b64"}
    for key in ("gpu", "versions", "shape", "lengths", "settings", "ratios", "goals", "table_markdown"):
        assert key in data
    assert data["lengths"]["train"]["mean"] == 240 and data["lengths"]["eval"]["mean"] == 160
    assert data["lengths"]["answers"]["mean"] == 130
    assert data["table_markdown"] in stdout


def test_padding_free_trains_the_same_thing_as_the_plain_loop(result):
    train = result[0]["train"]
    pf = train["padding_free"]
    assert pf["lora_a_identical"] and pf["data_order_sequential"]
    assert pf["loss_check"] == "PASS" and pf["loss_check_strict"] == "PASS"
    # The adapter it trained is the plain loop's (up to LoRA dropout's masks, drawn over other shapes).
    for name in ("padding_free", "card", "card+compile", "card+cudagraphs"):
        assert train[name]["adapter_check"] == "PASS" and train[name]["adapter_cosine"] > 0.8, name
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
        if name.endswith("_answers"):
            # Answers counted to their ends; decoded to the look that saw each end (at the tiny budget,
            # 16 tokens = stages.decode.CHECK_EVERY, the only look is at the budget: tests/test_decode.py
            # shows rows taking the next questions).
            assert v["generated_tokens"] == v["generated_tokens_expected"] < v["prompts"] * data["settings"]["new_tokens"]
            assert v["generated_tokens"] <= v["decoded_tokens"] <= v["prompts"] * data["settings"]["new_tokens"]
        else:
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


def test_eval_variants_time_the_fine_tuned_model(result):
    """Every project variant ran on the base with the r=32 adapter (what `evaluate` runs after training);
    the plain recipe's baseline on the base alone."""
    data = result[0]
    adapter = data["build_adapter"]
    assert (adapter["r"], adapter["alpha"], adapter["targets"]) == (32, 16, "all-linear") and adapter["tensors"] == 28
    for name, v in data["eval"].items():
        if name == "baseline_4bit_b64":
            assert "adapter" not in v
        else:
            assert v["adapter"] == {"r": 32, "alpha": 16, "targets": "all-linear", "path": adapter["path"]}, name
    assert Path(adapter["path"]).parent == Path(data["workdir"])


def test_adapter_loads_as_evaluate_loads_it(tmp_path):
    """bench_model.build_adapter_dir writes what peft's save_pretrained writes for the train section's
    LoRA without loading the base: stages.evaluate.load_for_generation loads every tensor as written
    (none missing, none unexpected, bf16 as TRL trains it), B is not zero, so the logits move, and a
    second call reuses the directory while one of another rank is rebuilt."""
    import warnings

    import torch
    from safetensors.torch import load_file

    bench_model, bench_eval = load("bench_model"), load("bench_eval")
    workdir = tmp_path / "model"
    bench_model.build_model_dir(workdir, bench_model.bench_shape(tiny=True), seed=0)
    built = bench_model.build_adapter_dir(workdir, seed=0)
    assert not built["reused"] and Path(built["path"]) == workdir / "adapter_r32"
    config = json.loads((workdir / "adapter_r32" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (32, 16, "LORA")
    # all-linear, as peft resolves it: under 20 modules it lists them by their full names
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"}
    written = load_file(str(workdir / "adapter_r32" / "adapter_model.safetensors"))
    assert len(written) == built["tensors"] == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    assert all(t.dtype == torch.bfloat16 and t.abs().sum() > 0 for t in written.values())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = bench_eval.load_project_model(str(workdir), dequantize=True, adapter=built["path"])
    assert not [w for w in caught if "adapter keys" in str(w.message)]
    loaded = {name.replace(".default.", "."): p for name, p in model.named_parameters() if "lora_" in name}
    assert set(loaded) == set(written)
    for name, tensor in written.items():
        assert torch.equal(loaded[name].detach(), tensor), name
    ids = torch.tensor([[1] + list(range(40, 60))])
    with torch.inference_mode():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert torch.isfinite(tuned).all() and not torch.equal(tuned, base)

    assert bench_model.build_adapter_dir(workdir, seed=0)["reused"]
    (workdir / "adapter_r32" / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    assert not bench_model.build_adapter_dir(workdir, seed=0)["reused"]


def test_eval_section_alone_runs_with_the_adapter(tmp_path):
    """`bench.py --tiny --sections eval`: the adapter built for the model directory, the project variants
    on it, the engine checks over both engines' completions of the fine-tuned model."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--sections", "eval", "--eval-variants",
                           "static_b256,generate_b256", "--eval-baseline-prompts", "0",
                           "--workdir", str(tmp_path / "model"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["eval"]) == {"static_b256", "generate_b256"} and "train" not in data
    assert data["build_adapter"]["reused"] is False
    for v in data["eval"].values():
        assert "error" not in v and v["adapter"]["path"] == str(tmp_path / "model" / "adapter_r32")
    assert data["engine_agreement"]["identical"] == data["engine_agreement"]["prompts"] > 0
    assert data["engine_checks"]["teacher_forced/static"]["argmax_match"] > 0.9


@pytest.mark.parametrize("vocab_size", [512, 128256])
def test_tokenizer_encodes_questions_back_to_their_ids(vocab_size):
    from stages.config import PromptParams
    from stages.modeling import encode_prompt, render_prompt

    bench = load("bench_model")
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
    bench = load("bench_model")
    rows = bench.make_train_rows(400, 512, seed=0)
    lengths = [len(r["input_ids"]) for r in rows]
    assert 225 < sum(lengths) / len(lengths) < 255 and min(lengths) >= 120 and max(lengths) <= 450
    assert all(len(r["completion_mask"]) == len(r["input_ids"]) and r["completion_mask"][0] == 0 for r in rows)
    prompts = bench.make_eval_prompts(1319, 512, seed=0)
    assert 150 < sum(map(len, prompts)) / 1319 < 170 and min(map(len, prompts)) >= 90
    # seeded, row by row: every path and every run read the same rows, and a subset is a prefix
    assert bench.make_train_rows(8, 512, seed=0) == rows[:8]
    assert bench.make_eval_prompts(128, 512, seed=0) == prompts[:128]


def test_a_path_that_trains_nothing_or_something_else_fails_the_adapter_check():
    """The loss of a random-weight model hardly moves in a few steps, so a path that never updated its adapter
    passed the loss checks (audit, stop 27); its LoRA B (zero at the start) does not pass this one."""
    import torch

    bench_train = load("bench_train")

    class Model(torch.nn.Module):
        def __init__(self, b):
            super().__init__()
            self.layer = torch.nn.ModuleDict({"lora_A": torch.nn.Linear(4, 2), "lora_B": torch.nn.Linear(2, 4)})
            with torch.no_grad():
                self.layer["lora_B"].weight.copy_(b)
                self.layer["lora_B"].bias.zero_()

    trained = torch.randn(4, 2)
    reference = bench_train.lora_snapshot(Model(trained), "lora_B")
    check = lambda b: bench_train.compare_lora_b(reference, Model(b))["adapter_check"]  # noqa: E731
    assert check(trained * 1.01 + 1e-3 * torch.randn(4, 2)) == "PASS"  # bf16-like differences
    assert check(torch.zeros(4, 2)) == "FAIL"  # trained nothing
    assert check(trained * 1e-6) == "FAIL"  # a learning rate of ~0
    assert check(-trained) == "FAIL"  # trained against the plain loop's direction


@pytest.mark.parametrize("losses, check, strict", [
    ([6.2540, 6.2596, 6.2457], "PASS", "PASS"),  # same rows, float noise
    ([6.2596, 6.2457, 6.2540], "PASS", "FAIL"),  # other rows: within rtol, but the strict check sees it
    ([6.2540 / 8, 6.2596 / 8, 6.2457 / 8], "FAIL", "FAIL"),  # loss divided by the accumulation steps
])
def test_loss_agreement(losses, check, strict):
    bench = load("bench_report")
    baseline = {"losses": [6.25401, 6.25958, 6.24572], "grad_norms": [0.068, 0.072, 0.073]}
    got = bench.loss_agreement(baseline, {"losses": losses}, warmup=1, rtol=0.02)
    assert (got["loss_check"], got["loss_check_strict"]) == (check, strict)


def test_module_patches_are_undone():
    """Liger rewrites transformers' Llama module; later variants must get the stock classes back."""
    from transformers.models.llama import modeling_llama

    bench = load("bench_train")
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


# What a goal needs besides the figures: the issue's setting (an H200, the 8B shape, 256 new tokens), and a
# path that trained what the plain loop trained, in the same invocation as the baseline.
SETTING = {"gpu": "NVIDIA H200", "shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                               vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
           "lengths": {"scale": None}, "settings": {"new_tokens": 256}}
SAME = {"loss_check": "PASS", "loss_check_strict": "PASS", "adapter_check": "PASS", "lora_a_identical": True,
        "data_order_sequential": True, "command": "python benchmarks/bench.py"}


@pytest.mark.parametrize("card, fast, fast_in_memory", [
    (dict(train_tokens_per_second=1000.0, peak_allocated_gib=9.3, allocated_at_start_gib=1.0), True, True),
    (dict(train_tokens_per_second=1000.0, peak_allocated_gib=9.3, allocated_at_start_gib=0.0), True, False),
    (dict(train_tokens_per_second=800.0, peak_allocated_gib=8.0, allocated_at_start_gib=0.0), False, False),
])
def test_card_goal_with_and_without_the_memory_clause(card, fast, fast_in_memory):
    """3x the plain recipe at batch 1 x 8 with the same loss; the memory clause counts the variant's own
    peak, not what earlier variants of the process left allocated."""
    bench = load("bench_report")
    results = {**SETTING, "train": {"baseline": {"train_tokens_per_second": 300.0, "peak_allocated_gib": 8.9,
                                                 "command": SAME["command"]},
                                    "card+compile-checkpointing": {**card, **SAME}}}
    _, goals = bench.ratios_and_goals(results, tiny=False)
    assert goals["train_card_batch_1x8_>=3x_same_loss"] is fast
    assert goals["train_card_batch_1x8_>=3x_same_loss_no_more_memory"] is fast_in_memory
    assert goals["train_effective_batch_8_>=8x_same_loss_no_more_memory"] is None  # no padding-free variant ran
    assert goals["train_effective_batch_8_>=1.2x_unsloth_same_loss"] is None  # nor the peer


def test_goals_are_the_default_paths_when_it_ran():
    """Issue 15's training goals are the default path's: a faster non-default variant does not meet them."""
    bench = load("bench_report")
    base = {"train_tokens_per_second": 300.0, "peak_allocated_gib": 8.9, "command": SAME["command"]}
    fast = {"train_tokens_per_second": 3000.0, "peak_allocated_gib": 7.0, **SAME}
    slow = {**fast, "train_tokens_per_second": 1500.0}
    peer = {"train_tokens_per_second": 2000.0, "command": SAME["command"]}
    for default, met in ((fast, True), (slow, False)):
        results = {**SETTING, "train": {"baseline": base, "unsloth": peer, "default": default,
                                        "padding_free+compile": fast}}
        _, goals = bench.ratios_and_goals(results, tiny=False)
        assert goals["train_effective_batch_8_>=8x_same_loss_no_more_memory"] is met
        assert goals["train_effective_batch_8_>=1.2x_unsloth_same_loss"] is met


def test_a_goal_holds_only_in_the_issues_setting_for_a_path_that_trained_the_same():
    """Audit of stop 27: an H100 run, a 2-layer model, a path that trained nothing (its loss alone passed),
    a variant merged from another invocation: the goals said met."""
    bench = load("bench_report")
    base = {"train_tokens_per_second": 300.0, "peak_allocated_gib": 8.9, "command": SAME["command"]}
    fast = {"train_tokens_per_second": 3000.0, "peak_allocated_gib": 7.0, **SAME}
    key = "train_effective_batch_8_>=8x_same_loss_no_more_memory"
    goals = bench.ratios_and_goals({**SETTING, "train": {"baseline": base, "default": fast}}, tiny=False)[1]
    assert goals[key] is True and "not_applicable" not in goals
    for change, why in (({"gpu": "NVIDIA H100 80GB HBM3"}, "the goals are on an H200"),
                        ({"shape": {**SETTING["shape"], "num_hidden_layers": 2}}, "not the Llama-3.1-8B shape"),
                        ({"settings": {"new_tokens": 128}}, "128 new tokens, not 256")):
        results = {**SETTING, **change, "train": {"baseline": base, "default": fast}}
        goals = bench.ratios_and_goals(results, tiny=False)[1]
        assert goals[key] is None and why in goals["not_applicable"]
    for change in ({"adapter_check": "FAIL"}, {"loss_check_strict": "FAIL"}, {"data_order_sequential": False},
                   {"command": "python benchmarks/bench.py --merge (an earlier run)"}):
        results = {**SETTING, "train": {"baseline": base, "default": {**fast, **change}}}
        assert bench.ratios_and_goals(results, tiny=False)[1][key] is False, change


def test_the_eval_goals_count_only_the_whole_split_decoded_to_the_last_token():
    bench = load("bench_report")
    whole = {"prompts": 1319, "generated_tokens": 1319 * 256, "wall_seconds_full_split": 20.0, "extrapolated": False,
             "peak_allocated_gib": 33.0, "peak_reserved_gib": 35.2}
    fast, small = "eval_full_split_<=25s_measured", "eval_<=25s_within_40GB"
    goals = bench.ratios_and_goals({**SETTING, "eval": {"static_b256": whole}}, tiny=False)[1]
    assert (goals[fast], goals[small]) == (True, True)
    for change in ({"prompts": 300, "generated_tokens": 300 * 256, "extrapolated": True},  # extrapolated
                   {"generated_tokens": 1319 * 100}):  # answers ended early: less work than the goal's
        goals = bench.ratios_and_goals({**SETTING, "eval": {"static_b256": {**whole, **change}}}, tiny=False)[1]
        assert (goals[fast], goals[small]) == (None, None), change
    # What a 40 GB card must hold is what the allocator reserved, not only the live tensors.
    goals = bench.ratios_and_goals({**SETTING, "eval": {"static_b256": {**whole, "peak_reserved_gib": 38.0}}},
                                   tiny=False)[1]
    assert (goals[fast], goals[small]) == (True, False)


def test_model_flop_utilization_counts_the_matmuls_a_trained_token_passes():
    """6 x (decoder projections + LM head) per token: 45 GFLOP for Llama-3.1-8B; MFU against the GPU's peak."""
    report = load("bench_report")
    shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
    per_token = report.train_flops_per_token(shape)
    assert per_token == pytest.approx(6 * (32 * 218_103_808 + 4096 * 128256))
    assert 44e9 < per_token < 46e9
    results = {"gpu": "NVIDIA H200", "shape": shape, "train": {"default": {"train_tokens_per_second": 1000.0}}}
    assert report.model_flop_utilization(results) == {"default": round(1000.0 * per_token / 989e12, 4)}
    assert report.model_flop_utilization({**results, "gpu": "cpu"}) == {}  # no peak known: no figure


def test_train_variants_run_in_the_order_asked():
    """A compiled variant that follows another one ran faster (bench runs 9 and 10): the order is the caller's."""
    bench = load("bench")
    args = bench.parse_args(["--sections", "train", "--train-variants", "card+compile-checkpointing,card"])
    assert bench.wanted_variants(args, "train") == ["baseline", "card+compile-checkpointing", "card"]


def test_release_frees_what_the_trainer_registered_with_bitsandbytes():
    """The Trainer registers each nn.Embedding with bitsandbytes' process-wide optimizer manager (32-bit
    states); without release() a later variant still held the earlier model's embedding (1 GiB at 8B)."""
    import gc
    import weakref

    import bitsandbytes as bnb
    import torch

    bench = load("bench_device")
    embedding = torch.nn.Embedding(16, 4)
    bnb.optim.GlobalOptimManager.get_instance().register_module_override(embedding, "weight", {"optim_bits": 32})
    alive = weakref.ref(embedding)
    del embedding
    gc.collect()
    assert alive() is not None  # the manager holds it
    bench.release({})
    assert alive() is None


def test_steady_state_leaves_out_the_steps_that_recorded_graphs():
    bench = load("bench_report")
    baseline = {"step_seconds": [9.0, 6.0, 6.0, 6.0, 6.0]}
    graphs = {"step_seconds": [70.0, 1.0, 15.0, 1.0, 2.0], "cuda_graph_recording_steps": [0, 2]}
    got = bench.steady_state(baseline, graphs, warmup=1)
    assert got["steps"] == [1, 3, 4]  # step 0 is warm-up, step 2 recorded graphs
    assert got["speedup"] == pytest.approx(18.0 / 4.0) and got["seconds_per_step"] == pytest.approx(4.0 / 3, abs=1e-4)


def test_the_peer_trains_on_the_same_rows_in_a_process_of_its_own(result):
    """bench_unsloth.py against the stand-in: the rows travel as JSON, the figures come back and are merged as
    the train variant "unsloth", with its loss differences reported (not gated) and the peer goal computed."""
    data = result[0]
    peer, base, steps = data["train"]["unsloth"], data["train"]["baseline"], data["settings"]["train_steps"]
    assert "error" not in peer, peer
    assert len(peer["losses"]) == len(base["losses"]) == steps and peer["train_tokens_per_second"] > 0
    assert peer["tokens_per_step"] == base["tokens_per_step"]  # the same rows, timed over the same steps
    # B = 0 at init: the first step is the base model's loss on the first 8 rows (4-bit there, bf16 here).
    assert peer["first_step_loss_rel_diff"] < 0.02
    assert "loss_check" not in peer and len(peer["loss_vs_ours"]["loss_rel_diff_per_step"]) == steps
    assert peer["allocated_at_start_gib"] == 0.0 and peer["recipe"]["batching"] == "padding-free"
    assert peer["versions"]["transformers"]  # read in the peer's process
    assert data["ratios"]["train_speedup_over_unsloth/padding_free"] > 0
    assert data["goals"]["train_effective_batch_8_>=1.2x_unsloth_same_loss"] is None  # tiny: goals are for 8B
    assert "(peer: other kernels and LoRA init, not gated)" in data["table_markdown"]


def test_a_peer_that_does_not_import_is_one_line_and_the_run_goes_on(tmp_path):
    empty_site = tmp_path / "site"
    empty_site.mkdir()
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--sections", "train", "--train-steps", "2",
                           "--train-variants", "unsloth,padding_free,unsloth+dropout0",
                           "--unsloth-site", str(empty_site),
                           "--workdir", str(tmp_path / "model"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = json.loads(out.read_text())["train"]
    error = train["unsloth"]["error"]
    assert error.startswith("RuntimeError: exit 1: bench_unsloth: unsloth does not import from "
                            f"PYTHONPATH={empty_site}:")
    assert error.endswith("ModuleNotFoundError: No module named 'unsloth'") and "\n" not in error
    assert "losses" in train["padding_free"] and train["unsloth+dropout0"]["error"] == error


def test_the_peer_is_skipped_without_a_site():
    bench = load("bench")
    args = bench.parse_args(["--sections", "train", "--train-variants", "unsloth,padding_free"])
    assert args.unsloth_site is None and bench.wanted_variants(args, "train") == ["baseline", "unsloth", "padding_free"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--train-variants", "unslot"])


def test_packed_step_is_one_padding_free_row_with_the_prompts_masked():
    peer = load("bench_unsloth")
    rows = [{"input_ids": [1, 10, 11, 12, 2], "completion_mask": [0, 0, 1, 1, 1]},
            {"input_ids": [1, 20, 21, 2], "completion_mask": [0, 1, 1, 1]}]
    packed = peer.packed_step(rows)
    assert packed["input_ids"] == [1, 10, 11, 12, 2, 1, 20, 21, 2]
    assert packed["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    # the loss tokens are those of the plain loop (labels[1:] != -100); each row's BOS is masked, so the
    # last token of one row never learns to predict the next row's first
    assert packed["labels"] == [-100, -100, 11, 12, 2, -100, 20, 21, 2]
    assert sum(t != -100 for t in packed["labels"]) == load("bench_train").completion_tokens(rows)


def test_peer_command_gives_the_peer_its_own_site_and_no_network(monkeypatch):
    peer = load("bench_unsloth")
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")  # the main process's site (transformers 5.23) must not leak
    argv, env = peer.peer_command("/tmp/site_unsloth", "/m", "/r.json", "/o.json", {"steps": 24, "lora_dropout": 0.0})
    assert env["PYTHONPATH"] == "/tmp/site_unsloth"
    assert env["HF_HUB_OFFLINE"] == env["UNSLOTH_DISABLE_STATISTICS"] == "1"
    assert argv[1].endswith("bench_unsloth.py") and argv[-4:] == ["--steps", "24", "--lora-dropout", "0.0"]
    args = peer.parse_args(argv[2:] + ["--warmup", "8"])
    assert (args.steps, args.warmup, args.lora_dropout, args.lora_r) == (24, 8, 0.0, 32)


def test_pruned_wheel_installs_without_the_pruned_folders(tmp_path):
    """benchmarks/prune_wheels.py on a wheel shaped like Unsloth's: the result is a wheel pip installs, whose
    RECORD lists exactly its files with their hashes."""
    prune = load("prune_wheels")
    wheel = tmp_path / "unsloth-2026.10.9-py3-none-any.whl"
    files = {"unsloth/__init__.py": b"VALUE = 42\n", "studio/backend/app.py": b"raise SystemExit\n",
             "studio/frontend/index.html": b"<html/>", "unsloth_cli/__init__.py": b"",
             "unsloth-2026.10.9.dist-info/METADATA": b"Metadata-Version: 2.1\nName: unsloth\nVersion: 2026.10.9\n",
             "unsloth-2026.10.9.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(wheel, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
        z.writestr("unsloth-2026.10.9.dist-info/RECORD",
                   "\n".join([prune.record_line(n, c) for n, c in files.items()]
                             + ["unsloth-2026.10.9.dist-info/RECORD,,"]))
    prune.main([str(tmp_path)])
    with zipfile.ZipFile(wheel) as z:
        assert z.testzip() is None
        names = set(z.namelist())
        record = z.read("unsloth-2026.10.9.dist-info/RECORD").decode().splitlines()
        assert names == {n for n in files if not n.startswith(("studio/", "unsloth_cli/"))} | {
            "unsloth-2026.10.9.dist-info/RECORD"}
        assert sorted(record) == sorted([prune.record_line(n, z.read(n)) for n in names if not n.endswith("RECORD")]
                                        + ["unsloth-2026.10.9.dist-info/RECORD,,"])
    assert prune.rules_for("unsloth_zoo-2026.10.9-py3-none-any.whl")[0] == ("unsloth_zoo/mlx/",)
    assert prune.rules_for("unsloth-2026.10.9-py3-none-any.whl")[0] == ("studio/", "unsloth_cli/")
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (target / "unsloth" / "__init__.py").is_file() and not (target / "studio").exists()
    check = subprocess.run([sys.executable, "-c", "import unsloth; print(unsloth.VALUE)"], capture_output=True,
                           text=True, env={"PYTHONPATH": str(target)}, timeout=60)
    assert check.stdout.strip() == "42"


def test_diagnose_engine_records_a_crashed_case_and_goes_on(tmp_path):
    """benchmarks/diagnose_engine.py on the tiny model: a case whose child process dies (here by a
    segmentation fault, as run 20's first GPU try did) is recorded as crashed with its last lines, and
    the next case runs in a new child and compares the engine with its eager path."""
    script = tmp_path / "diagnose_engine.py"
    source = (ROOT / "benchmarks" / "diagnose_engine.py").read_text()
    # The copy dies where the named case starts; it imports its siblings from benchmarks/ as the original does.
    source = source.replace('HERE = Path(__file__).resolve().parent', f'HERE = Path({str(ROOT / "benchmarks")!r})')
    source = source.replace("    n, rows, new_tokens, answers, graph, fused, eager = CASES[name]\n",
                            "    if name == 'small_one_pass':\n        os.kill(os.getpid(), 11)\n"
                            "    n, rows, new_tokens, answers, graph, fused, eager = CASES[name]\n")
    assert "os.kill" in source
    script.write_text(source)
    out = subprocess.run([sys.executable, str(script), "--tiny", "--out", str(tmp_path), "--tag", "t",
                          "--cases", "small_one_pass,small_answers_sdpa"], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(next(tmp_path.glob("diagnose_engine_t_*.json")).read_text())["cases"]
    assert results["small_one_pass"]["crashed"] is True
    assert any("Segmentation fault" in line or "SIGSEGV" in line
               for line in results["small_one_pass"]["stderr_tail"] + results["small_one_pass"]["native_frames"])
    assert results["small_answers_sdpa"]["identical_to_eager"] == "64/64"
    assert results["small_answers_sdpa"]["answers_cut_at_their_length"] == 64


def _peer_rows(lengths):
    """Rows as bench.py hands them to the peer: BOS (prompt) first, then prompt and completion tokens."""
    return [{"input_ids": [1] + [3 + (i + j) % 90 for j in range(n - 1)],
             "completion_mask": [0] * (n // 2) + [1] * (n - n // 2)} for i, n in enumerate(lengths)]


def test_packed_step_positions_restart_exactly_at_each_row():
    """The padding-free peer gets no packed_seq_lengths: Unsloth 2026.10.9's LlamaModel_fast_forward derives
    them from the position ids (a 0 starts a row; the first token must be a 0; more than one 0), so the
    positions packed_step writes must give back exactly the row lengths, summing to the sequence length."""
    peer = load("bench_unsloth")
    lengths = [30, 12, 9, 6, 26, 24, 40, 9]
    packed = peer.packed_step(_peer_rows(lengths))
    positions = packed["position_ids"]
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert starts[0] == 0 and len(starts) == len(lengths) > 1
    derived = [b - a for a, b in zip(starts, starts[1:] + [len(positions)])]
    assert derived == lengths and sum(derived) == len(packed["input_ids"]) == len(packed["labels"])
    # the first label of every row is -100: nothing is trained across a row boundary
    assert all(packed["labels"][s] == -100 for s in starts)


UNSLOTH_WHEEL = sorted((ROOT / ".whl_unsloth").glob("unsloth-2026.10.9-*.whl"))


@pytest.mark.skipif(not UNSLOTH_WHEEL, reason="no .whl_unsloth/unsloth-2026.10.9-*.whl (unsloth_wheels.sh)")
def test_unsloth_derives_per_row_attention_from_packed_step_positions():
    """Against the pinned wheel's own source (read, not installed: it needs CUDA): its Llama forward derives
    packed_seq_lengths from reset position ids when none is given, and its derivation, run on CPU over
    packed_step's positions, gives int32 boundaries whose lengths are the rows'."""
    import ast

    import torch

    with zipfile.ZipFile(UNSLOTH_WHEEL[0]) as wheel:
        llama = wheel.read("unsloth/models/llama.py").decode()
        packing = wheel.read("unsloth/utils/packing.py").decode()
    # LlamaModel_fast_forward: batch 1, no mask, no cache, positions given -> kwargs["packed_seq_lengths"]
    guard = ('kwargs.get("packed_seq_lengths") is None\n        and batch_size == 1\n'
             '        and attention_mask is None\n        and past_key_values is None\n'
             '        and position_ids is not None\n')
    assert guard in llama
    assert "seq_info = get_packed_info_from_kwargs(kwargs, position_ids.device, position_ids)" in llama
    assert 'kwargs["packed_seq_lengths"] = seq_info[0]' in llama
    # ... which the attention reads (seq_info -> varlen / per-row SDPA)
    assert "seq_info = get_packed_info_from_kwargs(kwargs, Q.device)" in llama
    wanted = {"_varlen_from_position_ids", "_seq_idx_from_cu_seqlens"}
    defs = [n for n in ast.parse(packing).body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    module = ast.Module(defs, type_ignores=[])
    namespace = {"torch": torch}
    exec(compile(module, "unsloth/utils/packing.py", "exec"), namespace)
    assert wanted <= namespace.keys()
    peer = load("bench_unsloth")
    lengths = [30, 12, 9, 6, 26, 24, 40, 9]
    packed = peer.packed_step(_peer_rows(lengths))
    cu_seqlens, _ = namespace["_varlen_from_position_ids"](torch.tensor([packed["position_ids"]]))
    seq_lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # what get_packed_info_from_kwargs hands the attention
    assert cu_seqlens.dtype == seq_lengths.dtype == torch.int32
    assert seq_lengths.tolist() == lengths and int(seq_lengths.sum()) == len(packed["input_ids"])
