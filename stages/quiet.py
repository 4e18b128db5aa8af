"""Known harmless warnings, silenced where they are raised, each with why; nothing else is hidden.

A stage's output should read as what happened: a warning that says nothing about this run (a
library warning about another library) looks like a failure to a person reading the log. Each
filter below matches one message exactly and names its source; a new warning still shows.
"""
from __future__ import annotations

import warnings

# (category, message regex, why it is harmless here)
KNOWN = [
    (FutureWarning, r"The pynvml package is deprecated",
     "torch.cuda imports `pynvml`, which the nvidia-ml-py package provides under that name; "
     "it is about torch's import, not about this run"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "peft/TRL call transformers' old property name; same value"),
    (DeprecationWarning, r"`torch.jit.script_method` is deprecated",
     "raised while transformers imports its TorchScript helpers; nothing here scripts"),
]


def silence_known_warnings() -> None:
    for category, message, _why in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)
