#!/usr/bin/env bash
# GPU benchmark, ours next to the anchors in ONE device command (SPEC §4):
#   bench/run_gpu.sh BENCH_BIN            (BENCH_BIN = `flashattn bench --device cuda` or a
#                                          binary taking the same options)
# Env: PASS=fwd|bwd FAMILY=fa2|fa3|auto HEAD_DIMS=64,128,256 SEQLENS=512,...,16384 MASKS=both
#      TILES=128x64w8,... (fa2 tile overrides, timed one after another) REPEATS=30
#      OUT=dir for logs (default /tmp/fa_bench). Prints one table with ours/FLASH and ours/cuDNN.
set -uo pipefail
BENCH=${1:?usage: run_gpu.sh BENCH_BIN}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/fa_bench}; mkdir -p "$OUT"
PASS=${PASS:-fwd}; FAMILY=${FAMILY:-fa2}; HEAD_DIMS=${HEAD_DIMS:-64,128,256}
SEQLENS=${SEQLENS:-512,1024,2048,4096,8192,16384}; MASKS=${MASKS:-both}; REPEATS=${REPEATS:-30}
TAG=${TAG:-$PASS}
export FLASHATTN_CACHE_DIR=${FLASHATTN_CACHE_DIR:-$(mktemp -d)}
args=(--json --pass "$PASS" --family "$FAMILY" --head-dims "$HEAD_DIMS" --seqlens "$SEQLENS"
      --masks "$MASKS" --repeats "$REPEATS")
[ -n "${TILES:-}" ] && args+=(--tile "$TILES")
[ -n "${MEM_SEQLEN:-}" ] && args+=(--mem-seqlen "$MEM_SEQLEN")
"$BENCH" "${args[@]}" > "$OUT/ours_$TAG.json" 2> "$OUT/ours_$TAG.err" || { echo "ours failed:"; tail -5 "$OUT/ours_$TAG.err"; }
PYTHONUNBUFFERED=1 python3 "$HERE/anchors.py" --pass "$PASS" --head-dims "$HEAD_DIMS" --seqlens "$SEQLENS" \
  --masks "$MASKS" --repeats "$REPEATS" > "$OUT/anchors_$TAG.json" 2> "$OUT/anchors_$TAG.err" \
  || { echo "anchors failed:"; tail -5 "$OUT/anchors_$TAG.err"; }
# SASS check: the FA2 kernel must use the tensor cores (HMMA).
python3 - "$FLASHATTN_CACHE_DIR" > "$OUT/sass_$TAG.txt" <<'PY'
import glob, struct, subprocess, sys, os
for f in sorted(glob.glob(sys.argv[1] + '/**/*.cubin', recursive=True)):
    b = open(f, 'rb').read()
    if b[:8] != b'FACUBIN1': continue
    n = struct.unpack('<Q', b[16:24])[0]
    cub, log = b[40:40 + n], b[40 + n:]
    if b'fa2_fwd' not in cub: continue
    p = '/tmp/_fa2.cubin'; open(p, 'wb').write(cub)
    cuobj = 'cuobjdump' if subprocess.call('command -v cuobjdump >/dev/null', shell=True) == 0 else '/usr/local/cuda/bin/cuobjdump'
    sass = subprocess.run([cuobj, '-sass', p], capture_output=True, text=True).stdout
    print(f"{os.path.basename(f)}: HMMA {sass.count('HMMA')}, LDSM {sass.count('LDSM')}, LDGSTS {sass.count('LDGSTS')}, LDL {sass.count('LDL')}, STL {sass.count('STL')}")
PY
python3 - "$OUT/ours_$TAG.json" "$OUT/anchors_$TAG.json" "$OUT/sass_$TAG.txt" <<'PY'
import json, sys
ours = json.load(open(sys.argv[1])); anc = json.load(open(sys.argv[2]))
key = lambda r: (r['d'], r['seqlen'], bool(r['causal']))
A = {}
for r in anc['rows']:
    A.setdefault(key(r), {})[r['impl']] = r.get('tflops')
print(f"device: {ours['device']} | torch {anc.get('torch')} cuDNN {anc.get('cudnn')}")
print(ours.get('memory', ''))
print("SASS:", open(sys.argv[3]).read().strip().replace('\n', ' | ')[:600])
print(f"{'pass':4} {'d':>4} {'seqlen':>6} {'causal':>6} {'tile':>10} {'ours':>7} {'FLASH':>7} {'cuDNN':>7} {'/FLASH':>7} {'/cuDNN':>7}")
for r in ours['rows']:
    a = A.get(key(r), {}); f = a.get('sdpa_flash'); c = a.get('sdpa_cudnn'); t = r['tflops']
    fmt = lambda x: f"{x:7.1f}" if x else "      -"
    rat = lambda x: f"{t / x:7.2f}" if x else "      -"
    print(f"{r['pass']:4} {r['d']:4} {r['seqlen']:6} {str(r['causal']):>6} {r['tile']:>10} {fmt(t)} {fmt(f)} {fmt(c)} {rat(f)} {rat(c)}{'' if r.get('finite', True) else ' NONFINITE'}")
PY
