#!/usr/bin/env bash
# bash benchmarks/gpu_run.sh PART TAG   (from the repository root, on the CUDA host; $OUT: what comes back)
#
# The measurements issue 15 asks for, as device calls of under 10 minutes each (the per-call limit),
# made one after another on the same warm machine (the model built by the first stays in /dev/shm):
#
#   train_eval   the eval variants, then Unsloth and the default training path against the plain
#                recipe, into one JSON: benchmarks/results/bench_TAG_<gpu>.json (~9.5 min)
#   card         the card's batch 1 x accumulation 8 compiled, and compiled + CUDA graphs, against the
#                plain recipe (bench_TAGb_<gpu>.json); the engine's graph-vs-eager checks on the
#                refill/packing paths (diagnose_engine_TAG_<gpu>.json); the stages themselves at the
#                8B shape (pipeline_8b_default_<gpu>.json) (~9.5 min)
#
# Carry [".whl", ".whl_unsloth"]: `bash ../shared/tools/gpu-wheels.sh transformers==5.23.0` and
# `bash benchmarks/unsloth_wheels.sh` fill them here (both git-ignored; 35 MB together).
# Each bench.py writes its JSON after every variant, so a part cut short keeps what it measured;
# every result is also copied to $OUT as it is written.
set -uo pipefail
part=${1:?PART: train_eval or card}
tag=${2:?TAG: names the results, e.g. run21}
out=${OUT:?OUT: the folder whose files come back}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

# Our pins (transformers 5.23, trl 1.16, ...) over the host's torch; Unsloth's own site beside it.
if [ ! -e /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_unsloth \
         .whl_unsloth/*.whl .whl/bitsandbytes-*.whl \
    && touch /tmp/site/.done || { echo "gpu_run.sh: installing the wheels failed" >&2; exit 3; }
fi
export PYTHONPATH=/tmp/site
gpu=$(python3 -c 'import sys; sys.path.insert(0, "benchmarks"); import bench_device as d; print(d.slug(d.gpu_name()))')
model=/dev/shm/m8b
quiet() { grep -v Warning | tail -"$1"; }

case $part in
  train_eval)
    r=benchmarks/results/bench_${tag}_${gpu}.json
    # eval first: its goals are the ones never yet met on this engine; the training variants after it.
    timeout 285 python3 benchmarks/bench.py --sections eval --workdir $model \
      --eval-variants static_auto,static_b256,static_auto_answers,generate_b256 --eval-baseline-prompts 64 \
      --time-budget-s 265 --out "$r" 2>&1 | quiet 60
    cp "$r" "$out"/
    timeout 245 python3 benchmarks/bench.py --merge --sections train --workdir $model --train-steps 14 \
      --warmup-steps 5 --train-variants unsloth,default --unsloth-site /tmp/site_unsloth --time-budget-s 230 \
      --out "$r" 2>&1 | quiet 50
    cp "$r" "$out"/
    ;;
  card)
    r=benchmarks/results/bench_${tag}b_${gpu}.json
    # CUDA graphs first: the goal's candidate (compile alone was ~2x); compile alone if the budget leaves room.
    timeout 300 python3 benchmarks/bench.py --sections train --workdir $model --train-steps 12 --warmup-steps 4 \
      --train-variants card+cudagraphs,card+compile --time-budget-s 285 --out "$r" 2>&1 | quiet 40
    cp "$r" "$out"/
    timeout 90 python3 benchmarks/diagnose_engine.py --workdir $model --cases small_budget_refill,small_answers \
      --tag "$tag" --out "$out" 2>&1 | quiet 20
    timeout 170 python3 benchmarks/pipeline_8b.py --workdir $model --variant default --out "$out" 2>&1 | quiet 20
    ;;
  *)
    echo "gpu_run.sh: PART is train_eval or card, not '$part'" >&2; exit 2 ;;
esac
ls -l "$out"
