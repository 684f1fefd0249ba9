//! Tile logic against a tiny inline f64 reference on awkward sizes (the broad randomized suite
//! lives in `tests/`).

use crate::layout::{Problem, Qkv};
use crate::options::{AlibiSlopes, AttnOptions};
use crate::tensor::{random_values, DType, Tensor};
use crate::{backward, forward, Device};

/// Naive f64 attention over logical (row-major) f32 data. Returns out, lse, dq, dk, dv.
#[allow(clippy::type_complexity)]
fn naive(
    qkv: &Qkv<'_>,
    opts: &AttnOptions,
    dout: &[f32],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let p = Problem::new(qkv, opts).unwrap();
    let (q, k, v) = (qkv.q.to_f32_vec(), qkv.k.to_f32_vec(), qkv.v.to_f32_vec());
    let (hq, d) = (p.heads_q, p.head_dim);
    let mut out = vec![0.0f64; q.len()];
    let mut dq = vec![0.0f64; q.len()];
    let mut dk = vec![0.0f64; k.len()];
    let mut dv = vec![0.0f64; k.len()];
    let mut lse = vec![0.0f64; p.lse_shape().iter().product()];
    for (b, s) in p.seqs.iter().enumerate() {
        let (sq, sk) = (s.sq, s.sk);
        for h in 0..hq {
            let g = h / p.group();
            let qi = |i: usize| p.out_index(b, h, i);
            let kj = |j: usize| p.kv_grad_index(b, g, j);
            let slope = opts.alibi_slopes.as_ref().map(|a| a.slope(b, h, hq) as f64);
            for i in 0..sq {
                let mut sc = vec![f64::NEG_INFINITY; sk];
                let mut dt = vec![1.0f64; sk];
                for j in 0..sk {
                    let mut x: f64 = (0..d)
                        .map(|c| q[qi(i) + c] as f64 * k[kj(j) + c] as f64)
                        .sum();
                    x *= p.scale as f64;
                    if p.softcap > 0.0 {
                        let t = (x / p.softcap as f64).tanh();
                        dt[j] = 1.0 - t * t;
                        x = p.softcap as f64 * t;
                    }
                    if let Some(sl) = slope {
                        x -= sl * (i as f64 + sk as f64 - sq as f64 - j as f64).abs();
                    }
                    if p.mask.keeps(i, j, sq, sk) {
                        sc[j] = x;
                    }
                }
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = if m == f64::NEG_INFINITY {
                    0.0
                } else {
                    sc.iter().map(|x| (x - m).exp()).sum()
                };
                let lse_v = if l > 0.0 {
                    m + l.ln()
                } else {
                    f64::NEG_INFINITY
                };
                lse[p.lse_index(b, h, i)] = lse_v;
                let pr: Vec<f64> = sc
                    .iter()
                    .map(|x| if l > 0.0 { (x - lse_v).exp() } else { 0.0 })
                    .collect();
                let kf: Vec<f64> = (0..sk)
                    .map(|j| match &p.dropout {
                        Some(dr) => {
                            if dr.keeps(b, h, i, j) {
                                dr.scale as f64
                            } else {
                                0.0
                            }
                        }
                        None => 1.0,
                    })
                    .collect();
                let o = qi(i);
                for j in 0..sk {
                    for c in 0..d {
                        out[o + c] += pr[j] * kf[j] * v[kj(j) + c] as f64;
                    }
                }
                // Backward.
                let dp: Vec<f64> = (0..sk)
                    .map(|j| {
                        kf[j]
                            * (0..d)
                                .map(|c| dout[o + c] as f64 * v[kj(j) + c] as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let dd: f64 = (0..sk).map(|j| pr[j] * dp[j]).sum();
                for j in 0..sk {
                    let ds = pr[j] * (dp[j] - dd) * dt[j] * p.scale as f64;
                    for c in 0..d {
                        dv[kj(j) + c] += pr[j] * kf[j] * dout[o + c] as f64;
                        dk[kj(j) + c] += ds * q[o + c] as f64;
                        dq[o + c] += ds * k[kj(j) + c] as f64;
                    }
                }
            }
        }
    }
    (out, lse, dq, dk, dv)
}

fn rel(got: &Tensor, want: &[f64]) -> f64 {
    let g = got.to_f32_vec();
    assert_eq!(g.len(), want.len());
    let mut num = 0.0;
    let mut den = 0.0;
    for (a, b) in g.iter().zip(want) {
        assert!(a.is_finite(), "non-finite output");
        num += (*a as f64 - b).powi(2);
        den += b * b;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn check(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu: Option<(&[i32], &[i32])>,
    opts: &AttnOptions,
    tol: f64,
) {
    let qkv = Qkv {
        q,
        k,
        v,
        cu_seqlens: cu,
    };
    let f = forward(&qkv, opts, Device::Cpu).unwrap();
    let dout = Tensor::from_f32_as(&random_values(q.numel(), 99), q.shape(), q.dtype()).unwrap();
    let (out, lse, dq, dk, dv) = naive(&qkv, opts, &dout.to_f32_vec());
    assert!(rel(&f.out, &out) < tol, "out err {}", rel(&f.out, &out));
    let gl = f.lse.to_f32_vec();
    for (a, b) in gl.iter().zip(&lse) {
        if *b == f64::NEG_INFINITY {
            assert_eq!(*a, f32::NEG_INFINITY);
        } else {
            assert!(
                (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                "lse {a} vs {b}"
            );
        }
    }
    let g = backward(&qkv, &f.out, &f.lse, &dout, opts, Device::Cpu).unwrap();
    // The backward uses the rounded `out` for D; tolerance as for the dtype.
    for (name, t, w) in [("dq", &g.dq, &dq), ("dk", &g.dk, &dk), ("dv", &g.dv, &dv)] {
        let e = rel(t, w);
        assert!(
            e < tol,
            "{name} err {e} (opts {opts:?}, shape {:?})",
            q.shape()
        );
    }
    // Both parallel schemes, and determinism of each.
    let p = Problem::new(&qkv, opts).unwrap();
    for fused in [false, true] {
        let run =
            || super::backward_mode(&p, &qkv, &f.out, &f.lse, &dout, opts, Some(fused)).unwrap();
        let (g1, g2) = (run(), run());
        for (name, t, w) in [
            ("dq", &g1.dq, &dq),
            ("dk", &g1.dk, &dk),
            ("dv", &g1.dv, &dv),
        ] {
            let e = rel(t, w);
            assert!(
                e < tol,
                "{name} err {e} fused={fused} (opts {opts:?}, shape {:?})",
                q.shape()
            );
        }
        assert_eq!(g1.dq, g2.dq);
        assert_eq!(g1.dk, g2.dk);
        assert_eq!(g1.dv, g2.dv);
    }
}

#[allow(clippy::too_many_arguments)]
fn dense(
    b: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hk: usize,
    d: usize,
    dt: DType,
    seed: u64,
) -> (Tensor, Tensor, Tensor) {
    let q =
        Tensor::from_f32_as(&random_values(b * sq * hq * d, seed), &[b, sq, hq, d], dt).unwrap();
    let k = Tensor::from_f32_as(
        &random_values(b * sk * hk * d, seed + 1),
        &[b, sk, hk, d],
        dt,
    )
    .unwrap();
    let v = Tensor::from_f32_as(
        &random_values(b * sk * hk * d, seed + 2),
        &[b, sk, hk, d],
        dt,
    )
    .unwrap();
    (q, k, v)
}

#[test]
fn odd_sizes_all_masks() {
    let sizes = [
        (1, 1),
        (1, 7),
        (7, 1),
        (3, 300),
        (300, 3),
        (67, 129),
        (129, 67),
        (257, 257),
    ];
    for (n, &(sq, sk)) in sizes.iter().enumerate() {
        let (q, k, v) = dense(2, sq, sk, 2, 1, 13, DType::F32, n as u64);
        for opts in [
            AttnOptions::new(),
            AttnOptions::new().causal(true),
            AttnOptions::new().window(5, 2),
            AttnOptions::new().window(0, 0),
        ] {
            check(&q, &k, &v, None, &opts, 1e-4);
        }
    }
}

#[test]
fn softcap_alibi_dropout_gqa() {
    let (q, k, v) = dense(2, 70, 90, 4, 2, 40, DType::F32, 7);
    let slopes = AlibiSlopes::per_batch(vec![0.1, 0.2, 0.05, 0.3, 0.0, 0.7, 0.01, 0.4]);
    for opts in [
        AttnOptions::new().softcap(0.5).scale(0.9),
        AttnOptions::new().alibi(slopes.clone()).causal(true),
        AttnOptions::new().dropout(0.3, 42).dropout_offset(5),
        AttnOptions::new()
            .dropout(0.2, 1)
            .softcap(2.0)
            .alibi(slopes)
            .window(20, -1),
    ] {
        check(&q, &k, &v, None, &opts, 1e-4);
    }
}

#[test]
fn half_types_and_big_head_dim() {
    for dt in [DType::F16, DType::BF16] {
        let (q, k, v) = dense(1, 33, 65, 2, 2, 72, dt, 3);
        check(&q, &k, &v, None, &AttnOptions::new().causal(true), 1e-2);
    }
    let (q, k, v) = dense(1, 5, 9, 1, 1, 512, DType::F32, 4);
    check(&q, &k, &v, None, &AttnOptions::new(), 1e-4);
    let (q, k, v) = dense(1, 5, 9, 1, 1, 1, DType::F32, 4);
    check(&q, &k, &v, None, &AttnOptions::new().causal(true), 1e-4);
}

#[test]
fn varlen_and_strided() {
    let cq = [0, 3, 3, 80, 81];
    let ck = [0, 5, 9, 9, 140];
    let (hq, hk, d) = (4, 1, 16);
    let q = Tensor::from_f32(random_values(81 * hq * d, 1), &[81, hq, d]).unwrap();
    let k = Tensor::from_f32(random_values(140 * hk * d, 2), &[140, hk, d]).unwrap();
    let v = Tensor::from_f32(random_values(140 * hk * d, 3), &[140, hk, d]).unwrap();
    for opts in [
        AttnOptions::new(),
        AttnOptions::new().causal(true).dropout(0.1, 3),
    ] {
        check(&q, &k, &v, Some((&cq, &ck)), &opts, 1e-4);
    }
    // A fused-QKV style strided view: [b, s, 3, h, d] with q/k/v slices.
    let (b, s, h) = (2, 37, 2);
    let data = random_values(b * s * 3 * h * d, 8);
    let mk = |which: usize| {
        Tensor::strided(
            crate::tensor::Storage::F32(data.clone()),
            &[b, s, h, d],
            &[s * 3 * h * d, 3 * h * d, d, 1],
            which * h * d,
        )
        .unwrap()
    };
    check(
        &mk(0),
        &mk(1),
        &mk(2),
        None,
        &AttnOptions::new().causal(true),
        1e-4,
    );
}

#[test]
fn empty_inputs() {
    let (q, k, v) = dense(0, 4, 4, 2, 2, 8, DType::F32, 1);
    let f = forward(&Qkv::dense(&q, &k, &v), &AttnOptions::new(), Device::Cpu).unwrap();
    assert_eq!(f.out.numel(), 0);
    let (q, k, v) = dense(2, 3, 0, 2, 2, 8, DType::F32, 1);
    check(&q, &k, &v, None, &AttnOptions::new(), 1e-4);
    let (q, k, v) = dense(2, 0, 5, 2, 2, 8, DType::BF16, 1);
    check(&q, &k, &v, None, &AttnOptions::new().causal(true), 1e-2);
    // No query heads at all (0 is a multiple of heads_k).
    let (q, k, v) = dense(1, 4, 4, 0, 2, 8, DType::F32, 1);
    check(&q, &k, &v, None, &AttnOptions::new(), 1e-4);
}

#[test]
fn alibi_fast_path_matches_math_exactly() {
    let p = Problem::new(
        &Qkv::dense(
            &Tensor::zeros(DType::F32, &[1, 37, 1, 4]),
            &Tensor::zeros(DType::F32, &[1, 300, 1, 4]),
            &Tensor::zeros(DType::F32, &[1, 300, 1, 4]),
        ),
        &AttnOptions::new(),
    )
    .unwrap();
    for &(i, j0) in &[(0usize, 0usize), (5, 100), (36, 250), (20, 7)] {
        let mut s = vec![0.25f32; 50];
        super::transform_row(&p, Some(0.37), i, j0, 37, 300, &mut s, &mut []);
        for (c, x) in s.iter().enumerate() {
            let want = 0.25 - crate::math::alibi_bias(0.37, i, j0 + c, 37, 300);
            assert_eq!(x.to_bits(), want.to_bits(), "i={i} j={}", j0 + c);
        }
    }
}

#[test]
fn vectorised_dropout_matches_math() {
    let d = crate::math::Dropout::new(0.37, 0x1234_5678_9abc_def0, 0x0000_0005_0000_0009).unwrap();
    for &(b, h, i, j0, n) in &[
        (0usize, 0usize, 0usize, 0usize, 1usize),
        (3, 2, 17, 5, 70),
        (1, 7, 1000, 1023, 300),
        (0, 1, 2, 3, 33),
    ] {
        let mut row = vec![1.0f32; n];
        let mut other = vec![2.0f32; n];
        super::dropout_row(&d, b, h, i, j0, &mut row, Some(&mut other));
        for c in 0..n {
            let keep = d.keeps(b, h, i, j0 + c);
            assert_eq!(
                row[c],
                if keep { d.scale } else { 0.0 },
                "b{b} h{h} i{i} j{}",
                j0 + c
            );
            assert_eq!(other[c], if keep { 2.0 * d.scale } else { 0.0 });
        }
    }
}
