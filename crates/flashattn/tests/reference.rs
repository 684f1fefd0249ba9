#![allow(clippy::needless_range_loop)] // index loops mirror the formulas they check
//! Checks of the f64 reference itself (tests/common): its backward against central finite
//! differences of its forward, its mask against the SPEC examples, and a few closed forms.

mod common;

use common::*;
use flashattn::math::Mask;
use flashattn::{AlibiSlopes, AttnOptions, DType, Tensor};

/// `sum(out · dout)` of the reference.
fn loss(rp: &RefProblem, o: &AttnOptions, dout: &[f64]) -> f64 {
    let (out, _) = rp.forward(o);
    out.iter().zip(dout).map(|(a, b)| a * b).sum()
}

/// Max over entries of |analytic − numeric| relative to the gradient's largest entry.
fn fd_check(rp: &RefProblem, o: &AttnOptions, dout: &[f64]) {
    let (dq, dk, dv) = rp.backward(o, dout);
    let h = 1e-5;
    for (name, which, grad) in [("dq", 0, &dq), ("dk", 1, &dk), ("dv", 2, &dv)] {
        let scale = grad.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-3);
        for idx in 0..grad.len() {
            let mut plus = rp.clone();
            let mut minus = rp.clone();
            match which {
                0 => {
                    plus.q[idx] += h;
                    minus.q[idx] -= h;
                }
                1 => {
                    plus.k[idx] += h;
                    minus.k[idx] -= h;
                }
                _ => {
                    plus.v[idx] += h;
                    minus.v[idx] -= h;
                }
            }
            let num = (loss(&plus, o, dout) - loss(&minus, o, dout)) / (2.0 * h);
            let err = (num - grad[idx]).abs() / scale;
            assert!(
                err < 1e-6,
                "{name}[{idx}]: analytic {} numeric {num} (opts {o:?})",
                grad[idx]
            );
        }
    }
}

fn tiny_dense(sq: usize, sk: usize, hq: usize, hk: usize, d: usize, seed: u64) -> Case {
    Case::dense(DType::F32, 2, sq, sk, hq, hk, d, AttnOptions::new(), seed)
}

#[test]
fn backward_matches_finite_differences() {
    let c = tiny_dense(4, 5, 4, 2, 3, 11);
    let rp = RefProblem::from_qkv(&c.qkv());
    let dout: Vec<f64> = rand_values(c.q.numel(), 99)
        .iter()
        .map(|&x| x as f64)
        .collect();
    let slopes = AlibiSlopes::per_head(vec![0.3, 0.1, 0.7, 0.2]);
    let option_sets = [
        AttnOptions::new(),
        AttnOptions::new().causal(true),
        AttnOptions::new().softcap(0.7).scale(1.3),
        AttnOptions::new().alibi(slopes.clone()),
        AttnOptions::new().window(1, 1),
        AttnOptions::new()
            .causal(true)
            .softcap(0.5)
            .alibi(slopes.clone())
            .scale(2.0),
        AttnOptions::new().dropout(0.4, 123).dropout_offset(5),
        AttnOptions::new()
            .causal(true)
            .softcap(0.9)
            .alibi(slopes)
            .dropout(0.3, 7),
    ];
    for o in &option_sets {
        fd_check(&rp, o, &dout);
    }
}

#[test]
fn backward_matches_finite_differences_varlen() {
    // Varlen with a zero-length sequence, sq > sk in one (empty causal rows), GQA 3:1.
    let c = Case::varlen(
        DType::F32,
        &[(3, 2), (0, 2), (2, 4)],
        3,
        1,
        2,
        AttnOptions::new(),
        5,
    );
    let rp = RefProblem::from_qkv(&c.qkv());
    let dout: Vec<f64> = rand_values(c.q.numel(), 3)
        .iter()
        .map(|&x| x as f64)
        .collect();
    let o = AttnOptions::new()
        .causal(true)
        .softcap(1.0)
        .alibi(AlibiSlopes::per_batch(
            (0..9).map(|i| 0.1 * i as f32).collect(),
        ))
        .dropout(0.25, 42);
    fd_check(&rp, &o, &dout);
    // Empty causal row (sequence 0, row 0 sees key position -1): out 0, lse -inf, zero dq.
    let (out, lse) = rp.forward(&o);
    assert_eq!(lse[rp.lse_index(0, 0, 0)], f64::NEG_INFINITY);
    assert!(out[..2].iter().all(|&x| x == 0.0));
    let (dq, _, _) = rp.backward(&o, &dout);
    assert!(dq[..2].iter().all(|&x| x == 0.0));
}

#[test]
fn closed_forms() {
    // One key: out = v, lse = score.
    let q = Tensor::from_f32(vec![0.5, -1.0], &[1, 1, 1, 2]).unwrap();
    let k = Tensor::from_f32(vec![0.25, 0.75], &[1, 1, 1, 2]).unwrap();
    let v = Tensor::from_f32(vec![3.0, -2.0], &[1, 1, 1, 2]).unwrap();
    let qkv = flashattn::Qkv::dense(&q, &k, &v);
    let (out, lse) = ref_forward(&qkv, &AttnOptions::new().scale(2.0));
    assert_eq!(out, vec![3.0, -2.0]);
    assert!((lse[0] - 2.0 * (0.125 - 0.75)).abs() < 1e-12);
    // Two equal keys: out is their mean of v, lse = s + ln 2.
    let k2 = Tensor::from_f32(vec![0.25, 0.75, 0.25, 0.75], &[1, 2, 1, 2]).unwrap();
    let v2 = Tensor::from_f32(vec![1.0, 2.0, 3.0, 6.0], &[1, 2, 1, 2]).unwrap();
    let (out, lse) = ref_forward(
        &flashattn::Qkv::dense(&q, &k2, &v2),
        &AttnOptions::new().scale(2.0),
    );
    assert!((out[0] - 2.0).abs() < 1e-12 && (out[1] - 4.0).abs() < 1e-12);
    assert!((lse[0] - (2.0 * (0.125 - 0.75) + 2f64.ln())).abs() < 1e-12);
}

/// The reference's mask (re-derived from the SPEC) agrees with `math::Mask` and with the
/// worked examples: causal with sq > sk empties the first rows.
#[test]
fn mask_semantics() {
    for &(sq, sk) in &[(2usize, 4usize), (4, 2), (3, 3), (1, 5), (5, 1)] {
        for &(causal, win) in &[
            (true, (-1i64, -1i64)),
            (false, (1, 1)),
            (false, (0, -1)),
            (false, (-1, 2)),
            (true, (2, 0)),
            (false, (0, 0)),
        ] {
            let c = Case::dense(DType::F32, 1, sq, sk, 1, 1, 1, AttnOptions::new(), 1);
            // v = one-hot-ish: v_j = 2^j, so out reveals which keys were used (all weights > 0).
            let v = Tensor::from_f32(
                (0..sk).map(|j| (1u64 << j) as f32).collect(),
                &[1, sk, 1, 1],
            )
            .unwrap();
            let o = AttnOptions::new().causal(causal).window(win.0, win.1);
            let (_, lse) = ref_forward(&flashattn::Qkv::dense(&c.q, &c.k, &v), &o);
            let mask = {
                let (l, r) = o.effective_window();
                Mask { left: l, right: r }
            };
            for i in 0..sq {
                let (lo, hi) = mask.key_range(i, sq, sk);
                assert_eq!(
                    lse[i] == f64::NEG_INFINITY,
                    lo >= hi,
                    "sq={sq} sk={sk} causal={causal} win={win:?} row {i}"
                );
            }
        }
    }
    // SPEC example: sq=4, sk=2 causal -> rows 0, 1 empty; row 2 sees key 0 only.
    let c = Case::dense(
        DType::F32,
        1,
        4,
        2,
        1,
        1,
        2,
        AttnOptions::new().causal(true),
        8,
    );
    let (out, lse) = c.ref_forward();
    assert_eq!(lse[0], f64::NEG_INFINITY);
    assert_eq!(lse[1], f64::NEG_INFINITY);
    assert!(lse[2].is_finite() && lse[3].is_finite());
    let v = c.v.to_f32_vec();
    assert!((out[4] - v[0] as f64).abs() < 1e-7 && (out[5] - v[1] as f64).abs() < 1e-7);
}

#[test]
fn comparisons() {
    assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!((rel_err(&[1.0, 0.0], &[0.0, 1.0]) - 2f64.sqrt()).abs() < 1e-12);
    assert_eq!(rel_err(&[f32::NAN], &[1.0]), f64::INFINITY);
    assert_eq!(rel_err(&[1.0], &[f64::NAN]), f64::INFINITY);
    assert_eq!(rel_err(&[f32::INFINITY], &[1.0]), f64::INFINITY);
    assert_eq!(rel_err(&[0.5], &[0.0]), 0.5);
    assert_eq!(lse_err(&[f32::NEG_INFINITY], &[f64::NEG_INFINITY]), 0.0);
    assert_eq!(lse_err(&[-1e30], &[f64::NEG_INFINITY]), f64::INFINITY);
    assert_eq!(lse_err(&[f32::NEG_INFINITY], &[0.0]), f64::INFINITY);
    assert!(lse_err(&[2.0], &[2.0 + 1e-9]) < 1e-8);
}

#[test]
fn helpers_are_reproducible_and_nonzero() {
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let a = rand_tensor(dt, &[3, 5, 7], 1).to_f32_vec();
        let b = rand_tensor(dt, &[3, 5, 7], 1).to_f32_vec();
        assert_eq!(a, b);
        assert!(a.iter().all(|&x| x != 0.0 && (-1.0..=1.0).contains(&x)));
        assert_ne!(a, rand_tensor(dt, &[3, 5, 7], 2).to_f32_vec());
        let t = rand_tensor(dt, &[2, 3, 4, 5], 9);
        let s = strided_copy(&t, 4);
        assert!(!s.is_contiguous());
        assert_eq!(s.to_f32_vec(), t.to_f32_vec());
    }
    let (q, k, v) = fused_qkv(DType::F32, 2, 3, 2, 4, 1);
    assert!(!q.is_contiguous());
    assert_ne!(q.to_f32_vec(), k.to_f32_vec());
    assert_ne!(k.to_f32_vec(), v.to_f32_vec());
    let mut rng = Rng::new(1);
    for _ in 0..200 {
        let spec = random_spec(&mut rng, &CaseConfig::cpu());
        let c = Case::build(spec);
        flashattn::Problem::new(&c.qkv(), c.opts())
            .unwrap_or_else(|e| panic!("{e}: {}", c.spec.describe()));
    }
}

#[test]
fn backward_given_exact_out_is_backward() {
    let c = Case::varlen(
        DType::F32,
        &[(5, 7), (3, 0), (6, 2)],
        4,
        2,
        5,
        AttnOptions::new().causal(true).softcap(1.0).dropout(0.2, 3),
        8,
    );
    let rp = RefProblem::from_qkv(&c.qkv());
    let dout: Vec<f64> = rand_values(c.q.numel(), 4)
        .iter()
        .map(|&x| x as f64)
        .collect();
    let (out, _) = rp.forward(c.opts());
    let a = rp.backward(c.opts(), &dout);
    let b = rp.backward_given_out(c.opts(), &dout, Some(&out));
    for (x, y) in [(&a.0, &b.0), (&a.1, &b.1), (&a.2, &b.2)] {
        let worst = x
            .iter()
            .zip(y)
            .fold(0.0f64, |m, (p, q)| m.max((p - q).abs()));
        assert!(worst < 1e-12, "{worst}");
    }
}

/// The floor only changes the denominator of near-zero targets; real differences still fail.
#[test]
fn rel_err_floor_semantics() {
    assert_eq!(rel_err_floor(&[2.0, 0.0], &[1.0, 0.0], 1e-3), 1.0);
    assert!((rel_err_floor(&[1e-6, 0.0], &[0.0, 0.0], 1.0) - 1e-6).abs() < 1e-12);
    assert!((rel_err_floor(&[0.5, 0.0], &[0.0, 0.0], 1.0) - 0.5).abs() < 1e-12);
    assert_eq!(rel_err_floor(&[f32::NAN], &[0.0], 1.0), f64::INFINITY);
}
