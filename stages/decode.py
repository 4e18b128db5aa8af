"""Greedy decoding on a preallocated KV cache, each decoding step replayed as one CUDA graph.

Used by `stages.evaluate` when `evaluate.engine: static` (the default). Why not `model.generate`:
one decoding step of an 8B model is dozens of small kernels per layer, and at batch 256 eager
PyTorch takes ~40 ms to get through them while reading the weights takes ~5 ms
(benchmarks/profile_generate.py). Recording the step once per batch as a CUDA graph and replaying
it removes the launch cost. transformers' own static cache + torch.compile path was no faster:
under compile its sdpa attention repeats the KV heads over the whole cache (`repeat_kv`), while
run eagerly (as here, also while recording) a single-token step attends per KV head (`pack_gqa`).

The model is called through its own forward (any causal LM whose attention calls
`past_key_values.update(key, value, layer_idx)` and accepts a prepared 4-D mask, as transformers'
Llama/Mistral/Qwen2 do), so the numbers are the model's: on the tiny test model the tokens equal
`generate`'s greedy tokens. Only plain greedy argmax is done (no logits processors), which is what
published GSM8K numbers use. On CPU the same loop runs without graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

# Prompt tokens per prefill forward: bounds the prefill's activations (~0.9 GB for an 8B model)
# while keeping its matmuls large.
PREFILL_TOKENS = 8192
# Steps between two looks at the generated tokens (a host sync): stop early once every row has
# ended, without stalling the GPU every step.
CHECK_EVERY = 32


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
    on every replay. During prefill `prefill_rows` selects the chunk of rows being filled and only
    the prompt's slots are returned, so the prefill attends over the prompt alone.
    """

    def __init__(self, keys: list, values: list):
        import torch

        self.keys, self.values = keys, values
        self.position = torch.zeros(1, dtype=torch.long, device=keys[0].device)
        self.prefill_rows: slice | None = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill_rows is not None:
            n = key_states.shape[2]
            keys[self.prefill_rows, :, :n] = key_states
            values[self.prefill_rows, :, :n] = value_states
            return keys[self.prefill_rows, :, :n], values[self.prefill_rows, :, :n]
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


def prefill_rows(width: int) -> int:
    """Rows per prefill forward for prompts padded to `width` (stages.memory sizes the prefill by it)."""
    return max(1, PREFILL_TOKENS // width)


def real_keys(lengths, width: int, device):
    """[rows, width] bool: which slots of a left-padded batch hold prompt tokens."""
    import torch

    lengths = torch.as_tensor(lengths, device=device)
    return torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]


def prefill_mask(lengths, width: int, device):
    """[rows, 1, width, width] bool: causal, real prompt keys only. A padding query sees itself, so
    no softmax row is empty (its output is never used)."""
    import torch

    pos = torch.arange(width, device=device)
    causal = pos[:, None] >= pos[None, :]                                      # [width, width]
    mask = causal[None] & real_keys(lengths, width, device)[:, None, :]
    return (mask | torch.eye(width, dtype=torch.bool, device=device)[None])[:, None]


def greedy_decode(model, batch: Batch, new_tokens: int, buffers: tuple[list, list], finished, use_graph: bool):
    """Greedy continuation of `batch`: a [rows, new_tokens] long tensor on the model's device.

    `finished(tokens_so_far) -> bool` is asked every CHECK_EVERY steps with the tokens generated so
    far (on the CPU); when it says every row has ended, decoding stops and the rest stays pad (0).
    """
    import torch

    device = batch.input_ids.device
    rows, width = batch.input_ids.shape
    slots = width + new_tokens - 1
    cache = SlotCache([k[:rows, :, :slots] for k in buffers[0]], [v[:rows, :, :slots] for v in buffers[1]])
    out = torch.zeros(rows, new_tokens, dtype=torch.long, device=device)
    lengths = torch.as_tensor(batch.lengths, device=device)

    # Prefill, a chunk of rows at a time; only the last position's logits are computed.
    chunk = prefill_rows(width)
    positions_all = (torch.arange(width, device=device)[None, :] - (width - lengths)[:, None]).clamp(min=0)
    for start in range(0, rows, chunk):
        part = slice(start, min(start + chunk, rows))
        cache.prefill_rows = part
        logits = model(input_ids=batch.input_ids[part], attention_mask=prefill_mask(batch.lengths[part], width, device),
                       position_ids=positions_all[part], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        out[part, 0] = logits[:, -1].argmax(-1)
    cache.prefill_rows = None
    del logits
    if new_tokens == 1:
        return out

    # Decoding state, updated in place so that a recorded graph sees it.
    tokens = out[:, :1].clone()
    positions = lengths[:, None].clone()          # the next token's RoPE position, per row
    cache.position.fill_(width)                   # the next token's slot, shared by all rows
    mask = torch.zeros(rows, 1, 1, slots, dtype=torch.bool, device=device)
    mask[:, 0, 0, :width] = real_keys(batch.lengths, width, device)
    column = torch.ones(1, dtype=torch.long, device=device)  # where the step's token goes in `out`

    def step():
        mask.index_fill_(3, cache.position, True)
        logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache,
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
