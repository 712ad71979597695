#!/usr/bin/env bash
# The whole test suite beside a CPU hog on every core, to prove that no test depends on the
# machine's speed (a shared GPU box where another job trains, a noisy CI runner).
#
#   scripts/test-under-load.sh                 # the README's test command, one hog per core
#   HOGS=4 scripts/test-under-load.sh -x -q    # more hogs than cores; arguments go to pytest
#
# The hogs are plain busy loops at normal priority, started here and always stopped here (on
# success, failure or Ctrl-C). The last line says how the suite ended and how long it took.
set -uo pipefail
cd "$(dirname "$0")/.."

hogs=${HOGS:-$(nproc)}
pids=()
stop_hogs() {
  ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null
  wait "${pids[@]}" 2>/dev/null
  pids=()
}
trap stop_hogs EXIT
trap 'exit 130' INT TERM

for _ in $(seq "$hogs"); do
  sh -c 'while :; do :; done' &
  pids+=("$!")
done
echo "test-under-load: $hogs busy processes beside the suite (pids ${pids[*]})"

start=$(date +%s)
python -m pytest -q -n auto "$@"
code=$?
elapsed=$(( $(date +%s) - start ))
stop_hogs

verdict=passed
((code)) && verdict="FAILED (pytest exit $code)"
printf 'test-under-load: %s in %dm %02ds beside %d hogs\n' "$verdict" $((elapsed / 60)) $((elapsed % 60)) "$hogs"
exit "$code"
