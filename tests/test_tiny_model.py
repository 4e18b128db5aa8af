import pytest

from stages.tiny_model import main


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_reloads_as_a_small_llama_with_distinct_special_tokens(loaded):
    model, tokenizer = loaded
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer) == 512
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token] == ["<s>", "</s>", "<pad>"]
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert tokenizer.model_max_length == 2048


@pytest.mark.parametrize("text", [
    "Question: Natalia sold 48 clips.\nAnswer: 48/2 = 24\n#### 72",
    "He earns £195 every day, €3.50 or 1,234 ¥ — 日本",  # any bytes, no unknown token
])
def test_tokenizer_round_trips_and_starts_with_bos(loaded, text):
    _, tokenizer = loaded
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_prompt_is_a_prefix_of_the_full_conversation(loaded):
    _, tokenizer = loaded
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "#### 4"}], tokenize=False)
    assert rendered == "<s>system: Be brief.\nuser: What is 2+2?\nassistant: "
    assert full == rendered + "#### 4</s>"


def test_generates_new_tokens_from_a_left_padded_batch(loaded):
    import torch

    model, tokenizer = loaded
    tokenizer.padding_side = "left"
    batch = tokenizer(["Question: 1+1?\nAnswer:", "Hi"], return_tensors="pt", padding=True)
    assert (batch.input_ids == tokenizer.pad_token_id).any()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    prompt_length = batch.input_ids.shape[1]
    assert prompt_length < out.shape[1] <= prompt_length + 4
    assert (out[:, :prompt_length] == batch.input_ids).all()


def test_same_seed_same_bytes_other_seed_other_weights(tiny_model_dir, tmp_path, capsys):
    main([str(tmp_path / "again"), "--seed", "0"])
    assert str(tmp_path / "again") in capsys.readouterr().out
    built = sorted(p.name for p in tiny_model_dir.iterdir())
    assert "model.safetensors" in built and "tokenizer.json" in built
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == built
    for name in built:
        assert (tmp_path / "again" / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name

    main([str(tmp_path / "other"), "--seed", "1"])
    other = tmp_path / "other"
    assert (other / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()
    # Written atomically: no temporary directory left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]


def test_too_small_vocab_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "m"), "--vocab-size", "100"])
    assert exc.value.code == 2
    assert "vocab_size must be >= 259" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
