#!/usr/bin/env python3
"""Times PyTorch SDPA's FLASH_ATTENTION (FlashAttention-2) and CUDNN_ATTENTION backends on
SPEC §4's shapes (bf16, `tokens` total, hidden 2048, d in {64,128,256}, causal and not) and
prints JSON rows like `flashattn bench --device cuda --json`.

Inputs are [batch, seqlen, heads, d] tensors viewed as [batch, heads, seqlen, d] (SDPA's
layout, the same memory as ours), random non-zero values, several sets rotated so L2 never
serves them; CUDA events around each call after warm-up; the median is reported. FLOPs by
FlashAttention's convention: fwd 4*b*h*s*s*d (halved for causal), bwd 2.5x fwd.
"""
import argparse, json, sys, time
import torch
from torch.nn.attention import sdpa_kernel, SDPBackend
import torch.nn.functional as F


def bench(fn, sets, warmup, repeats):
    for i in range(warmup):
        fn(sets[i % len(sets)])
    torch.cuda.synchronize()
    evs = []
    for i in range(repeats):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn(sets[i % len(sets)])
        b.record()
        evs.append((a, b))
    torch.cuda.synchronize()
    t = sorted(a.elapsed_time(b) for a, b in evs)
    n = len(t)
    return t[n // 2] if n % 2 else 0.5 * (t[n // 2 - 1] + t[n // 2])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pass", dest="pass_", default="fwd", choices=["fwd", "bwd"])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--masks", default="both", choices=["both", "causal", "full"])
    ap.add_argument("--backends", default="flash,cudnn")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--sets", type=int, default=3)
    ap.add_argument("--cooldown-ms", type=int, default=0,
                    help="idle time before each timing (the same power state for every case)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    masks = {"both": [False, True], "causal": [True], "full": [False]}[a.masks]
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    rows = []
    for d in [int(x) for x in a.head_dims.split(",")]:
        heads = max(1, a.hidden // d)
        for s in [int(x) for x in a.seqlens.split(",")]:
            batch = max(1, a.tokens // s)
            sets = []
            for _ in range(a.sets):
                def mk():
                    x = torch.rand(batch, s, heads, d, device=dev, dtype=torch.float32) * 2 - 1
                    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 0.5), x)
                    return x.to(dtype).transpose(1, 2)
                q, k, v = mk(), mk(), mk()
                if a.pass_ == "bwd":
                    q.requires_grad_(True); k.requires_grad_(True); v.requires_grad_(True)
                sets.append((q, k, v, mk()))
            for causal in masks:
                flops = 4.0 * batch * heads * s * s * d * (0.5 if causal else 1.0)
                if a.pass_ == "bwd":
                    flops *= 2.5
                for name in a.backends.split(","):
                    be = backends[name]
                    try:
                        with sdpa_kernel(be):
                            if a.pass_ == "fwd":
                                fn = lambda t: F.scaled_dot_product_attention(t[0], t[1], t[2], is_causal=causal)
                            else:
                                outs = []
                                for t in sets:
                                    outs.append(F.scaled_dot_product_attention(t[0], t[1], t[2], is_causal=causal))
                                def fn(t, _o={id(t): o for t, o in zip(sets, outs)}):
                                    torch.autograd.grad(_o[id(t)], (t[0], t[1], t[2]), t[3], retain_graph=True)
                            if a.cooldown_ms > 0:
                                torch.cuda.synchronize()
                                time.sleep(a.cooldown_ms / 1000)
                            ms = bench(fn, sets, a.warmup, a.repeats)
                        rows.append(dict(impl="sdpa_" + name, pass_=a.pass_, d=d, seqlen=s, batch=batch,
                                         heads=heads, causal=causal, ms=round(ms, 5),
                                         tflops=round(flops / (ms * 1e-3) / 1e12, 2)))
                    except Exception as e:  # a backend may refuse a shape (e.g. d=256 bwd)
                        rows.append(dict(impl="sdpa_" + name, pass_=a.pass_, d=d, seqlen=s, batch=batch,
                                         heads=heads, causal=causal, ms=None, tflops=None,
                                         error=str(e).splitlines()[0][:200]))
                    print(f"{name} d={d} s={s} causal={causal}: {rows[-1].get('tflops')}", file=sys.stderr)
            del sets
            torch.cuda.empty_cache()
    print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                          cudnn=torch.backends.cudnn.version(), rows=rows)))


if __name__ == "__main__":
    main()
