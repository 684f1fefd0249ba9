//! Shared test helpers (owner: H2). Use from any integration test with `mod common;`.
//!
//! - [`rand_tensor`]: reproducible inputs in `[-1, 1]`, never zero (even after bf16 rounding).
//! - [`ref_forward`] / [`ref_backward`]: a float64, fully materialised attention that follows
//!   SPEC §1 literally. It reads the *rounded* input values (through `Tensor::to_f32_vec`), so a
//!   kernel is compared against exact math on exactly the numbers it saw. The mask condition is
//!   re-derived here from the SPEC text (not `Mask::key_range`) so a bug there is caught; the
//!   dropout mask is `flashattn::math::Dropout::keeps`, which *is* the definition.
//! - [`rel_err`], [`lse_err`], [`tol`]: comparisons.
//! - [`gpu_or_skip`], [`hopper_or_skip`] (feature `cuda`): the device for a GPU test, or `None`
//!   after printing why the test skips.
//! - [`Rng`] (splitmix64) and a random-case generator ([`CaseConfig`], [`random_case`],
//!   [`Case`]) reusable by CPU and GPU tests.
#![allow(dead_code)]

use flashattn::math::Dropout;
use flashattn::{AlibiSlopes, AttnOptions, DType, Qkv, Tensor};
use rayon::prelude::*;

// ---------------------------------------------------------------------------------------------
// GPU tests: skip (with the reason printed) where there is no usable device
// ---------------------------------------------------------------------------------------------

/// GPU 0, or `None` after printing why `what` skips (no driver, no device, no NVRTC).
#[cfg(feature = "cuda")]
pub fn gpu_or_skip(what: &str) -> Option<std::sync::Arc<flashattn::cuda::Gpu>> {
    match flashattn::cuda::Gpu::get(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("skipping {what} (no usable GPU): {e}");
            None
        }
    }
}

/// Median milliseconds of one call of `f` on GPU 0's stream, by CUDA events around `batch`
/// back-to-back calls (batch > 1 overlaps each launch's host work with the previous kernel), after
/// at least 250 ms of warm-up so that clocks reach their sustained state.
#[cfg(feature = "cuda")]
pub fn event_median_ms(
    gpu: &flashattn::cuda::Gpu,
    reps: usize,
    batch: usize,
    mut f: impl FnMut(),
) -> f64 {
    let stream = gpu.stream();
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let t0 = std::time::Instant::now();
    while t0.elapsed().as_millis() < 250 {
        for _ in 0..5 {
            f();
        }
        gpu.synchronize().unwrap();
    }
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps {
        let a = stream.record_event(flags).unwrap();
        for _ in 0..batch {
            f();
        }
        let b = stream.record_event(flags).unwrap();
        b.synchronize().unwrap();
        ts.push(a.elapsed_ms(&b).unwrap() as f64 / batch as f64);
    }
    ts.sort_by(|x, y| x.partial_cmp(y).unwrap());
    ts[ts.len() / 2]
}

/// Compiles each spec for sm_90a through NVRTC (no GPU needed) and audits the ptxas report:
/// returns one line per variant with spills, a stack frame, an ignored `setmaxnreg` (C7508) or
/// serialised wgmma. Writes every cubin to `cubin_dir` when given (for `cuobjdump -sass`).
#[cfg(feature = "cuda")]
pub fn hopper_compile_audit(
    specs: &[flashattn::cuda::KernelSpec],
    cubin_dir: Option<&str>,
) -> Vec<String> {
    let mut bad = Vec::new();
    for spec in specs {
        let c = flashattn::cuda::jit::compile(spec, "sm_90a")
            .unwrap_or_else(|e| panic!("{} compiles: {e}", spec.label()));
        let r = &c.resources;
        eprintln!(
            "{}: {} regs, spill {}/{}, stack {}",
            spec.label(),
            r.registers,
            r.spill_stores,
            r.spill_loads,
            r.stack_bytes
        );
        // Spills (and stack) only where the library accepts them (report::accepted_spill_bytes).
        if !flashattn::cuda::report::spill_accepted(&spec.label(), r)
            || c.log.contains("C7508")
            || c.log.contains("serialized")
        {
            bad.push(format!("{}: {:?}\n{}", spec.label(), r, c.log));
        }
        if let Some(d) = cubin_dir {
            // The label without its FA3_ prefixes, sanitised; a long one (the linear-order FP8
            // kernels' passed the file system's 255 bytes) cut and told apart by a hash.
            let label = spec.label();
            let mut name: String = label
                .replace("FA3_", "")
                .chars()
                .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' })
                .collect();
            if name.len() > 200 {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                label.hash(&mut h);
                name = format!("{}_{:016x}", &name[..180], h.finish());
            }
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(format!("{d}/{name}.cubin"), &c.cubin).unwrap();
        }
    }
    bad
}

/// The SASS of `cubin` from `nvdisasm` (on PATH: `.ci/nvrtc-env.sh` installs it next to
/// NVRTC), or `None` when the disassembler is missing or fails.
#[cfg(feature = "cuda")]
pub fn sass(cubin: &[u8]) -> Option<String> {
    let path = std::env::temp_dir().join(format!(
        "flashattn_sass_{}_{:?}.cubin",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, cubin).ok()?;
    let out = std::process::Command::new("nvdisasm").arg(&path).output();
    let _ = std::fs::remove_file(&path);
    let out = out.ok().filter(|o| o.status.success())?;
    String::from_utf8(out.stdout).ok()
}

/// The forward main loop's intra-warpgroup overlap, read from its SASS: the number of MUFU.EX2
/// between the QKᵀ wait that leaves PV in flight (`WARPGROUP.DEPBAR.LE gsb0, 0x1`) and the PV
/// wait (`... 0x0`) — the exponentials that run under PV (the smallest count over the kernel's
/// loops), or why it cannot tell. ptxas has hoisted that wait to right after the QKᵀ wait when
/// nothing held it down (bench/RESULTS.md "Step 12"): then it is 0.
#[cfg(feature = "cuda")]
pub fn exps_under_pv(sass: &str) -> Result<usize, String> {
    let mut fewest: Option<usize> = None;
    let mut open: Option<usize> = None;
    for line in sass.lines() {
        if line.contains("WARPGROUP.DEPBAR.LE gsb0, 0x1") {
            open = Some(0);
        } else if line.contains("MUFU.EX2") {
            if let Some(n) = open.as_mut() {
                *n += 1;
            }
        } else if line.contains("WARPGROUP.DEPBAR.LE gsb0, 0x0") {
            if let Some(n) = open.take() {
                fewest = Some(fewest.map_or(n, |f: usize| f.min(n)));
            }
        }
    }
    fewest.ok_or_else(|| "no QKᵀ wait with PV in flight (DEPBAR.LE gsb0, 0x1) found".into())
}

/// GPU 0 if it is sm 9.0 (the Hopper kernels), or `None` after printing why `what` skips.
#[cfg(feature = "cuda")]
pub fn hopper_or_skip(what: &str) -> Option<std::sync::Arc<flashattn::cuda::Gpu>> {
    let g = gpu_or_skip(what)?;
    let a = g.arch();
    if a.major == 9 && a.minor == 0 {
        Some(g)
    } else {
        eprintln!(
            "skipping {what}: {} is sm {}.{}, not 9.0",
            g.name(),
            a.major,
            a.minor
        );
        None
    }
}

// ---------------------------------------------------------------------------------------------
// RNG
// ---------------------------------------------------------------------------------------------

/// splitmix64: tiny, seedable, good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5851_F42D_4C95_7F2D)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform integer in `[lo, hi)` (`lo` when the range is empty).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        if hi <= lo {
            return lo;
        }
        lo + (self.next_u64() % (hi - lo) as u64) as usize
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }
    /// A random element of `xs` (non-empty).
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.range(0, xs.len())]
    }
    /// A value in `[-1, 1]` whose magnitude is at least 1/128 (never zero, also in bf16).
    pub fn sym(&mut self) -> f32 {
        let u = (2.0 * self.uniform() - 1.0) as f32;
        if u.abs() < 1.0 / 128.0 {
            if u < 0.0 {
                -1.0 / 128.0
            } else {
                1.0 / 128.0
            }
        } else {
            u
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------------------------

/// `n` values in `[-1, 1]`, never zero, reproducible from `seed`.
pub fn rand_values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.sym()).collect()
}

/// A contiguous tensor of `dtype` with values uniform-ish in `[-1, 1]`, never zero.
pub fn rand_tensor(dtype: DType, shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_f32_as(&rand_values(n, seed), shape, dtype).unwrap()
}

/// A non-contiguous view with the same logical values as `t` (same dtype and shape): every
/// dimension but the last gets padded strides and the view starts at a non-zero offset. The
/// padding holds NaN, so a kernel that reads outside the view poisons its result.
pub fn strided_copy(t: &Tensor, seed: u64) -> Tensor {
    let shape = t.shape().to_vec();
    let r = shape.len();
    let mut rng = Rng::new(seed);
    let mut strides = vec![1usize; r];
    for k in (0..r.saturating_sub(1)).rev() {
        strides[k] = strides[k + 1] * shape[k + 1].max(1) + rng.range(1, 4);
    }
    let offset = rng.range(1, 6);
    let span: usize = if shape.iter().all(|&s| s > 0) {
        shape
            .iter()
            .zip(&strides)
            .map(|(&s, &st)| (s - 1) * st)
            .sum::<usize>()
            + 1
    } else {
        0
    };
    let len = offset + span + rng.range(0, 4);
    let mut buf = vec![f32::NAN; len];
    let vals = t.to_f32_vec();
    let mut idx = vec![0usize; r];
    for &x in &vals {
        let off: usize = offset
            + idx
                .iter()
                .zip(&strides)
                .map(|(&i, &s)| i * s)
                .sum::<usize>();
        buf[off] = x;
        for d in (0..r).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    let storage = Tensor::from_f32_as(&buf, &[len], t.dtype())
        .unwrap()
        .into_storage();
    let view = Tensor::strided(storage, &shape, &strides, offset).unwrap();
    debug_assert!(!view.is_contiguous() || view.numel() == 0);
    view
}

/// `[batch, seq, heads, d]` q/k/v as three slices of one fused `[batch, seq, 3, heads, d]`
/// buffer (what a fused QKV projection produces). Needs sq == sk and heads_q == heads_k.
pub fn fused_qkv(
    dtype: DType,
    batch: usize,
    seq: usize,
    heads: usize,
    d: usize,
    seed: u64,
) -> (Tensor, Tensor, Tensor) {
    let fused = rand_tensor(dtype, &[batch, seq, 3, heads, d], seed);
    let strides = [seq * 3 * heads * d, 3 * heads * d, d, 1];
    let shape = [batch, seq, heads, d];
    let mk = |i: usize| {
        Tensor::strided(fused.storage().clone(), &shape, &strides, i * heads * d).unwrap()
    };
    (mk(0), mk(1), mk(2))
}

// ---------------------------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------------------------

/// Relative tolerance against the f64 reference for outputs and gradients of `dtype`.
pub fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 | DType::BF16 => 1e-2,
    }
}

/// Frobenius relative error `‖got − want‖ / ‖want‖`. Any NaN, or an infinity that does not
/// match exactly, gives `INFINITY`. When `‖want‖ = 0` it returns `‖got‖`. A length mismatch
/// also gives `INFINITY`.
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    let mut gn = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        let g = g as f64;
        if g.is_nan() || w.is_nan() {
            return f64::INFINITY;
        }
        if g.is_infinite() || w.is_infinite() {
            if g != w {
                return f64::INFINITY;
            }
            continue;
        }
        num += (g - w) * (g - w);
        den += w * w;
        gn += g * g;
    }
    if den == 0.0 {
        gn.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Like [`rel_err`], but relative to `max(‖want‖, floor)`: for a gradient that cancels to
/// (almost) zero — e.g. dq, dk with one key, where `dS = P (dP − D)` is pure rounding — the
/// relative error of two rounding-noise vectors means nothing; `floor` (a fraction of the
/// problem's natural gradient scale, such as `1e-3 · ‖dV‖`) says below what size a difference is
/// noise. NaN and inf mismatches still give `INFINITY`.
pub fn rel_err_floor(got: &[f32], want: &[f64], floor: f64) -> f64 {
    let e = rel_err(got, want);
    if !e.is_finite() {
        return e;
    }
    let norm = want.iter().map(|w| w * w).sum::<f64>().sqrt();
    if norm >= floor {
        return e;
    }
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w) * (g as f64 - w))
        .sum::<f64>()
        .sqrt();
    diff / floor
}

/// LSE error: `-inf` must match `-inf` exactly (and any non-finite mismatch or NaN gives
/// `INFINITY`); otherwise the largest `|got − want| / max(1, |want|)`.
pub fn lse_err(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let mut worst = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        let g = g as f64;
        if g.is_nan() || w.is_nan() {
            return f64::INFINITY;
        }
        if g.is_infinite() || w.is_infinite() {
            if g != w {
                return f64::INFINITY;
            }
            continue;
        }
        worst = worst.max((g - w).abs() / w.abs().max(1.0));
    }
    worst
}

/// LSE tolerance: LSE is f32 math on the rounded inputs for every dtype.
pub fn lse_tol(_dtype: DType) -> f64 {
    1e-4
}

// ---------------------------------------------------------------------------------------------
// The float64 reference
// ---------------------------------------------------------------------------------------------

/// One sequence: where its rows start (packed row index, dense = b * seqlen) and its lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefSeq {
    pub q_row: usize,
    pub sq: usize,
    pub k_row: usize,
    pub sk: usize,
}

/// The reference problem: geometry plus q, k, v as f64 in logical row-major order
/// (`[rows, heads, d]` with rows = batch·seqlen for dense, packed rows for varlen).
#[derive(Clone, Debug)]
pub struct RefProblem {
    pub varlen: bool,
    pub heads_q: usize,
    pub heads_k: usize,
    pub d: usize,
    pub total_q: usize,
    pub total_k: usize,
    pub seqs: Vec<RefSeq>,
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_f32_vec().into_iter().map(|x| x as f64).collect()
}

impl RefProblem {
    /// Reads geometry and the (rounded) values of `inputs`. Assumes valid shapes.
    pub fn from_qkv(inputs: &Qkv<'_>) -> RefProblem {
        let (qs, ks) = (inputs.q.shape(), inputs.k.shape());
        let (varlen, seqs, heads_q, heads_k, d, total_q, total_k) = match inputs.cu_seqlens {
            Some((cq, ck)) => {
                let seqs = (0..cq.len() - 1)
                    .map(|b| RefSeq {
                        q_row: cq[b] as usize,
                        sq: (cq[b + 1] - cq[b]) as usize,
                        k_row: ck[b] as usize,
                        sk: (ck[b + 1] - ck[b]) as usize,
                    })
                    .collect();
                (true, seqs, qs[1], ks[1], qs[2], qs[0], ks[0])
            }
            None => {
                let (b, sq, sk) = (qs[0], qs[1], ks[1]);
                let seqs = (0..b)
                    .map(|b| RefSeq {
                        q_row: b * sq,
                        sq,
                        k_row: b * sk,
                        sk,
                    })
                    .collect();
                (false, seqs, qs[2], ks[2], qs[3], b * sq, b * sk)
            }
        };
        RefProblem {
            varlen,
            heads_q,
            heads_k,
            d,
            total_q,
            total_k,
            seqs,
            q: to_f64(inputs.q),
            k: to_f64(inputs.k),
            v: to_f64(inputs.v),
        }
    }

    /// Number of LSE values (`batch·heads_q·seqlen_q` = `heads_q·total_q`).
    pub fn lse_len(&self) -> usize {
        self.heads_q * self.total_q
    }

    /// Index of row `i` of sequence `b`, head `h` in the LSE layout of SPEC §1.
    pub fn lse_index(&self, b: usize, h: usize, i: usize) -> usize {
        let s = &self.seqs[b];
        if self.varlen {
            h * self.total_q + s.q_row + i
        } else {
            (b * self.heads_q + h) * s.sq + i
        }
    }

    fn qi(&self, row: usize, h: usize) -> usize {
        (row * self.heads_q + h) * self.d
    }
    fn ki(&self, row: usize, h: usize) -> usize {
        (row * self.heads_k + h) * self.d
    }

    /// The score row of `(b, h, i)`: for every key `j`, `(raw, s)` with `raw = scale·q·k`
    /// (before softcap) and `s` the final score, or `None` when masked.
    fn scores(&self, o: &AttnOptions, b: usize, h: usize, i: usize) -> Vec<Option<(f64, f64)>> {
        let s = self.seqs[b];
        let hk = h / (self.heads_q / self.heads_k);
        let scale = o
            .scale
            .map(|x| x as f64)
            .unwrap_or(1.0 / (self.d as f64).sqrt());
        let qrow = &self.q[self.qi(s.q_row + i, h)..][..self.d];
        // SPEC: row i sits at key position i + sk - sq; causal keeps j <= that; the window
        // (left, right) keeps diag - left <= j <= diag + right, -1 = unbounded; causal = (left, 0).
        let diag = i as i64 + s.sk as i64 - s.sq as i64;
        let (left, mut right) = o.window;
        if o.causal {
            right = 0;
        }
        (0..s.sk)
            .map(|j| {
                let jj = j as i64;
                if left >= 0 && jj < diag - left {
                    return None;
                }
                if right >= 0 && jj > diag + right {
                    return None;
                }
                let krow = &self.k[self.ki(s.k_row + j, hk)..][..self.d];
                let dot: f64 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                let raw = scale * dot;
                let mut x = raw;
                if o.softcap > 0.0 {
                    let c = o.softcap as f64;
                    x = c * (raw / c).tanh();
                }
                if let Some(a) = &o.alibi_slopes {
                    let slope = if a.per_batch {
                        a.values[b * self.heads_q + h]
                    } else {
                        a.values[h]
                    } as f64;
                    x -= slope * (diag - jj).abs() as f64;
                }
                Some((raw, x))
            })
            .collect()
    }

    /// Softmax probabilities (before dropout) and the LSE of a score row; all-zero and `-inf`
    /// when every key is masked.
    fn softmax(sc: &[Option<(f64, f64)>]) -> (Vec<f64>, f64) {
        let m = sc
            .iter()
            .flatten()
            .map(|&(_, s)| s)
            .fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            return (vec![0.0; sc.len()], f64::NEG_INFINITY);
        }
        let e: Vec<f64> = sc
            .iter()
            .map(|x| x.map(|(_, s)| (s - m).exp()).unwrap_or(0.0))
            .collect();
        let sum: f64 = e.iter().sum();
        (e.iter().map(|x| x / sum).collect(), m + sum.ln())
    }

    /// Dropout multipliers of row `(b, h, i)`: `1/(1−p)` kept, 0 dropped, 1 without dropout.
    fn dropout_row(&self, o: &AttnOptions, b: usize, h: usize, i: usize) -> Vec<f64> {
        let sk = self.seqs[b].sk;
        match Dropout::new(o.dropout_p, o.seed, o.offset) {
            None => vec![1.0; sk],
            Some(dr) => {
                let keep = 1.0 / (1.0 - o.dropout_p as f64);
                (0..sk)
                    .map(|j| if dr.keeps(b, h, i, j) { keep } else { 0.0 })
                    .collect()
            }
        }
    }

    /// `(out, lse)`: out in q's logical layout, lse in SPEC §1's layout.
    pub fn forward(&self, o: &AttnOptions) -> (Vec<f64>, Vec<f64>) {
        let d = self.d;
        let group = self.heads_q / self.heads_k;
        let mut out = vec![0.0; self.total_q * self.heads_q * d];
        let mut lse = vec![f64::NEG_INFINITY; self.lse_len()];
        // Rows are independent and each is computed in the same order whatever thread takes
        // it, so the result does not depend on the thread count (GPU tests compare long
        // sequences: a 16-core device machine then checks them in a fraction of the time).
        let rows: Vec<(usize, usize, usize)> = self
            .seqs
            .iter()
            .enumerate()
            .flat_map(|(b, s)| {
                (0..self.heads_q).flat_map(move |h| (0..s.sq).map(move |i| (b, h, i)))
            })
            .collect();
        let done: Vec<(Vec<f64>, f64)> = rows
            .par_iter()
            .map(|&(b, h, i)| {
                let s = &self.seqs[b];
                let sc = self.scores(o, b, h, i);
                let (p, l) = Self::softmax(&sc);
                let z = self.dropout_row(o, b, h, i);
                let mut orow = vec![0.0; d];
                for j in 0..s.sk {
                    let w = p[j] * z[j];
                    if w == 0.0 {
                        continue;
                    }
                    let vrow = &self.v[self.ki(s.k_row + j, h / group)..][..d];
                    for x in 0..d {
                        orow[x] += w * vrow[x];
                    }
                }
                (orow, l)
            })
            .collect();
        for (&(b, h, i), (orow, l)) in rows.iter().zip(done) {
            lse[self.lse_index(b, h, i)] = l;
            out[self.qi(self.seqs[b].q_row + i, h)..][..d].copy_from_slice(&orow);
        }
        (out, lse)
    }

    /// Gradients of `sum(out · dout)` w.r.t. q, k, v (`dout` in q's logical layout).
    pub fn backward(&self, o: &AttnOptions, dout: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        self.backward_given_out(o, dout, None)
    }

    /// Like [`RefProblem::backward`], but the row term `D_i = Σ_j P_ij dP_ij` is taken as
    /// `dout_i · out_i` with the `out` the kernel was given (when `Some`), as FlashAttention's
    /// backward does. Mathematically identical; with an f16/bf16 `out` it models the rounding
    /// the backward API cannot avoid (it only sees the rounded `out`), which otherwise dominates
    /// `dq`/`dk` when a softmax row is nearly one-hot.
    pub fn backward_given_out(
        &self,
        o: &AttnOptions,
        dout: &[f64],
        out: Option<&[f64]>,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let d = self.d;
        let group = self.heads_q / self.heads_k;
        let scale = o.scale.map(|x| x as f64).unwrap_or(1.0 / (d as f64).sqrt());
        let mut dq = vec![0.0; self.q.len()];
        let mut dk = vec![0.0; self.k.len()];
        let mut dv = vec![0.0; self.v.len()];
        for (b, s) in self.seqs.iter().enumerate() {
            for h in 0..self.heads_q {
                let hk = h / group;
                for i in 0..s.sq {
                    let sc = self.scores(o, b, h, i);
                    let (p, _) = Self::softmax(&sc);
                    let z = self.dropout_row(o, b, h, i);
                    let qoff = self.qi(s.q_row + i, h);
                    let dorow = &dout[qoff..][..d];
                    // dP_j = z_j · (dout_i · v_j); dS_j = P_j (dP_j − Σ_k P_k dP_k).
                    let dp: Vec<f64> = (0..s.sk)
                        .map(|j| {
                            if p[j] == 0.0 {
                                return 0.0;
                            }
                            let vrow = &self.v[self.ki(s.k_row + j, hk)..][..d];
                            z[j] * dorow.iter().zip(vrow).map(|(a, b)| a * b).sum::<f64>()
                        })
                        .collect();
                    let rowdot: f64 = match out {
                        Some(out) => dorow
                            .iter()
                            .zip(&out[qoff..][..d])
                            .map(|(a, b)| a * b)
                            .sum(),
                        None => p.iter().zip(&dp).map(|(a, b)| a * b).sum(),
                    };
                    for j in 0..s.sk {
                        if p[j] == 0.0 {
                            continue;
                        }
                        let koff = self.ki(s.k_row + j, hk);
                        let w = p[j] * z[j];
                        for x in 0..d {
                            dv[koff + x] += w * dorow[x];
                        }
                        let mut ds = p[j] * (dp[j] - rowdot);
                        if o.softcap > 0.0 {
                            let (raw, _) = sc[j].unwrap();
                            let t = (raw / o.softcap as f64).tanh();
                            ds *= 1.0 - t * t;
                        }
                        let ds = ds * scale;
                        for x in 0..d {
                            dq[qoff + x] += ds * self.k[koff + x];
                            dk[koff + x] += ds * self.q[qoff + x];
                        }
                    }
                }
            }
        }
        (dq, dk, dv)
    }
}

/// Float64 naive forward on the rounded inputs: `(out, lse)`, out in q's row-major logical
/// layout, lse dense `[batch, heads_q, seqlen_q]` / varlen `[heads_q, total_q]`.
pub fn ref_forward(inputs: &Qkv<'_>, opts: &AttnOptions) -> (Vec<f64>, Vec<f64>) {
    RefProblem::from_qkv(inputs).forward(opts)
}

/// Float64 naive backward: `(dq, dk, dv)` of `sum(out · dout)`, in the logical layouts of q, k, v.
pub fn ref_backward(
    inputs: &Qkv<'_>,
    opts: &AttnOptions,
    dout: &Tensor,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    RefProblem::from_qkv(inputs).backward(opts, &to_f64(dout))
}

/// [`ref_backward`] with the row term `D = rowsum(dout ∘ out)` taken from the rounded `out`
/// the backward is given (see [`RefProblem::backward_given_out`]); use it for f16/bf16.
pub fn ref_backward_given_out(
    inputs: &Qkv<'_>,
    opts: &AttnOptions,
    dout: &Tensor,
    out: &Tensor,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    RefProblem::from_qkv(inputs).backward_given_out(opts, &to_f64(dout), Some(&to_f64(out)))
}

// ---------------------------------------------------------------------------------------------
// Random cases
// ---------------------------------------------------------------------------------------------

/// What a random case may contain. Start from [`CaseConfig::cpu`] or [`CaseConfig::gpu`] and
/// switch things off as a backend needs.
#[derive(Clone, Debug)]
pub struct CaseConfig {
    pub dtypes: Vec<DType>,
    /// Allowed head dims; empty = any in `1..=max_d`.
    pub head_dims: Vec<usize>,
    pub max_d: usize,
    pub max_batch: usize,
    /// Longest sequence drawn.
    pub max_seq: usize,
    /// Largest `heads_k` and group size (heads_q = heads_k · group).
    pub max_heads_k: usize,
    pub max_group: usize,
    pub varlen: bool,
    /// Zero-length sequences (varlen entries or whole dense seqlens).
    pub empty_seqs: bool,
    pub strided: bool,
    pub causal: bool,
    pub window: bool,
    pub softcap: bool,
    pub alibi: bool,
    pub dropout: bool,
    pub custom_scale: bool,
    /// Upper bound on `Σ_b heads_q · sq · sk · d` so the f64 reference stays fast.
    pub max_work: usize,
}

impl CaseConfig {
    /// Everything the CPU backend supports.
    pub fn cpu() -> CaseConfig {
        CaseConfig {
            dtypes: vec![DType::F32, DType::F16, DType::BF16],
            head_dims: vec![],
            max_d: 160,
            max_batch: 3,
            max_seq: 320,
            max_heads_k: 3,
            max_group: 4,
            varlen: true,
            empty_seqs: true,
            strided: true,
            causal: true,
            window: true,
            softcap: true,
            alibi: true,
            dropout: true,
            custom_scale: true,
            max_work: 6_000_000,
        }
    }
    /// f16/bf16 and the CUDA head dims; larger shapes.
    pub fn gpu() -> CaseConfig {
        CaseConfig {
            dtypes: vec![DType::F16, DType::BF16],
            head_dims: vec![32, 64, 96, 128, 192, 256],
            max_d: 256,
            max_seq: 700,
            max_work: 60_000_000,
            ..CaseConfig::cpu()
        }
    }
    /// No options at all (plain attention), dense, contiguous.
    pub fn plain(mut self) -> CaseConfig {
        self.varlen = false;
        self.strided = false;
        self.causal = false;
        self.window = false;
        self.softcap = false;
        self.alibi = false;
        self.dropout = false;
        self.custom_scale = false;
        self
    }
}

/// A fully described case; [`Case::build`] turns it into tensors.
#[derive(Clone, Debug)]
pub struct CaseSpec {
    pub dtype: DType,
    pub batch: usize,
    /// `(sq, sk)` per batch entry (dense: all equal, and at least one entry even for batch 0).
    pub seqlens: Vec<(usize, usize)>,
    pub varlen: bool,
    pub heads_q: usize,
    pub heads_k: usize,
    pub d: usize,
    pub strided: bool,
    pub opts: AttnOptions,
    pub seed: u64,
}

/// A built case: owned tensors; [`Case::qkv`] borrows them as the API wants.
#[derive(Clone, Debug)]
pub struct Case {
    pub spec: CaseSpec,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub cu_q: Vec<i32>,
    pub cu_k: Vec<i32>,
}

fn draw_len(rng: &mut Rng, max: usize, empty: bool) -> usize {
    const LENS: [usize; 20] = [
        1, 2, 3, 5, 7, 16, 17, 31, 33, 63, 64, 65, 100, 127, 128, 129, 200, 255, 257, 300,
    ];
    let x = match rng.range(0, 10) {
        0 if empty => 0,
        0..=5 => rng.pick(&LENS),
        _ => rng.range(1, max + 1),
    };
    x.min(max)
}

/// Draws a random case within `cfg`.
pub fn random_spec(rng: &mut Rng, cfg: &CaseConfig) -> CaseSpec {
    let dtype = rng.pick(&cfg.dtypes);
    let d = if cfg.head_dims.is_empty() {
        match rng.range(0, 4) {
            0 => rng
                .pick(&[1usize, 3, 8, 17, 33, 64, 100, 128, 160])
                .min(cfg.max_d),
            _ => rng.range(1, cfg.max_d + 1),
        }
    } else {
        rng.pick(&cfg.head_dims)
    };
    let heads_k = rng.range(1, cfg.max_heads_k + 1);
    let heads_q = heads_k * rng.range(1, cfg.max_group + 1);
    let varlen = cfg.varlen && rng.chance(0.3);
    let batch = rng.range(1, cfg.max_batch + 1);
    let mut seqlens: Vec<(usize, usize)> = if varlen {
        (0..batch)
            .map(|_| {
                (
                    draw_len(rng, cfg.max_seq, cfg.empty_seqs),
                    draw_len(rng, cfg.max_seq, cfg.empty_seqs),
                )
            })
            .collect()
    } else {
        let empty = cfg.empty_seqs && rng.chance(0.2);
        let sq = draw_len(rng, cfg.max_seq, empty);
        let sk = if rng.chance(0.3) {
            sq.max(1)
        } else {
            draw_len(rng, cfg.max_seq, false)
        };
        vec![(sq, sk); batch]
    };
    // Keep the f64 reference cheap: shrink sequences until the work fits.
    let work =
        |s: &[(usize, usize)]| -> usize { s.iter().map(|&(a, b)| heads_q * a * b * d).sum() };
    while work(&seqlens) > cfg.max_work {
        let before = seqlens.clone();
        for s in seqlens.iter_mut() {
            *s = ((s.0 * 3 / 4).max(1).min(s.0), (s.1 * 3 / 4).max(1).min(s.1));
        }
        if seqlens == before {
            break;
        }
    }

    let mut opts = AttnOptions::new();
    if cfg.causal && rng.chance(0.3) {
        opts = opts.causal(true);
    }
    if cfg.window && rng.chance(0.25) {
        let max_sk = seqlens.iter().map(|s| s.1).max().unwrap_or(0) as i64;
        let side = |rng: &mut Rng| -> i64 {
            if rng.chance(0.25) {
                -1
            } else {
                rng.range(0, (max_sk + 3) as usize) as i64
            }
        };
        let left = side(rng);
        let right = if opts.causal {
            rng.pick(&[0i64, -1])
        } else {
            side(rng)
        };
        opts = opts.window(left, right);
    }
    if cfg.softcap && rng.chance(0.25) {
        opts = opts.softcap(rng.pick(&[0.3f32, 1.0, 5.0, 30.0]));
    }
    if cfg.alibi && rng.chance(0.25) {
        if rng.chance(0.5) {
            let v = (0..heads_q).map(|_| rng.uniform() as f32 + 0.01).collect();
            opts = opts.alibi(AlibiSlopes::per_head(v));
        } else {
            let v = (0..batch * heads_q)
                .map(|_| rng.uniform() as f32 * 0.5)
                .collect();
            opts = opts.alibi(AlibiSlopes::per_batch(v));
        }
    }
    if cfg.dropout && rng.chance(0.25) {
        opts = opts
            .dropout(rng.pick(&[0.1f32, 0.3, 0.5]), rng.next_u64())
            .dropout_offset(if rng.chance(0.5) { 0 } else { rng.next_u64() });
    }
    if cfg.custom_scale && rng.chance(0.2) {
        opts = opts.scale((rng.uniform() * 0.9 + 0.05) as f32);
    }
    CaseSpec {
        dtype,
        batch,
        seqlens,
        varlen,
        heads_q,
        heads_k,
        d,
        strided: cfg.strided && rng.chance(0.25),
        opts,
        seed: rng.next_u64(),
    }
}

/// Draws and builds a random case.
pub fn random_case(rng: &mut Rng, cfg: &CaseConfig) -> Case {
    Case::build(random_spec(rng, cfg))
}

impl Case {
    /// Materialises the tensors of `spec` (reproducible from `spec.seed`).
    pub fn build(spec: CaseSpec) -> Case {
        let (qshape, kshape, cu_q, cu_k) = spec.shapes();
        let mut q = rand_tensor(spec.dtype, &qshape, spec.seed);
        let mut k = rand_tensor(spec.dtype, &kshape, spec.seed.wrapping_add(1));
        let mut v = rand_tensor(spec.dtype, &kshape, spec.seed.wrapping_add(2));
        if spec.strided {
            q = strided_copy(&q, spec.seed.wrapping_add(3));
            k = strided_copy(&k, spec.seed.wrapping_add(4));
            v = strided_copy(&v, spec.seed.wrapping_add(5));
        }
        Case {
            spec,
            q,
            k,
            v,
            cu_q,
            cu_k,
        }
    }

    /// Plain dense case with the given shape and options.
    #[allow(clippy::too_many_arguments)]
    pub fn dense(
        dtype: DType,
        batch: usize,
        sq: usize,
        sk: usize,
        heads_q: usize,
        heads_k: usize,
        d: usize,
        opts: AttnOptions,
        seed: u64,
    ) -> Case {
        Case::build(CaseSpec {
            dtype,
            batch,
            // Dense keeps one entry even for batch 0 so the seqlens survive.
            seqlens: vec![(sq, sk); batch.max(1)],
            varlen: false,
            heads_q,
            heads_k,
            d,
            strided: false,
            opts,
            seed,
        })
    }

    /// Varlen case with the given `(sq, sk)` per sequence.
    pub fn varlen(
        dtype: DType,
        seqlens: &[(usize, usize)],
        heads_q: usize,
        heads_k: usize,
        d: usize,
        opts: AttnOptions,
        seed: u64,
    ) -> Case {
        Case::build(CaseSpec {
            dtype,
            batch: seqlens.len(),
            seqlens: seqlens.to_vec(),
            varlen: true,
            heads_q,
            heads_k,
            d,
            strided: false,
            opts,
            seed,
        })
    }

    /// The inputs as the API takes them.
    pub fn qkv(&self) -> Qkv<'_> {
        if self.spec.varlen {
            Qkv::varlen(&self.q, &self.k, &self.v, &self.cu_q, &self.cu_k)
        } else {
            Qkv::dense(&self.q, &self.k, &self.v)
        }
    }

    pub fn opts(&self) -> &AttnOptions {
        &self.spec.opts
    }

    /// A random `dout` shaped like q (contiguous).
    pub fn dout(&self) -> Tensor {
        rand_tensor(
            self.spec.dtype,
            self.q.shape(),
            self.spec.seed.wrapping_add(77),
        )
    }

    pub fn ref_forward(&self) -> (Vec<f64>, Vec<f64>) {
        ref_forward(&self.qkv(), &self.spec.opts)
    }

    pub fn ref_backward(&self, dout: &Tensor) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        ref_backward(&self.qkv(), &self.spec.opts, dout)
    }

    pub fn ref_backward_given_out(
        &self,
        dout: &Tensor,
        out: &Tensor,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        ref_backward_given_out(&self.qkv(), &self.spec.opts, dout, out)
    }
}

impl CaseSpec {
    /// `(q shape, k shape, cu_seqlens_q, cu_seqlens_k)`; the cu arrays are empty for dense.
    pub fn shapes(&self) -> (Vec<usize>, Vec<usize>, Vec<i32>, Vec<i32>) {
        if self.varlen {
            let mut cq = vec![0i32];
            let mut ck = vec![0i32];
            for &(a, b) in &self.seqlens {
                cq.push(cq.last().unwrap() + a as i32);
                ck.push(ck.last().unwrap() + b as i32);
            }
            (
                vec![*cq.last().unwrap() as usize, self.heads_q, self.d],
                vec![*ck.last().unwrap() as usize, self.heads_k, self.d],
                cq,
                ck,
            )
        } else {
            let (sq, sk) = self.seqlens.first().copied().unwrap_or((0, 0));
            (
                vec![self.batch, sq, self.heads_q, self.d],
                vec![self.batch, sk, self.heads_k, self.d],
                vec![],
                vec![],
            )
        }
    }

    /// A one-line description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "{} batch={} seqlens={:?} varlen={} heads={}/{} d={} strided={} opts={:?} seed={}",
            self.dtype,
            self.batch,
            if self.seqlens.len() > 4 {
                &self.seqlens[..4]
            } else {
                &self.seqlens[..]
            },
            self.varlen,
            self.heads_q,
            self.heads_k,
            self.d,
            self.strided,
            self.opts,
            self.seed
        )
    }
}

/// A sweep's verdicts: every case is printed with ok/FAIL, and [`Tally::finish`] fails the test
/// listing all failing cases (not only the first).
#[derive(Default)]
pub struct Tally {
    n: usize,
    fails: Vec<String>,
}

impl Tally {
    pub fn record(&mut self, ok: bool, line: String) {
        self.n += 1;
        let line = format!("{line} {}", if ok { "ok" } else { "FAIL" });
        eprintln!("{line}");
        if !ok {
            self.fails.push(line);
        }
    }

    pub fn finish(self, what: &str) {
        eprintln!(
            "{what}: {} of {} cases passed",
            self.n - self.fails.len(),
            self.n
        );
        assert!(self.n > 0, "{what}: no cases ran");
        assert!(
            self.fails.is_empty(),
            "{what} failures:\n{}",
            self.fails.join("\n")
        );
    }
}
