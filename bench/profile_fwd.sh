#!/usr/bin/env bash
# Profile our forward kernel next to cuDNN's on the same problem, in ONE device command:
#   bench/profile_fwd.sh FAB D SEQLEN MASK [FAMILY]
# FAB: a binary taking `flashattn bench --device cuda` options (e.g. a wrapper that execs
# `flashattn bench --device cuda "$@"`); MASK: full | causal. Writes the two ncu reports and
# their summaries (bench/ncu_summary.py) under $OUT (default /tmp/fa_prof) and prints the heads.
set -uo pipefail
FAB=${1:?usage: profile_fwd.sh FAB D SEQLEN MASK [FAMILY]}; D=${2:?}; S=${3:?}; M=${4:?}
FAMILY=${5:-auto}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/fa_prof}; mkdir -p "$OUT"
export FLASHATTN_CACHE_DIR=${FLASHATTN_CACHE_DIR:-$(mktemp -d)} PYTHONUNBUFFERED=1
NCU="ncu --clock-control none --set full --import-source no --launch-skip 1 --launch-count 1"
B="--pass fwd --family $FAMILY --head-dims $D --seqlens $S --masks $M --warmup 1 --repeats 2 --mem-seqlen 0"
"$FAB" $B > /dev/null 2>&1  # JIT-compile outside the profiled run
$NCU -k regex:'fa3_fwd|fa2_fwd' -o "$OUT/ours_${D}_${S}_$M" -f "$FAB" $B > "$OUT/ncu_ours.log" 2>&1 \
  || tail -3 "$OUT/ncu_ours.log"
$NCU -k regex:'sdpa|fprop|fmha|cudnn' -o "$OUT/cudnn_${D}_${S}_$M" -f python3 "$HERE/anchors.py" --pass fwd \
  --head-dims "$D" --seqlens "$S" --masks "$M" --backends cudnn --warmup 1 --repeats 2 --sets 1 \
  > "$OUT/ncu_cudnn.log" 2>&1 || tail -3 "$OUT/ncu_cudnn.log"
for who in ours cudnn; do
  echo "=== $who d=$D seqlen=$S $M"
  python3 "$HERE/ncu_summary.py" "$OUT/${who}_${D}_${S}_$M.ncu-rep" > "$OUT/summary_$who.txt" 2>&1
  head -24 "$OUT/summary_$who.txt" | cut -c1-160
done
