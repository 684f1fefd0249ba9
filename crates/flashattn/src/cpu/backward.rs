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
//!
//! When there are enough (sequence, key head) pairs to keep every thread busy, a fused mode
//! is used instead: one task per (sequence, key head) walks all key tiles in order and also
//! accumulates dQ of the group's query heads into a task-owned f32 buffer (5 products per tile
//! pair); again each output has one owner and a fixed summation order, so the result does not
//! depend on scheduling either. `FLASHATTN_CPU_BWD=fused|split` forces a mode (tests, tuning).

use super::forward::{q_tiles, split_chunks};
use super::tile::{self, CpuElem, Mat};
use super::{query_range_for_keys, tile_key_range, transform_row, Tiles};
use crate::error::Result;
use crate::layout::row_strides;
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
    force_fused: Option<bool>,
) -> Result<Gradients> {
    let (hq, hk, d) = (p.heads_q, p.heads_k, p.head_dim);
    let n_q: usize = p.q_shape.iter().product();
    let n_k: usize = p.k_shape.iter().product();
    let mut dq = vec![T::zero(); n_q];
    let mut dk = vec![T::zero(); n_k];
    let mut dv = vec![T::zero(); n_k];

    let lse_v = lse.to_f32_vec();
    let o = T::slice(out.storage());
    let os = row_strides(out, p.varlen);
    let dos = row_strides(dout, p.varlen);
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

    let threads = rayon::current_num_threads().max(1);
    let units = p.batch * hk;
    let fused = match (force_fused, std::env::var("FLASHATTN_CPU_BWD").as_deref()) {
        (Some(f), _) => f,
        (None, Ok("fused")) => true,
        (None, Ok("split")) => false,
        #[allow(clippy::manual_is_multiple_of)] // MSRV 1.80
        _ => units >= 2 * threads || (units >= threads && units % threads == 0),
    };
    if fused {
        // Fused mode: one task per (sequence, key head) walks every key tile of the sequence
        // and accumulates dK/dV per tile and dQ of the group's query heads in a task-owned
        // buffer (5 tile products per tile pair; O(seqlen · d) per task, not O(seqlen²)).
        let grp = p.group();
        // Each task scatters its finished gradients right away (disjoint elements, so the
        // result does not depend on the order), keeping only in-flight tasks' buffers alive.
        let sink = std::sync::Mutex::new((&mut dq[..], &mut dk[..], &mut dv[..]));
        (0..units).into_par_iter().for_each(|u| {
            let (b, g) = (u / hk, u % hk);
            let seq = p.seqs[b];
            let mut dkl = vec![T::zero(); seq.sk * d];
            let mut dvl = vec![T::zero(); seq.sk * d];
            let mut dqa = vec![0.0f32; grp * seq.sq * d];
            let mut w = BwdWork::new(tiles, d);
            let mut j0 = 0;
            while j0 < seq.sk {
                let jn = tiles.bk.min(seq.sk - j0);
                kv_tile(
                    &cx,
                    b,
                    g,
                    j0,
                    jn,
                    &mut w,
                    &mut dkl[j0 * d..],
                    &mut dvl[j0 * d..],
                    d,
                    Some(&mut dqa),
                );
                j0 += jn;
            }
            let mut guard = sink.lock().unwrap_or_else(|e| e.into_inner());
            let (dq, dk, dv) = &mut *guard;
            for j in 0..seq.sk {
                let o = p.kv_grad_index(b, g, j);
                dk[o..o + d].copy_from_slice(&dkl[j * d..j * d + d]);
                dv[o..o + d].copy_from_slice(&dvl[j * d..j * d + d]);
            }
            for hh in 0..grp {
                for i in 0..seq.sq {
                    let o = p.out_index(b, g * grp + hh, i);
                    let src = &dqa[(hh * seq.sq + i) * d..][..d];
                    for (x, &y) in dq[o..o + d].iter_mut().zip(src) {
                        *x = T::from_f32(y * p.scale);
                    }
                }
            }
        });
    } else {
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
                    kv_tile(
                        &cx,
                        b,
                        g,
                        j0,
                        jn,
                        &mut w,
                        &mut dkc[g * d..],
                        &mut dvc[g * d..],
                        hk * d,
                        None,
                    );
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
    }

    Ok(Gradients {
        dq: Tensor::new(T::storage(dq), &p.q_shape)?,
        dk: Tensor::new(T::storage(dk), &p.k_shape)?,
        dv: Tensor::new(T::storage(dv), &p.k_shape)?,
    })
}

/// Per-task conversion buffers for f16/bf16 tiles (f32 inputs are read in place).
struct Bufs {
    qb: Vec<f32>,
    dob: Vec<f32>,
    kb: Vec<f32>,
    vb: Vec<f32>,
}

/// Per-task scratch tiles and accumulators.
struct Scr {
    sb: Vec<f32>,
    dpb: Vec<f32>,
    pdb: Vec<f32>,
    dtb: Vec<f32>,
    acc1: Vec<f32>,
    acc2: Vec<f32>,
    lr: Vec<f32>,
    dr: Vec<f32>,
}

/// Per-task working memory: O(tile).
struct BwdWork {
    bufs: Bufs,
    scr: Scr,
}

impl BwdWork {
    fn new(t: Tiles, d: usize) -> BwdWork {
        let st = t.bq * t.bk;
        let rows = t.bq.max(t.bk);
        BwdWork {
            bufs: Bufs {
                qb: vec![0.0; t.bq * d],
                dob: vec![0.0; t.bq * d],
                kb: vec![0.0; t.bk * d],
                vb: vec![0.0; t.bk * d],
            },
            scr: Scr {
                sb: vec![0.0; st],
                dpb: vec![0.0; st],
                pdb: vec![0.0; st],
                dtb: vec![0.0; st],
                acc1: vec![0.0; rows * d],
                acc2: vec![0.0; rows * d],
                lr: vec![0.0; t.bq],
                dr: vec![0.0; t.bq],
            },
        }
    }
}

impl<T: CpuElem> Ctx<'_, T> {
    /// Views of the Q and dO rows `i0..i0+rows` of head `h` (unscaled), and LSE/D into `scr`.
    #[allow(clippy::too_many_arguments)]
    fn q_side<'a>(
        &'a self,
        b: usize,
        h: usize,
        i0: usize,
        rows: usize,
        qb: &'a mut [f32],
        dob: &'a mut [f32],
        scr: &mut Scr,
    ) -> (Mat<'a>, Mat<'a>) {
        let p = self.p;
        let d = p.head_dim;
        let seq = p.seqs[b];
        let qv = tile::view(
            self.q,
            rows,
            d,
            p.q.at(b, seq.q_start, i0, h),
            p.q.row,
            1.0,
            qb,
        );
        let dov = tile::view(
            self.dout,
            rows,
            d,
            self.dos.at(b, seq.q_start, i0, h),
            self.dos.row,
            1.0,
            dob,
        );
        for r in 0..rows {
            let li = p.lse_index(b, h, i0 + r);
            scr.lr[r] = self.lse[li];
            scr.dr[r] = self.dd[li];
        }
        (qv, dov)
    }

    /// Views of the K and V rows `j0..j0+jn` of key head `g`.
    #[allow(clippy::too_many_arguments)]
    fn k_side<'a>(
        &'a self,
        b: usize,
        g: usize,
        j0: usize,
        jn: usize,
        kb: &'a mut [f32],
        vb: &'a mut [f32],
    ) -> (Mat<'a>, Mat<'a>) {
        let p = self.p;
        let d = p.head_dim;
        let seq = p.seqs[b];
        let kv = tile::view(
            self.k,
            jn,
            d,
            p.k.at(b, seq.k_start, j0, g),
            p.k.row,
            1.0,
            kb,
        );
        let vv = tile::view(
            self.v,
            jn,
            d,
            p.v.at(b, seq.k_start, j0, g),
            p.v.row,
            1.0,
            vb,
        );
        (kv, vv)
    }

    /// `sb = P`, `pdb = dropout(P)` (only with dropout), `dpb = dS` (the gradient w.r.t. the
    /// scaled score `scale·QKᵀ`, so `dQ = scale·dS K` and `dK = scale·dSᵀ Q`).
    #[allow(clippy::too_many_arguments)]
    fn recompute(
        &self,
        b: usize,
        h: usize,
        i0: usize,
        rows: usize,
        j0: usize,
        jn: usize,
        (qv, dov): (Mat<'_>, Mat<'_>),
        (kv, vv): (Mat<'_>, Mat<'_>),
        w: &mut Scr,
        roff: usize,
    ) {
        let p = self.p;
        let d = p.head_dim;
        let bk = self.tiles.bk;
        let seq = p.seqs[b];
        let (sq, sk) = (seq.sq, seq.sk);
        tile::matmul_beta(rows, jn, d, &mut w.sb, bk, qv, kv.t(), false, p.scale);
        tile::matmul(rows, jn, d, &mut w.dpb, bk, dov, vv.t(), false);
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
            let lse = w.lr[roff + r];
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
                // dP through dropout: the same keep mask and 1/(1-p) factor.
                super::dropout_row(drop, b, h, i, j0, pdr, Some(&mut *dpr));
            }
            ds_row(srow, dpr, w.dr[roff + r]);
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

/// dK/dV of key head `g`, key tile `j0..j0+jn` of sequence `b` (rows written at
/// `dkc[r·out_rs ..]`), and optionally dQ (unscaled) of the group's query heads accumulated into
/// `dq_acc` (`[group][sq][d]`).
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
    out_rs: usize,
    mut dq_acc: Option<&mut [f32]>,
) {
    let p = cx.p;
    let d = p.head_dim;
    let (bq, bk) = (cx.tiles.bq, cx.tiles.bk);
    let seq = p.seqs[b];
    let (ia, ib) = query_range_for_keys(&p.mask, j0, j0 + jn, seq.sq, seq.sk);
    let BwdWork { bufs, scr } = w;
    scr.acc1[..jn * d].fill(0.0); // dK / scale
    scr.acc2[..jn * d].fill(0.0); // dV
    if ia < ib {
        let kside = cx.k_side(b, g, j0, jn, &mut bufs.kb, &mut bufs.vb);
        let grp = p.group();
        for h in g * grp..(g + 1) * grp {
            let mut i0 = ia;
            while i0 < ib {
                let rows = bq.min(ib - i0);
                // Only keys ca..cb of this tile are visible from rows i0..i0+rows.
                let (ca, cb) = match tile_key_range(&p.mask, i0, rows, seq.sq, seq.sk) {
                    Some((lo, hi)) => (lo.clamp(j0, j0 + jn) - j0, hi.clamp(j0, j0 + jn) - j0),
                    None => (0, 0),
                };
                if ca >= cb {
                    i0 += rows;
                    continue;
                }
                let cn = cb - ca;
                let ks = (kside.0.skip_rows(ca), kside.1.skip_rows(ca));
                let qside = cx.q_side(b, h, i0, rows, &mut bufs.qb, &mut bufs.dob, scr);
                cx.recompute(b, h, i0, rows, j0 + ca, cn, qside, ks, scr, 0);
                let pmat = if p.dropout.is_some() {
                    &scr.pdb
                } else {
                    &scr.sb
                };
                // dV += P̃ᵀ dO
                tile::matmul(
                    cn,
                    d,
                    rows,
                    &mut scr.acc2[ca * d..],
                    d,
                    Mat::trans(pmat, bk),
                    qside.1,
                    true,
                );
                // dK += dSᵀ Q (scaled at the end)
                tile::matmul(
                    cn,
                    d,
                    rows,
                    &mut scr.acc1[ca * d..],
                    d,
                    Mat::trans(&scr.dpb, bk),
                    qside.0,
                    true,
                );
                if let Some(dqa) = dq_acc.as_deref_mut() {
                    // dQ (unscaled) += dS K, rows of head h in the group's accumulator.
                    let o = ((h - g * grp) * seq.sq + i0) * d;
                    tile::matmul(
                        rows,
                        d,
                        cn,
                        &mut dqa[o..o + rows * d],
                        d,
                        Mat::rows(&scr.dpb, bk),
                        ks.0,
                        true,
                    );
                }
                i0 += rows;
            }
        }
    }
    let sc = p.scale;
    for r in 0..jn {
        let o = r * out_rs;
        for c in 0..d {
            dkc[o + c] = T::from_f32(scr.acc1[r * d + c] * sc);
            dvc[o + c] = T::from_f32(scr.acc2[r * d + c]);
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
    let BwdWork { bufs, scr } = w;
    scr.acc1[..rows * d].fill(0.0);
    if let Some((klo, khi)) = tile_key_range(&p.mask, i0, rows, seq.sq, seq.sk) {
        let qside = cx.q_side(b, h, i0, rows, &mut bufs.qb, &mut bufs.dob, scr);
        let mut j0 = klo;
        while j0 < khi {
            let jn = bk.min(khi - j0);
            // Only rows ra..rb of this tile see a key of j0..j0+jn.
            let (ia, ib) = query_range_for_keys(&p.mask, j0, j0 + jn, seq.sq, seq.sk);
            let ra = ia.clamp(i0, i0 + rows) - i0;
            let rb = ib.clamp(i0, i0 + rows) - i0;
            if ra < rb {
                let kside = cx.k_side(b, g, j0, jn, &mut bufs.kb, &mut bufs.vb);
                let qs = (qside.0.skip_rows(ra), qside.1.skip_rows(ra));
                cx.recompute(b, h, i0 + ra, rb - ra, j0, jn, qs, kside, scr, ra);
                // dQ += dS K  (the scale is applied at the end)
                tile::matmul(
                    rb - ra,
                    d,
                    jn,
                    &mut scr.acc1[ra * d..],
                    d,
                    Mat::rows(&scr.dpb, bk),
                    kside.0,
                    true,
                );
            }
            j0 += jn;
        }
    }
    let sc = p.scale;
    for r in 0..rows {
        let o = (r * hq + h) * d;
        for c in 0..d {
            dqc[o + c] = T::from_f32(scr.acc1[r * d + c] * sc);
        }
    }
}
