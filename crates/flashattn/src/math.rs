//! The single definition of the per-element math every backend must reproduce exactly:
//! the mask (bottom-right aligned), the ALiBi bias, the softcap, and the dropout RNG.
//! The CUDA kernels mirror this file (`kernels/common/philox.cuh`, `mask.cuh`); tests pin both
//! to the same known vectors.

/// Which keys a query row may see. Row `i` of `sq` sits at key position `i + sk - sq`
/// (bottom-right alignment, as FlashAttention >= 2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mask {
    /// Keys at most `left` before the diagonal are kept; `None` = unbounded.
    pub left: Option<usize>,
    /// Keys at most `right` after the diagonal are kept; `None` = unbounded.
    pub right: Option<usize>,
}

impl Mask {
    pub const NONE: Mask = Mask {
        left: None,
        right: None,
    };

    /// True when nothing is masked.
    pub fn is_none(&self) -> bool {
        self.left.is_none() && self.right.is_none()
    }

    /// The half-open key range `[lo, hi)` kept for query row `i` (empty when `lo >= hi`).
    #[inline]
    pub fn key_range(&self, i: usize, sq: usize, sk: usize) -> (usize, usize) {
        let diag = i as i64 + sk as i64 - sq as i64;
        let lo = match self.left {
            Some(l) => (diag - l as i64).max(0),
            None => 0,
        };
        let hi = match self.right {
            Some(r) => (diag + r as i64 + 1).clamp(0, sk as i64),
            None => sk as i64,
        };
        (lo.min(sk as i64) as usize, hi as usize)
    }

    /// True when key `j` is visible from query row `i`.
    #[inline]
    pub fn keeps(&self, i: usize, j: usize, sq: usize, sk: usize) -> bool {
        let (lo, hi) = self.key_range(i, sq, sk);
        j >= lo && j < hi
    }
}

/// The ALiBi bias subtracted from the score: `slope · |i + sk − sq − j|`.
#[inline]
pub fn alibi_bias(slope: f32, i: usize, j: usize, sq: usize, sk: usize) -> f32 {
    let d = (i as i64 + sk as i64 - sq as i64 - j as i64).abs();
    slope * d as f32
}

/// `softcap · tanh(s / softcap)`, or `s` unchanged when `softcap == 0`.
#[inline]
pub fn apply_softcap(s: f32, softcap: f32) -> f32 {
    if softcap > 0.0 {
        softcap * (s / softcap).tanh()
    } else {
        s
    }
}

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Philox4x32-10 (Salmon et al., SC'11), the counter-based RNG also used by cuRAND and PyTorch.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        let p0 = (PHILOX_M0 as u64) * (c[0] as u64);
        let p1 = (PHILOX_M1 as u64) * (c[2] as u64);
        c = [
            ((p1 >> 32) as u32) ^ c[1] ^ k[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// The dropout mask of SPEC §1, a pure function of `(seed, offset, batch, head, i, j)`.
///
/// Definition (mirrored word for word by the CUDA kernels):
/// - Philox4x32-10 key `= [seed_lo, seed_hi ^ offset_hi]`,
/// - counter `= [j >> 2, i, head, batch ^ offset_lo]` (`i`, `j` are positions inside the
///   sequence, `head` the query head, `batch` the sequence index, varlen included),
/// - element `(i, j)` is kept when word `j & 3` of the output is `>= threshold`, with
///   `threshold = floor(p · 2^32)`; kept values are scaled by `1 / (1 − p)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    key: [u32; 2],
    offset_lo: u32,
    threshold: u32,
    /// `1 / (1 − p)`.
    pub scale: f32,
}

impl Dropout {
    /// `None` when `p == 0` (no dropout at all).
    pub fn new(p: f32, seed: u64, offset: u64) -> Option<Dropout> {
        if p <= 0.0 {
            return None;
        }
        let threshold = ((p as f64) * 4294967296.0).floor().min(4294967295.0) as u32;
        Some(Dropout {
            key: [seed as u32, ((seed >> 32) as u32) ^ ((offset >> 32) as u32)],
            offset_lo: offset as u32,
            threshold,
            scale: 1.0 / (1.0 - p),
        })
    }

    /// The Philox counter of element `(batch, head, i, j)`: `[j >> 2, i, head, batch ^ offset_lo]`.
    #[inline]
    pub fn counter(&self, batch: usize, head: usize, i: usize, j: usize) -> [u32; 4] {
        [
            (j >> 2) as u32,
            i as u32,
            head as u32,
            (batch as u32) ^ self.offset_lo,
        ]
    }

    /// The four Philox words that decide keys `4·(j/4) .. 4·(j/4)+3` of row `i`.
    #[inline]
    pub fn words(&self, batch: usize, head: usize, i: usize, j: usize) -> [u32; 4] {
        philox4x32_10(self.counter(batch, head, i, j), self.key)
    }

    /// True when element `(batch, head, i, j)` is kept.
    #[inline]
    pub fn keeps(&self, batch: usize, head: usize, i: usize, j: usize) -> bool {
        self.words(batch, head, i, j)[j & 3] >= self.threshold
    }

    /// The keep threshold on a Philox word.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }
    /// The Philox key.
    pub fn key(&self) -> [u32; 2] {
        self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors of Random123 (kat_vectors) for philox4x32_10.
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn mask_bottom_right() {
        let causal = Mask {
            left: None,
            right: Some(0),
        };
        // sq = 2, sk = 4: row 0 sits at key 2, row 1 at key 3.
        assert_eq!(causal.key_range(0, 2, 4), (0, 3));
        assert_eq!(causal.key_range(1, 2, 4), (0, 4));
        // sq = 4, sk = 2: rows 0 and 1 see nothing.
        assert_eq!(causal.key_range(0, 4, 2), (0, 0));
        assert_eq!(causal.key_range(1, 4, 2), (0, 0));
        assert_eq!(causal.key_range(2, 4, 2), (0, 1));
        let win = Mask {
            left: Some(1),
            right: Some(1),
        };
        assert_eq!(win.key_range(0, 3, 3), (0, 2));
        assert_eq!(win.key_range(1, 3, 3), (0, 3));
        assert_eq!(win.key_range(2, 3, 3), (1, 3));
        assert!(Mask::NONE.keeps(5, 0, 6, 1));
    }

    #[test]
    fn dropout_keep_rate_and_determinism() {
        let d = Dropout::new(0.3, 1234, 7).unwrap();
        let mut kept = 0usize;
        let n = 200 * 256;
        for i in 0..200 {
            for j in 0..256 {
                if d.keeps(1, 2, i, j) {
                    kept += 1;
                }
                assert_eq!(d.keeps(1, 2, i, j), d.keeps(1, 2, i, j));
            }
        }
        let rate = kept as f64 / n as f64;
        let sigma = (0.3f64 * 0.7 / n as f64).sqrt();
        assert!((rate - 0.7).abs() < 4.0 * sigma, "keep rate {rate}");
        assert!(Dropout::new(0.0, 1, 0).is_none());
    }
}
