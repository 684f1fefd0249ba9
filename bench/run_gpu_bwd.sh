#!/usr/bin/env bash
# FA2 backward timing next to PyTorch SDPA FLASH_ATTENTION and CUDNN_ATTENTION backward, in one
# device command. Usage (on the GPU machine): bench/run_gpu_bwd.sh PATH/TO/gpu_bwd-TESTBINARY [OUTDIR]
# Env: BENCH_DIMS (64,128,256), BENCH_SEQS (1024,4096,16384). Standard sweep shapes (SPEC §4):
# bf16, batch = 16384/seqlen, heads = 2048/d, causal and not; backward FLOPs = 2.5 x forward.
set -uo pipefail
BIN=$1
OUTDIR=${2:-/tmp}
export BENCH_DIMS=${BENCH_DIMS:-64,128,256}
export BENCH_SEQS=${BENCH_SEQS:-1024,4096,16384}
FLASHATTN_BENCH=1 "$BIN" bwd_bench --nocapture --test-threads=1 2>&1 | tee "$OUTDIR/bwd_ours.log" | grep -o 'BENCH.*' > "$OUTDIR/bwd_ours.txt"
PYTHONUNBUFFERED=1 python3 - "$OUTDIR" <<'PY' 2>&1 | tee "$OUTDIR/bwd_anchors.log"
import os, sys, torch
from torch.nn.attention import sdpa_kernel, SDPBackend
out = sys.argv[1]
dims = [int(x) for x in os.environ["BENCH_DIMS"].split(",")]
seqs = [int(x) for x in os.environ["BENCH_SEQS"].split(",")]
F = torch.nn.functional
def bench_bwd(backend, b, h, s, d, causal):
    q, k, v, do = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=(i < 3)) for i in range(4))
    try:
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            times = []
            for it in range(25):
                st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                st.record()
                torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
                en.record()
                torch.cuda.synchronize()
                if it >= 5:
                    times.append(st.elapsed_time(en))
        times.sort()
        return times[len(times) // 2]
    except Exception as e:
        print("anchor failed", backend, b, h, s, d, causal, e)
        return float("nan")
ours = {}
for line in open(os.path.join(out, "bwd_ours.txt")):
    f = dict(x.split("=") for x in line.split()[2:])
    ours[(int(f["d"]), int(f["seqlen"]), int(f["causal"]))] = float(f["ms"])
rows = []
for d in dims:
    for s in seqs:
        for causal in (0, 1):
            b, h = 16384 // s, 2048 // d
            flops = 2.5 * 4 * b * h * s * s * d * (0.5 if causal else 1.0)
            fl = bench_bwd(SDPBackend.FLASH_ATTENTION, b, h, s, d, bool(causal))
            cu = bench_bwd(SDPBackend.CUDNN_ATTENTION, b, h, s, d, bool(causal))
            me = ours.get((d, s, causal), float("nan"))
            tf = lambda ms: flops / (ms * 1e-3) / 1e12
            rows.append((d, s, causal, tf(me), tf(fl), tf(cu), fl / me, cu / me))
print(torch.cuda.get_device_name(), "torch", torch.__version__, "cudnn", torch.backends.cudnn.version())
print("| d | seqlen | causal | ours TFLOP/s | SDPA flash | SDPA cuDNN | ours/flash | ours/cuDNN |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| %d | %d | %s | %.1f | %.1f | %.1f | %.2f | %.2f |" % (r[0], r[1], "yes" if r[2] else "no", r[3], r[4], r[5], r[6], r[7]))
PY
