//! Tile-level building blocks of the CPU backend: a bounds-checked wrapper around the `gemm`
//! crate's f32 product, typed loads/stores of f32/f16/bf16 tiles, a vectorisable `exp`, and
//! runtime dispatch of the element-wise loops to an AVX2+FMA build of the same code.

use crate::tensor::{Element, Storage};
use half::{bf16, f16};

/// A CPU element type with typed access to [`Storage`].
pub trait CpuElem: Element {
    fn slice(s: &Storage) -> &[Self];
    /// Widens a row to f32 (`dst.len() == src.len()`).
    #[inline]
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (x, y) in dst.iter_mut().zip(src) {
            *x = y.to_f32();
        }
    }
    /// The same slice as f32 when `Self` is f32 (zero-copy tile views).
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }
    fn storage(v: Vec<Self>) -> Storage;
    fn zero() -> Self;
}

impl CpuElem for f32 {
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    fn slice(s: &Storage) -> &[Self] {
        match s {
            Storage::F32(v) => v,
            _ => &[],
        }
    }
    fn storage(v: Vec<Self>) -> Storage {
        Storage::F32(v)
    }
    fn zero() -> Self {
        0.0
    }
}
// f16 and bf16: half's slice conversion is vectorised (F16C where available).
macro_rules! half_cpu_elem {
    ($t:ty, $variant:ident) => {
        impl CpuElem for $t {
            #[inline]
            fn widen(src: &[Self], dst: &mut [f32]) {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
            }
            fn slice(s: &Storage) -> &[Self] {
                match s {
                    Storage::$variant(v) => v,
                    _ => &[],
                }
            }
            fn storage(v: Vec<Self>) -> Storage {
                Storage::$variant(v)
            }
            fn zero() -> Self {
                <$t>::ZERO
            }
        }
    };
}
half_cpu_elem!(f16, F16);
half_cpu_elem!(bf16, BF16);

/// A row-major f32 matrix view into a slice: element `(r, c)` is `data[off + r*rs + c*cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major with row stride `rs`.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        Mat {
            data,
            off: 0,
            rs,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with row stride `rs`.
    pub fn trans(data: &'a [f32], rs: usize) -> Self {
        Mat {
            data,
            off: 0,
            rs: 1,
            cs: rs,
        }
    }
    /// The view starting `n` rows further down.
    pub fn skip_rows(self, n: usize) -> Self {
        Mat {
            off: self.off + n * self.rs,
            ..self
        }
    }
    /// The transpose (a view, no copy).
    pub fn t(self) -> Self {
        Mat {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
    fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || self.off + (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// `dst[m×n] (row stride dst_rs) = (accumulate ? dst : 0) + lhs[m×k] · rhs[k×n]`, single-threaded.
///
/// Panics only on internal shape bugs (the bounds are checked before the raw call).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    accumulate: bool,
) {
    matmul_beta(m, n, k, dst, dst_rs, lhs, rhs, accumulate, 1.0)
}

/// `dst = (accumulate ? dst : 0) + beta · lhs · rhs` (see [`matmul`]).
#[allow(clippy::too_many_arguments)]
pub fn matmul_beta(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    accumulate: bool,
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst.len() && dst_rs >= n,
        "matmul dst bounds"
    );
    assert!(lhs.fits(m, k) && rhs.fits(k, n), "matmul operand bounds");
    // SAFETY: every element addressed by the three (pointer, row stride, col stride) views lies
    // inside its slice (checked just above: the largest index of each view is in bounds and all
    // strides are non-negative); `dst` is a unique borrow and does not alias `lhs`/`rhs`
    // (they are shared borrows, so the borrow checker proves they are distinct from `dst`).
    unsafe {
        gemm::gemm::<f32>(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr().add(lhs.off),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr().add(rhs.off),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Multi-threaded f32 GEMM (rayon, `threads`), for the benchmark's reference rate.
pub fn matmul_parallel(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    threads: usize,
) {
    assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // SAFETY: dense row-major m×k, k×n, m×n views, each within its slice (asserted above);
    // `dst` is uniquely borrowed and distinct from the shared `lhs`, `rhs`.
    unsafe {
        gemm::gemm::<f32>(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        )
    }
}

/// Loads `rows` rows of `d` elements starting at element offsets `row_off(r)` into a dense f32
/// buffer (row stride `d`), multiplied by `mul`.
#[inline]
pub fn load_rows<T: CpuElem>(
    src: &[T],
    rows: usize,
    d: usize,
    row_off: impl Fn(usize) -> usize,
    mul: f32,
    dst: &mut [f32],
) {
    for r in 0..rows {
        let o = row_off(r);
        let s = &src[o..o + d];
        let t = &mut dst[r * d..r * d + d];
        T::widen(s, t);
        if mul != 1.0 {
            scale_in_place(t, mul);
        }
    }
}

/// A `rows × d` f32 view of tensor rows `base + r·rs`: zero-copy for f32 inputs when `mul`
/// is 1, otherwise converted (and multiplied by `mul`) into `buf`.
#[inline]
pub fn view<'a, T: CpuElem>(
    src: &'a [T],
    rows: usize,
    d: usize,
    base: usize,
    rs: usize,
    mul: f32,
    buf: &'a mut [f32],
) -> Mat<'a> {
    if let Some(f) = T::as_f32(src) {
        if mul == 1.0 {
            return Mat {
                data: f,
                off: base,
                rs,
                cs: 1,
            };
        }
    }
    load_rows(src, rows, d, |r| base + r * rs, mul, buf);
    Mat::rows(buf, d)
}

/// `exp(x)` for f32 with ~2e-7 relative error, vectorisable (no calls, no branches).
/// Returns exactly 0 for `x <= -88` (and for `-inf`), saturates at `exp(88)`.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Cody–Waite: x = n·ln2 + f, |f| <= ln2/2, n clamped so that 2^n stays representable
    // (n = -127 gives an exact 0 through the exponent bits below).
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375, exact in few bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    let t = (x * LOG2E).clamp(-127.0, 127.0);
    // Round to nearest with the 1.5·2^23 trick; the integer sits in the low mantissa bits.
    let magic = 12_582_912.0f32;
    let r = t + magic;
    let n = r - magic;
    let xc = x.clamp(
        -127.0 * std::f32::consts::LN_2,
        127.0 * std::f32::consts::LN_2,
    );
    let f = (xc - n * LN2_HI) - n * LN2_LO;
    let ni = (r.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    // e^f, Taylor to degree 6 (error <= 1.2e-7 on |f| <= 0.35).
    const C2: f32 = 1.0 / 2.0;
    const C3: f32 = 1.0 / 6.0;
    const C4: f32 = 1.0 / 24.0;
    const C5: f32 = 1.0 / 120.0;
    const C6: f32 = 1.0 / 720.0;
    let p = 1.0 + f * (1.0 + f * (C2 + f * (C3 + f * (C4 + f * (C5 + f * C6)))));
    p * scale
}

/// `tanh(x)` via [`exp_fast`], accurate to ~3e-7 absolute.
#[inline(always)]
pub fn tanh_fast(x: f32) -> f32 {
    // tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1]: no cancellation blow-up
    // for large |x|; for tiny |x| fall back to x (relative accuracy near 0).
    let a = x.abs();
    let e = exp_fast(-2.0 * a);
    let t = (1.0 - e) / (1.0 + e);
    let t = if a < 1e-3 { a - a * a * a / 3.0 } else { t };
    t.copysign(x)
}

/// True when this CPU can run the AVX2+FMA builds of the element-wise loops.
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static F: OnceLock<bool> = OnceLock::new();
        *F.get_or_init(|| {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name(args)` that runs `$body` compiled twice: for the baseline target and with
/// AVX2+FMA enabled, picking the latter at run time when the CPU has it.
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident $(<$($g:ident : $b:path),*>)? ($($a:ident : $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name $(<$($g: $b),*>)? ($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn imp $(<$($g: $b),*>)? ($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2 $(<$($g: $b),*>)? ($($a: $t),*) $(-> $r)? { imp $(::<$($g),*>)? ($($a),*) }
            #[cfg(target_arch = "x86_64")]
            {
                if $crate::cpu::tile::has_avx2() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above),
                    // the only precondition of calling a `#[target_feature]` function.
                    return unsafe { avx2 $(::<$($g),*>)? ($($a),*) };
                }
            }
            imp $(::<$($g),*>)? ($($a),*)
        }
    };
}
pub(crate) use dispatch;

dispatch! {
    /// `y[i] = exp_fast(x[i] - sub)` in place; returns the sum.
    pub fn exp_sub_sum(x: &mut [f32], sub: f32) -> f32 {
        // Sixteen independent partial sums so that the loop vectorises (a single f32
        // accumulator would force a serial, in-order reduction).
        let mut acc = [0.0f32; 16];
        let mut ch = x.chunks_exact_mut(16);
        for c in &mut ch {
            for l in 0..16 {
                let e = exp_fast(c[l] - sub);
                c[l] = e;
                acc[l] += e;
            }
        }
        let mut s = 0.0f32;
        for v in ch.into_remainder() {
            let e = exp_fast(*v - sub);
            *v = e;
            s += e;
        }
        s + acc.iter().sum::<f32>()
    }
}

dispatch! {
    /// Maximum of a slice (−inf for an empty one).
    pub fn max_of(x: &[f32]) -> f32 {
        // Eight independent lanes so that the reduction vectorises.
        let mut m = [f32::NEG_INFINITY; 8];
        let mut ch = x.chunks_exact(8);
        for c in &mut ch {
            for l in 0..8 {
                m[l] = if c[l] > m[l] { c[l] } else { m[l] };
            }
        }
        let mut r = f32::NEG_INFINITY;
        for &v in ch.remainder().iter().chain(m.iter()) {
            r = if v > r { v } else { r };
        }
        r
    }
}

dispatch! {
    /// `y *= a`.
    pub fn scale_in_place(y: &mut [f32], a: f32) {
        for v in y.iter_mut() {
            *v *= a;
        }
    }
}

dispatch! {
    /// Softcap in place: `x = cap·tanh(x/cap)`; when `dt` is non-empty also stores
    /// `1 − tanh²` there (the derivative factor of the backward).
    pub fn softcap_in_place(x: &mut [f32], cap: f32, dt: &mut [f32]) {
        let inv = 1.0 / cap;
        if dt.is_empty() {
            for v in x.iter_mut() {
                *v = cap * tanh_fast(*v * inv);
            }
        } else {
            for (v, d) in x.iter_mut().zip(dt.iter_mut()) {
                let t = tanh_fast(*v * inv);
                *v = cap * t;
                *d = 1.0 - t * t;
            }
        }
    }
}

dispatch! {
    /// Dot product (f32 accumulation in 8 lanes).
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0.0f32; 8];
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut ca = a.chunks_exact(8);
        let mut cb = b.chunks_exact(8);
        for (x, y) in (&mut ca).zip(&mut cb) {
            for l in 0..8 {
                acc[l] += x[l] * y[l];
            }
        }
        let mut s: f32 = 0.0;
        for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
            s += x * y;
        }
        s + acc.iter().sum::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fast_accuracy() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_fast(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst rel err {worst}");
        assert_eq!(exp_fast(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_fast(-200.0), 0.0);
        assert_eq!(exp_fast(0.0), 1.0);
        assert!(exp_fast(f32::INFINITY).is_finite());
    }

    #[test]
    fn tanh_fast_accuracy() {
        let mut x = -20.0f32;
        while x < 20.0 {
            let want = (x as f64).tanh();
            assert!((tanh_fast(x) as f64 - want).abs() < 1e-6, "x={x}");
            x += 0.00731;
        }
        assert_eq!(tanh_fast(0.0), 0.0);
    }

    #[test]
    fn matmul_strided_transposed() {
        // A 2×3 times Bᵀ where B is 4×3 row-major.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let mut c = vec![0.0f32; 2 * 5];
        matmul(
            2,
            4,
            3,
            &mut c,
            5,
            Mat::rows(&a, 3),
            Mat::trans(&b, 3),
            false,
        );
        for i in 0..2 {
            for j in 0..4 {
                let want: f32 = (0..3).map(|p| a[i * 3 + p] * b[j * 3 + p]).sum();
                assert_eq!(c[i * 5 + j], want);
            }
        }
        matmul(
            2,
            4,
            3,
            &mut c,
            5,
            Mat::rows(&a, 3),
            Mat::trans(&b, 3),
            true,
        );
        assert_eq!(c[0], 2.0 * (0.0 + 2.0 + 6.0));
        assert_eq!(max_of(&[1.0, 5.0, -3.0]), 5.0);
        assert_eq!(max_of(&[]), f32::NEG_INFINITY);
        let v: Vec<f32> = (0..19).map(|x| x as f32).collect();
        assert_eq!(dot(&v, &v), (0..19).map(|x| (x * x) as f32).sum::<f32>());
    }
}
