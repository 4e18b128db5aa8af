"""Known harmless warnings, silenced where they are raised, each with why; nothing else is hidden.

A stage's output should read as what happened: a warning that says nothing about this run (a
library warning about another library) looks like a failure to a person reading the log. Each
entry below matches one message exactly, from the start, at its source: a warning category (a
`warnings` filter) or the name of the logger that emits it (a `logging` filter on that logger).
A new warning, or the same text from another source, still shows.
"""
from __future__ import annotations

import logging
import re
import warnings

# (source: a Warning category or a logger's name, message regex matched from its start, why it is harmless here)
KNOWN = [
    (FutureWarning, r"The pynvml package is deprecated",
     "torch.cuda imports `pynvml`, which the nvidia-ml-py package provides under that name; "
     "it is about torch's import, not about this run"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "peft/TRL call transformers' old property name; same value"),
    (DeprecationWarning, r"`torch.jit.script_method` is deprecated",
     "raised while transformers imports its TorchScript helpers; nothing here scripts"),
    (UserWarning, r"Paged optimizers are not supported on CPU\. Falling back to non-paged optimizer behavior\.$",
     "bitsandbytes pages optimizer state through CUDA memory only; on CPU the same update runs on "
     "ordinary memory, and the train stage says so in its own line"),
    ("bitsandbytes.backends.cpu.ops",
     r"Failed to load CPU gemm_4bit_forward from kernels-community: ",
     "bitsandbytes 0.50.2, on import, when its CPU library is loaded on a CPU with AVX512-BF16, tries to "
     "fetch a faster CPU 4-bit matmul from the Hub through the optional `kernels` package; without it "
     "the same op runs on bitsandbytes' built-in CPU code (its CUDA library does not try)"),
    ("liger_kernel.backends.registry",
     r"Backend impl 'liger_kernel\.ops\.backends\._(cutedsl|ascend|cutile)\.\w+' for op '\w+' could not be "
     r"imported: (ModuleNotFoundError|ImportError): ",
     "Liger 0.8.5 probes every backend of an op on its first use; CuTe DSL (NVIDIA cutlass), Ascend "
     "(NPU) and cuTile are optional packages for other hardware or opt-in kernels, and the op runs "
     "its Triton kernel (a failing Triton backend still shows)"),
    ("transformers.trainer_utils",
     r"mtime may not be reliable on this filesystem, falling back to numerical ordering$",
     "transformers says so whenever two checkpoints were saved within a second (a fast tiny run), "
     "whatever the disk; it then orders checkpoint-<step> by step, the order the resume uses too"),
    ("transformers.integrations.bitsandbytes", r"The modules are dequantized in \S+ and casted to \S+\.$",
     "transformers says which dtype `evaluate.dequantize` turned the 4-bit weights into, as a warning: it is the "
     "dtype the stage asked for (the compute dtype), not a problem"),
    (FutureWarning, r"`use_liger_kernel=True` is deprecated and will be removed in v2\.0\.0\. Use the Hub kernels",
     "TRL 1.16 still applies Liger's kernels; its replacement downloads kernels from the Hub at run "
     "time, which this pipeline does not do (train.use_liger_kernel, pinned liger-kernel)"),
]


class _KnownRecords(logging.Filter):
    """Drops the records of one logger whose formatted message matches one of its known patterns."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(p.match(text) for p in self.patterns)


def silence_known_warnings() -> None:
    """Install the filters of KNOWN; idempotent (every stage's main calls it, tests call mains repeatedly)."""
    by_logger: dict[str, list[str]] = {}
    for source, message, _why in KNOWN:
        if isinstance(source, str):
            by_logger.setdefault(source, []).append(message)
        else:
            warnings.filterwarnings("ignore", message=message, category=source)
    # Filters on the logger itself, not on a handler: the libraries log before any handler exists
    # (Python's last-resort handler prints them), and a handler added later must not see them either.
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _KnownRecords)]:
            logger.removeFilter(old)
        logger.addFilter(_KnownRecords(patterns))
