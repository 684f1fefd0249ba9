#!/usr/bin/env bash
# Runs GPU test binaries one test at a time, each under its own timeout, within a total time
# budget, and prints one line per test (result, seconds) — so that one device call checks as
# much as fits and says what it did not reach. Build the binaries here first (`cargo test
# --release --features cuda --no-run`) and copy them into the carried folder.
#
#   bench/verify_gpu.sh [-b BUDGET_S] [-t PER_TEST_S] BIN[:TEST,TEST...] ...
#
# BIN alone runs every test the binary lists (`--list`), BIN:a,b only those (exact names), in
# that order. Failing tests print their last output lines. Exit status: 0 when every test that
# ran passed and none was skipped for time, 1 otherwise.
set -uo pipefail

budget=540
per_test=240
while getopts "b:t:" opt; do
  case $opt in
    b) budget=$OPTARG ;;
    t) per_test=$OPTARG ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { sed -n '2,12p' "$0"; exit 2; }

start=$(date +%s)
status=0
log=$(mktemp)
printf '%-52s %-8s %6s\n' test result s
for spec in "$@"; do
  bin=${spec%%:*}
  if [ "$spec" != "$bin" ]; then
    IFS=',' read -ra tests <<< "${spec#*:}"
  else
    mapfile -t tests < <("$bin" --list 2>/dev/null | sed -n 's/: test$//p')
  fi
  for t in "${tests[@]}"; do
    left=$((budget - ($(date +%s) - start)))
    if [ "$left" -lt 5 ]; then
      printf '%-52s %-8s %6s\n' "$t" "no time" -
      status=1
      continue
    fi
    limit=$((left < per_test ? left : per_test))
    t0=$(date +%s)
    timeout "$limit" "$bin" --exact "$t" --test-threads 1 --nocapture >"$log" 2>&1
    rc=$?
    secs=$(($(date +%s) - t0))
    if [ $rc -eq 0 ] && grep -q "skipping " "$log"; then
      result=skipped  # the test printed why (no GPU, not a Hopper, an opt-in bench)
    elif [ $rc -eq 0 ] && grep -q "test result: ok. 1 passed" "$log"; then
      result=ok
    elif [ $rc -eq 124 ]; then
      result=timeout
      status=1
    else
      result=FAILED
      status=1
    fi
    printf '%-52s %-8s %6s\n' "$t" "$result" "$secs"
    case $result in
      ok) ;;
      skipped) grep -o "skipping .*" "$log" | head -n 1 | sed 's/^/    /' ;;
      *) tail -n 15 "$log" | sed 's/^/    /' ;;
    esac
  done
done
rm -f "$log"
exit $status
