#!/usr/bin/env bash
# FP8 (e4m3) forward on the GPU, everything in ONE device command (SPEC §4):
#   bench/run_fp8.sh BIN_DIR
# BIN_DIR holds the release test binaries `gpu_fp8` and `gpu_fa3` (cargo test --release
# --features cuda --no-run). Steps, each under its own timeout, logs under $OUT:
#   1. compile every FP8 variant (NVRTC) and check the main kernel's SASS with cuobjdump
#      (QGMMA = the FP8 wgmma; HGMMA would be the 16-bit path; LDL/STL = local memory);
#   2. FP8 correctness tests (vs the f64 reference on dequantised and unquantised inputs);
#   3. bf16 FA3 regression tests (the kernel source is shared);
#   4. the RMSE study (outlier features: bf16, FP8 per-tensor, per-head, + Hadamard);
#   (SKIP_FA3=1 / SKIP_RMSE=1 skip steps 3 / 4)
#   5. the FP8 benchmark (kernel alone, with the V pre-pass, with the in-kernel V transpose,
#      our bf16 FA3) on SPEC §4 shapes,
#      then SDPA FLASH/cuDNN bf16 anchors (bench/anchors.py) in the same command, and a probe of
#      whether torch offers an FP8 SDPA path; prints one merged table last.
set -uo pipefail
BIN=${1:?usage: run_fp8.sh BIN_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/fp8_out}; mkdir -p "$OUT"
SEQLENS=${SEQLENS:-1024,2048,4096,8192,16384}
export FLASHATTN_CACHE_DIR=${FLASHATTN_CACHE_DIR:-$(mktemp -d)}
CUOBJ=$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > "$OUT/gpu.txt" 2>&1

echo "== 1. compile + SASS"
FP8_CUBIN_DIR="$OUT/cubins" timeout 120 "$BIN/gpu_fp8" fp8_variants_compile --nocapture > "$OUT/compile.log" 2>&1
echo "compile rc=$?"
: > "$OUT/sass.txt"
for f in "$OUT"/cubins/*.cubin; do
  s=$("$CUOBJ" -sass "$f")
  printf '%s: QGMMA %s HGMMA %s F2FP.E4M3 %s LDL %s STL %s\n' "$(basename "$f" .cubin)" \
    "$(grep -c QGMMA <<<"$s")" "$(grep -c HGMMA <<<"$s")" "$(grep -c 'F2FP.SATFINITE.E4M3' <<<"$s")" \
    "$(grep -c LDL <<<"$s")" "$(grep -c STL <<<"$s")" >> "$OUT/sass.txt"
  grep -o 'QGMMA[.A-Z0-9x]*' <<<"$s" | sort | uniq -c | sed 's/^/    /' >> "$OUT/sass.txt"
done
cat "$OUT/sass.txt"

echo "== 2. fp8 tests"
timeout 120 "$BIN/gpu_fp8" --test-threads=1 --nocapture fp8_matches fp8_forward_api > "$OUT/tests_fp8.log" 2>&1
echo "fp8 tests rc=$?"; grep -E "FAIL|passed|test result|panicked" "$OUT/tests_fp8.log" | head -20

if [ -z "${SKIP_FA3:-}" ]; then
echo "== 3. bf16 fa3 regression"
timeout 150 "$BIN/gpu_fa3" --test-threads=1 fa3_matches_reference fa3_features_match_reference fa3_forward_edge_cases > "$OUT/tests_fa3.log" 2>&1
echo "fa3 tests rc=$?"; grep -E "FAIL|cases passed|test result|panicked" "$OUT/tests_fa3.log" | head -10
fi

if [ -z "${SKIP_RMSE:-}" ]; then
echo "== 4. RMSE study"
timeout 120 "$BIN/gpu_fp8" fp8_rmse_study --nocapture > "$OUT/rmse.log" 2>&1
echo "rmse rc=$?"; grep -E "RMSE|inputs|N\(0|outlier|panicked" "$OUT/rmse.log"
fi

echo "== 5. bench"
FP8_BENCH=1 FP8_BENCH_SEQ="$SEQLENS" timeout 200 "$BIN/gpu_fp8" fp8_bench --nocapture > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv >> "$OUT/gpu.txt" 2>&1
PYTHONUNBUFFERED=1 timeout 150 python3 "$HERE/anchors.py" --head-dims 64,128,256 --seqlens "$SEQLENS" \
  --masks both --repeats 30 > "$OUT/anchors.json" 2> "$OUT/anchors.err" || { echo "anchors failed"; tail -3 "$OUT/anchors.err"; }
timeout 40 python3 - > "$OUT/torch_fp8.txt" 2>&1 <<'PY'
import torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
q = torch.randn(4, 16, 4096, 128, device="cuda").to(torch.float8_e4m3fn)
for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)]:
    try:
        with sdpa_kernel(be):
            o = F.scaled_dot_product_attention(q, q, q)
        print(f"torch {torch.__version__} SDPA {name} fp8 e4m3: ran, out dtype {o.dtype}")
    except Exception as e:
        print(f"torch {torch.__version__} SDPA {name} fp8 e4m3: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
PY
cat "$OUT/torch_fp8.txt"
python3 - "$OUT/bench.log" "$OUT/anchors.json" "$OUT/gpu.txt" <<'PY'
import json, sys
rows = [json.loads(l.split(" ", 1)[1]) for l in open(sys.argv[1]) if l.startswith("FP8JSON ")]
try:
    anc = json.load(open(sys.argv[2]))
except Exception:
    anc = {"rows": []}
A = {}
for r in anc["rows"]:
    A.setdefault((r["d"], r["seqlen"], bool(r["causal"])), {})[r["impl"]] = r.get("tflops")
print(open(sys.argv[3]).read().strip())
print(f"device: {anc.get('device')} | torch {anc.get('torch')} cuDNN {anc.get('cudnn')}")
f = lambda x: f"{x:7.1f}" if x else "      -"
print(f"{'d':>4} {'causal':>6} {'seq':>6} {'fp8kern':>7} {'fp8+vt':>7} {'fp8vtk':>7} {'bf16':>7} {'FLASH':>7} {'cuDNN':>7} {'k/cuDNN':>7} {'k/bf16':>7}")
for r in rows:
    a = A.get((r["d"], r["seqlen"], bool(r["causal"])), {})
    c = a.get("sdpa_cudnn"); fl = a.get("sdpa_flash")
    print(f"{r['d']:>4} {int(r['causal']):>6} {r['seqlen']:>6} {f(r['fp8_kernel'])} {f(r['fp8_with_vt'])} {f(r.get('fp8_vtk'))} {f(r['bf16_fa3'])} {f(fl)} {f(c)} "
          f"{(r['fp8_kernel']/c if c else 0):7.2f} {r['fp8_kernel']/r['bf16_fa3']:7.2f}{'' if r['finite'] else ' NONFINITE'}")
PY
