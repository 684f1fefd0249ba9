//! CPU forward: one rayon task per (sequence, query tile), looping over the query heads and the
//! visible key tiles with an online softmax.

use super::tile::{self, CpuElem, Mat};
use super::{query_range_for_keys, tile_key_range, transform_row, Tiles};
use crate::error::Result;
use crate::layout::{Problem, Qkv};
use crate::options::AttnOptions;
use crate::tensor::Tensor;
use crate::ForwardOutput;
use rayon::prelude::*;

/// A query tile: sequence `b`, rows `i0 .. i0 + rows`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QTile {
    pub b: usize,
    pub i0: usize,
    pub rows: usize,
}

/// Every query tile, in the row order of a contiguous q-shaped tensor.
pub(crate) fn q_tiles(p: &Problem, bq: usize) -> Vec<QTile> {
    let mut v = Vec::new();
    for (b, s) in p.seqs.iter().enumerate() {
        let mut i0 = 0;
        while i0 < s.sq {
            let rows = bq.min(s.sq - i0);
            v.push(QTile { b, i0, rows });
            i0 += rows;
        }
    }
    v
}

/// Splits `buf` into consecutive chunks of `rows * row_len` elements for each tile.
pub(crate) fn split_chunks<X>(
    mut buf: &mut [X],
    sizes: impl Iterator<Item = usize>,
) -> Vec<&mut [X]> {
    let mut v = Vec::new();
    for n in sizes {
        let (a, b) = buf.split_at_mut(n);
        v.push(a);
        buf = b;
    }
    v
}

pub(crate) fn run<T: CpuElem>(
    p: &Problem,
    inputs: &Qkv<'_>,
    opts: &AttnOptions,
    tiles: Tiles,
) -> Result<ForwardOutput> {
    let (hq, d) = (p.heads_q, p.head_dim);
    let q = T::slice(inputs.q.storage());
    let k = T::slice(inputs.k.storage());
    let v = T::slice(inputs.v.storage());
    let n_out: usize = p.q_shape.iter().product();
    let mut out = vec![T::zero(); n_out];
    let mut lse = vec![f32::NEG_INFINITY; p.lse_shape().iter().product()];

    let tl = q_tiles(p, tiles.bq);
    let chunks = split_chunks(&mut out, tl.iter().map(|t| t.rows * hq * d));
    let lse_parts: Vec<Vec<f32>> = tl
        .par_iter()
        .zip(chunks)
        .map(|(t, chunk)| {
            let mut ws = Work::new(tiles, d);
            let mut l = vec![f32::NEG_INFINITY; hq * t.rows];
            for h in 0..hq {
                fwd_tile(
                    p,
                    opts,
                    q,
                    k,
                    v,
                    *t,
                    h,
                    &mut ws,
                    chunk,
                    &mut l[h * t.rows..][..t.rows],
                );
            }
            l
        })
        .collect();
    for (t, l) in tl.iter().zip(&lse_parts) {
        for h in 0..hq {
            for r in 0..t.rows {
                lse[p.lse_index(t.b, h, t.i0 + r)] = l[h * t.rows + r];
            }
        }
    }
    Ok(ForwardOutput {
        out: Tensor::new(T::storage(out), &p.q_shape)?,
        lse: Tensor::from_f32(lse, &p.lse_shape())?,
    })
}

/// Per-task scratch buffers (O(tile)).
pub(crate) struct Work {
    pub t: Tiles,
    pub qb: Vec<f32>,
    pub kb: Vec<f32>,
    pub vb: Vec<f32>,
    pub sb: Vec<f32>,
    pub acc: Vec<f32>,
    pub m: Vec<f32>,
    pub l: Vec<f32>,
}

impl Work {
    pub fn new(t: Tiles, d: usize) -> Work {
        Work {
            t,
            qb: vec![0.0; t.bq * d],
            kb: vec![0.0; t.bk * d],
            vb: vec![0.0; t.bk * d],
            sb: vec![0.0; t.bq * t.bk],
            acc: vec![0.0; t.bq * d],
            m: vec![0.0; t.bq],
            l: vec![0.0; t.bq],
        }
    }
}

/// One (tile, head): writes rows of `out` into `chunk` (rows × heads_q × d, contiguous) and
/// the LSE of the rows into `lse`.
#[allow(clippy::too_many_arguments)]
fn fwd_tile<T: CpuElem>(
    p: &Problem,
    opts: &AttnOptions,
    q: &[T],
    k: &[T],
    v: &[T],
    t: QTile,
    h: usize,
    w: &mut Work,
    chunk: &mut [T],
    lse: &mut [f32],
) {
    let (d, hq) = (p.head_dim, p.heads_q);
    let seq = p.seqs[t.b];
    let (sq, sk) = (seq.sq, seq.sk);
    let hk = h / p.group();
    let rows = t.rows;
    let bk = w.t.bk;
    let slope = opts
        .alibi_slopes
        .as_ref()
        .map(|a| a.slope(t.b, h, p.heads_q));

    let Some((klo, khi)) = tile_key_range(&p.mask, t.i0, rows, sq, sk) else {
        for r in 0..rows {
            chunk[(r * hq + h) * d..][..d].fill(T::zero());
            lse[r] = f32::NEG_INFINITY;
        }
        return;
    };

    tile::load_rows(
        q,
        rows,
        d,
        |r| p.q.at(t.b, seq.q_start, t.i0 + r, h),
        p.scale,
        &mut w.qb,
    );
    w.acc[..rows * d].fill(0.0);
    w.m[..rows].fill(f32::NEG_INFINITY);
    w.l[..rows].fill(0.0);

    let mut j0 = klo;
    while j0 < khi {
        let jn = bk.min(khi - j0);
        let kv = tile::view(
            k,
            jn,
            d,
            p.k.at(t.b, seq.k_start, j0, hk),
            p.k.row,
            1.0,
            &mut w.kb,
        );
        let vv = tile::view(
            v,
            jn,
            d,
            p.v.at(t.b, seq.k_start, j0, hk),
            p.v.row,
            1.0,
            &mut w.vb,
        );
        // Only the rows ra..rb of this tile see a key of j0..j0+jn (key ranges are monotone
        // in the row): the others are skipped, their running state is unchanged.
        let (ia, ib) = query_range_for_keys(&p.mask, j0, j0 + jn, sq, sk);
        let ra = ia.clamp(t.i0, t.i0 + rows) - t.i0;
        let rb = ib.clamp(t.i0, t.i0 + rows) - t.i0;
        if ra >= rb {
            j0 += jn;
            continue;
        }
        // S = (scale·Q) Kᵀ
        tile::matmul(
            rb - ra,
            jn,
            d,
            &mut w.sb[ra * bk..],
            bk,
            Mat::rows(&w.qb[ra * d..], d),
            kv.t(),
            false,
        );
        for r in ra..rb {
            let i = t.i0 + r;
            let srow = &mut w.sb[r * bk..r * bk + jn];
            transform_row(p, slope, i, j0, sq, sk, srow, &mut []);
            let mx = tile::max_of(srow);
            let m_old = w.m[r];
            let m_new = m_old.max(mx);
            if m_new == f32::NEG_INFINITY {
                srow.fill(0.0);
                continue;
            }
            let sum = tile::exp_sub_sum(srow, m_new);
            let alpha = tile::exp_fast(m_old - m_new);
            w.l[r] = w.l[r] * alpha + sum;
            w.m[r] = m_new;
            if alpha != 1.0 {
                tile::scale_in_place(&mut w.acc[r * d..r * d + d], alpha);
            }
            if let Some(drop) = &p.dropout {
                super::dropout_row(drop, t.b, h, i, j0, srow, None);
            }
        }
        // O += P V
        tile::matmul(
            rb - ra,
            d,
            jn,
            &mut w.acc[ra * d..],
            d,
            Mat::rows(&w.sb[ra * bk..], bk),
            vv,
            true,
        );
        j0 += jn;
    }

    for r in 0..rows {
        let dst = &mut chunk[(r * hq + h) * d..][..d];
        let l = w.l[r];
        if l > 0.0 {
            let inv = 1.0 / l;
            for (o, a) in dst.iter_mut().zip(&w.acc[r * d..r * d + d]) {
                *o = T::from_f32(a * inv);
            }
            lse[r] = w.m[r] + l.ln();
        } else {
            dst.fill(T::zero());
            lse[r] = f32::NEG_INFINITY;
        }
    }
}
