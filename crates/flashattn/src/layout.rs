//! Shapes, strides, varlen offsets and GQA grouping, validated once at the API boundary.
//!
//! After [`Problem::new`] succeeds, no backend re-checks user input: it walks
//! [`Problem::seqs`] and uses the row/element offsets computed here.

use crate::error::{Error, Result};
use crate::math::{Dropout, Mask};
use crate::options::AttnOptions;
use crate::tensor::{DType, Tensor};

/// Largest head dimension any backend accepts (the CPU limit; CUDA has its own list).
pub const MAX_HEAD_DIM_CPU: usize = 512;

/// One sequence of the batch: where its rows start and how long it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seq {
    /// First query row in the packed (varlen) layout; 0 for dense (the batch stride applies).
    pub q_start: usize,
    /// Query length.
    pub sq: usize,
    /// First key row in the packed (varlen) layout; 0 for dense (the batch stride applies).
    pub k_start: usize,
    /// Key length.
    pub sk: usize,
}

/// Element strides of a `[.., rows, heads, d]` tensor: how to reach row `r`, head `h` of
/// sequence `b`. For dense tensors `batch` is the batch stride; for varlen it is unused (0)
/// because `Seq::q_start`/`k_start` are absolute packed rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowStrides {
    pub offset: usize,
    pub batch: usize,
    pub row: usize,
    pub head: usize,
}

impl RowStrides {
    /// Element index of `[b, row, h, 0]` where `row` is the row inside sequence `b`
    /// (`start` = the sequence's packed start row, used for varlen).
    #[inline]
    pub fn at(&self, b: usize, start: usize, row: usize, h: usize) -> usize {
        self.offset + b * self.batch + (start + row) * self.row + h * self.head
    }
}

/// A validated attention problem: every shape fact a backend needs, nothing it must re-check.
#[derive(Clone, Debug)]
pub struct Problem {
    pub dtype: DType,
    pub batch: usize,
    pub heads_q: usize,
    pub heads_k: usize,
    pub head_dim: usize,
    pub varlen: bool,
    pub seqs: Vec<Seq>,
    /// Longest query / key sequence.
    pub max_sq: usize,
    pub max_sk: usize,
    /// Total rows (packed) of q and of k.
    pub total_q: usize,
    pub total_k: usize,
    pub q: RowStrides,
    pub k: RowStrides,
    pub v: RowStrides,
    /// Softmax scale (resolved default).
    pub scale: f32,
    pub mask: Mask,
    pub softcap: f32,
    pub dropout: Option<Dropout>,
    /// Shape of `q` (and of `out`).
    pub q_shape: Vec<usize>,
    pub k_shape: Vec<usize>,
}

/// Attention inputs: `q`, `k`, `v` and, for variable-length batches, the `cu_seqlens`.
#[derive(Clone, Copy, Debug)]
pub struct Qkv<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    /// `(cu_seqlens_q, cu_seqlens_k)`, each of length `batch + 1`.
    pub cu_seqlens: Option<(&'a [i32], &'a [i32])>,
}

impl<'a> Qkv<'a> {
    /// Dense inputs: `q [batch, seqlen_q, heads_q, d]`, `k, v [batch, seqlen_k, heads_k, d]`.
    pub fn dense(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> Self {
        Qkv {
            q,
            k,
            v,
            cu_seqlens: None,
        }
    }
    /// Packed inputs: `q [total_q, heads_q, d]`, `k, v [total_k, heads_k, d]`.
    pub fn varlen(
        q: &'a Tensor,
        k: &'a Tensor,
        v: &'a Tensor,
        cu_seqlens_q: &'a [i32],
        cu_seqlens_k: &'a [i32],
    ) -> Self {
        Qkv {
            q,
            k,
            v,
            cu_seqlens: Some((cu_seqlens_q, cu_seqlens_k)),
        }
    }
}

fn check_cu(name: &str, cu: &[i32], total: usize) -> Result<()> {
    if cu.is_empty() {
        return Err(Error::invalid(
            name,
            "an empty array",
            "batch + 1 offsets starting at 0",
        ));
    }
    if cu[0] != 0 {
        return Err(Error::invalid(name, format!("first entry {}", cu[0]), "0"));
    }
    for w in cu.windows(2) {
        if w[1] < w[0] {
            return Err(Error::invalid(
                name,
                format!("decreasing offsets {} -> {}", w[0], w[1]),
                "non-decreasing offsets",
            ));
        }
    }
    let last = *cu.last().unwrap() as usize;
    if last != total {
        return Err(Error::invalid(
            name,
            format!("last entry {last}"),
            format!("the packed row count {total}"),
        ));
    }
    Ok(())
}

/// Row strides of a `[batch, rows, heads, d]` (dense) or `[total, heads, d]` (varlen) tensor.
pub(crate) fn row_strides(t: &Tensor, varlen: bool) -> RowStrides {
    let s = t.strides();
    if varlen {
        RowStrides {
            offset: t.offset(),
            batch: 0,
            row: s[0],
            head: s[1],
        }
    } else {
        RowStrides {
            offset: t.offset(),
            batch: s[0],
            row: s[1],
            head: s[2],
        }
    }
}

impl Problem {
    /// Validates inputs and options together; the one gate all backends share.
    pub fn new(inputs: &Qkv<'_>, opts: &AttnOptions) -> Result<Problem> {
        opts.validate()?;
        let (q, k, v) = (inputs.q, inputs.k, inputs.v);
        let varlen = inputs.cu_seqlens.is_some();
        let rank = if varlen { 3 } else { 4 };
        let layout = if varlen {
            "[total, heads, head_dim]"
        } else {
            "[batch, seqlen, heads, head_dim]"
        };
        for (name, t) in [("q", q), ("k", k), ("v", v)] {
            if t.shape().len() != rank {
                return Err(Error::invalid(
                    name,
                    format!("shape {:?}", t.shape()),
                    format!("rank {rank} {layout}"),
                ));
            }
            if t.numel() > 0 && t.shape()[rank - 1] > 1 && t.strides()[rank - 1] != 1 {
                return Err(Error::invalid(
                    name,
                    format!("last-dim stride {}", t.strides()[rank - 1]),
                    "a contiguous last dimension (stride 1)",
                ));
            }
        }
        if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
            return Err(Error::invalid(
                "k/v dtype",
                format!("q {}, k {}, v {}", q.dtype(), k.dtype(), v.dtype()),
                "q, k and v of one dtype",
            ));
        }
        if k.shape() != v.shape() {
            return Err(Error::invalid(
                "v",
                format!("shape {:?}", v.shape()),
                format!("the shape of k {:?}", k.shape()),
            ));
        }
        let qs = q.shape();
        let ks = k.shape();
        let d = qs[rank - 1];
        if ks[rank - 1] != d {
            return Err(Error::invalid(
                "k",
                format!("head_dim {}", ks[rank - 1]),
                format!("head_dim {d} as in q"),
            ));
        }
        if d == 0 || d > MAX_HEAD_DIM_CPU {
            return Err(Error::invalid(
                "head_dim",
                d,
                format!("1..={MAX_HEAD_DIM_CPU}"),
            ));
        }
        let heads_q = qs[rank - 2];
        let heads_k = ks[rank - 2];
        if heads_k == 0 || heads_q % heads_k != 0 {
            return Err(Error::invalid(
                "heads",
                format!("heads_q {heads_q}, heads_k {heads_k}"),
                "heads_q a multiple of heads_k (heads_k > 0)",
            ));
        }

        let (batch, seqs, total_q, total_k) = if let Some((cq, ck)) = inputs.cu_seqlens {
            check_cu("cu_seqlens_q", cq, qs[0])?;
            check_cu("cu_seqlens_k", ck, ks[0])?;
            if cq.len() != ck.len() {
                return Err(Error::invalid(
                    "cu_seqlens_k",
                    format!("length {}", ck.len()),
                    format!("length {} as cu_seqlens_q (batch + 1)", cq.len()),
                ));
            }
            let seqs: Vec<Seq> = (0..cq.len() - 1)
                .map(|b| Seq {
                    q_start: cq[b] as usize,
                    sq: (cq[b + 1] - cq[b]) as usize,
                    k_start: ck[b] as usize,
                    sk: (ck[b + 1] - ck[b]) as usize,
                })
                .collect();
            (cq.len() - 1, seqs, qs[0], ks[0])
        } else {
            if ks[0] != qs[0] {
                return Err(Error::invalid(
                    "k",
                    format!("batch {}", ks[0]),
                    format!("batch {} as in q", qs[0]),
                ));
            }
            let (b, sq, sk) = (qs[0], qs[1], ks[1]);
            let seqs = (0..b)
                .map(|_| Seq {
                    q_start: 0,
                    sq,
                    k_start: 0,
                    sk,
                })
                .collect();
            (b, seqs, b * sq, b * sk)
        };

        if let Some(a) = &opts.alibi_slopes {
            let want = if a.per_batch {
                batch * heads_q
            } else {
                heads_q
            };
            if a.values.len() != want {
                let form = if a.per_batch {
                    format!("[batch={batch}, heads_q={heads_q}]")
                } else {
                    format!("[heads_q={heads_q}]")
                };
                return Err(Error::invalid(
                    "alibi_slopes",
                    format!("{} values", a.values.len()),
                    format!("{want} values, shape {form}"),
                ));
            }
        }

        let (left, right) = opts.effective_window();
        Ok(Problem {
            dtype: q.dtype(),
            batch,
            heads_q,
            heads_k,
            head_dim: d,
            varlen,
            max_sq: seqs.iter().map(|s| s.sq).max().unwrap_or(0),
            max_sk: seqs.iter().map(|s| s.sk).max().unwrap_or(0),
            seqs,
            total_q,
            total_k,
            q: row_strides(q, varlen),
            k: row_strides(k, varlen),
            v: row_strides(v, varlen),
            scale: opts.scale.unwrap_or(1.0 / (d as f32).sqrt()),
            mask: Mask { left, right },
            softcap: opts.softcap,
            dropout: Dropout::new(opts.dropout_p, opts.seed, opts.offset),
            q_shape: qs.to_vec(),
            k_shape: ks.to_vec(),
        })
    }

    /// Query heads per key/value head (1 = MHA, heads_q = MQA).
    pub fn group(&self) -> usize {
        self.heads_q / self.heads_k
    }

    /// Shape of the LSE: dense `[batch, heads_q, seqlen_q]`, varlen `[heads_q, total_q]`.
    pub fn lse_shape(&self) -> Vec<usize> {
        if self.varlen {
            vec![self.heads_q, self.total_q]
        } else {
            vec![self.batch, self.heads_q, self.q_shape[1]]
        }
    }

    /// Element strides (batch, head) of a contiguous LSE ([`lse_shape`](Self::lse_shape));
    /// varlen has no batch dim (its rows are `total_q` long per head), so its batch stride is 0.
    pub fn lse_strides(&self) -> (usize, usize) {
        if self.varlen {
            (0, self.total_q)
        } else {
            (self.heads_q * self.q_shape[1], self.q_shape[1])
        }
    }

    /// Index into a contiguous LSE of row `i` of sequence `b`, query head `h`.
    #[inline]
    pub fn lse_index(&self, b: usize, h: usize, i: usize) -> usize {
        if self.varlen {
            h * self.total_q + self.seqs[b].q_start + i
        } else {
            (b * self.heads_q + h) * self.q_shape[1] + i
        }
    }

    /// Index into a contiguous `out`/`dq` (shape of q) of `[b, i, h, 0]`.
    #[inline]
    pub fn out_index(&self, b: usize, h: usize, i: usize) -> usize {
        let row = if self.varlen {
            self.seqs[b].q_start + i
        } else {
            b * self.q_shape[1] + i
        };
        (row * self.heads_q + h) * self.head_dim
    }

    /// Index into a contiguous `dk`/`dv` (shape of k) of `[b, j, hk, 0]`.
    #[inline]
    pub fn kv_grad_index(&self, b: usize, hk: usize, j: usize) -> usize {
        let row = if self.varlen {
            self.seqs[b].k_start + j
        } else {
            b * self.k_shape[1] + j
        };
        (row * self.heads_k + hk) * self.head_dim
    }

    /// Forward FLOPs by SPEC §4's convention (causal halved only when sq == sk).
    pub fn forward_flops(&self) -> f64 {
        let mut f = 0.0;
        for s in &self.seqs {
            let mut x = 4.0 * s.sq as f64 * s.sk as f64 * self.head_dim as f64;
            if self.mask.right == Some(0) && self.mask.left.is_none() && s.sq == s.sk {
                x *= 0.5;
            }
            f += x;
        }
        f * self.heads_q as f64
    }

    /// Checks the extra tensors of the backward pass against this problem.
    pub fn check_backward(&self, out: &Tensor, lse: &Tensor, dout: &Tensor) -> Result<()> {
        for (name, t) in [("out", out), ("dout", dout)] {
            if t.shape() != self.q_shape.as_slice() {
                return Err(Error::invalid(
                    name,
                    format!("shape {:?}", t.shape()),
                    format!("the shape of q {:?}", self.q_shape),
                ));
            }
            let r = t.shape().len();
            if t.numel() > 0 && t.strides()[r - 1] != 1 && t.shape()[r - 1] > 1 {
                return Err(Error::invalid(
                    name,
                    format!("last-dim stride {}", t.strides()[r - 1]),
                    "a contiguous last dimension (stride 1)",
                ));
            }
        }
        if dout.dtype() != self.dtype {
            return Err(Error::invalid(
                "dout",
                format!("dtype {}", dout.dtype()),
                format!("dtype {} as q", self.dtype),
            ));
        }
        if lse.dtype() != DType::F32 || lse.shape() != self.lse_shape().as_slice() {
            return Err(Error::invalid(
                "lse",
                format!("{} {:?}", lse.dtype(), lse.shape()),
                format!("f32 {:?}", self.lse_shape()),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::AttnOptions;
    use crate::tensor::{DType, Tensor};

    /// The strides the kernels take for the LSE address the element `lse_index` names.
    #[test]
    fn lse_strides_agree_with_lse_index() {
        let t = |shape: &[usize]| Tensor::zeros(DType::F32, shape);
        let (q, k) = (t(&[3, 5, 4, 8]), t(&[3, 7, 2, 8]));
        let p = Problem::new(&Qkv::dense(&q, &k, &k), &AttnOptions::new()).unwrap();
        let (sb, sh) = p.lse_strides();
        assert_eq!((sb, sh), (20, 5));
        for (b, h, i) in [(0, 0, 0), (2, 3, 4), (1, 2, 3)] {
            assert_eq!(p.lse_index(b, h, i), b * sb + h * sh + i);
        }
        let (q, kv) = (t(&[9, 4, 8]), t(&[11, 2, 8]));
        let (cq, ck) = ([0, 2, 9], [0, 6, 11]);
        let p = Problem::new(&Qkv::varlen(&q, &kv, &kv, &cq, &ck), &AttnOptions::new()).unwrap();
        let (sb, sh) = p.lse_strides();
        assert_eq!((sb, sh), (0, 9));
        for (b, h, i) in [(0, 0, 1), (1, 3, 6), (1, 1, 0)] {
            assert_eq!(p.lse_index(b, h, i), h * sh + p.seqs[b].q_start + i);
        }
    }
}
