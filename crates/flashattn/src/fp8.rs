//! FP8 (e4m3) inputs for the Hopper FP8 forward (`cuda::fa3_fp8`): quantization with
//! per-tensor or per-(batch, head) amax scaling, and the optional "incoherent processing" of
//! Q and K (a seeded random-sign, normalised Walsh–Hadamard transform over the head dim).
//!
//! e4m3 (OCP FP8 E4M3, as the sm_90 tensor cores read it): 1 sign, 4 exponent (bias 7) and
//! 3 mantissa bits; no infinities; `0x7f`/`0xff` are NaN; the largest finite value is 448 and
//! the smallest subnormal 2⁻⁹. Quantizing `x` stores `e4m3(x · s)` with `s = 448 / amax`
//! (amax over the tensor or over one (batch, head) slice) and keeps the *descale* `1 / s`;
//! dequantizing multiplies back. The forward folds `q_descale · k_descale` into the softmax scale
//! and multiplies O by `v_descale`.
//!
//! The transform `M = H · diag(signs) / sqrt(d)` (H the d×d Sylvester–Hadamard matrix, signs ±1
//! drawn from a seed) is orthogonal, so applying it to every row of Q and of K leaves Q Kᵀ —
//! hence the attention output — unchanged, while spreading outlier channels over all d
//! coordinates before quantization. V is not transformed. d must be a power of two.

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;

/// `x` rounded to the nearest e4m3 (ties to even), saturating to ±448; NaN gives `0x7f`.
pub fn e4m3_from_f32(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = (x as f64).abs();
    if a >= E4M3_MAX as f64 {
        return sign | 0x7e;
    }
    const MIN_NORMAL: f64 = 1.0 / 64.0; // 2^-6
    if a < MIN_NORMAL {
        // Subnormals: multiples of 2^-9 (code 8 is 2^-6, the smallest normal, which continues).
        let q = (a * 512.0).round_ties_even() as u8;
        return sign | q;
    }
    let mut e = a.log2().floor() as i32;
    // Guard log2 rounding at exact powers of two.
    if a < 2f64.powi(e) {
        e -= 1;
    } else if a >= 2f64.powi(e + 1) {
        e += 1;
    }
    let m = a / 2f64.powi(e); // [1, 2), exact
    let mut mant = ((m - 1.0) * 8.0).round_ties_even() as i32;
    if mant == 8 {
        mant = 0;
        e += 1;
    }
    let code = (((e + 7) as u8) << 3) | mant as u8;
    sign | code.min(0x7e)
}

/// The value of the e4m3 code `b` (NaN for `0x7f`/`0xff`).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((b >> 3) & 0xf) as i32;
    let m = (b & 7) as f32;
    if e == 15 && m == 7.0 {
        return f32::NAN;
    }
    let v = if e == 0 {
        m / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + m / 8.0) * 2f32.powi(e - 7)
    };
    sign * v
}

/// How the amax (hence the descale) is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Scaling {
    /// One descale for the whole tensor.
    PerTensor,
    /// One descale per (batch, head): `descale[b * heads + h]`.
    PerHead,
}

/// A dense e4m3 tensor `[batch, seqlen, heads, d]` (row-major, contiguous) with its descale
/// factors: the real value of element `x` of (batch b, head h) is `e4m3(x) · descale(b, h)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Tensor {
    data: Vec<u8>,
    shape: [usize; 4],
    descale: Vec<f32>,
    scaling: Fp8Scaling,
}

impl Fp8Tensor {
    /// Quantizes a `[batch, seqlen, heads, d]` tensor (any dtype, any strides). NaN or infinite
    /// inputs are an error (they have no e4m3 encoding worth keeping).
    pub fn quantize(t: &Tensor, scaling: Fp8Scaling) -> Result<Fp8Tensor> {
        let sh = t.shape();
        if sh.len() != 4 {
            return Err(Error::invalid(
                "tensor",
                format!("shape {sh:?}"),
                "[batch, seqlen, heads, d] (fp8 takes dense inputs)",
            ));
        }
        let shape = [sh[0], sh[1], sh[2], sh[3]];
        let x = t.contiguous().to_f32_vec();
        if let Some(bad) = x.iter().find(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "tensor",
                bad,
                "finite values (fp8 quantize)",
            ));
        }
        let [b, s, h, d] = shape;
        let nd = match scaling {
            Fp8Scaling::PerTensor => 1,
            Fp8Scaling::PerHead => b * h,
        };
        let slot = |i: usize| -> usize {
            match scaling {
                Fp8Scaling::PerTensor => 0,
                Fp8Scaling::PerHead => {
                    let bi = i / (s * h * d);
                    let hi = (i / d) % h;
                    bi * h + hi
                }
            }
        };
        let mut amax = vec![0f32; nd];
        for (i, v) in x.iter().enumerate() {
            let a = &mut amax[slot(i)];
            *a = a.max(v.abs());
        }
        let scale: Vec<f32> = amax
            .iter()
            .map(|&a| if a > 0.0 { E4M3_MAX / a } else { 1.0 })
            .collect();
        let data = x
            .iter()
            .enumerate()
            .map(|(i, &v)| e4m3_from_f32(v * scale[slot(i)]))
            .collect();
        Ok(Fp8Tensor {
            data,
            shape,
            descale: scale.iter().map(|s| 1.0 / s).collect(),
            scaling,
        })
    }

    /// Wraps e4m3 codes with given descales (`descale.len()` 1 for per tensor, `batch · heads`
    /// for per head).
    pub fn from_parts(data: Vec<u8>, shape: [usize; 4], descale: Vec<f32>) -> Result<Fp8Tensor> {
        let n: usize = shape.iter().product();
        if data.len() != n {
            return Err(Error::invalid(
                "data",
                format!("{} bytes", data.len()),
                format!("{n} bytes for shape {shape:?}"),
            ));
        }
        let scaling = if descale.len() == 1 {
            Fp8Scaling::PerTensor
        } else if descale.len() == shape[0] * shape[2] {
            Fp8Scaling::PerHead
        } else {
            return Err(Error::invalid(
                "descale",
                format!("{} values", descale.len()),
                format!("1 or batch · heads = {}", shape[0] * shape[2]),
            ));
        };
        if let Some(bad) = descale.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
            return Err(Error::invalid("descale", bad, "finite positive factors"));
        }
        Ok(Fp8Tensor {
            data,
            shape,
            descale,
            scaling,
        })
    }

    /// `[batch, seqlen, heads, d]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
    /// The e4m3 codes, row-major.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    /// Descale factors: one (per tensor) or `batch · heads` (per head, `[b * heads + h]`).
    pub fn descale(&self) -> &[f32] {
        &self.descale
    }
    pub fn scaling(&self) -> Fp8Scaling {
        self.scaling
    }
    /// The descale of (batch b, head h).
    pub fn descale_at(&self, b: usize, h: usize) -> f32 {
        match self.scaling {
            Fp8Scaling::PerTensor => self.descale[0],
            Fp8Scaling::PerHead => self.descale[b * self.shape[2] + h],
        }
    }
    /// The real values (f32 `[batch, seqlen, heads, d]`): what the FP8 kernel computes with.
    pub fn dequantize(&self) -> Tensor {
        let [_, s, h, d] = self.shape;
        let v = self
            .data
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let bi = i / (s * h * d);
                let hi = (i / d) % h;
                e4m3_to_f32(c) * self.descale_at(bi, hi)
            })
            .collect();
        Tensor::from_f32(v, &self.shape).expect("shape matches the data")
    }
}

/// The seeded random-sign normalised Walsh–Hadamard transform over vectors of length `d`
/// (a power of two): `apply` computes `H · diag(signs) · x / sqrt(d)`, `apply_inverse` its
/// transpose (= inverse).
#[derive(Clone, Debug, PartialEq)]
pub struct RandomHadamard {
    signs: Vec<f32>,
}

impl RandomHadamard {
    pub fn new(d: usize, seed: u64) -> Result<RandomHadamard> {
        if d == 0 || !d.is_power_of_two() {
            return Err(Error::invalid(
                "head_dim",
                d,
                "a power of two (Hadamard transform)",
            ));
        }
        // splitmix64: one sign per coordinate.
        let mut z = seed;
        let signs = (0..d)
            .map(|_| {
                z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut x = z;
                x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                x ^= x >> 31;
                if x & 1 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        Ok(RandomHadamard { signs })
    }

    pub fn dim(&self) -> usize {
        self.signs.len()
    }
    pub fn signs(&self) -> &[f32] {
        &self.signs
    }

    /// In-place unnormalised fast Walsh–Hadamard transform (Sylvester order), in f64.
    fn fwht(x: &mut [f64]) {
        let n = x.len();
        let mut h = 1;
        while h < n {
            for i in (0..n).step_by(2 * h) {
                for j in i..i + h {
                    let (a, b) = (x[j], x[j + h]);
                    x[j] = a + b;
                    x[j + h] = a - b;
                }
            }
            h *= 2;
        }
    }

    /// `x ← H · diag(signs) · x / sqrt(d)`.
    pub fn apply(&self, x: &mut [f32]) {
        let n = self.signs.len();
        let mut t: Vec<f64> = x
            .iter()
            .zip(&self.signs)
            .map(|(a, s)| (a * s) as f64)
            .collect();
        Self::fwht(&mut t);
        let k = 1.0 / (n as f64).sqrt();
        for (o, v) in x.iter_mut().zip(t) {
            *o = (v * k) as f32;
        }
    }

    /// `x ← diag(signs) · H · x / sqrt(d)` (undoes [`apply`](Self::apply)).
    pub fn apply_inverse(&self, x: &mut [f32]) {
        let n = self.signs.len();
        let mut t: Vec<f64> = x.iter().map(|&a| a as f64).collect();
        Self::fwht(&mut t);
        let k = 1.0 / (n as f64).sqrt();
        for ((o, v), s) in x.iter_mut().zip(t).zip(&self.signs) {
            *o = (v * k) as f32 * s;
        }
    }

    /// A copy of `t` (`[..., d]`, f32 result) with every length-d row transformed.
    pub fn apply_rows(&self, t: &Tensor) -> Result<Tensor> {
        let sh = t.shape().to_vec();
        if sh.last() != Some(&self.dim()) {
            return Err(Error::invalid(
                "tensor",
                format!("shape {sh:?}"),
                format!("last dim {} (the transform's size)", self.dim()),
            ));
        }
        let mut v = t.contiguous().to_f32_vec();
        if self.dim() > 0 {
            for row in v.chunks_exact_mut(self.dim()) {
                self.apply(row);
            }
        }
        Tensor::from_f32(v, &sh)
    }
}

/// Incoherent processing: the same seeded random Hadamard transform applied to every row of
/// `q` and `k` (`[batch, seqlen, heads, d]`, d a power of two), so that `q kᵀ` is unchanged.
/// Returns f32 tensors, ready for [`Fp8Tensor::quantize`].
pub fn incoherent_qk(q: &Tensor, k: &Tensor, seed: u64) -> Result<(Tensor, Tensor)> {
    let d = *q.shape().last().unwrap_or(&0);
    if k.shape().last() != Some(&d) {
        return Err(Error::invalid(
            "k",
            format!("shape {:?}", k.shape()),
            format!("head dim {d} like q"),
        ));
    }
    let m = RandomHadamard::new(d, seed)?;
    Ok((m.apply_rows(q)?, m.apply_rows(k)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_known_values() {
        assert_eq!(e4m3_from_f32(0.0), 0x00);
        assert_eq!(e4m3_from_f32(-0.0), 0x80);
        assert_eq!(e4m3_from_f32(1.0), 0x38);
        assert_eq!(e4m3_from_f32(-2.0), 0xc0);
        assert_eq!(e4m3_from_f32(448.0), 0x7e);
        assert_eq!(e4m3_from_f32(1e6), 0x7e);
        assert_eq!(e4m3_from_f32(-1e6), 0xfe);
        assert_eq!(e4m3_from_f32(f32::NAN), 0x7f);
        assert_eq!(e4m3_from_f32(2f32.powi(-9)), 0x01);
        assert_eq!(e4m3_from_f32(2f32.powi(-6)), 0x08);
        assert_eq!(e4m3_from_f32(1.125), 0x39);
        // Ties to even: 1.0625 lies halfway between 1.0 (even) and 1.125.
        assert_eq!(e4m3_from_f32(1.0625), 0x38);
        assert_eq!(e4m3_from_f32(1.1875), 0x3a);
        // Below half the smallest subnormal: 0.
        assert_eq!(e4m3_from_f32(2f32.powi(-11)), 0x00);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x3c), 1.5);
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
    }

    #[test]
    fn e4m3_round_trip_and_nearest() {
        for c in 0u16..=255 {
            let c = c as u8;
            if c & 0x7f == 0x7f {
                continue;
            }
            assert_eq!(e4m3_from_f32(e4m3_to_f32(c)), c, "code {c:#x}");
        }
        // Every encoding is a nearest representable value.
        let finite: Vec<f32> = (0u16..=255)
            .map(|c| e4m3_to_f32(c as u8))
            .filter(|v| v.is_finite())
            .collect();
        let mut x = -500.0f32;
        while x < 500.0 {
            let got = e4m3_to_f32(e4m3_from_f32(x));
            let best = finite
                .iter()
                .map(|v| (v - x.clamp(-448.0, 448.0)).abs())
                .fold(f32::INFINITY, f32::min);
            assert!(
                (got - x.clamp(-448.0, 448.0)).abs() <= best,
                "x={x} got {got}"
            );
            x += 0.37;
        }
    }

    fn sample(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut z = seed;
        let v = (0..n)
            .map(|_| {
                z = z
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((z >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_f32(v, shape).unwrap()
    }

    #[test]
    fn quantize_per_tensor_and_per_head() {
        let mut t = sample(&[2, 5, 3, 16], 1).to_f32_vec();
        t[7] = 9.0; // batch 0, head 0 outlier
        let t = Tensor::from_f32(t, &[2, 5, 3, 16]).unwrap();
        let pt = Fp8Tensor::quantize(&t, Fp8Scaling::PerTensor).unwrap();
        assert_eq!(pt.descale().len(), 1);
        assert!((pt.descale()[0] - 9.0 / 448.0).abs() < 1e-7);
        assert_eq!(pt.data()[7], 0x7e); // the amax maps to 448
        let ph = Fp8Tensor::quantize(&t, Fp8Scaling::PerHead).unwrap();
        assert_eq!(ph.descale().len(), 6);
        assert!((ph.descale_at(0, 0) - 9.0 / 448.0).abs() < 1e-7);
        assert!(ph.descale_at(1, 2) < 1.0 / 448.0 + 1e-9);
        // Dequantized values are within e4m3's half-ulp (relative 1/16) of the input, or of
        // the subnormal step, and per head is at least as accurate as per tensor here.
        let x = t.to_f32_vec();
        let err = |q: &Fp8Tensor| -> f64 {
            let y = q.dequantize().to_f32_vec();
            let mut num = 0.0;
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                let bi = i / (5 * 3 * 16);
                let hi = (i / 16) % 3;
                let step = q.descale_at(bi, hi) * 2f32.powi(-9);
                assert!(
                    (a - b).abs() <= a.abs() / 16.0 + step,
                    "element {i}: {a} vs {b}"
                );
                num += ((a - b) as f64).powi(2);
            }
            num.sqrt()
        };
        assert!(err(&ph) <= err(&pt));
        // Zero tensor: descale 1, all codes 0.
        let z = Tensor::from_f32(vec![0.0; 32], &[1, 2, 1, 16]).unwrap();
        let qz = Fp8Tensor::quantize(&z, Fp8Scaling::PerHead).unwrap();
        assert!(qz.data().iter().all(|&c| c == 0) && qz.descale() == [1.0]);
        // Non-finite inputs and wrong ranks are errors.
        let bad = Tensor::from_f32(vec![f32::NAN; 16], &[1, 1, 1, 16]).unwrap();
        assert!(Fp8Tensor::quantize(&bad, Fp8Scaling::PerTensor).is_err());
        let r3 = Tensor::from_f32(vec![0.0; 16], &[1, 1, 16]).unwrap();
        assert!(Fp8Tensor::quantize(&r3, Fp8Scaling::PerTensor).is_err());
        assert!(Fp8Tensor::from_parts(vec![0; 16], [1, 1, 1, 16], vec![1.0, 2.0]).is_err());
        assert!(Fp8Tensor::from_parts(vec![0; 16], [1, 1, 1, 16], vec![0.0]).is_err());
    }

    #[test]
    fn hadamard_known_values_and_orthogonality() {
        // d = 4, all signs applied: H4 rows (1,1,1,1), (1,-1,1,-1), (1,1,-1,-1), (1,-1,-1,1) / 2.
        let m = RandomHadamard::new(4, 3).unwrap();
        for i in 0..4 {
            let mut e = [0f32; 4];
            e[i] = 1.0;
            m.apply(&mut e);
            let s = m.signs()[i];
            for (j, v) in e.iter().enumerate() {
                let h = if (i & j).count_ones() % 2 == 0 {
                    0.5
                } else {
                    -0.5
                };
                assert!((v - s * h).abs() < 1e-7, "column {i} row {j}: {v}");
            }
        }
        assert!(RandomHadamard::new(96, 1).is_err());
        assert!(RandomHadamard::new(0, 1).is_err());
        // Orthogonal: norms and dot products preserved, inverse undoes it, at d = 128.
        let d = 128;
        let m = RandomHadamard::new(d, 42).unwrap();
        assert!(m.signs().iter().any(|&s| s < 0.0) && m.signs().iter().any(|&s| s > 0.0));
        let a = sample(&[d], 5).to_f32_vec();
        let b = sample(&[d], 6).to_f32_vec();
        let (mut ta, mut tb) = (a.clone(), b.clone());
        m.apply(&mut ta);
        m.apply(&mut tb);
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| (p * q) as f64).sum::<f64>();
        assert!((dot(&a, &b) - dot(&ta, &tb)).abs() < 1e-5);
        assert!((dot(&a, &a) - dot(&ta, &ta)).abs() < 1e-5);
        assert!(ta.iter().zip(&a).any(|(x, y)| (x - y).abs() > 1e-3));
        m.apply_inverse(&mut ta);
        assert!(ta.iter().zip(&a).all(|(x, y)| (x - y).abs() < 1e-6));
    }

    #[test]
    fn incoherent_qk_preserves_scores_and_spreads_outliers() {
        let (b, s, h, d) = (1, 6, 2, 64);
        let mut qv = sample(&[b, s, h, d], 7).to_f32_vec();
        let kv0 = sample(&[b, s, h, d], 8).to_f32_vec();
        for r in 0..b * s * h {
            qv[r * d + 3] *= 50.0; // an outlier channel
        }
        let q = Tensor::from_f32(qv.clone(), &[b, s, h, d]).unwrap();
        let k = Tensor::from_f32(kv0.clone(), &[b, s, h, d]).unwrap();
        let (tq, tk) = incoherent_qk(&q, &k, 99).unwrap();
        let (tqv, tkv) = (tq.to_f32_vec(), tk.to_f32_vec());
        for i in 0..b * s * h {
            for j in 0..b * s * h {
                let dot = |x: &[f32], y: &[f32]| {
                    x.iter().zip(y).map(|(p, q)| (p * q) as f64).sum::<f64>()
                };
                let want = dot(&qv[i * d..(i + 1) * d], &kv0[j * d..(j + 1) * d]);
                let got = dot(&tqv[i * d..(i + 1) * d], &tkv[j * d..(j + 1) * d]);
                assert!(
                    (want - got).abs() < 1e-4 * (1.0 + want.abs()),
                    "{want} vs {got}"
                );
            }
        }
        let amax = |v: &[f32]| v.iter().fold(0f32, |a, x| a.max(x.abs()));
        assert!(amax(&tqv) < amax(&qv) / 3.0, "outlier spread out");
        let bad = Tensor::from_f32(vec![0.0; 96], &[1, 1, 1, 96]).unwrap();
        assert!(incoherent_qk(&bad, &bad, 1).is_err());
    }
}
