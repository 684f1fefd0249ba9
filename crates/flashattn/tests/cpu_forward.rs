//! CPU forward against the float64 reference (tests/common) on the same rounded inputs.

mod common;

use common::*;
use flashattn::math::Dropout;
use flashattn::{forward, AlibiSlopes, AttnOptions, DType, Device, Qkv, Tensor};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Runs the CPU forward on `c` and checks out/lse against the reference; returns the errors.
fn check(c: &Case) -> (f64, f64) {
    let what = c.spec.describe();
    let got = forward(&c.qkv(), c.opts(), Device::Cpu).unwrap_or_else(|e| panic!("{e}: {what}"));
    assert_eq!(got.out.shape(), c.q.shape(), "{what}");
    assert_eq!(got.out.dtype(), c.spec.dtype, "{what}");
    assert_eq!(got.lse.dtype(), DType::F32, "{what}");
    let lse_shape = if c.spec.varlen {
        vec![c.spec.heads_q, c.q.shape()[0]]
    } else {
        vec![c.spec.batch, c.spec.heads_q, c.q.shape()[1]]
    };
    assert_eq!(got.lse.shape(), lse_shape.as_slice(), "{what}");
    let (want_out, want_lse) = c.ref_forward();
    let eo = rel_err(&got.out.to_f32_vec(), &want_out);
    let el = lse_err(&got.lse.to_f32_vec(), &want_lse);
    assert!(eo <= tol(c.spec.dtype), "out rel err {eo:e}: {what}");
    assert!(el <= lse_tol(c.spec.dtype), "lse err {el:e}: {what}");
    (eo, el)
}

#[test]
fn random_cases() {
    let mut rng = Rng::new(0xF0);
    let cfg = CaseConfig::cpu();
    for _ in 0..250 {
        check(&random_case(&mut rng, &cfg));
    }
}

#[test]
fn plain_shapes_all_dtypes() {
    // seqlen 1, sq != sk both ways, tile non-multiples, odd and large head dims.
    let shapes: &[(usize, usize, usize, usize, usize, usize)] = &[
        // (batch, sq, sk, heads_q, heads_k, d)
        (1, 1, 1, 1, 1, 1),
        (2, 1, 300, 4, 4, 64),
        (1, 300, 1, 2, 2, 32),
        (1, 65, 129, 2, 1, 17),
        (2, 129, 65, 3, 3, 128),
        (1, 64, 64, 1, 1, 160),
        (1, 33, 70, 2, 2, 512),
        (3, 7, 5, 8, 1, 8),
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
                n as u64,
            ));
        }
    }
}

#[test]
fn each_option_alone_and_combined() {
    let slopes = AlibiSlopes::per_head(vec![0.5, 0.25, 0.125, 0.0625]);
    let sets = vec![
        AttnOptions::new().causal(true),
        AttnOptions::new().window(8, 3),
        AttnOptions::new().window(-1, 0),
        AttnOptions::new().window(0, -1),
        AttnOptions::new().softcap(0.5),
        AttnOptions::new().softcap(30.0),
        AttnOptions::new().scale(0.9),
        AttnOptions::new().alibi(slopes.clone()),
        AttnOptions::new().alibi(AlibiSlopes::per_batch(
            (0..8).map(|i| i as f32 * 0.1).collect(),
        )),
        AttnOptions::new().dropout(0.2, 5),
        AttnOptions::new()
            .causal(true)
            .window(20, 0)
            .softcap(2.0)
            .alibi(slopes.clone())
            .dropout(0.3, 77)
            .dropout_offset(1 << 40 | 3)
            .scale(0.3),
        AttnOptions::new()
            .window(5, 9)
            .softcap(1.0)
            .alibi(slopes)
            .scale(1.5),
    ];
    for (n, o) in sets.into_iter().enumerate() {
        for dt in DTYPES {
            for &(sq, sk) in &[(70usize, 70usize), (40, 90), (90, 40)] {
                check(&Case::dense(
                    dt,
                    2,
                    sq,
                    sk,
                    4,
                    2,
                    24,
                    o.clone(),
                    n as u64 * 7 + sq as u64,
                ));
            }
        }
    }
}

#[test]
fn fully_masked_rows_are_zero_with_neg_inf_lse() {
    for dt in DTYPES {
        // Causal with sq > sk: the first sq - sk rows see no key.
        let c = Case::dense(dt, 2, 50, 20, 2, 1, 16, AttnOptions::new().causal(true), 1);
        check(&c);
        let got = forward(&c.qkv(), c.opts(), Device::Cpu).unwrap();
        let out = got.out.to_f32_vec();
        let lse = got.lse.to_f32_vec();
        for b in 0..2 {
            for h in 0..2 {
                for i in 0..50 {
                    let l = lse[(b * 2 + h) * 50 + i];
                    let row = &out[((b * 50 + i) * 2 + h) * 16..][..16];
                    if i < 30 {
                        assert_eq!(l, f32::NEG_INFINITY, "row {i}");
                        assert!(row.iter().all(|&x| x == 0.0), "row {i} not zero");
                    } else {
                        assert!(l.is_finite());
                    }
                }
            }
        }
        // Windows that leave rows empty (sq > sk, narrow window; right-only window beyond sk).
        check(&Case::dense(
            dt,
            1,
            40,
            10,
            2,
            2,
            8,
            AttnOptions::new().window(0, 0),
            2,
        ));
        check(&Case::dense(
            dt,
            1,
            40,
            10,
            2,
            2,
            8,
            AttnOptions::new().window(2, 1),
            3,
        ));
        check(&Case::dense(
            dt,
            1,
            10,
            40,
            2,
            2,
            8,
            AttnOptions::new().window(-1, 0).softcap(3.0),
            4,
        ));
        // Every row empty: sk = 0.
        check(&Case::dense(dt, 2, 5, 0, 2, 2, 8, AttnOptions::new(), 5));
    }
}

#[test]
fn gqa_and_mqa() {
    for dt in DTYPES {
        check(&Case::dense(dt, 2, 37, 53, 8, 1, 32, AttnOptions::new(), 1));
        check(&Case::dense(
            dt,
            1,
            37,
            53,
            8,
            2,
            32,
            AttnOptions::new().causal(true),
            2,
        ));
        check(&Case::dense(
            dt,
            1,
            1,
            200,
            12,
            4,
            64,
            AttnOptions::new(),
            3,
        ));
    }
}

#[test]
fn varlen_with_empty_sequences() {
    let lens = [
        (0usize, 5usize),
        (3, 0),
        (17, 17),
        (0, 0),
        (1, 40),
        (70, 33),
        (64, 129),
    ];
    for dt in DTYPES {
        for o in [
            AttnOptions::new(),
            AttnOptions::new().causal(true),
            AttnOptions::new().window(3, 2).softcap(1.5),
            AttnOptions::new()
                .causal(true)
                .alibi(AlibiSlopes::per_batch(
                    (0..21).map(|i| 0.05 * i as f32).collect(),
                ))
                .dropout(0.25, 9),
        ] {
            check(&Case::varlen(dt, &lens, 3, 1, 20, o, 11));
        }
    }
    // A sequence with sq > 0 and sk = 0 gives zero rows and -inf LSE.
    let c = Case::varlen(
        DType::F32,
        &[(2, 3), (3, 0)],
        1,
        1,
        4,
        AttnOptions::new(),
        1,
    );
    let got = forward(&c.qkv(), c.opts(), Device::Cpu).unwrap();
    let lse = got.lse.to_f32_vec();
    assert!(lse[..2].iter().all(|x| x.is_finite()));
    assert!(lse[2..].iter().all(|&x| x == f32::NEG_INFINITY));
    assert!(got.out.to_f32_vec()[8..].iter().all(|&x| x == 0.0));
}

#[test]
fn strided_inputs() {
    for dt in DTYPES {
        // Slices of a fused [batch, seq, 3, heads, d] QKV buffer.
        let (q, k, v) = fused_qkv(dt, 2, 45, 3, 20, 7);
        assert!(!q.is_contiguous());
        for o in [AttnOptions::new(), AttnOptions::new().causal(true)] {
            let qkv = Qkv::dense(&q, &k, &v);
            let got = forward(&qkv, &o, Device::Cpu).unwrap();
            let (want, want_lse) = ref_forward(&qkv, &o);
            assert!(rel_err(&got.out.to_f32_vec(), &want) <= tol(dt));
            assert!(lse_err(&got.lse.to_f32_vec(), &want_lse) <= lse_tol(dt));
            // Same numbers as on contiguous copies.
            let (qc, kc, vc) = (q.contiguous(), k.contiguous(), v.contiguous());
            let got_c = forward(&Qkv::dense(&qc, &kc, &vc), &o, Device::Cpu).unwrap();
            assert_eq!(got.out.to_f32_vec(), got_c.out.to_f32_vec());
        }
        // Padded strides with NaN in the gaps (a kernel reading outside the view fails).
        let mut spec =
            Case::dense(dt, 2, 30, 41, 4, 2, 12, AttnOptions::new().causal(true), 3).spec;
        spec.strided = true;
        check(&Case::build(spec.clone()));
        spec.varlen = true;
        spec.seqlens = vec![(30, 41), (0, 3), (12, 5)];
        spec.batch = 3;
        check(&Case::build(spec));
    }
}

#[test]
fn zero_size_inputs() {
    for dt in DTYPES {
        for &(b, sq, sk) in &[(0usize, 4usize, 4usize), (2, 0, 4), (2, 0, 0), (0, 0, 0)] {
            let c = Case::dense(dt, b, sq, sk, 2, 1, 8, AttnOptions::new().causal(true), 1);
            let got = forward(&c.qkv(), c.opts(), Device::Cpu).unwrap();
            assert_eq!(got.out.shape(), &[b, sq, 2, 8]);
            assert_eq!(got.lse.shape(), &[b, 2, sq]);
            assert_eq!(got.out.numel(), 0);
        }
        // Varlen with every sequence empty, and with no sequence at all.
        let c = Case::varlen(dt, &[(0, 0), (0, 0)], 2, 2, 8, AttnOptions::new(), 1);
        let got = forward(&c.qkv(), c.opts(), Device::Cpu).unwrap();
        assert_eq!(got.out.shape(), &[0, 2, 8]);
        assert_eq!(got.lse.shape(), &[2, 0]);
        let c = Case::varlen(dt, &[], 2, 2, 8, AttnOptions::new(), 1);
        let got = forward(&c.qkv(), c.opts(), Device::Cpu).unwrap();
        assert_eq!(got.out.numel(), 0);
    }
}

/// q = 0 makes every score equal, so `P = 1/sk` and with `v = I` (d = sk),
/// `out[i, j] = keep(i, j) / (sk · (1 − p))`: the output spells out the dropout mask.
fn dropout_probe(p: f32, seed: u64, offset: u64) -> (usize, usize, usize, usize, Vec<f32>) {
    let (b, s, h, sk) = (2usize, 64usize, 3usize, 96usize);
    let q = Tensor::zeros(DType::F32, &[b, s, h, sk]);
    let k = rand_tensor(DType::F32, &[b, sk, 1, sk], 1);
    let mut eye = vec![0f32; b * sk * sk];
    for bb in 0..b {
        for j in 0..sk {
            eye[(bb * sk + j) * sk + j] = 1.0;
        }
    }
    let v = Tensor::from_f32(eye, &[b, sk, 1, sk]).unwrap();
    let o = AttnOptions::new().dropout(p, seed).dropout_offset(offset);
    let out = forward(&Qkv::dense(&q, &k, &v), &o, Device::Cpu)
        .unwrap()
        .out;
    (b, s, h, sk, out.to_f32_vec())
}

#[test]
fn dropout_mask_is_the_documented_one_with_the_right_rate() {
    for &(p, seed, offset) in &[
        (0.1f32, 1u64, 0u64),
        (0.5, 0xDEAD_BEEF_1234, 77),
        (0.3, 9, 1 << 33),
    ] {
        let (b, s, h, sk, out) = dropout_probe(p, seed, offset);
        let dr = Dropout::new(p, seed, offset).unwrap();
        let kept_val = 1.0 / (sk as f64 * (1.0 - p as f64));
        let mut kept = 0usize;
        for bb in 0..b {
            for i in 0..s {
                for hh in 0..h {
                    for j in 0..sk {
                        let x = out[((bb * s + i) * h + hh) * sk + j] as f64;
                        let keep = dr.keeps(bb, hh, i, j);
                        if keep {
                            kept += 1;
                            assert!((x - kept_val).abs() < 1e-5 * kept_val, "kept value {x}");
                        } else {
                            assert_eq!(x, 0.0, "dropped ({bb},{hh},{i},{j}) but got {x}");
                        }
                    }
                }
            }
        }
        let n = (b * s * h * sk) as f64;
        let rate = kept as f64 / n;
        let q = 1.0 - p as f64;
        let sigma = (q * (1.0 - q) / n).sqrt();
        assert!((rate - q).abs() < 4.0 * sigma, "keep rate {rate} vs {q}");
    }
}

#[test]
fn dropout_seed_and_offset_select_the_mask() {
    let c = Case::dense(DType::BF16, 2, 33, 47, 2, 2, 16, AttnOptions::new(), 5);
    let run = |o: AttnOptions| forward(&c.qkv(), &o, Device::Cpu).unwrap().out.to_f32_vec();
    let a = run(AttnOptions::new().dropout(0.3, 1));
    assert_eq!(a, run(AttnOptions::new().dropout(0.3, 1)));
    assert_ne!(a, run(AttnOptions::new().dropout(0.3, 2)));
    assert_ne!(a, run(AttnOptions::new().dropout(0.3, 1).dropout_offset(1)));
    assert_ne!(a, run(AttnOptions::new()));
    // The LSE is taken before dropout.
    let l0 = forward(&c.qkv(), &AttnOptions::new(), Device::Cpu)
        .unwrap()
        .lse;
    let l1 = forward(&c.qkv(), &AttnOptions::new().dropout(0.3, 1), Device::Cpu)
        .unwrap()
        .lse;
    assert!(
        lse_err(
            &l1.to_f32_vec(),
            &l0.to_f32_vec()
                .iter()
                .map(|&x| x as f64)
                .collect::<Vec<_>>()
        ) < 1e-6
    );
}

#[test]
fn forward_is_repeatable() {
    let c = Case::dense(
        DType::F32,
        2,
        150,
        170,
        4,
        2,
        40,
        AttnOptions::new().causal(true),
        3,
    );
    let a = forward(&c.qkv(), c.opts(), Device::Cpu).unwrap();
    let b = forward(&c.qkv(), c.opts(), Device::Cpu).unwrap();
    assert_eq!(a.out, b.out);
    assert_eq!(a.lse, b.lse);
}
