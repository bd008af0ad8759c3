#!/usr/bin/env bash
# The reference training and sampling benchmarks on one accelerator, in one go.
#
#   benchmarks/device/run.sh OUT_DIR [--seconds N] [--quick] [STEP ...]
#
# STEPs, run one after another in the order given (default: all, in this order),
# each model in its own processes as on the CPU:
#   training_reference  train_speed.py: ours, original, transformer6 (reference)
#   sampling_reference  sample_speed.py --suite reference (ours vs TransformerLM-12
#                       in both loops, and the original)
#   sampling_profile    one traced call of 256 tokens each of ours and TransformerLM-12
#                       in our loop (--profile): device operations a token runs, and
#                       the longest by name
#   sampling_sparse, sampling_batch, sampling_long: the other suites
# Each writes its log and JSON to OUT_DIR and prints its table. A step is stopped
# when N seconds (default 540) have passed since the start, and one that would
# start with under a minute left is skipped, so the whole ends within N seconds.
# --quick passes --quick to every benchmark (tiny models: a smoke test).
# On an H200 (2026-11-29) sampling_reference took 370 s, most of it compiling.
#
# Compiled programs go to a persistent JAX cache, so a model's later rounds do
# not compile again; timings exclude compilation either way. Where TensorFlow is
# not installed (accelerator images without it), benchmarks/device/absent stands
# in for the imports trax makes but these benchmarks do not use.
set -u -o pipefail
out=${1:?usage: benchmarks/device/run.sh OUT_DIR [--seconds N] [--quick] [STEP ...]}
shift
budget=540
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
all=(training_reference sampling_reference sampling_profile sampling_sparse sampling_batch
     sampling_long)
((${#steps[@]})) || steps=("${all[@]}")
for name in "${steps[@]}"; do
  if [[ " ${all[*]} " != *" $name "* ]]; then
    echo "run.sh: unknown step '$name'; steps: ${all[*]}" >&2
    exit 2
  fi
done
[[ $budget =~ ^[0-9]+$ ]] || { echo "run.sh: --seconds $budget: give a whole number of seconds, e.g. 540" >&2; exit 2; }
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

for name in "${steps[@]}"; do
  case $name in
    training_reference)
      run "$name" train_speed.py --models ours,original,transformer6 --rounds 3 --steps 10 ;;
    sampling_profile)
      run "$name" sample_speed.py --models ours_sample,transformer12_sample --rounds 1 \
        --n_tokens 256 --max_len 2048 --profile 15 ;;
    *)
      run "$name" sample_speed.py --suite "${name#sampling_}" --rounds 3 ;;
  esac
done
echo "== done in $((SECONDS - deadline + budget))s"
