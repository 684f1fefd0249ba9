//! CPU backward against the float64 reference (tests/common), plus determinism and a
//! finite-difference check of the CPU backward against the CPU forward (dropout included).

mod common;

use common::*;
use flashattn::{
    backward, forward, AlibiSlopes, AttnOptions, DType, Device, Gradients, Qkv, Tensor,
};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn run_backward(c: &Case, dout: &Tensor) -> Gradients {
    run_backward_out(c, dout).0
}

/// The CPU backward and the forward `out` it was given.
fn run_backward_out(c: &Case, dout: &Tensor) -> (Gradients, Tensor) {
    let what = c.spec.describe();
    let f = forward(&c.qkv(), c.opts(), Device::Cpu).unwrap_or_else(|e| panic!("{e}: {what}"));
    let g = backward(&c.qkv(), &f.out, &f.lse, dout, c.opts(), Device::Cpu)
        .unwrap_or_else(|e| panic!("{e}: {what}"));
    (g, f.out)
}

/// The reference gradients: pure f64 for f32 inputs; for f16/bf16 the row term
/// `D = rowsum(dout ∘ out)` comes from the rounded `out` the backward saw (see
/// `RefProblem::backward_given_out`).
fn reference(
    qkv: &Qkv<'_>,
    o: &AttnOptions,
    dout: &Tensor,
    out: &Tensor,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    if out.dtype() == DType::F32 {
        ref_backward(qkv, o, dout)
    } else {
        ref_backward_given_out(qkv, o, dout, out)
    }
}

/// Backward on `c` vs the reference; dq/dk/dv shapes, dtypes and relative errors.
fn check(c: &Case) {
    check_with_dout(c, &c.dout());
}

fn check_with_dout(c: &Case, dout: &Tensor) {
    let what = c.spec.describe();
    let (g, out) = run_backward_out(c, dout);
    let (dq, dk, dv) = reference(&c.qkv(), c.opts(), dout, &out);
    for (name, got, shape, want) in [
        ("dq", &g.dq, c.q.shape(), &dq),
        ("dk", &g.dk, c.k.shape(), &dk),
        ("dv", &g.dv, c.v.shape(), &dv),
    ] {
        assert_eq!(got.shape(), shape, "{name}: {what}");
        assert_eq!(got.dtype(), c.spec.dtype, "{name}: {what}");
        let e = rel_err(&got.to_f32_vec(), want);
        assert!(e <= tol(c.spec.dtype), "{name} rel err {e:e}: {what}");
    }
}

#[test]
fn random_cases() {
    let mut rng = Rng::new(0xB0);
    let cfg = CaseConfig::cpu();
    for _ in 0..150 {
        check(&random_case(&mut rng, &cfg));
    }
}

#[test]
fn shapes_all_dtypes() {
    let shapes: &[(usize, usize, usize, usize, usize, usize)] = &[
        (1, 1, 1, 1, 1, 1),
        (2, 1, 130, 4, 2, 64),
        (1, 130, 1, 2, 2, 32),
        (1, 65, 129, 4, 1, 17),
        (2, 129, 65, 3, 3, 96),
        (1, 40, 40, 2, 2, 160),
        (1, 20, 30, 1, 1, 512),
    ];
    for (n, &(b, sq, sk, hq, hk, d)) in shapes.iter().enumerate() {
        for dt in DTYPES {
            check(&Case::dense(
                dt,
                b,
                sq,
                sk,
                hq,
                hk,
                d,
                AttnOptions::new(),
                100 + n as u64,
            ));
        }
    }
}

#[test]
fn each_option_alone_and_combined() {
    let slopes = AlibiSlopes::per_head(vec![0.5, 0.25, 0.125, 0.0625]);
    let sets = vec![
        AttnOptions::new().causal(true),
        AttnOptions::new().window(6, 2),
        AttnOptions::new().softcap(0.5),
        AttnOptions::new().scale(1.1),
        AttnOptions::new().alibi(slopes.clone()),
        AttnOptions::new().dropout(0.2, 5),
        AttnOptions::new()
            .causal(true)
            .window(15, 0)
            .softcap(2.0)
            .alibi(slopes)
            .dropout(0.4, 77)
            .dropout_offset(12345)
            .scale(0.4),
    ];
    for (n, o) in sets.into_iter().enumerate() {
        for dt in DTYPES {
            for &(sq, sk) in &[(50usize, 50usize), (30, 70), (70, 30)] {
                check(&Case::dense(
                    dt,
                    2,
                    sq,
                    sk,
                    4,
                    2,
                    24,
                    o.clone(),
                    3 * n as u64 + sk as u64,
                ));
            }
        }
    }
}

#[test]
fn empty_rows_and_unseen_keys_have_zero_gradients() {
    // Causal sq > sk: rows 0..sq-sk see nothing -> dq = 0 there.
    // Window (0, 0) with sq < sk: keys before the first diagonal are never seen -> dk = dv = 0.
    let c = Case::dense(
        DType::F32,
        1,
        12,
        4,
        2,
        1,
        8,
        AttnOptions::new().causal(true),
        1,
    );
    check(&c);
    let g = run_backward(&c, &c.dout());
    let dq = g.dq.to_f32_vec();
    assert!(dq[..8 * 2 * 8].iter().all(|&x| x == 0.0));
    assert!(dq[8 * 2 * 8..].iter().any(|&x| x != 0.0));

    let c = Case::dense(
        DType::F32,
        1,
        4,
        12,
        2,
        1,
        8,
        AttnOptions::new().window(0, 0),
        2,
    );
    check(&c);
    let g = run_backward(&c, &c.dout());
    let (dk, dv) = (g.dk.to_f32_vec(), g.dv.to_f32_vec());
    assert!(dk[..8 * 8].iter().all(|&x| x == 0.0));
    assert!(dv[..8 * 8].iter().all(|&x| x == 0.0));
    assert!(dv[8 * 8..].iter().any(|&x| x != 0.0));
}

#[test]
fn gqa_mqa_and_varlen() {
    for dt in DTYPES {
        check(&Case::dense(dt, 2, 33, 57, 8, 1, 32, AttnOptions::new(), 1));
        check(&Case::dense(
            dt,
            1,
            57,
            33,
            6,
            2,
            40,
            AttnOptions::new().causal(true),
            2,
        ));
        let lens = [
            (0usize, 5usize),
            (3, 0),
            (17, 17),
            (0, 0),
            (1, 40),
            (70, 33),
        ];
        for o in [
            AttnOptions::new(),
            AttnOptions::new().causal(true).softcap(3.0),
            AttnOptions::new().window(4, 4).dropout(0.3, 8),
        ] {
            check(&Case::varlen(dt, &lens, 4, 2, 20, o, 3));
        }
    }
}

#[test]
fn strided_inputs_and_dout() {
    for dt in DTYPES {
        let (q, k, v) = fused_qkv(dt, 2, 37, 2, 24, 9);
        let qkv = Qkv::dense(&q, &k, &v);
        let o = AttnOptions::new().causal(true);
        let dout = strided_copy(&rand_tensor(dt, q.shape(), 5), 6);
        let f = forward(&qkv, &o, Device::Cpu).unwrap();
        let g = backward(&qkv, &f.out, &f.lse, &dout, &o, Device::Cpu).unwrap();
        let (dq, dk, dv) = reference(&qkv, &o, &dout, &f.out);
        assert!(rel_err(&g.dq.to_f32_vec(), &dq) <= tol(dt));
        assert!(rel_err(&g.dk.to_f32_vec(), &dk) <= tol(dt));
        assert!(rel_err(&g.dv.to_f32_vec(), &dv) <= tol(dt));
        let mut spec =
            Case::dense(dt, 2, 30, 41, 4, 2, 12, AttnOptions::new().softcap(1.0), 3).spec;
        spec.strided = true;
        check(&Case::build(spec));
    }
}

#[test]
fn deterministic_backward_is_bit_identical() {
    for dt in DTYPES {
        for o in [
            AttnOptions::new().deterministic(true),
            AttnOptions::new()
                .deterministic(true)
                .causal(true)
                .dropout(0.2, 3),
        ] {
            let c = Case::dense(dt, 2, 200, 260, 4, 1, 64, o, 4);
            let dout = c.dout();
            let f = forward(&c.qkv(), c.opts(), Device::Cpu).unwrap();
            let a = backward(&c.qkv(), &f.out, &f.lse, &dout, c.opts(), Device::Cpu).unwrap();
            for _ in 0..3 {
                let b = backward(&c.qkv(), &f.out, &f.lse, &dout, c.opts(), Device::Cpu).unwrap();
                assert_eq!(a.dq, b.dq);
                assert_eq!(a.dk, b.dk);
                assert_eq!(a.dv, b.dv);
            }
        }
    }
}

#[test]
fn zero_size_inputs() {
    for dt in DTYPES {
        for &(b, sq, sk) in &[(0usize, 4usize, 4usize), (2, 0, 4), (2, 4, 0), (2, 0, 0)] {
            let c = Case::dense(dt, b, sq, sk, 2, 1, 8, AttnOptions::new(), 1);
            let g = run_backward(&c, &c.dout());
            assert_eq!(g.dq.shape(), c.q.shape());
            assert_eq!(g.dk.shape(), c.k.shape());
            assert_eq!(g.dv.shape(), c.v.shape());
            assert!(g.dq.to_f32_vec().iter().all(|&x| x == 0.0));
            assert!(g.dk.to_f32_vec().iter().all(|&x| x == 0.0));
        }
        let c = Case::varlen(
            dt,
            &[(0, 0), (0, 3), (2, 0)],
            2,
            2,
            8,
            AttnOptions::new(),
            1,
        );
        let g = run_backward(&c, &c.dout());
        assert!(g.dq.to_f32_vec().iter().all(|&x| x == 0.0));
        assert!(g.dk.to_f32_vec().iter().all(|&x| x == 0.0));
        assert!(g.dv.to_f32_vec().iter().all(|&x| x == 0.0));
    }
}

/// `sum(out · dout)` through the CPU forward (f32).
fn loss(q: &Tensor, k: &Tensor, v: &Tensor, o: &AttnOptions, dout: &[f32]) -> f64 {
    let out = forward(&Qkv::dense(q, k, v), o, Device::Cpu)
        .unwrap()
        .out
        .to_f32_vec();
    out.iter()
        .zip(dout)
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum()
}

fn shifted(t: &Tensor, dir: &[f32], h: f32) -> Tensor {
    let x: Vec<f32> = t
        .to_f32_vec()
        .iter()
        .zip(dir)
        .map(|(a, b)| a + h * b)
        .collect();
    Tensor::from_f32(x, t.shape()).unwrap()
}

/// Directional finite difference of the CPU forward vs the CPU backward, with dropout at a
/// fixed seed (the mask does not depend on the inputs), softcap, ALiBi and causal.
#[test]
fn backward_consistent_with_forward_under_dropout() {
    let c = Case::dense(DType::F32, 1, 24, 31, 2, 1, 16, AttnOptions::new(), 21);
    let o = AttnOptions::new()
        .dropout(0.3, 4242)
        .dropout_offset(7)
        .causal(true)
        .softcap(2.0)
        .alibi(AlibiSlopes::per_head(vec![0.2, 0.05]));
    let dout = c.dout();
    let dout_v = dout.to_f32_vec();
    let f = forward(&c.qkv(), &o, Device::Cpu).unwrap();
    let g = backward(&c.qkv(), &f.out, &f.lse, &dout, &o, Device::Cpu).unwrap();
    let h = 1e-2f32;
    for (which, grad) in [(0, &g.dq), (1, &g.dk), (2, &g.dv)] {
        let base = [&c.q, &c.k, &c.v][which];
        let dir = rand_values(base.numel(), 500 + which as u64);
        let analytic: f64 = grad
            .to_f32_vec()
            .iter()
            .zip(&dir)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        let mut args_p = [c.q.clone(), c.k.clone(), c.v.clone()];
        let mut args_m = args_p.clone();
        args_p[which] = shifted(base, &dir, h);
        args_m[which] = shifted(base, &dir, -h);
        let lp = loss(&args_p[0], &args_p[1], &args_p[2], &o, &dout_v);
        let lm = loss(&args_m[0], &args_m[1], &args_m[2], &o, &dout_v);
        let numeric = (lp - lm) / (2.0 * h as f64);
        let err = (numeric - analytic).abs() / analytic.abs().max(1e-3);
        assert!(
            err < 1e-2,
            "grad {which}: analytic {analytic} numeric {numeric}"
        );
    }
}
