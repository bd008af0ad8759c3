#!/usr/bin/env bash
# For each supported Python found on this machine (pyenv's, or python3.X on the
# PATH): a fresh venv, the package installed in it with a tested set of versions,
# and the smoke tests (`pytest -m smoke`: train, resume, sample, evaluate, a
# notebook, 2 devices). Prints one line per Python; exits 1 if any failed.
#
#   scripts/check_pythons.sh [-c CONSTRAINTS] [-d VENV_DIR] [VERSION ...]
#   scripts/check_pythons.sh -p VERSION    # only print the interpreter found
#
# Defaults: -c constraints/newest.txt, -d ${TMPDIR:-/tmp}/trax_hourglass_pythons
# (one venv per version, py3.X, replaced on each run), versions 3.12 3.13 (the
# newest set's jax needs 3.12+; Python 3.11: -c constraints/oldest.txt 3.11).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
constraints=$repo/constraints/newest.txt
venv_dir=${TMPDIR:-/tmp}/trax_hourglass_pythons
print_only=0
while getopts 'c:d:ph' opt; do
  case $opt in
    c) constraints=$(realpath "$OPTARG") ;;
    d) venv_dir=$OPTARG ;;
    p) print_only=1 ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.12 3.13)
if [ ! -f "$constraints" ]; then
  echo "constraints file $constraints does not exist: pass one of $repo/constraints/*.txt" >&2
  exit 2
fi
mkdir -p "$venv_dir" || exit 2

# The newest X.Y.* under pyenv, else pythonX.Y on the PATH; checked by running it.
find_python() {
  local version=$1 pyenv_root candidate
  pyenv_root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for candidate in $(ls -d "$pyenv_root"/versions/"$version".*/bin/python 2>/dev/null | sort -V -r) \
                   "$(command -v "python$version" 2>/dev/null)"; do
    if [ -n "$candidate" ] && [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$version" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if [ "$print_only" = 1 ]; then  # -p: the interpreter of each version, nothing else.
  for version in "${versions[@]}"; do
    find_python "$version" || { echo "Python $version: not found" >&2; exit 1; }
  done
  exit 0
fi

summary=() failed=0
for version in "${versions[@]}"; do
  python=$(find_python "$version") || { summary+=("Python $version: not found (skipped)"); continue; }
  full=$("$python" -c 'import platform; print(platform.python_version())')
  venv=$venv_dir/py$version log=$venv_dir/py$version.log
  echo "== Python $full ($python): venv $venv, log $log"
  start=$SECONDS
  rm -rf "$venv"
  if ! { "$python" -m venv "$venv" &&
         "$venv/bin/pip" install -q -e "$repo[test]" -c "$constraints"; } >"$log" 2>&1; then
    summary+=("Python $full: FAILED to install (see $log)"); failed=1; continue
  fi
  jax=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("jax"))')
  installed=$((SECONDS - start))
  (cd "$repo" && env -u PYTHONPATH "$venv/bin/python" -m pytest -q -m smoke) >>"$log" 2>&1
  status=$?
  result=$(grep -E '^=*ERROR|^FAILED|[0-9]+ (passed|failed|errors?)' "$log" | tail -1)
  line="Python $full, jax $jax: $(echo "$result" | tail -1) (install ${installed} s, tests $((SECONDS - start - installed)) s)"
  [ "$status" = 0 ] || { line="$line FAILED (see $log)"; failed=1; }
  summary+=("$line")
done
printf '%s\n' "${summary[@]}"
exit $failed
