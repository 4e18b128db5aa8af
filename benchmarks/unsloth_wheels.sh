#!/usr/bin/env bash
# bash benchmarks/unsloth_wheels.sh [DIR]   (from the repository root; DIR defaults to .whl_unsloth)
#
# The wheels that benchmarks/bench_unsloth.py needs on a CUDA host with no network, Python 3.12, and
# its own torch 2.11 / transformers 5.17 / peft / accelerate / triton: Unsloth pins transformers <= 5.17,
# trl <= 1.15 and datasets < 5, so it runs in a process of its own over a site directory of its own.
# The main process's wheels (../shared/tools/gpu-wheels.sh -> .whl/) give it bitsandbytes.
# Both folders travel to the GPU machine in the 64 MiB carry, so benchmarks/prune_wheels.py cuts out of
# the unsloth wheels what training never imports (unsloth: studio/, the web UI, and unsloth_cli/;
# unsloth_zoo: mlx/, Apple's backend, but its __init__ and runtime, which `import unsloth` reads) and
# writes each pruned wheel's RECORD anew. Pinned versions: the ones this was checked with.
#
# On the CUDA host:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_unsloth \
#       .whl_unsloth/*.whl .whl/bitsandbytes-*.whl
# and bench.py's `--unsloth-site /tmp/site_unsloth` runs the peer with PYTHONPATH=/tmp/site_unsloth alone,
# so that the host's transformers 5.17 is the one it sees (not the 5.23 of the main site).
set -euo pipefail
dir=${1:-.whl_unsloth}
[ $# -gt 0 ] && shift
mkdir -p "$dir"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# What `import unsloth` and FastLanguageModel's 4-bit load + get_peft_model import, less what the host
# has (KINDS.md's package list). Not taken: xformers (optional: SDPA without it; its wheels are ~100 MB),
# diffusers, hf_transfer, vllm (not imported on this path).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$dir" \
    unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 "dill<0.4.2" "multiprocess<0.70.20" \
    tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 torchao==0.18.0 cut_cross_entropy==25.1.1 \
    msgspec==0.23.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 "$@"

python3 "$(dirname "$0")/prune_wheels.py" "$dir"
ls -l "$dir"
du -sh "$dir"
