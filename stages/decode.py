"""Greedy decoding on a preallocated KV cache, each decoding step replayed as one CUDA graph.

Used by `stages.evaluate` when `evaluate.engine: static` (the default). Why not `model.generate`:
one decoding step of an 8B model is dozens of small kernels per layer, and at batch 256 eager
PyTorch takes ~40 ms to get through them while reading the weights takes ~5 ms
(benchmarks/profile_generate.py). Recording the step once per batch as a CUDA graph and replaying
it removes the launch cost. transformers' own static cache + torch.compile path was no faster:
under compile its sdpa attention repeats the KV heads over the whole cache (`repeat_kv`), while
run eagerly (as here, also while recording) a single-token step attends per KV head (`pack_gqa`).

The model is called through its own forward (any causal LM whose attention calls
`past_key_values.update(key, value, layer_idx)` and whose mask builders pass a prepared 4-D mask
through, as transformers' Llama/Mistral/Qwen/Gemma/Phi-3 do), so the numbers are the model's: on
tiny models of those families the tokens equal `generate`'s greedy tokens (tests/test_decode_families.py).
The engine builds the masks the model would build, one per layer type (`full_attention`, and
`sliding_attention` for a window of `config.sliding_window`), as additive float masks (0 / dtype
min): transformers hands a 4-D mask to the attention untouched, and eager attention adds it to the
scores, so a boolean mask would mask nothing there. A model it cannot vouch for (another attention
kind, flash_attention_2, a forward that would not take one mask per layer type) is refused before
anything is generated (`check_engine_supports`). Only plain greedy argmax is done (no logits
processors), which is what published GSM8K numbers use. On CPU the same loop runs without graphs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Prompt tokens per prefill forward: bounds the prefill's activations (~0.9 GB for an 8B model)
# while keeping its matmuls large.
PREFILL_TOKENS = 8192
# Steps between two looks at the generated tokens (a host sync): stop early once every row has
# ended, without stalling the GPU every step.
CHECK_EVERY = 32
# The decoding step's sdpa attention through stages/decode_attention.py's kernel: "auto" on CUDA when
# Triton imports, True forces it (the CPU tests, under Triton's interpreter), False never.
FUSED_STEP_ATTENTION: bool | str = "auto"


@dataclass
class Batch:
    """One left-padded batch: its prompts end at the same slot, where decoding starts."""
    input_ids: object   # [rows, width] long
    lengths: list       # real prompt tokens per row
    width: int


class SlotCache:
    """Per layer, keys and values of shape [rows, kv_heads, slots, head_dim], written in place.

    It stands in for transformers' Cache: the attention layers call `update`. The slot written by
    a decoding step is `position`, a device tensor, so a recorded graph reads the current value
    on every replay. During prefill `prefill_rows` selects the chunk of rows being filled and
    `prefill_slots` the prompt slots that chunk's forward covers (its own longest prompt, right-aligned
    at the batch's width), and only those are returned, so the prefill attends over the prompt alone.
    """

    def __init__(self, keys: list, values: list):
        import torch

        self.keys, self.values = keys, values
        self.position = torch.zeros(1, dtype=torch.long, device=keys[0].device)
        self.prefill_rows: slice | None = None
        self.prefill_slots: slice | None = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill_rows is not None:
            rows, slots = self.prefill_rows, self.prefill_slots
            keys[rows, :, slots] = key_states
            values[rows, :, slots] = value_states
            return keys[rows, :, slots], values[rows, :, slots]
        keys.index_copy_(2, self.position, key_states)
        values.index_copy_(2, self.position, value_states)
        return keys, values


def cache_geometry(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def allocate_cache(config, rows: int, slots: int, dtype, device) -> tuple[list, list]:
    """Cache buffers for the largest batch; smaller batches use views of them (no reallocation,
    no fragmentation between batches)."""
    import torch

    layers, kv_heads, head_dim = cache_geometry(config)
    shape = (rows, kv_heads, slots, head_dim)
    keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
    values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
    return keys, values


def prefill_chunks(lengths: list[int]) -> list[tuple[slice, int]]:
    """(rows, width) per prefill forward: consecutive rows, each chunk padded only to its own longest
    prompt, at most PREFILL_TOKENS tokens (one row at least; stages.memory sizes the prefill by that).
    Prefilling every chunk at the batch's width computed ~45% padding on GSM8K-length prompts sorted
    longest first (evaluate's batches); a chunk's padding slots are masked anyway."""
    chunks, start = [], 0
    while start < len(lengths):
        end, width = start + 1, lengths[start]
        while end < len(lengths) and (end + 1 - start) * max(width, lengths[end]) <= PREFILL_TOKENS:
            width = max(width, lengths[end])
            end += 1
        chunks.append((slice(start, end), width))
        start = end
    return chunks


FULL, SLIDING = "full_attention", "sliding_attention"
# The attention implementations whose use of a 4-D mask is the one checked here (the mask is added
# to the scores, or given to torch's sdpa as attn_mask). flash_attention_2 takes no 4-D mask.
CHECKED_ATTENTION = ("sdpa", "eager")
# A forward that takes {layer type: mask} as it is (transformers 5's Gemma/Qwen/...): only through
# it can layers of different types get different masks.
_TAKES_MASK_DICT = re.compile(r"isinstance\(\s*(?:\w+\s*:=\s*)?attention_mask\s*,\s*dict\s*\)")
# transformers' mask builders, which return a prepared 4-D mask as it is.
_BUILDS_MASK_WITH_MASKING_UTILS = re.compile(r"\bcreate_(?:causal|sliding_window_causal)_mask\b|\bcreate_masks_for_generate\b")


def _unwrap(model):
    """The transformers model under a peft wrapper, and its decoder (whose forward builds the masks)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm, getattr(lm, "base_model", lm)


def _refuse(model, why: str, alternative: str = ""):
    from stages.io import UserError

    raise UserError(f"params.yaml: evaluate.engine: static cannot decode {type(model).__name__} ({why}); "
                    f"set evaluate.engine: generate{alternative}")


def _forward_source(decoder) -> str:
    import inspect

    try:
        return inspect.getsource(type(decoder).forward)
    except (OSError, TypeError):
        return ""


def layer_kinds(model) -> list[str]:
    """Each layer's attention type, as transformers' own mask dispatch (create_masks_for_generate)
    reads the config, once check_engine_supports has accepted the model."""
    lm, _ = _unwrap(model)
    config = lm.config.get_text_config()
    if getattr(config, "layer_types", None):
        return list(config.layer_types)
    return [SLIDING if getattr(config, "sliding_window", None) is not None else FULL] * config.num_hidden_layers


def check_engine_supports(model) -> None:
    """Refuse, with one line naming evaluate.engine, a model whose masks the engine cannot build as
    `generate` would: it must run before anything is generated, so that no wrong number comes out."""
    lm, decoder = _unwrap(model)
    config = lm.config.get_text_config()
    attention = getattr(lm.config, "_attn_implementation", None) or "eager"
    if attention == "flash_attention_2":
        _refuse(model, "it is only checked with sdpa and eager attention, and flash_attention_2 ignores its masks",
                ", or model.attn_implementation: sdpa")
    if attention not in CHECKED_ATTENTION:
        _refuse(model, f"attention implementation {attention!r} is not one it is checked with (sdpa, eager)")
    if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
        _refuse(model, "its attention is not causal")
    if getattr(config, "attention_chunk_size", None) is not None and not getattr(config, "layer_types", None):
        _refuse(model, "chunked attention is not one of the attention kinds it builds masks for")
    kinds = layer_kinds(model)
    unknown = sorted(set(kinds) - {FULL, SLIDING})
    if unknown:
        _refuse(model, f"layer type {unknown[0]!r} is not one it builds masks for ({FULL}, {SLIDING})")
    if SLIDING in kinds and not (isinstance(getattr(config, "sliding_window", None), int) and config.sliding_window > 0):
        _refuse(model, f"{SLIDING} layers without a positive config.sliding_window")
    source = _forward_source(decoder)
    if not _BUILDS_MASK_WITH_MASKING_UTILS.search(source):
        _refuse(model, f"{type(decoder).__name__}.forward does not build its mask with transformers' masking_utils, "
                "so a prepared mask may not reach the attention as it is")
    if len(set(kinds)) > 1 and not _TAKES_MASK_DICT.search(source):
        _refuse(model, f"its layers mix {' and '.join(sorted(set(kinds)))}, but {type(decoder).__name__}.forward "
                "takes no mask per layer type")


def real_keys(lengths, width: int, device):
    """[rows, width] bool: which slots of a left-padded batch hold prompt tokens."""
    import torch

    lengths = torch.as_tensor(lengths, device=device)
    return torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]


def additive(allowed, dtype):
    """0 where attention is allowed, dtype's min elsewhere: what transformers' own eager masks hold.
    Added to the scores (eager) or given to sdpa as attn_mask, it masks the same under both; min
    rather than -inf keeps a row with nothing allowed finite."""
    import torch

    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def prefill_mask(lengths, width: int, device, dtype=None, window: int | None = None):
    """[rows, 1, width, width]: causal, real prompt keys only, and with `window` only keys less than
    `window` slots back (transformers' sliding window: kv > q - window). A padding query sees
    itself, so no softmax row is empty (its output is never used). Boolean without `dtype`, else
    additive (see `additive`)."""
    import torch

    pos = torch.arange(width, device=device)
    allowed = pos[:, None] >= pos[None, :]                                     # [width, width]
    if window is not None:
        allowed &= pos[None, :] > pos[:, None] - window
    mask = allowed[None] & real_keys(lengths, width, device)[:, None, :]
    mask = (mask | torch.eye(width, dtype=torch.bool, device=device)[None])[:, None]
    return mask if dtype is None else additive(mask, dtype)


_SELF_CHECKS: dict = {}


def fused_step_attention_wanted(device, heads: int = 0, kv_heads: int = 0, dim: int = 0, dtype=None) -> bool:
    """Whether the decoding steps use the fused kernel. "auto": on CUDA, when Triton imports and the
    kernel, compiled for this model's group size, head size and dtype, matches SDPA on a small
    input (once per process and geometry); otherwise, with one line saying why, SDPA as before."""
    if FUSED_STEP_ATTENTION != "auto":
        return bool(FUSED_STEP_ATTENTION)
    if device.type != "cuda":
        return False
    key = (str(device), heads, kv_heads, dim, str(dtype))
    if key not in _SELF_CHECKS:
        _SELF_CHECKS[key] = _self_check(device, heads, kv_heads, dim, dtype)
    return _SELF_CHECKS[key]


def _self_check(device, heads, kv_heads, dim, dtype) -> bool:
    import torch
    import torch.nn.functional as F

    try:
        from stages.decode_attention import decode_attention

        g = torch.Generator(device).manual_seed(0)
        q = torch.randn(3, heads, 1, dim, device=device, generator=g).to(dtype)
        k, v = (torch.randn(3, kv_heads, 100, dim, device=device, generator=g).to(dtype) for _ in range(2))
        mask = torch.zeros(3, 1, 1, 100, device=device, dtype=dtype)
        mask[1, ..., :70] = torch.finfo(dtype).min  # a left-padded row: whole blocks masked
        ours = decode_attention(q, k, v, mask, dim ** -0.5).float()
        group = heads // kv_heads
        exact = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                               v.float().repeat_interleave(group, 1), attn_mask=mask.float())
        error = (ours - exact).abs().max().item()
        if not error <= 2e-2:
            raise RuntimeError(f"max difference {error:.3g} from SDPA in float32")
        return True
    except Exception as exc:  # noqa: BLE001 - no Triton, no compiler, a wrong result: SDPA does the steps
        print(f"decode: fused step attention not used ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
              "decoding steps use SDPA")
        return False


def fused_step_sdpa(original):
    """transformers' sdpa attention function, with a decoding step's call (one query token, the
    engine's [rows, 1, 1, slots] additive mask, no dropout, softcap or sinks) sent to the fused
    kernel; every other call goes to `original` as it was."""
    from stages.decode_attention import decode_attention

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        mask = attention_mask
        if (query.shape[2] != 1 or mask is None or mask.dim() != 4 or mask.shape[1:3] != (1, 1) or dropout
                or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
                or kwargs.get("sinks") is not None or key.shape[-1] != query.shape[-1]
                or query.shape[1] % key.shape[1] or mask.shape[-1] != key.shape[2]):
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = decode_attention(query, key, value, mask, scale)
        return out.transpose(1, 2).contiguous(), None

    return attention


class _StepAttention:
    """While decoding steps run (and a step is recorded as a CUDA graph), transformers' "sdpa" entry
    is the fused step attention; afterwards it is what it was."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        if self.enabled:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            self.table = ALL_ATTENTION_FUNCTIONS
            self.had_local = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
            self.previous = ALL_ATTENTION_FUNCTIONS["sdpa"]
            ALL_ATTENTION_FUNCTIONS["sdpa"] = fused_step_sdpa(self.previous)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            if self.had_local:
                self.table["sdpa"] = self.previous
            else:
                del self.table["sdpa"]
        return False


def _as_model_mask(masks: dict, kinds: list[str]):
    """The attention_mask argument: one tensor when every layer has the same type (any forward built
    on masking_utils passes it through), else {layer type: mask}."""
    return masks[kinds[0]] if len(set(kinds)) == 1 else masks


def greedy_decode(model, batch: Batch, new_tokens: int, buffers: tuple[list, list], finished, use_graph: bool):
    """Greedy continuation of `batch`: a [rows, new_tokens] long tensor on the model's device.

    `finished(tokens_so_far) -> bool` is asked every CHECK_EVERY steps with the tokens generated so
    far (on the CPU); when it says every row has ended, decoding stops and the rest stays pad (0).
    """
    import torch

    check_engine_supports(model)
    kinds = layer_kinds(model)
    window = _unwrap(model)[0].config.get_text_config().sliding_window if SLIDING in kinds else None
    # The dtype the attention scores have: a float mask of any other dtype is refused by sdpa.
    dtype = model.get_input_embeddings().weight.dtype
    device = batch.input_ids.device
    rows, width = batch.input_ids.shape
    slots = width + new_tokens - 1
    cache = SlotCache([k[:rows, :, :slots] for k in buffers[0]], [v[:rows, :, :slots] for v in buffers[1]])
    out = torch.zeros(rows, new_tokens, dtype=torch.long, device=device)
    lengths = torch.as_tensor(batch.lengths, device=device)

    # Prefill, a chunk of rows at a time, each over the last `part_width` slots (its longest prompt);
    # the slots left of those stay unwritten and masked. Only the last position's logits are computed.
    positions_all = (torch.arange(width, device=device)[None, :] - (width - lengths)[:, None]).clamp(min=0)
    for part, part_width in prefill_chunks(list(batch.lengths)):
        cols = slice(width - part_width, width)
        cache.prefill_rows, cache.prefill_slots = part, cols
        masks = {kind: prefill_mask(batch.lengths[part], part_width, device, dtype, window if kind == SLIDING else None)
                 for kind in set(kinds)}
        logits = model(input_ids=batch.input_ids[part, cols], attention_mask=_as_model_mask(masks, kinds),
                       position_ids=positions_all[part, cols], past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits
        out[part, 0] = logits[:, -1].argmax(-1)
    cache.prefill_rows = cache.prefill_slots = None
    del logits, masks
    if new_tokens == 1:
        return out

    # Decoding state, updated in place so that a recorded graph sees it.
    tokens = out[:, :1].clone()
    positions = lengths[:, None].clone()          # the next token's RoPE position, per row
    cache.position.fill_(width)                   # the next token's slot, shared by all rows
    # The full mask: the real prompt keys, then each slot as a step writes it. The sliding mask is
    # the full one with the slots `window` or more behind the written slot masked too, rewritten
    # from it every step (in place: a slot leaves the window as the written slot moves on).
    lowest = torch.finfo(dtype).min
    full = torch.full((rows, 1, 1, slots), lowest, dtype=dtype, device=device)
    full[:, 0, 0, :width] = additive(real_keys(batch.lengths, width, device), dtype)
    masks = {FULL: full}
    if window is not None:
        masks[SLIDING] = torch.empty_like(full)
        slot_ids = torch.arange(slots, device=device)
        masked = torch.tensor(lowest, dtype=dtype, device=device)
    step_mask = _as_model_mask({kind: masks[kind] for kind in set(kinds)}, kinds)
    column = torch.ones(1, dtype=torch.long, device=device)  # where the step's token goes in `out`
    lm_config = _unwrap(model)[0].config.get_text_config()
    _, kv_heads, head_dim = cache_geometry(lm_config)
    step_attention = _StepAttention(fused_step_attention_wanted(device, lm_config.num_attention_heads, kv_heads,
                                                                head_dim, dtype))

    def step():
        full.index_fill_(3, cache.position, 0.0)
        if window is not None:
            torch.where(slot_ids > cache.position - window, full, masked, out=masks[SLIDING])
        with step_attention:
            logits = model(input_ids=tokens, attention_mask=step_mask, position_ids=positions, past_key_values=cache,
                           use_cache=True).logits
        tokens.copy_(logits[:, -1:].argmax(-1))
        out.index_copy_(1, column, tokens)
        positions.add_(1)
        cache.position.add_(1)
        column.add_(1)

    replay = step
    steps = new_tokens - 1
    if use_graph:
        # A first step runs for real on a side stream (CUDA graphs need warmed-up kernels and
        # allocator); recording does not execute, so the state stays that of after this step.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        steps -= 1
        # Its own memory pool, freed with the graph when this batch is done. (A pool shared by the
        # batches' graphs trips an allocator assert in torch 2.11 once the first graph is freed.)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                step()
            replay = graph.replay
        except RuntimeError as exc:  # a model whose forward talks to the host cannot be recorded
            print(f"decode: CUDA graph capture failed ({str(exc).splitlines()[0][:200]}); decoding without graphs")
    done_steps = new_tokens - 1 - steps
    for i in range(steps):
        replay()
        done_steps += 1
        if (i + 1) % CHECK_EVERY == 0 and finished(out[:, :done_steps + 1].cpu()):
            break
    return out
