#!/usr/bin/env bash
# GPU benchmark, ours next to the anchors in ONE device command (SPEC §4):
#   bench/run_gpu.sh BENCH_BIN            (BENCH_BIN = `flashattn bench --device cuda` or a
#                                          binary taking the same options)
# Env: PASS=fwd|bwd FAMILY=fa2|fa3|auto HEAD_DIMS=64,128,256 SEQLENS=512,...,16384 MASKS=both
#      TILES=128x64w8,... (fa2 tile overrides, timed one after another) REPEATS=30
#      COOLDOWN_MS=N (ours and the anchors idle N ms before every case)
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
# COOLDOWN_MS: ours and the anchors idle this long before every case (same power state for all).
anc_extra=(); [ -n "${COOLDOWN_MS:-}" ] && { args+=(--cooldown-ms "$COOLDOWN_MS"); anc_extra=(--cooldown-ms "$COOLDOWN_MS"); }
"$BENCH" "${args[@]}" > "$OUT/ours_$TAG.json" 2> "$OUT/ours_$TAG.err" || { echo "ours failed:"; tail -5 "$OUT/ours_$TAG.err"; }
PYTHONUNBUFFERED=1 python3 "$HERE/anchors.py" --pass "$PASS" --head-dims "$HEAD_DIMS" --seqlens "$SEQLENS" \
  --masks "$MASKS" --repeats "$REPEATS" ${anc_extra[@]+"${anc_extra[@]}"} > "$OUT/anchors_$TAG.json" 2> "$OUT/anchors_$TAG.err" \
  || { echo "anchors failed:"; tail -5 "$OUT/anchors_$TAG.err"; }
# SASS check of every kernel the run compiled: the FA2 kernels must use the tensor cores (HMMA),
# the Hopper ones wgmma (HGMMA; QGMMA for FP8) and TMA (UTMALDG loads, UTMASTG O stores).
python3 - "$FLASHATTN_CACHE_DIR" > "$OUT/sass_$TAG.txt" <<'PY'
import glob, struct, subprocess, sys, os
cuobj = 'cuobjdump' if subprocess.call('command -v cuobjdump >/dev/null', shell=True) == 0 else '/usr/local/cuda/bin/cuobjdump'
summary = {}
for f in sorted(glob.glob(sys.argv[1] + '/**/*.cubin', recursive=True)):
    b = open(f, 'rb').read()
    if b[:8] != b'FACUBIN1': continue
    n = struct.unpack('<Q', b[16:24])[0]
    cub = b[40:40 + n]
    kind = next((k for k in (b'fa2_fwd', b'fa2_bwd_main', b'fa3_fwd', b'fa3_bwd_main') if k in cub), None)
    if kind is None: continue
    p = '/tmp/_fa.cubin'; open(p, 'wb').write(cub)
    sass = subprocess.run([cuobj, '-sass', p], capture_output=True, text=True).stdout
    c = lambda op: sass.count(op)
    k = kind.decode()
    mma = c('HMMA') if k.startswith('fa2') else c('HGMMA') + c('QGMMA')
    s = summary.setdefault(k, [0, 1 << 30, 0, 0])
    s[0] += 1; s[1] = min(s[1], mma); s[2] += c('LDL') + c('STL'); s[3] += c('UTMASTG') > 0
    if k.startswith('fa2'):
        print(f"{k} {os.path.basename(f)}: HMMA {c('HMMA')}, LDSM {c('LDSM')}, LDGSTS {c('LDGSTS')}, LDL {c('LDL')}, STL {c('STL')}")
    else:
        print(f"{k} {os.path.basename(f)}: HGMMA {c('HGMMA')}, QGMMA {c('QGMMA')}, UTMALDG {c('UTMALDG')}, UTMASTG {c('UTMASTG')}, LDL {c('LDL')}, STL {c('STL')}")
for k, (cnt, mn, spill, tmast) in sorted(summary.items()):
    mma = 'HMMA' if k.startswith('fa2') else 'HGMMA/QGMMA'
    print(f"SUMMARY {k}: {cnt} kernels, fewest {mma} {mn}, LDL+STL {spill}" + ('' if k.startswith('fa2') else f", with UTMASTG {tmast}"))
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
print("SASS:", ' | '.join(l[8:] for l in open(sys.argv[3]).read().splitlines() if l.startswith('SUMMARY')))
print(f"{'pass':4} {'d':>4} {'seqlen':>6} {'causal':>6} {'tile':>10} {'ours':>7} {'FLASH':>7} {'cuDNN':>7} {'/FLASH':>7} {'/cuDNN':>7}")
for r in ours['rows']:
    a = A.get(key(r), {}); f = a.get('sdpa_flash'); c = a.get('sdpa_cudnn'); t = r['tflops']
    fmt = lambda x: f"{x:7.1f}" if x else "      -"
    rat = lambda x: f"{t / x:7.2f}" if x else "      -"
    print(f"{r['pass']:4} {r['d']:4} {r['seqlen']:6} {str(r['causal']):>6} {r['tile']:>10} {fmt(t)} {fmt(f)} {fmt(c)} {rat(f)} {rat(c)}{'' if r.get('finite', True) else ' NONFINITE'}")
PY
