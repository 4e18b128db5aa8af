"""python benchmarks/look_host_time.py [--rows 1319] [--new-tokens 256]

Host time of the static engine's looks over one pass of the split (no GPU needed: the GPU waits while the
host does this). Every CHECK_EVERY steps the engine copies the generated ids to the host and asks, per row,
whether the answer ended: EOS among the new ids, else a stop string in the text of the new ids and
STOP_CONTEXT before them (stages.evaluate.looks_ended). Times that check as committed (one decode per window) against
decoding the window again for each stop string, on random ids with the project's tiny byte-level BPE
tokenizer and the default protocol's 4 stop strings; no answer ends, as with the benchmark's random weights.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1319)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()

    import torch

    from stages.decode import CHECK_EVERY
    from stages.evaluate import STOP_CONTEXT, looks_ended
    from stages.protocols import TRAIN_PROMPT_STOP
    from stages.tiny_model import SPECIAL_TOKENS, build_tokenizer

    tokenizer = build_tokenizer(args.vocab_size)
    stop = [*TRAIN_PROMPT_STOP, tokenizer.eos_token]
    end_ids = {tokenizer.eos_token_id}
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    # Ids past the special tokens: no answer ends, as with the benchmark's random weights.
    out = torch.randint(len(SPECIAL_TOKENS), len(tokenizer), (args.rows, args.new_tokens + 1),
                        generator=torch.Generator().manual_seed(0))

    def per_stop():
        """The check before stop 24, as the baseline (no answer ends here, so answer_length never runs)."""
        looked = {}

        def ended(question, ids):
            start, looked[question] = looked.get(question, 0), len(ids)
            return any(t in end_ids for t in ids[start:]) or any(
                s in decode(ids[max(start - STOP_CONTEXT, 0):]) for s in stop)

        return ended

    def one_pass(make_check) -> float:
        ended = make_check()
        started = time.perf_counter()
        for done in range(CHECK_EVERY, args.new_tokens + 1, CHECK_EVERY):
            generated = out.cpu()
            for r in range(args.rows):
                ended(r, generated[r, :done].tolist())
        return time.perf_counter() - started

    looks = args.new_tokens // CHECK_EVERY
    committed = functools.partial(looks_ended, decode, stop, end_ids)
    for name, make_check in (("decoded once per stop string", per_stop), ("decoded once (committed)", committed)):
        best = min(one_pass(make_check) for _ in range(3))
        print(f"{name}: {best:.3f} s of host time for {looks} looks x {args.rows} rows "
              f"({len(stop)} stop strings)")


if __name__ == "__main__":
    main()
