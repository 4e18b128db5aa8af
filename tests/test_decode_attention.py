"""The static engine's fused decoding-step attention (stages/decode_attention.py, a Triton kernel the
engine uses on CUDA) computes what SDPA computes, and the engine with it decodes what `generate`
decodes. On CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py
before Triton is imported)."""
import importlib
import os

import pytest
import torch

import triton  # noqa: F401 - make install brings it where torch does not (the CPU build)


@pytest.fixture
def kernel_module():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets it before Triton is imported"
    return importlib.import_module("stages.decode_attention")


def engine_masks(rows, slots, dtype, generator):
    """Additive masks as the engine builds them: a left-padded prompt (whole leading blocks of
    slots masked for the short rows) and the slots written so far."""
    lengths = torch.randint(3, slots // 2, (rows,), generator=generator)
    written = slots - 7
    pos = torch.arange(slots)
    allowed = (pos[None, :] >= slots // 2 - lengths[:, None]) & (pos[None, :] < written)
    allowed[:, slots // 2:written] = True
    return torch.zeros(rows, 1, 1, slots, dtype=dtype).masked_fill_(~allowed[:, None, None, :], torch.finfo(dtype).min)


@pytest.mark.parametrize("heads,kv_heads,dim,slots", [(8, 2, 16, 150), (32, 8, 128, 200), (6, 2, 96, 64),
                                                      (4, 4, 32, 70), (12, 4, 64, 1)])
def test_kernel_equals_sdpa(kernel_module, heads, kv_heads, dim, slots):
    """Group sizes 4, 3 and 1, head dims that are and are not powers of two (Phi-3's 96), slot counts
    that are and are not multiples of the kernel's block, in float32 (to fp32 rounding) and bf16
    (within SDPA's own bf16 error of the float64 result)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(heads * dim + slots)
    rows = 5
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(rows, heads, 1, dim, generator=g).to(dtype)
        k = torch.randn(rows, kv_heads, slots, dim, generator=g).to(dtype)
        v = torch.randn(rows, kv_heads, slots, dim, generator=g).to(dtype)
        mask = engine_masks(rows, slots, dtype, g) if slots > 1 else torch.zeros(rows, 1, 1, 1, dtype=dtype)
        group = heads // kv_heads
        scale = dim ** -0.5

        def sdpa(x):
            return F.scaled_dot_product_attention(x(q), x(k).repeat_interleave(group, 1),
                                                  x(v).repeat_interleave(group, 1), attn_mask=x(mask), scale=scale)

        exact = sdpa(lambda t: t.double())
        ours = kernel_module.decode_attention(q, k, v, mask, scale)
        assert ours.shape == q.shape and ours.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)
        else:
            theirs = (sdpa(lambda t: t) .double() - exact).abs().max().item()
            assert (ours.double() - exact).abs().max().item() <= 2 * theirs + 1e-3


def test_kernel_skips_only_blocks_the_mask_excludes(kernel_module):
    """Rows whose allowed slots start two blocks in and end a block before the last (a left-padded
    prompt, unwritten slots), a row allowed everywhere, one allowed in a single slot, and one allowed
    at both ends with whole blocks masked between (a question whose slots wrapped around the ring):
    the same as SDPA. A row allowed nowhere (the engine never builds one) still gets finite values."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    block = kernel_module.BLOCK_SLOTS
    rows, heads, kv_heads, dim, slots = 5, 8, 2, 32, 4 * block + 5
    q = torch.randn(rows, heads, 1, dim, generator=g)
    k, v = (torch.randn(rows, kv_heads, slots, dim, generator=g) for _ in range(2))
    allowed = torch.zeros(rows, slots, dtype=torch.bool)
    allowed[0, 2 * block + 3:3 * block - 1] = True
    allowed[1] = True
    allowed[2, 7] = True
    allowed[4, :10] = allowed[4, 3 * block + 2:] = True
    mask = torch.zeros(rows, 1, 1, slots).masked_fill_(~allowed[:, None, None, :], torch.finfo(torch.float32).min)
    ours = kernel_module.decode_attention(q, k, v, mask, dim ** -0.5)
    exact = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(4, 1),
                                           v.double().repeat_interleave(4, 1), attn_mask=mask.double())
    real = [0, 1, 2, 4]
    torch.testing.assert_close(ours[real].double(), exact[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[2].double(), v[2, :, 7].double().repeat_interleave(4, 0)[:, None], rtol=1e-6,
                               atol=1e-6)
    assert torch.isfinite(ours[3]).all()


def test_only_decoding_steps_take_the_kernel(kernel_module):
    """A prefill call (several query tokens), a mask of another shape or softcapping go to the
    original attention function unchanged."""
    from stages.decode import fused_step_sdpa

    calls = []

    def original(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        calls.append(query.shape[2])
        return "original", None

    attention = fused_step_sdpa(original)
    q1, q3 = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 3, 16)
    k = v = torch.randn(2, 2, 10, 16)
    step_mask = torch.zeros(2, 1, 1, 10)
    assert attention(None, q3, k, v, torch.zeros(2, 1, 3, 10))[0] == "original"
    assert attention(None, q1, k, v, torch.zeros(2, 4, 1, 10))[0] == "original"
    assert attention(None, q1, k, v, step_mask, softcap=30.0)[0] == "original"
    assert attention(None, q1, k, v, None)[0] == "original"
    out, _ = attention(None, q1, k, v, step_mask, scaling=0.25)
    assert calls == [3, 1, 1, 1] and out.shape == (2, 1, 4, 16)  # transformers' [rows, tokens, heads, dim]


@pytest.mark.parametrize("case", ["llama", "qwen3", "mistral", "gemma3", "phi3-sliding", "llama-eager"])
def test_engine_with_the_kernel_matches_generate(kernel_module, monkeypatch, case):
    """Token for token against generate (float32 tiny models, sliding windows and mixed layer types
    among them), and the kernel really ran on every sdpa model's decoding steps."""
    import stages.decode
    from tests.test_decode_families import CASES, build, token_ids

    tokenizer = importlib.import_module("stages.tiny_model").build_tokenizer(512)
    tokenizer.padding_side = "left"
    family, overrides = CASES[case]
    model = build(tokenizer, family, **overrides)
    reference, _ = token_ids(model, tokenizer, "generate")
    calls = []
    real = kernel_module.decode_attention
    monkeypatch.setattr(kernel_module, "decode_attention", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(stages.decode, "FUSED_STEP_ATTENTION", True)
    static, _ = token_ids(model, tokenizer, "static")
    assert static == reference
    sdpa = model.config._attn_implementation == "sdpa"
    assert (len(calls) > 0) == sdpa  # eager attention is not transformers' "sdpa" entry: untouched
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping  # put back after decoding


def test_not_used_on_cpu_unless_asked():
    import stages.decode

    assert stages.decode.FUSED_STEP_ATTENTION == "auto"
    assert not stages.decode.fused_step_attention_wanted(torch.device("cpu"))
