#!/usr/bin/env bash
# A/B of forward kernel knobs in one device call: the same `bench` sweep under each
# FLASHATTN_FA3_TUNE string, alternating, ROUNDS rounds, then one line per shape with each
# tune's mean TFLOP/s and its ratio to the first tune (the baseline, usually "").
#
#   bench/ab_fwd.sh FAB "TUNE0;TUNE1;..." [HEAD_DIMS] [SEQLENS] [MASKS]
#   e.g. bench/ab_fwd.sh .device/x/fab ";sumb256=1" 256 2048,4096,8192 both
#
# FAB runs `flashattn bench --device cuda "$@"` (see README). Environment: OUT (results, default
# a temporary folder), ROUNDS (2), REPEATS (20). The JIT compiles every tune's kernels first,
# in parallel, so that compile time stays out of the timed runs.
set -uo pipefail
fab=$1
IFS=';' read -ra tunes <<< "$2"
[ ${#tunes[@]} -gt 0 ] || tunes=("")
dims=${3:-64,128,256}
lens=${4:-2048,4096,8192}
masks=${5:-both}
out=${OUT:-$(mktemp -d)}
rounds=${ROUNDS:-2}
mkdir -p "$out"
export FLASHATTN_CACHE_DIR=${FLASHATTN_CACHE_DIR:-$(mktemp -d)}
args=(--json --pass fwd --family auto --head-dims "$dims" --seqlens "$lens" --masks "$masks")
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader
for i in "${!tunes[@]}"; do
  FLASHATTN_FA3_TUNE="${tunes[$i]}" "$fab" "${args[@]}" --repeats 1 >/dev/null 2>"$out/warm$i.err" &
done
wait
for r in $(seq 1 "$rounds"); do
  for i in "${!tunes[@]}"; do
    FLASHATTN_FA3_TUNE="${tunes[$i]}" "$fab" "${args[@]}" --repeats "${REPEATS:-20}" \
      >"$out/t${i}_r$r.json" 2>"$out/t${i}_r$r.err" || tail -n 3 "$out/t${i}_r$r.err"
  done
done
python3 - "$out" "$rounds" "$2" <<'PY'
import json, sys
out, rounds, tunes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(';')
res = {}
for i in range(len(tunes)):
    for r in range(1, rounds + 1):
        try:
            rows = json.load(open(f"{out}/t{i}_r{r}.json"))["rows"]
        except Exception as e:
            print(f"tune {i} round {r}: no results ({e})")
            continue
        for row in rows:
            key = (row["d"], row["seqlen"], row["causal"])
            res.setdefault(key, {}).setdefault(i, []).append(row.get("tflops") or 0.0)
print("tunes: " + " | ".join(f"{i}: '{t}'" for i, t in enumerate(tunes)))
print(f"{'d':>4} {'seqlen':>6} {'causal':>6} " + " ".join(f"{'t' + str(i):>16}" for i in range(len(tunes))))
for key in sorted(res):
    mean = {i: sum(v) / len(v) for i, v in res[key].items()}
    base = mean.get(0)
    cells = []
    for i in range(len(tunes)):
        if i not in mean:
            cells.append(f"{'-':>16}")
        elif i == 0 or not base:
            cells.append(f"{mean[i]:>16.1f}")
        else:
            cells.append(f"{mean[i]:>8.1f} ({mean[i] / base:.3f})")
    print(f"{key[0]:>4} {key[1]:>6} {str(key[2]):>6} " + " ".join(cells))
PY
