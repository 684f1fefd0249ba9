//! `flashattn bench --device cpu`: forward/backward GFLOP/s of the CPU backend over SPEC §4's
//! sweep scaled down to a CPU, next to a naive materialised-softmax attention and the f32 GEMM
//! rate of the same `gemm` code, all measured in the same run (ratios are what count on a
//! shared machine). `--long N` instead runs one single-head d=128 forward at seqlen N and
//! reports its peak memory.

use flashattn::cpu::tile::{self, Mat};
use flashattn::tensor::random_values;
use flashattn::{backward, forward, AttnOptions, DType, Device, Error, Problem, Qkv, Tensor};
use rayon::prelude::*;
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct CpuBenchArgs {
    /// Total tokens per shape: batch = max(1, tokens / seqlen).
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Hidden size: heads = max(1, hidden / head_dim).
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    /// Head dims to sweep (comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![64, 128, 256])]
    pub head_dims: Vec<usize>,
    /// Sequence lengths to sweep (comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![512, 1024, 2048, 4096])]
    pub seqlens: Vec<usize>,
    /// Which masks: both, causal, full.
    #[arg(long, default_value = "both")]
    pub masks: String,
    /// Input dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Timed repeats per case (the median is reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Skip the naive materialised-softmax baseline.
    #[arg(long)]
    pub no_naive: bool,
    /// Skip the backward pass.
    #[arg(long)]
    pub no_backward: bool,
    /// Size n of the n×n×n f32 GEMM giving the reference rate.
    #[arg(long, default_value_t = 2048)]
    pub gemm_size: usize,
    /// Size of the square GEMM timed alternately with every case (the per-row GEMM column and
    /// the ratios use it, so that both sides see the same machine load).
    #[arg(long, default_value_t = 1024)]
    pub row_gemm_size: usize,
    /// Rayon threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Instead of the sweep: one single-head d=128 f32 forward at this seqlen (e.g. 65536),
    /// reporting peak memory against the size of q, k, v and out.
    #[arg(long)]
    pub long: Option<usize>,
    /// With --long: causal mask.
    #[arg(long)]
    pub long_causal: bool,
    /// Statistic over the repeats: median (SPEC §4) or min (steadier on a loaded machine).
    #[arg(long, default_value = "median")]
    pub stat: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark and returns the printed table (or JSON).
pub fn run(args: &CpuBenchArgs) -> Result<String, Error> {
    let threads = args
        .threads
        .unwrap_or_else(rayon::current_num_threads)
        .max(1);
    match args.stat.as_str() {
        "median" => USE_MIN.store(false, std::sync::atomic::Ordering::Relaxed),
        "min" => USE_MIN.store(true, std::sync::atomic::Ordering::Relaxed),
        s => return Err(Error::invalid("stat", s, "median or min")),
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::invalid("threads", e.to_string(), "a rayon pool"))?;
    pool.install(|| match args.long {
        Some(n) => run_long(args, n, threads),
        None => run_sweep(args, threads),
    })
}

fn parse_dtype(s: &str) -> Result<DType, Error> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(Error::invalid("dtype", s, "f32, f16 or bf16")),
    }
}

static USE_MIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    if USE_MIN.load(std::sync::atomic::Ordering::Relaxed) {
        return v[0];
    }
    v[v.len() / 2]
}

/// Median seconds of `f` over `repeats` runs after one warm-up.
fn time_it<R>(repeats: usize, mut f: impl FnMut() -> Result<R, Error>) -> Result<f64, Error> {
    f()?;
    let mut ts = Vec::new();
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let r = f()?;
        ts.push(t.elapsed().as_secs_f64());
        drop(r);
    }
    Ok(median(ts))
}

/// Median seconds of `f` and of `g`, timed alternately (`f, g, f, g, ...`) after one warm-up
/// of each, so that both see the same machine load.
fn time_pair<R, S>(
    repeats: usize,
    mut f: impl FnMut() -> Result<R, Error>,
    mut g: impl FnMut() -> Result<S, Error>,
) -> Result<(f64, f64), Error> {
    f()?;
    g()?;
    let (mut tf, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let r = f()?;
        tf.push(t.elapsed().as_secs_f64());
        drop(r);
        let t = Instant::now();
        let r = g()?;
        tg.push(t.elapsed().as_secs_f64());
        drop(r);
    }
    Ok((median(tf), median(tg)))
}

/// A square f32 GEMM of size n (the same `gemm` code, `threads` threads) as a closure, for
/// timing next to attention; returns its FLOPs.
fn gemm_job(n: usize, threads: usize) -> (impl FnMut() -> Result<(), Error>, f64) {
    let a = random_values(n * n, 5);
    let b = random_values(n * n, 6);
    let mut c = vec![0.0f32; n * n];
    (
        move || {
            tile::matmul_parallel(n, n, n, &mut c, &a, &b, threads);
            Ok(())
        },
        2.0 * (n as f64).powi(3),
    )
}

/// f32 GEMM GFLOP/s of the `gemm` crate on an n×n×n product with `threads` rayon threads.
pub fn gemm_rate(n: usize, threads: usize, repeats: usize) -> f64 {
    let a = random_values(n * n, 1);
    let b = random_values(n * n, 2);
    let mut c = vec![0.0f32; n * n];
    let t = time_it(repeats, || {
        tile::matmul_parallel(n, n, n, &mut c, &a, &b, threads);
        Ok(())
    })
    .unwrap_or(f64::NAN);
    2.0 * (n as f64).powi(3) / t / 1e9
}

/// Rows of head `hi` of batch entry `bi` of a contiguous `[b, s, h, d]` tensor, packed `[s, d]`.
fn gather_head(src: &[f32], bi: usize, hi: usize, s: usize, h: usize, d: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; s * d];
    for r in 0..s {
        let o = ((bi * s + r) * h + hi) * d;
        t[r * d..r * d + d].copy_from_slice(&src[o..o + d]);
    }
    t
}

/// Writes packed `[s, d]` blocks, one per (batch, head), back into a `[b, s, h, d]` tensor.
fn scatter_heads(parts: &[Vec<f32>], b: usize, s: usize, h: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; b * s * h * d];
    for (bh, o) in parts.iter().enumerate() {
        let (bi, hi) = (bh / h, bh % h);
        for r in 0..s {
            let dst = ((bi * s + r) * h + hi) * d;
            out[dst..dst + d].copy_from_slice(&o[r * d..r * d + d]);
        }
    }
    out
}

/// The materialised probabilities `P = softmax(scale · Q Kᵀ)` (`[sq, sk]`, causal bottom-right);
/// rows with no visible key are all zero.
fn naive_probs(qq: &[f32], kk: &[f32], sq: usize, sk: usize, d: usize, causal: bool) -> Vec<f32> {
    let scale = 1.0 / (d as f32).sqrt();
    let mut s = vec![0.0f32; sq * sk];
    tile::matmul(
        sq,
        sk,
        d,
        &mut s,
        sk,
        Mat::rows(qq, d),
        Mat::trans(kk, d),
        false,
    );
    for i in 0..sq {
        let row = &mut s[i * sk..i * sk + sk];
        for (j, x) in row.iter_mut().enumerate() {
            *x = if causal && j + sq > i + sk {
                f32::NEG_INFINITY
            } else {
                *x * scale
            };
        }
        let m = tile::max_of(row);
        if m == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let l = tile::exp_sub_sum(row, m);
        tile::scale_in_place(row, 1.0 / l);
    }
    s
}

/// Naive attention: the full `sq × sk` score matrix per (batch, head) with the same gemm,
/// a plain softmax, then `P V`. f32 dense inputs `[b, s, h, d]` (contiguous), MHA only.
pub fn naive_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: [usize; 4],
    sk: usize,
    causal: bool,
) -> Vec<f32> {
    let [b, sq, h, d] = shape;
    let parts: Vec<Vec<f32>> = (0..b * h)
        .into_par_iter()
        .map(|bh| {
            let (bi, hi) = (bh / h, bh % h);
            let qq = gather_head(q, bi, hi, sq, h, d);
            let kk = gather_head(k, bi, hi, sk, h, d);
            let vv = gather_head(v, bi, hi, sk, h, d);
            let p = naive_probs(&qq, &kk, sq, sk, d, causal);
            let mut o = vec![0.0f32; sq * d];
            tile::matmul(
                sq,
                d,
                sk,
                &mut o,
                d,
                Mat::rows(&p, sk),
                Mat::rows(&vv, d),
                false,
            );
            o
        })
        .collect();
    scatter_heads(&parts, b, sq, h, d)
}

/// Naive backward with the same materialisation: `P` (recomputed, `[sq, sk]`), `dV = Pᵀ dO`,
/// `dP = dO Vᵀ` (`[sq, sk]`), `dS = P ∘ (dP − rowsum(dO ∘ O))`, `dQ = scale · dS K`,
/// `dK = scale · dSᵀ Q`. Returns `(dq, dk, dv)` in the layout of the inputs (`sq == sk` here).
pub fn naive_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    shape: [usize; 4],
    sk: usize,
    causal: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let [b, sq, h, d] = shape;
    let scale = 1.0 / (d as f32).sqrt();
    let parts: Vec<[Vec<f32>; 3]> = (0..b * h)
        .into_par_iter()
        .map(|bh| {
            let (bi, hi) = (bh / h, bh % h);
            let qq = gather_head(q, bi, hi, sq, h, d);
            let kk = gather_head(k, bi, hi, sk, h, d);
            let vv = gather_head(v, bi, hi, sk, h, d);
            let dd = gather_head(dout, bi, hi, sq, h, d);
            let p = naive_probs(&qq, &kk, sq, sk, d, causal);
            let mut dv = vec![0.0f32; sk * d];
            tile::matmul(
                sk,
                d,
                sq,
                &mut dv,
                d,
                Mat::trans(&p, sk),
                Mat::rows(&dd, d),
                false,
            );
            let mut ds = vec![0.0f32; sq * sk];
            tile::matmul(
                sq,
                sk,
                d,
                &mut ds,
                sk,
                Mat::rows(&dd, d),
                Mat::trans(&vv, d),
                false,
            );
            // rowsum(dO ∘ O) = rowsum(P ∘ dP), so O need not be formed.
            for i in 0..sq {
                let (pr, dr) = (&p[i * sk..i * sk + sk], &mut ds[i * sk..i * sk + sk]);
                let di: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                for (x, &pv) in dr.iter_mut().zip(pr) {
                    *x = pv * (*x - di) * scale;
                }
            }
            let mut dq = vec![0.0f32; sq * d];
            tile::matmul(
                sq,
                d,
                sk,
                &mut dq,
                d,
                Mat::rows(&ds, sk),
                Mat::rows(&kk, d),
                false,
            );
            let mut dk = vec![0.0f32; sk * d];
            tile::matmul(
                sk,
                d,
                sq,
                &mut dk,
                d,
                Mat::trans(&ds, sk),
                Mat::rows(&qq, d),
                false,
            );
            [dq, dk, dv]
        })
        .collect();
    let pick = |i: usize, s: usize| {
        let v: Vec<Vec<f32>> = parts.iter().map(|p| p[i].clone()).collect();
        scatter_heads(&v, b, s, h, d)
    };
    (pick(0, sq), pick(1, sk), pick(2, sk))
}

struct Row {
    d: usize,
    seqlen: usize,
    batch: usize,
    heads: usize,
    causal: bool,
    fwd: f64,
    naive: Option<f64>,
    bwd: Option<f64>,
    naive_bwd: Option<f64>,
    /// GEMM GFLOP/s timed alternately with fwd / with bwd.
    gemm_f: f64,
    gemm_b: Option<f64>,
}

fn run_sweep(args: &CpuBenchArgs, threads: usize) -> Result<String, Error> {
    let dtype = parse_dtype(&args.dtype)?;
    let masks: Vec<bool> = match args.masks.as_str() {
        "both" => vec![false, true],
        "causal" => vec![true],
        "full" | "none" => vec![false],
        m => return Err(Error::invalid("masks", m, "both, causal or full")),
    };
    let t0 = Instant::now();
    let gemm = gemm_rate(args.gemm_size, threads, args.repeats);
    let mut rows = Vec::new();
    for &d in &args.head_dims {
        for &s in &args.seqlens {
            let batch = (args.tokens / s.max(1)).max(1);
            let heads = (args.hidden / d.max(1)).max(1);
            let shape = [batch, s, heads, d];
            let n = batch * s * heads * d;
            let qf = random_values(n, 11 + s as u64);
            let kf = random_values(n, 12 + d as u64);
            let vf = random_values(n, 13);
            let q = Tensor::from_f32_as(&qf, &shape, dtype)?;
            let k = Tensor::from_f32_as(&kf, &shape, dtype)?;
            let v = Tensor::from_f32_as(&vf, &shape, dtype)?;
            let dout = Tensor::from_f32_as(&random_values(n, 14), &shape, dtype)?;
            for &causal in &masks {
                let opts = AttnOptions::new().causal(causal);
                let qkv = Qkv::dense(&q, &k, &v);
                let flops = Problem::new(&qkv, &opts)?.forward_flops();
                let (mut gj, gflop) = gemm_job(args.row_gemm_size, threads);
                let (tf, tg) =
                    time_pair(args.repeats, || forward(&qkv, &opts, Device::Cpu), &mut gj)?;
                let gemm_f = gflop / tg / 1e9;
                let naive = if args.no_naive {
                    None
                } else {
                    let tn = time_it(args.repeats, || {
                        Ok(naive_forward(&qf, &kf, &vf, shape, s, causal))
                    })?;
                    Some(flops / tn / 1e9)
                };
                let (bwd, gemm_b) = if args.no_backward {
                    (None, None)
                } else {
                    let f = forward(&qkv, &opts, Device::Cpu)?;
                    let (tb, tg) = time_pair(
                        args.repeats,
                        || backward(&qkv, &f.out, &f.lse, &dout, &opts, Device::Cpu),
                        &mut gj,
                    )?;
                    (Some(2.5 * flops / tb / 1e9), Some(gflop / tg / 1e9))
                };
                let naive_bwd = if args.no_naive || args.no_backward {
                    None
                } else {
                    let df = dout.to_f32_vec();
                    let tn = time_it(args.repeats, || {
                        Ok(naive_backward(&qf, &kf, &vf, &df, shape, s, causal))
                    })?;
                    Some(2.5 * flops / tn / 1e9)
                };
                rows.push(Row {
                    d,
                    seqlen: s,
                    batch,
                    heads,
                    causal,
                    fwd: flops / tf / 1e9,
                    naive,
                    bwd,
                    naive_bwd,
                    gemm_f,
                    gemm_b,
                });
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let opt = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    if args.json {
        let mut s = format!(
            "{{\"device\":\"cpu\",\"threads\":{threads},\"dtype\":\"{}\",\"gemm_n\":{},\"gemm_gflops\":{:.3},\"seconds\":{secs:.1},\"rows\":[",
            dtype, args.gemm_size, gemm
        );
        let js = |x: Option<f64>| {
            x.map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "null".into())
        };
        for (i, r) in rows.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&format!(
                "{{\"d\":{},\"seqlen\":{},\"batch\":{},\"heads\":{},\"causal\":{},\"fwd_gflops\":{:.3},\"naive_gflops\":{},\"bwd_gflops\":{},\"naive_bwd_gflops\":{},\"fwd_over_naive\":{},\"bwd_over_naive\":{},\"gemm_gflops_fwd\":{:.3},\"gemm_gflops_bwd\":{},\"fwd_over_gemm\":{:.4},\"bwd_over_gemm\":{}}}",
                r.d, r.seqlen, r.batch, r.heads, r.causal, r.fwd, js(r.naive), js(r.bwd),
                js(r.naive_bwd), js(r.naive.map(|n| r.fwd / n)),
                js(r.bwd.zip(r.naive_bwd).map(|(b, n)| b / n)), r.gemm_f, js(r.gemm_b), r.fwd / r.gemm_f,
                js(r.bwd.zip(r.gemm_b).map(|(b, g)| b / g))
            ));
        }
        s.push_str("]}\n");
        return Ok(s);
    }
    let mut s = format!(
        "flashattn CPU benchmark: {threads} threads, dtype {dtype}, tokens {}, hidden {}, {} of {} (GFLOP/s, SPEC §4 FLOPs; bwd = 2.5x fwd FLOPs)\n\
         f32 GEMM {n}x{n}x{n} (same gemm crate, {threads} threads): {gemm:.2} GFLOP/s\n\
         GEMM column: f32 GEMM {m}x{m}x{m} timed alternately with each forward (and backward) run; the % columns divide by it\n\n",
        args.tokens,
        args.hidden,
        args.stat,
        args.repeats,
        n = args.gemm_size,
        m = args.row_gemm_size
    );
    s.push_str("|   d | seqlen | batch | heads | causal |    fwd |  naive | fwd/naive |   GEMM | fwd/GEMM |    bwd | naive bwd | bwd/naive | bwd/GEMM |\n");
    s.push_str("|----:|-------:|------:|------:|:------:|-------:|-------:|----------:|-------:|---------:|-------:|----------:|----------:|---------:|\n");
    for r in &rows {
        s.push_str(&format!(
            "| {:>3} | {:>6} | {:>5} | {:>5} | {:^6} | {:>6.2} | {:>6} | {:>9} | {:>6.2} | {:>7.1}% | {:>6} | {:>9} | {:>9} | {:>8} |\n",
            r.d,
            r.seqlen,
            r.batch,
            r.heads,
            if r.causal { "yes" } else { "no" },
            r.fwd,
            opt(r.naive),
            r.naive.map(|n| format!("{:.2}x", r.fwd / n)).unwrap_or_else(|| "-".into()),
            r.gemm_f,
            100.0 * r.fwd / r.gemm_f,
            opt(r.bwd),
            opt(r.naive_bwd),
            r.bwd
                .zip(r.naive_bwd)
                .map(|(b, n)| format!("{:.2}x", b / n))
                .unwrap_or_else(|| "-".into()),
            r.bwd
                .zip(r.gemm_b)
                .map(|(b, g)| format!("{:.1}%", 100.0 * b / g))
                .unwrap_or_else(|| "-".into()),
        ));
    }
    s.push_str(&format!("\n({secs:.1} s in total)\n"));
    Ok(s)
}

/// `VmHWM` and `VmRSS` of this process in bytes (Linux), if readable.
fn mem_status() -> Option<(u64, u64)> {
    let st = std::fs::read_to_string("/proc/self/status").ok()?;
    let get = |key: &str| -> Option<u64> {
        let line = st.lines().find(|l| l.starts_with(key))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((get("VmHWM:")?, get("VmRSS:")?))
}

fn run_long(args: &CpuBenchArgs, n: usize, threads: usize) -> Result<String, Error> {
    let d = 128;
    let shape = [1, n, 1, d];
    let q = Tensor::from_f32(random_values(n * d, 1), &shape)?;
    let k = Tensor::from_f32(random_values(n * d, 2), &shape)?;
    let v = Tensor::from_f32(random_values(n * d, 3), &shape)?;
    // Reset the high-water mark so that it measures the forward alone (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = mem_status();
    let opts = AttnOptions::new().causal(args.long_causal);
    let qkv = Qkv::dense(&q, &k, &v);
    let flops = Problem::new(&qkv, &opts)?.forward_flops();
    let t = Instant::now();
    let f = forward(&qkv, &opts, Device::Cpu)?;
    let secs = t.elapsed().as_secs_f64();
    let after = mem_status();
    let io_bytes = 4 * n * d * 4; // q, k, v, out (f32)
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let (peak_extra, hwm_before, hwm_after) = match (before, after) {
        (Some((_, rss0)), Some((hwm1, _))) => (
            Some(hwm1.saturating_sub(rss0)),
            before.map(|b| b.0),
            Some(hwm1),
        ),
        _ => (None, None, None),
    };
    drop(f);
    let ratio = peak_extra.map(|e| e as f64 / io_bytes as f64);
    if args.json {
        return Ok(format!(
            "{{\"device\":\"cpu\",\"threads\":{threads},\"mode\":\"long\",\"seqlen\":{n},\"d\":{d},\"causal\":{},\"seconds\":{secs:.2},\"gflops\":{:.3},\"qkvo_bytes\":{io_bytes},\"peak_extra_bytes\":{},\"peak_extra_over_qkvo\":{}}}\n",
            args.long_causal,
            flops / secs / 1e9,
            peak_extra.map(|x| x.to_string()).unwrap_or_else(|| "null".into()),
            ratio.map(|x| format!("{x:.4}")).unwrap_or_else(|| "null".into()),
        ));
    }
    let mut s = format!(
        "flashattn CPU long-sequence forward: seqlen {n}, 1 head, d {d}, f32, causal {}, {threads} threads\n",
        args.long_causal
    );
    s.push_str(&format!(
        "time {secs:.2} s, {:.2} GFLOP/s\n",
        flops / secs / 1e9
    ));
    s.push_str(&format!(
        "size of q+k+v+out: {:.1} MiB\n",
        mib(io_bytes as u64)
    ));
    match (peak_extra, hwm_before, hwm_after) {
        (Some(e), Some(h0), Some(h1)) => s.push_str(&format!(
            "VmHWM before {:.1} MiB (after reset), after {:.1} MiB; peak extra over RSS before the call: {:.1} MiB = {:.3}x q+k+v+out\n",
            mib(h0),
            mib(h1),
            mib(e),
            e as f64 / io_bytes as f64
        )),
        _ => s.push_str("peak memory: /proc/self/status not readable on this system\n"),
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The naive baselines compute real attention: they match flashattn on a causal case.
    #[test]
    fn naive_baselines_match_flashattn() {
        let shape = [2, 37, 3, 16];
        let n: usize = shape.iter().product();
        let (qf, kf, vf, df) = (
            random_values(n, 1),
            random_values(n, 2),
            random_values(n, 3),
            random_values(n, 4),
        );
        let t = |x: &[f32]| Tensor::from_f32(x.to_vec(), &shape).unwrap();
        let (q, k, v, dout) = (t(&qf), t(&kf), t(&vf), t(&df));
        let qkv = Qkv::dense(&q, &k, &v);
        let opts = AttnOptions::new().causal(true);
        let f = forward(&qkv, &opts, Device::Cpu).unwrap();
        let g = backward(&qkv, &f.out, &f.lse, &dout, &opts, Device::Cpu).unwrap();
        let rel = |a: &[f32], b: &[f32]| {
            let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
            let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
            (num / den).sqrt()
        };
        let o = naive_forward(&qf, &kf, &vf, shape, 37, true);
        assert!(rel(&o, &f.out.to_f32_vec()) < 1e-5);
        let (dq, dk, dv) = naive_backward(&qf, &kf, &vf, &df, shape, 37, true);
        assert!(rel(&dq, &g.dq.to_f32_vec()) < 1e-4);
        assert!(rel(&dk, &g.dk.to_f32_vec()) < 1e-4);
        assert!(rel(&dv, &g.dv.to_f32_vec()) < 1e-4);
    }
}
