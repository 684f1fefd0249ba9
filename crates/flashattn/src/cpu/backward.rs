//! CPU backward: `P` is recomputed tile by tile from the forward's LSE; nothing of size
//! `seqlen_q × seqlen_k` is stored.
//!
//! Determinism: every output element is produced by exactly one rayon task, in a fixed loop
//! order, so the result is bit-identical from run to run whatever the thread count or
//! scheduling (the `deterministic` option is therefore always honoured). Two parallel passes:
//!
//! 0. `D = rowsum(dO ∘ O)` per (sequence, query head, row), parallel over query tiles.
//! 1. dK, dV: one task per (sequence, key tile); it owns those rows of `dk`/`dv` for every
//!    key head, and loops over the query heads of each GQA group and over the query tiles that
//!    see the key tile: `S = Q Kᵀ`, `P = exp(S − LSE)`, `dP = dO Vᵀ`, `dS = P ∘ (dP − D)`,
//!    `dV += Pᵀ dO`, `dK += dSᵀ Q` (with the dropout keep mask and the softcap derivative).
//! 2. dQ: one task per (sequence, query tile); it recomputes `S`, `P`, `dP`, `dS` over the
//!    visible key tiles and accumulates `dQ += dS K`.
//!
//! Pass 2 repeats two of pass 1's products (7 tile products instead of 5), the price of
//! owning every output tile in exactly one task without atomics or order-dependent sums.

use super::forward::{q_tiles, split_chunks};
use super::tile::{self, CpuElem, Mat};
use super::{q_like_strides, query_range_for_keys, tile_key_range, transform_row, Tiles};
use crate::error::Result;
use crate::layout::{Problem, Qkv, RowStrides};
use crate::options::AttnOptions;
use crate::tensor::Tensor;
use crate::Gradients;
use rayon::prelude::*;

struct Ctx<'a, T> {
    p: &'a Problem,
    opts: &'a AttnOptions,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    dout: &'a [T],
    dos: RowStrides,
    /// Contiguous LSE and D, both in the LSE layout.
    lse: &'a [f32],
    dd: &'a [f32],
    tiles: Tiles,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn run<T: CpuElem>(
    p: &Problem,
    inputs: &Qkv<'_>,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    opts: &AttnOptions,
    tiles: Tiles,
) -> Result<Gradients> {
    let (hq, hk, d) = (p.heads_q, p.heads_k, p.head_dim);
    let n_q: usize = p.q_shape.iter().product();
    let n_k: usize = p.k_shape.iter().product();
    let mut dq = vec![T::zero(); n_q];
    let mut dk = vec![T::zero(); n_k];
    let mut dv = vec![T::zero(); n_k];

    let lse_v = lse.to_f32_vec();
    let o = T::slice(out.storage());
    let os = q_like_strides(out, p.varlen);
    let dos = q_like_strides(dout, p.varlen);
    let dov = T::slice(dout.storage());

    // Pass 0: D = rowsum(dO ∘ O).
    let qt = q_tiles(p, tiles.bq);
    let d_parts: Vec<Vec<f32>> = qt
        .par_iter()
        .map(|t| {
            let seq = p.seqs[t.b];
            let mut a = vec![0.0f32; d];
            let mut bb = vec![0.0f32; d];
            let mut res = vec![0.0f32; hq * t.rows];
            for h in 0..hq {
                for r in 0..t.rows {
                    tile::load_rows(
                        o,
                        1,
                        d,
                        |_| os.at(t.b, seq.q_start, t.i0 + r, h),
                        1.0,
                        &mut a,
                    );
                    tile::load_rows(
                        dov,
                        1,
                        d,
                        |_| dos.at(t.b, seq.q_start, t.i0 + r, h),
                        1.0,
                        &mut bb,
                    );
                    res[h * t.rows + r] = tile::dot(&a, &bb);
                }
            }
            res
        })
        .collect();
    let mut dd = vec![0.0f32; lse_v.len()];
    for (t, part) in qt.iter().zip(&d_parts) {
        for h in 0..hq {
            for r in 0..t.rows {
                dd[p.lse_index(t.b, h, t.i0 + r)] = part[h * t.rows + r];
            }
        }
    }
    drop(d_parts);

    let cx = Ctx {
        p,
        opts,
        q: T::slice(inputs.q.storage()),
        k: T::slice(inputs.k.storage()),
        v: T::slice(inputs.v.storage()),
        dout: dov,
        dos,
        lse: &lse_v,
        dd: &dd,
        tiles,
    };

    // Pass 1: dK, dV per (sequence, key tile).
    let mut kt = Vec::new();
    for (b, s) in p.seqs.iter().enumerate() {
        let mut j0 = 0;
        while j0 < s.sk {
            let jn = tiles.bk.min(s.sk - j0);
            kt.push((b, j0, jn));
            j0 += jn;
        }
    }
    let dk_chunks = split_chunks(&mut dk, kt.iter().map(|t| t.2 * hk * d));
    let dv_chunks = split_chunks(&mut dv, kt.iter().map(|t| t.2 * hk * d));
    kt.par_iter()
        .zip(dk_chunks.into_par_iter().zip(dv_chunks))
        .for_each(|(&(b, j0, jn), (dkc, dvc))| {
            let mut w = BwdWork::new(tiles, d);
            for g in 0..hk {
                kv_tile(&cx, b, g, j0, jn, &mut w, dkc, dvc);
            }
        });

    // Pass 2: dQ per (sequence, query tile).
    let dq_chunks = split_chunks(&mut dq, qt.iter().map(|t| t.rows * hq * d));
    qt.par_iter().zip(dq_chunks).for_each(|(t, dqc)| {
        let mut w = BwdWork::new(tiles, d);
        for h in 0..hq {
            q_tile(&cx, t.b, h, t.i0, t.rows, &mut w, dqc);
        }
    });

    Ok(Gradients {
        dq: Tensor::new(T::storage(dq), &p.q_shape)?,
        dk: Tensor::new(T::storage(dk), &p.k_shape)?,
        dv: Tensor::new(T::storage(dv), &p.k_shape)?,
    })
}

/// Per-task scratch (O(tile)).
struct BwdWork {
    qb: Vec<f32>,
    dob: Vec<f32>,
    kb: Vec<f32>,
    vb: Vec<f32>,
    sb: Vec<f32>,
    dpb: Vec<f32>,
    pdb: Vec<f32>,
    dtb: Vec<f32>,
    acc1: Vec<f32>,
    acc2: Vec<f32>,
    lr: Vec<f32>,
    dr: Vec<f32>,
}

impl BwdWork {
    fn new(t: Tiles, d: usize) -> BwdWork {
        let st = t.bq * t.bk;
        let rows = t.bq.max(t.bk);
        BwdWork {
            qb: vec![0.0; t.bq * d],
            dob: vec![0.0; t.bq * d],
            kb: vec![0.0; t.bk * d],
            vb: vec![0.0; t.bk * d],
            sb: vec![0.0; st],
            dpb: vec![0.0; st],
            pdb: vec![0.0; st],
            dtb: vec![0.0; st],
            acc1: vec![0.0; rows * d],
            acc2: vec![0.0; rows * d],
            lr: vec![0.0; t.bq],
            dr: vec![0.0; t.bq],
        }
    }
}

impl<T: CpuElem> Ctx<'_, T> {
    /// Loads the scaled Q tile, the dO tile, LSE and D of rows `i0..i0+rows`, head `h`.
    fn load_q_side(&self, b: usize, h: usize, i0: usize, rows: usize, w: &mut BwdWork) {
        let p = self.p;
        let d = p.head_dim;
        let seq = p.seqs[b];
        tile::load_rows(
            self.q,
            rows,
            d,
            |r| p.q.at(b, seq.q_start, i0 + r, h),
            p.scale,
            &mut w.qb,
        );
        let dos = self.dos;
        tile::load_rows(
            self.dout,
            rows,
            d,
            |r| dos.at(b, seq.q_start, i0 + r, h),
            1.0,
            &mut w.dob,
        );
        for r in 0..rows {
            let li = p.lse_index(b, h, i0 + r);
            w.lr[r] = self.lse[li];
            w.dr[r] = self.dd[li];
        }
    }

    fn load_k_side(&self, b: usize, g: usize, j0: usize, jn: usize, w: &mut BwdWork) {
        let p = self.p;
        let d = p.head_dim;
        let seq = p.seqs[b];
        tile::load_rows(
            self.k,
            jn,
            d,
            |r| p.k.at(b, seq.k_start, j0 + r, g),
            1.0,
            &mut w.kb,
        );
        tile::load_rows(
            self.v,
            jn,
            d,
            |r| p.v.at(b, seq.k_start, j0 + r, g),
            1.0,
            &mut w.vb,
        );
    }

    /// With Q side and K side loaded: `sb = P`, `pdb = dropout(P)` (only with dropout),
    /// `dpb = dS` (the gradient w.r.t. the scaled score, before the `scale` factor).
    #[allow(clippy::too_many_arguments)]
    fn recompute(
        &self,
        b: usize,
        h: usize,
        i0: usize,
        rows: usize,
        j0: usize,
        jn: usize,
        w: &mut BwdWork,
    ) {
        let p = self.p;
        let d = p.head_dim;
        let bk = self.tiles.bk;
        let seq = p.seqs[b];
        let (sq, sk) = (seq.sq, seq.sk);
        tile::matmul(
            rows,
            jn,
            d,
            &mut w.sb,
            bk,
            Mat::rows(&w.qb, d),
            Mat::trans(&w.kb, d),
            false,
        );
        tile::matmul(
            rows,
            jn,
            d,
            &mut w.dpb,
            bk,
            Mat::rows(&w.dob, d),
            Mat::trans(&w.vb, d),
            false,
        );
        let slope = self
            .opts
            .alibi_slopes
            .as_ref()
            .map(|a| a.slope(b, h, p.heads_q));
        let cap = p.softcap > 0.0;
        for r in 0..rows {
            let i = i0 + r;
            let rg = r * bk..r * bk + jn;
            let srow = &mut w.sb[rg.clone()];
            let dtrow: &mut [f32] = if cap { &mut w.dtb[rg.clone()] } else { &mut [] };
            transform_row(p, slope, i, j0, sq, sk, srow, dtrow);
            let lse = w.lr[r];
            if lse == f32::NEG_INFINITY {
                srow.fill(0.0);
                w.dpb[rg.clone()].fill(0.0);
                if p.dropout.is_some() {
                    w.pdb[rg].fill(0.0);
                }
                continue;
            }
            tile::exp_sub_sum(srow, lse);
            let dpr = &mut w.dpb[rg.clone()];
            if let Some(drop) = &p.dropout {
                let pdr = &mut w.pdb[rg.clone()];
                pdr.copy_from_slice(srow);
                super::dropout_row(drop, b, h, i, j0, pdr);
                // dP through dropout: keep/(1-p) factor = pd / p where p > 0; recompute the
                // mask on dP directly so that p == 0 entries are handled too.
                super::dropout_row(drop, b, h, i, j0, dpr);
            }
            ds_row(srow, dpr, w.dr[r]);
            if cap {
                mul_in_place(dpr, &w.dtb[rg]);
            }
        }
    }
}

tile::dispatch! {
    /// `dp = p ∘ (dp − D)`.
    fn ds_row(p: &[f32], dp: &mut [f32], dd: f32) {
        for (x, &pp) in dp.iter_mut().zip(p) {
            *x = pp * (*x - dd);
        }
    }
}

tile::dispatch! {
    fn mul_in_place(x: &mut [f32], y: &[f32]) {
        for (a, &b) in x.iter_mut().zip(y) {
            *a *= b;
        }
    }
}

/// Pass 1 for key head `g`, key tile `j0..j0+jn` of sequence `b`.
#[allow(clippy::too_many_arguments)]
fn kv_tile<T: CpuElem>(
    cx: &Ctx<'_, T>,
    b: usize,
    g: usize,
    j0: usize,
    jn: usize,
    w: &mut BwdWork,
    dkc: &mut [T],
    dvc: &mut [T],
) {
    let p = cx.p;
    let (d, hk) = (p.head_dim, p.heads_k);
    let (bq, bk) = (cx.tiles.bq, cx.tiles.bk);
    let seq = p.seqs[b];
    let (ia, ib) = query_range_for_keys(&p.mask, j0, j0 + jn, seq.sq, seq.sk);
    w.acc1[..jn * d].fill(0.0); // dK
    w.acc2[..jn * d].fill(0.0); // dV
    if ia < ib {
        cx.load_k_side(b, g, j0, jn, w);
        let grp = p.group();
        for h in g * grp..(g + 1) * grp {
            let mut i0 = ia;
            while i0 < ib {
                let rows = bq.min(ib - i0);
                cx.load_q_side(b, h, i0, rows, w);
                cx.recompute(b, h, i0, rows, j0, jn, w);
                let pmat = if p.dropout.is_some() { &w.pdb } else { &w.sb };
                // dV += P̃ᵀ dO
                tile::matmul(
                    jn,
                    d,
                    rows,
                    &mut w.acc2,
                    d,
                    Mat::trans(pmat, bk),
                    Mat::rows(&w.dob, d),
                    true,
                );
                // dK += dSᵀ (scale·Q)
                tile::matmul(
                    jn,
                    d,
                    rows,
                    &mut w.acc1,
                    d,
                    Mat::trans(&w.dpb, bk),
                    Mat::rows(&w.qb, d),
                    true,
                );
                i0 += rows;
            }
        }
    }
    for r in 0..jn {
        let o = (r * hk + g) * d;
        for c in 0..d {
            dkc[o + c] = T::from_f32(w.acc1[r * d + c]);
            dvc[o + c] = T::from_f32(w.acc2[r * d + c]);
        }
    }
}

/// Pass 2 for query head `h`, rows `i0..i0+rows` of sequence `b`.
fn q_tile<T: CpuElem>(
    cx: &Ctx<'_, T>,
    b: usize,
    h: usize,
    i0: usize,
    rows: usize,
    w: &mut BwdWork,
    dqc: &mut [T],
) {
    let p = cx.p;
    let (d, hq) = (p.head_dim, p.heads_q);
    let bk = cx.tiles.bk;
    let seq = p.seqs[b];
    let g = h / p.group();
    w.acc1[..rows * d].fill(0.0);
    if let Some((klo, khi)) = tile_key_range(&p.mask, i0, rows, seq.sq, seq.sk) {
        cx.load_q_side(b, h, i0, rows, w);
        let mut j0 = klo;
        while j0 < khi {
            let jn = bk.min(khi - j0);
            cx.load_k_side(b, g, j0, jn, w);
            cx.recompute(b, h, i0, rows, j0, jn, w);
            // dQ += dS K  (the scale is applied at the end)
            tile::matmul(
                rows,
                d,
                jn,
                &mut w.acc1,
                d,
                Mat::rows(&w.dpb, bk),
                Mat::rows(&w.kb, d),
                true,
            );
            j0 += jn;
        }
    }
    let sc = p.scale;
    for r in 0..rows {
        let o = (r * hq + h) * d;
        for c in 0..d {
            dqc[o + c] = T::from_f32(w.acc1[r * d + c] * sc);
        }
    }
}
