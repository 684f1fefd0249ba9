//! The CPU backend: the FlashAttention algorithm itself (tiles, online softmax, LSE,
//! recomputation in the backward), threaded with rayon over batch × query tiles (forward; each
//! task walks all heads of its rows so that it owns one contiguous block of `out`) and over
//! (batch, kv head) or key/query tiles (backward).
//!
//! - [`forward`]: one rayon task per (sequence, query tile); the task walks every query head and
//!   only the key tiles its rows can see (`Mask::key_range`; inside a partly visible tile only
//!   the rows that see a key), keeping a running max `m_i`, sum `l_i` and an f32 output
//!   accumulator. Working memory is O(tile) per task; nothing of size `seqlen_q × seqlen_k` is
//!   ever allocated. The order per score follows SPEC §1: scale, softcap, ALiBi, mask, softmax
//!   (LSE taken here), then dropout on the normalised probabilities.
//! - [`backward`]: recomputes `P` tile by tile from the LSE, `D = rowsum(dO ∘ O)` first; see
//!   `backward.rs` for the two deterministic parallel schemes (fused per (sequence, kv head),
//!   or two passes: dK/dV per key tile then dQ per query tile). No atomics, no order-dependent
//!   reductions: `deterministic` is always honoured.
//!
//! Inner products run on the `gemm` crate (f32, `Parallelism::None` inside each rayon task): on
//! the tile shapes it reached 72–100 % of its own large-GEMM rate in a quick measurement, so no
//! hand-written micro-kernel. f32 inputs are read in place (strided views handed to gemm);
//! f16/bf16 tiles are widened to f32 once when loaded. Element-wise loops (exp, max, softcap,
//! ALiBi, dS) are compiled twice and dispatched to AVX2+FMA at run time.

mod backward;
mod forward;
pub mod tile;

use crate::error::Result;
use crate::layout::{Problem, Qkv};
use crate::math::Mask;
use crate::options::AttnOptions;
use crate::tensor::{DType, Tensor};
use crate::{ForwardOutput, Gradients};
use half::{bf16, f16};

/// Query/key tile sizes of the CPU kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    /// Query rows per tile.
    pub bq: usize,
    /// Key rows per tile.
    pub bk: usize,
}

impl Tiles {
    /// The tile sizes used for head dim `d` (overridable for tuning with the environment
    /// variable `FLASHATTN_CPU_TILES=BQ,BK`).
    pub fn for_head_dim(d: usize) -> Tiles {
        if let Some(t) = env_tiles() {
            return t;
        }
        // Measured on a 2-core AVX2 host (f32, seqlen 2048): larger query tiles amortise the
        // gemm crate's packing of the K tile over more rows.
        if d <= 128 {
            Tiles { bq: 256, bk: 128 }
        } else if d <= 256 {
            Tiles { bq: 128, bk: 128 }
        } else {
            Tiles { bq: 64, bk: 128 }
        }
    }
}

fn env_tiles() -> Option<Tiles> {
    use std::sync::OnceLock;
    static T: OnceLock<Option<Tiles>> = OnceLock::new();
    *T.get_or_init(|| {
        let s = std::env::var("FLASHATTN_CPU_TILES").ok()?;
        let (a, b) = s.split_once(',')?;
        let (bq, bk) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        (bq > 0 && bk > 0).then_some(Tiles { bq, bk })
    })
}

/// CPU forward. `problem` was validated from `inputs` and `opts`.
pub fn forward(problem: &Problem, inputs: &Qkv<'_>, opts: &AttnOptions) -> Result<ForwardOutput> {
    let mut tiles = Tiles::for_head_dim(problem.head_dim);
    // Small problems: shorter query tiles so that every thread gets work.
    let threads = rayon::current_num_threads().max(1);
    let n_tasks = |bq: usize| {
        problem
            .seqs
            .iter()
            .map(|s| s.sq.div_ceil(bq))
            .sum::<usize>()
    };
    while tiles.bq > 16 && n_tasks(tiles.bq) < 2 * threads {
        tiles.bq /= 2;
    }
    match problem.dtype {
        DType::F32 => forward::run::<f32>(problem, inputs, opts, tiles),
        DType::F16 => forward::run::<f16>(problem, inputs, opts, tiles),
        DType::BF16 => forward::run::<bf16>(problem, inputs, opts, tiles),
    }
}

/// CPU backward. `problem` was validated from `inputs` and `opts`, and the backward tensors checked.
pub fn backward(
    problem: &Problem,
    inputs: &Qkv<'_>,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    opts: &AttnOptions,
) -> Result<Gradients> {
    backward_mode(problem, inputs, out, lse, dout, opts, None)
}

/// [`backward`] with the parallel scheme forced (`Some(true)`: fused per (sequence, key head);
/// `Some(false)`: two passes over key tiles then query tiles; `None`: chosen by size).
pub(crate) fn backward_mode(
    problem: &Problem,
    inputs: &Qkv<'_>,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    opts: &AttnOptions,
    fused: Option<bool>,
) -> Result<Gradients> {
    let tiles = Tiles::for_head_dim(problem.head_dim);
    match problem.dtype {
        DType::F32 => backward::run::<f32>(problem, inputs, out, lse, dout, opts, tiles, fused),
        DType::F16 => backward::run::<f16>(problem, inputs, out, lse, dout, opts, tiles, fused),
        DType::BF16 => backward::run::<bf16>(problem, inputs, out, lse, dout, opts, tiles, fused),
    }
}

/// The union `[lo, hi)` of the key ranges of rows `i0..i0+rows` (empty rows ignored);
/// `None` when no row sees a key.
pub(crate) fn tile_key_range(
    mask: &Mask,
    i0: usize,
    rows: usize,
    sq: usize,
    sk: usize,
) -> Option<(usize, usize)> {
    let mut lo = usize::MAX;
    let mut hi = 0;
    for i in i0..i0 + rows {
        let (a, b) = mask.key_range(i, sq, sk);
        if a < b {
            lo = lo.min(a);
            hi = hi.max(b);
        }
    }
    (lo < hi).then_some((lo, hi))
}

/// The query rows `[ia, ib)` that see at least one key of `[j0, j1)` (key ranges are monotone
/// in the row index, so they form one interval).
pub(crate) fn query_range_for_keys(
    mask: &Mask,
    j0: usize,
    j1: usize,
    sq: usize,
    sk: usize,
) -> (usize, usize) {
    // First row with hi > j0.
    let first = |pred: &dyn Fn(usize) -> bool| {
        let (mut a, mut b) = (0usize, sq);
        while a < b {
            let m = (a + b) / 2;
            if pred(m) {
                b = m;
            } else {
                a = m + 1;
            }
        }
        a
    };
    let ia = first(&|i| mask.key_range(i, sq, sk).1 > j0);
    let ib = first(&|i| mask.key_range(i, sq, sk).0 >= j1);
    (ia, ib.max(ia))
}

/// Applies softcap, ALiBi and the mask to one score row (`s[c]` is key `j0 + c` of row `i`).
/// `dt` (empty, or as long as `s`) receives the softcap derivative factor `1 − tanh²`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn transform_row(
    p: &Problem,
    slope: Option<f32>,
    i: usize,
    j0: usize,
    sq: usize,
    sk: usize,
    s: &mut [f32],
    dt: &mut [f32],
) {
    let jn = s.len();
    if p.softcap > 0.0 {
        tile::softcap_in_place(s, p.softcap, dt);
    }
    if let Some(sl) = slope {
        let base = i as i64 + sk as i64 - sq as i64 - j0 as i64;
        if base.unsigned_abs() + (jn as u64) < (1 << 24) {
            // Same value as `math::alibi_bias` (integer distances below 2^24 are exact in f32),
            // in a form that vectorises.
            alibi_row(s, sl, base as f32);
        } else {
            for (c, x) in s.iter_mut().enumerate() {
                *x -= crate::math::alibi_bias(sl, i, j0 + c, sq, sk);
            }
        }
    }
    if !p.mask.is_none() {
        let (lo, hi) = p.mask.key_range(i, sq, sk);
        let a = lo.saturating_sub(j0).min(jn);
        let b = hi.saturating_sub(j0).min(jn).max(a);
        s[..a].fill(f32::NEG_INFINITY);
        s[b..].fill(f32::NEG_INFINITY);
    }
}

tile::dispatch! {
    /// `s[c] -= slope · |base − c|`.
    fn alibi_row(s: &mut [f32], slope: f32, base: f32) {
        for (c, x) in s.iter_mut().enumerate() {
            *x -= slope * (base - c as f32).abs();
        }
    }
}

/// Dropout on one probability row, in place: kept values scaled by `1/(1−p)`, dropped set to 0;
/// `also` (same length, if given) gets the same keep mask and factor. The keep decisions are
/// exactly `math::Dropout::keeps(b, h, i, j)`; Philox runs on eight 4-key blocks at a time
/// so that it vectorises.
pub(crate) fn dropout_row(
    drop: &crate::math::Dropout,
    b: usize,
    h: usize,
    i: usize,
    j0: usize,
    row: &mut [f32],
    mut also: Option<&mut [f32]>,
) {
    let n = row.len();
    let thr = drop.threshold();
    let sc = drop.scale;
    let key = drop.key();
    let c3 = drop.counter(b, h, i, 0)[3];
    let mut c = 0;
    while c < n {
        let g0 = (j0 + c) >> 2;
        let mut w = [[0u32; 8]; 4];
        philox8(key, g0 as u32, i as u32, h as u32, c3, &mut w);
        // Factor of key 4·g0 + q is word q & 3 of block q >> 2.
        let mut fac = [0.0f32; 32];
        for (q, f) in fac.iter_mut().enumerate() {
            *f = if w[q & 3][q >> 2] >= thr { sc } else { 0.0 };
        }
        let end = ((g0 + 8) * 4 - j0).min(n);
        let q0 = j0 + c - 4 * g0;
        let fs = &fac[q0..q0 + (end - c)];
        mul_keep(&mut row[c..end], fs);
        if let Some(o) = also.as_deref_mut() {
            mul_keep(&mut o[c..end], fs);
        }
        c = end;
    }
}

tile::dispatch! {
    /// `x = x·f` where `f ≠ 0`, else exactly 0.
    fn mul_keep(x: &mut [f32], f: &[f32]) {
        for (a, &b) in x.iter_mut().zip(f) {
            *a = if b != 0.0 { *a * b } else { 0.0 };
        }
    }
}

tile::dispatch! {
    /// Philox4x32-10 (as `math::philox4x32_10`) of the eight counters
    /// `[blk0 + l, i, h, c3]`, `l = 0..8`; `w[word][l]`.
    fn philox8(key: [u32; 2], blk0: u32, i: u32, h: u32, c3: u32, w: &mut [[u32; 8]; 4]) {
        const M0: u64 = 0xD251_1F53;
        const M1: u64 = 0xCD9E_8D57;
        let mut x0 = [0u32; 8];
        let mut x1 = [i; 8];
        let mut x2 = [h; 8];
        let mut x3 = [c3; 8];
        for (l, v) in x0.iter_mut().enumerate() {
            *v = blk0.wrapping_add(l as u32);
        }
        let (mut k0, mut k1) = (key[0], key[1]);
        for round in 0..10 {
            if round > 0 {
                k0 = k0.wrapping_add(0x9E37_79B9);
                k1 = k1.wrapping_add(0xBB67_AE85);
            }
            for l in 0..8 {
                let p0 = M0 * x0[l] as u64;
                let p1 = M1 * x2[l] as u64;
                let n0 = ((p1 >> 32) as u32) ^ x1[l] ^ k0;
                let n2 = ((p0 >> 32) as u32) ^ x3[l] ^ k1;
                x0[l] = n0;
                x1[l] = p1 as u32;
                x2[l] = n2;
                x3[l] = p0 as u32;
            }
        }
        w[0] = x0;
        w[1] = x1;
        w[2] = x2;
        w[3] = x3;
    }
}

#[cfg(test)]
mod tests;
