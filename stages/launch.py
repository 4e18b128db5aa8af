"""python -m stages.launch N stages.train ARGS…

Runs a stage module in N processes through `accelerate launch` (one DDP rank per GPU), or in this
very process when N is 1, so a one-GPU run has no launcher in the way. dvc.yaml calls every GPU
stage through here with N from params (train.num_processes, evaluate.num_processes).
Multi-node runs skip this file: run the stage command under `accelerate launch --config_file …`.
"""
from __future__ import annotations

import os
import runpy
import sys

from stages.io import UserError, cli


def accelerate_args(num_processes: int, module: str, args: list[str]) -> list[str]:
    # Passed explicitly so accelerate does not warn about defaults; mixed precision stays "no"
    # here because the Trainer applies the bf16 setting itself.
    return ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module, *args]


@cli
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or not argv[0].isdigit() or int(argv[0]) < 1:
        raise UserError("usage: python -m stages.launch NUM_PROCESSES MODULE [ARGS…]")
    num_processes, module, args = int(argv[0]), argv[1], argv[2:]
    if num_processes == 1:
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    import torch

    gpus = torch.cuda.device_count()
    if gpus < num_processes and _cpu_ranks_allowed():
        os.environ["ACCELERATE_USE_CPU"] = "true"  # gloo DDP between CPU processes (accelerate's MULTI_CPU)
    elif gpus < num_processes:
        raise UserError(f"num_processes is {num_processes} but this machine has {gpus} CUDA GPU(s); "
                        "set train.num_processes / evaluate.num_processes to at most that")
    from accelerate.commands.launch import launch_command, launch_command_parser

    try:
        launch_command(launch_command_parser().parse_args(accelerate_args(num_processes, module, args)))
    except Exception as exc:  # CalledProcessError or torch elastic's ChildFailedError; the ranks printed why
        code = getattr(exc, "returncode", 1)
        raise SystemExit(code if isinstance(code, int) and code else 1) from None


def _cpu_ranks_allowed() -> bool:
    # Tests run DDP over gloo on CPU processes; nobody wants that for real training.
    return os.environ.get("QLORA_ALLOW_CPU_DDP") == "1"


if __name__ == "__main__":
    main()
