"""Greedy decoding on a preallocated KV cache, each decoding step replayed as one CUDA graph.

Used by `stages.evaluate` when `evaluate.engine: static` (the default). Why not `model.generate`:
one decoding step of an 8B model is dozens of small kernels per layer, and at batch 256 eager
PyTorch takes ~40 ms to get through them while reading the weights takes ~5 ms
(benchmarks/profile_generate.py). Recording the step once as a CUDA graph (once more for each smaller
set of rows, below) and replaying it removes the launch cost. transformers' own static cache + torch.compile path was no faster:
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

The batch is a set of rows that questions flow through: when a row's answer has ended (EOS, a stop
string, or its max_new_tokens), the next question is prefilled into that row while the others go
on, so that real answers of very different lengths do not leave rows idle until the longest one in
a batch ends; the last questions go right after the answers still running, and once no question is
left those move into fewer rows (a row with nothing to decode costs a step's matmuls, and its cache
would cost the attention too, were it not put back at position 0). A
question's token at position p sits in slot p of its row, so its keys are laid out, masked and
summed as they would be for the question alone, whichever row it has and whatever ran there before
(tests/test_decode.py, test_decode_families.py: token for token against `generate`).
"""
from __future__ import annotations

import re
from collections import deque

# Prompt tokens per prefill forward: bounds the prefill's activations (~0.9 GB for an 8B model)
# while keeping its matmuls large.
PREFILL_TOKENS = 8192
# Once no question is left to take, the answers still running move into the first rows whenever
# they fill half of the rows in use or less, and the steps run on those rows alone (a smaller graph,
# recorded anew): with answers of very different lengths the last ones would otherwise pay for every
# row until the longest ends. Not below this many rows, where a step costs about the same anyway.
COMPACT_DOWN_TO = 32
# Rows moved per copy while compacting: bounds the temporary copy of each layer's cache.
COMPACT_COPY_ROWS = 64
# Steps between two looks at the generated tokens (a host sync, with the GPU idle while the host
# checks each row for EOS and stop strings): rows whose answer ended get the next questions. A row
# waits for the next look after its answer ends, CHECK_EVERY / 2 steps on average, ~6% of a GSM8K
# answer (~130 tokens); looking more often costs more host time per step.
CHECK_EVERY = 16
# The decoding step's sdpa attention through stages/decode_attention.py's kernel: "auto" on CUDA when
# Triton imports, True forces it (the CPU tests, under Triton's interpreter), False never.
FUSED_STEP_ATTENTION: bool | str = "auto"


class SlotCache:
    """Per layer, keys and values of shape [rows, kv_heads, slots, head_dim], written in place.

    It stands in for transformers' Cache: the attention layers call `update`. A question's token at
    position p (its prompt from 0) sits in slot p of its row, whichever row it has and whatever the row
    held before, so the attention sums its keys in the same order as for the question alone. A
    decoding step writes each row's token at `write_slots` ([rows] long, a device tensor that a
    recorded graph reads on every replay). During a prefill `prefill_rows` and `prefill_slots` (long
    tensors) say where the chunk's real prompt tokens go, `prefill_real` which of its left-padded
    columns they are, and the prefill attends over the chunk's prompts alone.
    """

    def __init__(self, keys: list, values: list, write_slots):
        self.keys, self.values = keys, values
        self.write_slots = write_slots
        self.rows = None  # set per step view: torch.arange(rows)
        self.prefill_rows = self.prefill_slots = self.prefill_real = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill_rows is not None:
            # [chunk rows, heads, width, dim] -> the real tokens' [n, heads, dim], each into its row and slot.
            index = (self.prefill_rows, slice(None), self.prefill_slots)
            keys[index] = key_states.transpose(1, 2)[self.prefill_real].to(keys.dtype)
            values[index] = value_states.transpose(1, 2)[self.prefill_real].to(values.dtype)
            return key_states.to(keys.dtype), value_states.to(values.dtype)
        keys[self.rows, :, self.write_slots] = key_states[:, :, 0]
        values[self.rows, :, self.write_slots] = value_states[:, :, 0]
        return keys, values


def cache_geometry(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def allocate_cache(config, rows: int, slots: int, dtype, device) -> tuple[list, list]:
    """Cache buffers, every layer at full length (stages.memory sizes evaluate.batch_size by them)."""
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
    longest first (the engine's order); a chunk's padding slots are masked anyway."""
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


def greedy_decode(model, prompts: list[list[int]], rows: int, new_tokens: int, pad_id: int, ended, use_graph: bool,
                  progress=None) -> list[list[int]]:
    """Greedy continuations of `prompts` (token ids), through a batch of `rows` rows: per prompt, in
    input order, the ids generated until its answer was seen to end (at most `new_tokens`).

    `ended(index, ids) -> bool` is asked every CHECK_EVERY steps for each question being decoded,
    with the ids generated so far (ids after the end are the model's and are left to the caller to
    cut); a question also ends at `new_tokens`. Its row then takes the next question. Questions go
    in longest prompt first, which sizes the slots and keeps each prefill's padding small.
    `progress(n)` is told of every n questions done.
    """
    import torch

    check_engine_supports(model)
    kinds = layer_kinds(model)
    lm_config = _unwrap(model)[0].config.get_text_config()
    window = lm_config.sliding_window if SLIDING in kinds else None
    # The dtype the attention scores have: a float mask of any other dtype is refused by sdpa.
    dtype = model.get_input_embeddings().weight.dtype
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    results: list = [None] * len(prompts)
    if not order:
        return results
    rows = max(1, min(rows, len(prompts)))
    slots = len(prompts[order[0]]) + new_tokens - 1
    # Decoding state, updated in place so that a recorded graph sees it; a row's entries are set when
    # it takes a question. `out[:, -1]` is a scratch column for rows with nothing left to decode.
    tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)      # the token each step feeds in
    positions = torch.zeros(rows, 1, dtype=torch.long, device=device)   # its position, and its slot
    out = torch.zeros(rows, new_tokens + 1, dtype=torch.long, device=device)
    column = torch.zeros(rows, dtype=torch.long, device=device)         # where in `out` the step writes
    cache = SlotCache(*allocate_cache(lm_config, rows, slots, dtype, device), write_slots=None)
    slot_ids = torch.arange(slots, device=device)
    lowest = torch.finfo(dtype).min
    _, kv_heads, head_dim = cache_geometry(lm_config)
    step_attention = _StepAttention(fused_step_attention_wanted(device, lm_config.num_attention_heads, kv_heads,
                                                                head_dim, dtype))

    def fill(free_rows: list[int], questions: list[int]) -> None:
        """Prefill `questions` (longest first) into `free_rows`, a chunk of rows per forward, each chunk
        left-padded only to its own longest prompt; each prompt's keys go to slots 0.. of its row (the
        slots after them keep the row's previous question's keys, masked until overwritten)."""
        lengths = [len(prompts[i]) for i in questions]
        for part, width in prefill_chunks(lengths):
            chunk, chunk_rows = questions[part], torch.tensor(free_rows[part], device=device)
            chunk_lengths = lengths[part]
            ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=device)
            lengths_t = torch.as_tensor(chunk_lengths, device=device)
            chunk_positions = torch.arange(width, device=device)[None, :] - (width - lengths_t)[:, None]
            real = chunk_positions >= 0
            cache.prefill_rows = chunk_rows[:, None].expand(-1, width)[real]
            cache.prefill_slots, cache.prefill_real = chunk_positions[real], real
            chunk_masks = {kind: prefill_mask(chunk_lengths, width, device, dtype, window if kind == SLIDING else None)
                           for kind in set(kinds)}
            try:
                logits = model(input_ids=ids, attention_mask=_as_model_mask(chunk_masks, kinds),
                               position_ids=chunk_positions.clamp(min=0), past_key_values=cache, use_cache=True,
                               logits_to_keep=1).logits
            finally:
                cache.prefill_rows = cache.prefill_slots = cache.prefill_real = None
            first = logits[:, -1].argmax(-1)
            out[chunk_rows] = 0
            out[chunk_rows, 0] = first
            tokens[chunk_rows, 0] = first
            positions[chunk_rows, 0] = lengths_t
            column[chunk_rows] = 1
            del logits

    def make_step(n: int):
        """One decoding step of the first n rows (views: a recorded graph reads and writes them in place)."""
        n_tokens, n_positions, n_out, n_column = tokens[:n], positions[:n], out[:n], column[:n]
        # A row with no question left writes (unread) into its own slots, never past the last one.
        write_slots = torch.zeros(n, dtype=torch.long, device=device)
        view = SlotCache([k[:n] for k in cache.keys], [v[:n] for v in cache.values], write_slots)
        view.rows = torch.arange(n, device=device)
        # Per row, additive masks over the slots: its own tokens up to the one being written, and
        # for sliding layers only the last `window` of them (transformers': kv > q - window).
        n_masks = {kind: torch.empty(n, 1, 1, slots, dtype=dtype, device=device) for kind in set(kinds)}
        n_mask = _as_model_mask(n_masks, kinds)
        zero = torch.zeros((), dtype=dtype, device=device)
        masked = torch.full((), lowest, dtype=dtype, device=device)

        def step():
            torch.clamp(n_positions[:, 0], max=slots - 1, out=write_slots)
            allowed = slot_ids[None, :] <= n_positions
            if FULL in n_masks:
                torch.where(allowed[:, None, None, :], zero, masked, out=n_masks[FULL])
            if SLIDING in n_masks:
                allowed &= slot_ids[None, :] > n_positions - window
                torch.where(allowed[:, None, None, :], zero, masked, out=n_masks[SLIDING])
            with step_attention:
                logits = model(input_ids=n_tokens, attention_mask=n_mask, position_ids=n_positions,
                               past_key_values=view, use_cache=True).logits
            n_tokens.copy_(logits[:, -1:].argmax(-1))
            n_out.scatter_(1, n_column[:, None], n_tokens)
            # (A row with no question left stops at the last position a question can reach: a
            # position past the model's range would change its RoPE scaling for every row, Phi-3's longrope.)
            n_positions.add_(1).clamp_(max=slots)
            n_column.add_(1).clamp_(max=new_tokens)

        return step

    def compact(active: list[int]) -> None:
        """Move the rows `active` (ascending) to the front, state and cache. Each row moves to an
        index at or before its own, and chunks go in order, so no row is overwritten before it is read.
        The graph recorded for the rows in use is dropped: the next steps record one for the new rows."""
        nonlocal replay, recorded
        replay = recorded = None
        index = torch.tensor(active, device=device)
        for tensor in (*cache.keys, *cache.values, tokens, positions, out, column):
            for s in range(0, len(active), COMPACT_COPY_ROWS):
                chunk = index[s:s + COMPACT_COPY_ROWS]  # the last one is shorter
                tensor[s:s + len(chunk)] = tensor[chunk]
        occupant[:len(active)], done[:len(active)] = [occupant[r] for r in active], [done[r] for r in active]

    replay = None
    # The step a graph was recorded from: its tensors (write slots, masks, row indices) are the
    # graph's inputs and outputs, read and written by address on every replay, so they must live as
    # long as the graph does. Freed, the allocator hands their memory to the next prefill while the
    # graph goes on writing there.
    recorded = None
    in_use = rows  # the first rows the steps run on

    def run_steps(k: int) -> None:
        nonlocal replay, recorded
        if replay is None:
            step = recorded = make_step(in_use)
            replay = step
            if use_graph:
                # A first step runs for real on a side stream (CUDA graphs need warmed-up kernels and
                # allocator); recording does not execute, so the state stays that of after this step.
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    step()
                torch.cuda.current_stream().wait_stream(side)
                k -= 1
                # Its own memory pool, freed with the graph when decoding is done or the rows are
                # compacted. (A pool shared by successive graphs trips an allocator assert in torch 2.11
                # once the first graph is freed.)
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph):
                        step()
                except (torch.OutOfMemoryError, torch.AcceleratorError):
                    raise  # RuntimeErrors too: the stage's own memory message, not "use generate" (more memory)
                except RuntimeError as exc:
                    from stages.io import UserError

                    # A model whose step talks to the host (a dynamic RoPE, a data-dependent branch) cannot
                    # be recorded. No eager fallback here: when capture fails, torch.cuda.graph's exit raises
                    # before it restores the stream, and what decoding on from that state computes was never
                    # checked; transformers' generate decodes such a model.
                    why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                    raise UserError(f"params.yaml: evaluate.engine: static cannot record this model's decoding "
                                    f"step as a CUDA graph ({why}); set evaluate.engine: generate") from exc
                replay = graph.replay
        for _ in range(k):
            replay()

    queue = deque(order)
    occupant: list = [None] * rows   # the question each row decodes
    done = [0] * rows                # tokens it has generated
    first = [queue.popleft() for _ in range(rows)]
    fill(list(range(rows)), first)
    for r, i in enumerate(first):
        occupant[r], done[r] = i, 1
    while True:
        generated = out[:in_use].cpu()
        finished = 0
        for r, i in enumerate(occupant[:in_use]):
            if i is None:
                continue
            ids = generated[r, :done[r]].tolist()
            if done[r] >= new_tokens or ended(i, ids):
                results[i], occupant[r] = ids, None
                finished += 1
        if progress and finished:
            progress(finished)
        free = [r for r, i in enumerate(occupant[:in_use]) if i is None]
        if queue and free:
            taken = [queue.popleft() for _ in range(min(len(free), len(queue)))]
            running = [r for r, i in enumerate(occupant[:in_use]) if i is not None]
            if not queue and in_use > COMPACT_DOWN_TO and (len(running) + len(taken)) * 4 <= in_use * 3:
                # The last questions: the answers still running move to the first rows and these
                # questions go right after them, so that their steps do not pay for the rows left over
                # (when every answer runs the whole budget, 541 questions after the first 778 rows).
                compact(running)
                in_use = len(running) + len(taken)
                free = list(range(len(running), in_use))
            fill(free[:len(taken)], taken)
            for r, i in zip(free, taken):
                occupant[r], done[r] = i, 1
        active = [r for r, i in enumerate(occupant[:in_use]) if i is not None]
        if not active:
            return results
        if not queue and in_use > COMPACT_DOWN_TO and len(active) * 2 <= in_use:
            compact(active)
            in_use, active = max(len(active), 1), list(range(len(active)))
        idle = [r for r in range(in_use) if occupant[r] is None]
        if idle:
            # A row with nothing to decode still runs with the others; back at position 0 its mask
            # allows a few slots, so the attention kernel reads one block of its cache, not all of it.
            positions[torch.tensor(idle, device=device), 0] = 0
        # Up to the next look, and never past an active question's budget (its tokens stay within
        # `out` and its slots); rows with no question run on, unread.
        k = min(CHECK_EVERY, min(new_tokens - done[r] for r in active))
        if k <= 0:
            continue
        run_steps(k)
        for r in active:
            done[r] += k
