#!/usr/bin/env bash
# The reference training and sampling benchmarks on one accelerator, in one go.
#
#   benchmarks/device/run.sh OUT_DIR [--seconds N] [--quick] [STEP ...]
#
# STEPs, run one after another in the order given (default: all, in this order),
# each model in its own processes as on the CPU:
#   training_reference   train_speed.py: ours, original, transformer6 (reference
#                        size), 2 rounds
#   training_paper       the same at the paper's enwik8 size ('5@1 24@3 5@1',
#                        d_model 512, d_ff 2,048, 8 heads, 2,048 bytes), 1 round
#   training_paper_bf16  ours alone at the paper's size in bfloat16 (the others
#                        have no bfloat16), 1 round
#   sampling_profile     one traced call of 256 tokens each of ours and
#                        TransformerLM-12 in our loop (--profile): device
#                        operations a token runs, and the longest by name
#   sampling_reference   sample_speed.py --suite reference (ours vs
#                        TransformerLM-12 in both loops, and the original), 1 round
#   sampling_batch       the reference size at batch 16, 1 round
#   sampling_paper, sampling_paper_batch: the paper's size at batch 1 and 16,
#                        ours against TransformerLM-12 in our loop, 1 round
#   sampling_paper_bf16  the same at batch 1, ours in bfloat16
#   sampling_sparse, sampling_long: the other suites, 1 round
# Each writes its log and JSON to OUT_DIR and prints its table. A step is stopped
# when N seconds (default 480: 8 minutes) have passed since the start, and one
# that would start with under a minute left is skipped, so the whole ends within
# N seconds; run the steps it skipped in a second call (the persistent
# compilation cache below keeps what the first compiled).
# --quick passes --quick to every benchmark (tiny models, XLA optimization off:
# a smoke test, as tests/test_benchmarks.py runs it on the CPU); the size flags of
# the paper's steps are then left out.
# On an H200 (2026-11-29) sampling_reference took 370 s at 3 rounds, most of it
# compiling.
#
# Compiled programs go to a persistent JAX cache, so a model's later rounds do
# not compile again; timings exclude compilation either way. Where TensorFlow is
# not installed (accelerator images without it), benchmarks/device/absent stands
# in for the imports trax makes but these benchmarks do not use.
set -u -o pipefail
out=${1:?usage: benchmarks/device/run.sh OUT_DIR [--seconds N] [--quick] [STEP ...]}
shift
budget=480
quick=()
steps=()
while (($#)); do
  case $1 in
    --seconds) budget=${2:?--seconds needs a number}; shift ;;
    --quick) quick=(--quick) ;;
    *) steps+=("$1") ;;
  esac
  shift
done
all=(training_reference training_paper training_paper_bf16 sampling_profile
     sampling_reference sampling_batch sampling_paper sampling_paper_batch
     sampling_paper_bf16 sampling_sparse sampling_long)
((${#steps[@]})) || steps=("${all[@]}")
for name in "${steps[@]}"; do
  if [[ " ${all[*]} " != *" $name "* ]]; then
    echo "run.sh: unknown step '$name'; steps: ${all[*]}" >&2
    exit 2
  fi
done
[[ $budget =~ ^[0-9]+$ ]] || { echo "run.sh: --seconds $budget: give a whole number of seconds, e.g. 480" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-python3}
mkdir -p "$out"
deadline=$((SECONDS + budget))

if ! "$python" -c 'import tensorflow' >/dev/null 2>&1; then
  export PYTHONPATH=$repo/benchmarks/device/absent${PYTHONPATH:+:$PYTHONPATH}
  echo "TensorFlow not installed: using the stand-ins of benchmarks/device/absent"
fi
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/trax_hourglass_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export PYTHONUNBUFFERED=1

"$python" - <<'PY' 2>&1 | tee "$out/machine.txt"
import platform
from importlib.metadata import version
import jax
print(f'python {platform.python_version()}, ' + ', '.join(
    f'{name} {version(name)}' for name in ('jax', 'numpy', 'trax')))
print('devices:', ', '.join(f'{d.platform}:{d.device_kind}' for d in jax.devices()))
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
  --format=csv,noheader | tee -a "$out/machine.txt"

run() {  # NAME SCRIPT ARGS...: one benchmark, stopped at the deadline.
  local name=$1 script=$2 left=$((deadline - SECONDS))
  shift 2
  if ((left < 60)); then
    echo "== $name: skipped, ${left}s left"
    return
  fi
  echo "== $name (up to ${left}s): $script $*"
  timeout -k 10 "$left" "$python" "$repo/benchmarks/$script" "$@" "${quick[@]}" \
    --json "$out/$name.json" >"$out/$name.log" 2>&1
  local status=$?
  # The summary: from the table's title line to the end.
  sed -n '/^\(Sampling speed\|Training throughput\), /,$p' "$out/$name.log" | grep -v '^$'
  ((status)) && echo "== $name: exit status $status (log: $out/$name.log)"
}

# The paper's enwik8 model: its sizes, unless --quick (whose tiny sizes stand);
# 2,048 bytes trained as 2,049 (the original takes multiples of its factor, 3).
paper=(--vanilla_layers 5,5 --hierarchy 24@3 --d_model 512 --d_ff 2048 --n_heads 8
       --seq_len 2049 --tokens_per_step 16392)
((${#quick[@]})) && paper=()
for name in "${steps[@]}"; do
  case $name in
    training_reference)
      run "$name" train_speed.py --models ours,original,transformer6 --rounds 2 --steps 10 ;;
    training_paper)
      run "$name" train_speed.py --models ours,original,transformer6 --rounds 1 --steps 5 \
        "${paper[@]}" ;;
    training_paper_bf16)
      run "$name" train_speed.py --models ours --rounds 1 --steps 5 --dtype bfloat16 \
        "${paper[@]}" ;;
    sampling_profile)
      run "$name" sample_speed.py --models ours_sample,transformer12_sample --rounds 1 \
        --n_tokens 256 --max_len 2048 --profile 15 ;;
    sampling_paper_bf16)
      run "$name" sample_speed.py --suite paper --rounds 1 --dtype bfloat16 ;;
    *)
      run "$name" sample_speed.py --suite "${name#sampling_}" --rounds 1 ;;
  esac
done
echo "== done in $((SECONDS - deadline + budget))s"
