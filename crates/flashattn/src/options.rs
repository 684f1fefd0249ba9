//! [`AttnOptions`]: every knob of SPEC §1, with a builder and one validation routine that every
//! backend (CPU, CUDA) and the CLI share.

use crate::error::{Error, Result};

/// ALiBi slopes: one per query head, or one per (batch, query head).
#[derive(Clone, Debug, PartialEq)]
pub struct AlibiSlopes {
    /// Row-major values, `[heads_q]` or `[batch, heads_q]`.
    pub values: Vec<f32>,
    /// True for the `[batch, heads_q]` form.
    pub per_batch: bool,
}

impl AlibiSlopes {
    /// Slopes shared by every batch entry, `[heads_q]`.
    pub fn per_head(values: Vec<f32>) -> Self {
        AlibiSlopes {
            values,
            per_batch: false,
        }
    }
    /// Slopes given per batch entry, `[batch, heads_q]` row-major.
    pub fn per_batch(values: Vec<f32>) -> Self {
        AlibiSlopes {
            values,
            per_batch: true,
        }
    }
    /// The slope for batch `b`, query head `h` (`heads_q` heads). Assumes validated shapes.
    #[inline]
    pub fn slope(&self, b: usize, h: usize, heads_q: usize) -> f32 {
        if self.per_batch {
            self.values[b * heads_q + h]
        } else {
            self.values[h]
        }
    }
}

/// Attention options (SPEC §1). Build with [`AttnOptions::new`] and the chained setters.
///
/// ```
/// use flashattn::AttnOptions;
/// let opts = AttnOptions::new().causal(true).softcap(30.0).dropout(0.1, 42);
/// assert!(opts.is_causal());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct AttnOptions {
    /// Softmax scale; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Causal mask, aligned bottom-right.
    pub causal: bool,
    /// Sliding window `(left, right)`; `-1` is unbounded on that side. `(-1, -1)` = no window.
    pub window: (i64, i64),
    /// `softcap · tanh(S / softcap)` when > 0; 0 disables it.
    pub softcap: f32,
    /// Optional ALiBi slopes.
    pub alibi_slopes: Option<AlibiSlopes>,
    /// Dropout probability in `[0, 1)`.
    pub dropout_p: f32,
    /// Dropout RNG seed.
    pub seed: u64,
    /// Dropout RNG offset (advance it between calls that share a seed).
    pub offset: u64,
    /// Bit-identical backward from run to run.
    pub deterministic: bool,
}

impl Default for AttnOptions {
    fn default() -> Self {
        AttnOptions {
            scale: None,
            causal: false,
            window: (-1, -1),
            softcap: 0.0,
            alibi_slopes: None,
            dropout_p: 0.0,
            seed: 0,
            offset: 0,
            deterministic: false,
        }
    }
}

impl AttnOptions {
    /// Plain softmax attention with the default scale.
    pub fn new() -> Self {
        Self::default()
    }
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    pub fn window(mut self, left: i64, right: i64) -> Self {
        self.window = (left, right);
        self
    }
    pub fn softcap(mut self, softcap: f32) -> Self {
        self.softcap = softcap;
        self
    }
    pub fn alibi(mut self, slopes: AlibiSlopes) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }
    pub fn dropout(mut self, p: f32, seed: u64) -> Self {
        self.dropout_p = p;
        self.seed = seed;
        self
    }
    pub fn dropout_offset(mut self, offset: u64) -> Self {
        self.offset = offset;
        self
    }
    pub fn deterministic(mut self, deterministic: bool) -> Self {
        self.deterministic = deterministic;
        self
    }
    pub fn is_causal(&self) -> bool {
        self.causal
    }

    /// Checks the option values that do not depend on tensor shapes.
    pub fn validate(&self) -> Result<()> {
        if let Some(s) = self.scale {
            if !s.is_finite() {
                return Err(Error::invalid("scale", s, "a finite number"));
            }
        }
        let (l, r) = self.window;
        if l < -1 || r < -1 {
            return Err(Error::invalid(
                "window",
                format!("({l}, {r})"),
                "each side >= 0, or -1 for unbounded",
            ));
        }
        if self.causal && r > 0 {
            return Err(Error::invalid(
                "window",
                format!("({l}, {r}) with causal"),
                "right side 0 or -1 when causal is set (causal is the window (left, 0))",
            ));
        }
        if !(self.softcap >= 0.0 && self.softcap.is_finite()) {
            return Err(Error::invalid(
                "softcap",
                self.softcap,
                "a finite value >= 0 (0 disables it)",
            ));
        }
        if !(self.dropout_p >= 0.0 && self.dropout_p < 1.0) {
            return Err(Error::invalid(
                "dropout",
                self.dropout_p,
                "a probability in [0, 1)",
            ));
        }
        if let Some(a) = &self.alibi_slopes {
            if let Some(bad) = a.values.iter().find(|x| !x.is_finite()) {
                return Err(Error::invalid("alibi_slopes", bad, "finite slopes"));
            }
        }
        Ok(())
    }

    /// The effective mask window `(left, right)`, `None` meaning unbounded, with causal folded in.
    pub fn effective_window(&self) -> (Option<usize>, Option<usize>) {
        let side = |x: i64| if x < 0 { None } else { Some(x as usize) };
        let (l, r) = self.window;
        let right = if self.causal { Some(0) } else { side(r) };
        (side(l), right)
    }
}
