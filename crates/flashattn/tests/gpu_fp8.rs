//! FP8 (e4m3) Hopper forward (`cuda::fa3_fp8`): compile check of every FP8 variant (NVRTC, no
//! GPU needed), correctness against a float64 reference on the dequantised inputs and, looser,
//! on the unquantised ones, API errors, the RMSE study with outlier features (bf16 vs FP8
//! per-tensor / per-head / + Hadamard) and, with `FP8_BENCH=1`, the SPEC §4 sweep.
//! GPU tests skip with a printed reason without a GPU or on a GPU that is not sm 9.0.
//!
//! Env: `FP8_CUBIN_DIR=dir` writes the FP8 cubins there (for `cuobjdump -sass`);
//! `FP8_BENCH=1` (`FP8_BENCH_SEQ=1024,...`, `FP8_BENCH_DIMS=64,128,256`) runs the benchmark.
#![cfg(feature = "cuda")]

mod common;

use common::{
    event_median_ms, hopper_compile_audit, hopper_or_skip, lse_err, rand_tensor, ref_forward,
    rel_err, Rng, Tally,
};
use flashattn::cuda::fa3_fp8::{self, Fp8DeviceTensor};
use flashattn::cuda::{fa3, DeviceBuffer, DeviceTensor, Gpu};
use flashattn::fp8::{e4m3_from_f32, e4m3_to_f32, incoherent_qk, Fp8Scaling, Fp8Tensor};
use flashattn::{AttnOptions, DType, Problem, Qkv, Tensor};

/// f32 tensor `[b, s, h, d]`, values in [-1, 1] times a per-head magnitude (so per-head
/// descales differ), never zero.
fn rand_heads(shape: [usize; 4], seed: u64) -> Tensor {
    let [b, s, h, d] = shape;
    let mut rng = Rng::new(seed);
    let mags: Vec<f32> = (0..b * h)
        .map(|_| 0.05 + 4.0 * rng.uniform() as f32)
        .collect();
    let mut v = Vec::with_capacity(b * s * h * d);
    for bi in 0..b {
        for _ in 0..s {
            for hi in 0..h {
                for _ in 0..d {
                    v.push(rng.sym() * mags[bi * h + hi]);
                }
            }
        }
    }
    Tensor::from_f32(v, &shape).unwrap()
}

/// Float64 attention on f32 `[b, s, h, d]` inputs with P rounded to e4m3 relative to the row
/// maximum (a model of the kernel's P quantization, to size the tolerance): out only.
fn ref_p_quantized(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Vec<f64> {
    let [b, sq, hq, d] = <[usize; 4]>::try_from(q.shape()).unwrap();
    let [_, sk, hk, _] = <[usize; 4]>::try_from(k.shape()).unwrap();
    let (qv, kv, vv) = (q.to_f32_vec(), k.to_f32_vec(), v.to_f32_vec());
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f64; b * sq * hq * d];
    for bi in 0..b {
        for h in 0..hq {
            let hk_i = h / (hq / hk);
            for i in 0..sq {
                let lim = if causal {
                    (i + sk) as i64 - sq as i64
                } else {
                    sk as i64 - 1
                };
                let n = (lim + 1).clamp(0, sk as i64) as usize;
                if n == 0 {
                    continue;
                }
                let qr = &qv[((bi * sq + i) * hq + h) * d..][..d];
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        let kr = &kv[((bi * sk + j) * hk + hk_i) * d..][..d];
                        scale
                            * qr.iter()
                                .zip(kr)
                                .map(|(a, c)| *a as f64 * *c as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let o = &mut out[((bi * sq + i) * hq + h) * d..][..d];
                for (j, x) in s.iter().enumerate() {
                    let p = e4m3_to_f32(e4m3_from_f32((x - m).exp() as f32)) as f64;
                    let vr = &vv[((bi * sk + j) * hk + hk_i) * d..][..d];
                    for (oc, vc) in o.iter_mut().zip(vr) {
                        *oc += p * *vc as f64 / l;
                    }
                }
            }
        }
    }
    out
}

struct Outcome {
    /// vs the f64 reference on the dequantised inputs.
    err_deq: f64,
    /// the P-quantization model's error on the same inputs.
    err_model: f64,
    /// vs the f64 reference on the unquantised inputs.
    err_raw: f64,
    lse: f64,
}

/// Quantizes, runs `attention_into` (V pre-pass) or, with `vtk`, `attention_into_raw_v`
/// (in-kernel V transpose) into NaN-poisoned out/lse, compares.
fn run_fp8(
    gpu: &Gpu,
    qkv: (&Tensor, &Tensor, &Tensor),
    scaling: Fp8Scaling,
    causal: bool,
    vtk: bool,
) -> Outcome {
    let (q, k, v) = qkv;
    let fq = Fp8Tensor::quantize(q, scaling).unwrap();
    let fk = Fp8Tensor::quantize(k, scaling).unwrap();
    let fv = Fp8Tensor::quantize(v, scaling).unwrap();
    let up = |t: &Fp8Tensor| Fp8DeviceTensor::upload(gpu, t).unwrap();
    let (dq, dk, dv) = (up(&fq), up(&fk), up(&fv));
    let [b, sq, hq, d] = fq.shape();
    let out = DeviceTensor::alloc(gpu, DType::BF16, &[b, sq, hq, d]).unwrap();
    let lse = DeviceTensor::alloc(gpu, DType::F32, &[b, hq, sq]).unwrap();
    out.fill_poison().unwrap();
    lse.fill_poison().unwrap();
    let opts = AttnOptions::new().causal(causal);
    let r = if vtk {
        fa3_fp8::attention_into_raw_v(gpu, &dq, &dk, &dv, &opts, &out, &lse)
    } else {
        // The pre-pass into a poisoned Vᵀ, so that a byte it leaves unwritten (padding keys
        // included) turns O into NaN.
        fa3_fp8::Fp8VTransposed::uninit(gpu, &dv).and_then(|mut vt| {
            vt.fill_poison()?;
            fa3_fp8::transpose_v_into(gpu, &dv, &mut vt)?;
            fa3_fp8::attention_into(gpu, &dq, &dk, &vt, &opts, &out, &lse)
        })
    };
    if let Err(e) = r {
        eprintln!("fp8 launch failed: {e}");
        return Outcome {
            err_deq: f64::INFINITY,
            err_model: 0.0,
            err_raw: f64::INFINITY,
            lse: f64::INFINITY,
        };
    }
    gpu.synchronize().expect("fp8 kernel ran");
    let got = out.download().unwrap().to_f32_vec();
    let got_lse = lse.download().unwrap().to_f32_vec();
    let (xq, xk, xv) = (fq.dequantize(), fk.dequantize(), fv.dequantize());
    let (want, want_lse) = ref_forward(&Qkv::dense(&xq, &xk, &xv), &opts);
    let model = ref_p_quantized(&xq, &xk, &xv, causal);
    let model_f32: Vec<f32> = model.iter().map(|&x| x as f32).collect();
    let (raw, _) = ref_forward(&Qkv::dense(q, k, v), &opts);
    Outcome {
        err_deq: rel_err(&got, &want),
        err_model: rel_err(&model_f32, &want),
        err_raw: rel_err(&got, &raw),
        lse: lse_err(&got_lse, &want_lse),
    }
}

#[test]
fn fp8_matches_reference() {
    let Some(gpu) = hopper_or_skip("fp8 GPU test") else {
        return;
    };
    let mut rng = Rng::new(0xf8);
    let mut tally = Tally::default();
    for d in fa3_fp8::HEAD_DIMS {
        for causal in [false, true] {
            let mut shapes = vec![
                (1, 1, 1, 1, 1),
                (1, 128, 128, 2, 1),
                (2, 200, 77, 2, 2),
                (1, 257, 300, 4, 2),
            ];
            if causal {
                shapes.push((1, 300, 129, 2, 1)); // sq > sk: empty rows
                shapes.push((1, 65, 511, 1, 1)); // sq < sk: offset diagonal

                // From fa3_fp8::LINEAR_MIN_SK keys: one CTA per tile in the linear order (3
                // query tiles × 2 heads, the last of each partial; a partial last key tile).
                shapes.push((1, 300, fa3_fp8::LINEAR_MIN_SK + 4, 2, 1));
            }
            let hk = rng.range(1, 3);
            shapes.push((
                rng.range(1, 3),
                rng.range(1, 400),
                rng.range(1, 400),
                hk * rng.range(1, 4),
                hk,
            ));
            for (i, (b, sq, sk, hq, hk)) in shapes.into_iter().enumerate() {
                let scaling = if i % 2 == 0 {
                    Fp8Scaling::PerHead
                } else {
                    Fp8Scaling::PerTensor
                };
                let seed = rng.next_u64() % 1_000_000;
                check_both_v_paths(
                    &gpu,
                    &mut tally,
                    [b, sq, sk, hq, hk, d],
                    causal,
                    scaling,
                    seed,
                );
            }
        }
    }
    tally.finish("fp8");
}

/// One shape through both V paths (pre-pass and in-kernel transpose), each against the f64
/// reference on the dequantised inputs (within twice the P-quantisation model's error) and on
/// the unquantised ones.
fn check_both_v_paths(
    gpu: &Gpu,
    tally: &mut Tally,
    [b, sq, sk, hq, hk, d]: [usize; 6],
    causal: bool,
    scaling: Fp8Scaling,
    seed: u64,
) {
    let q = rand_heads([b, sq, hq, d], seed);
    let k = rand_heads([b, sk, hk, d], seed + 1);
    let v = rand_heads([b, sk, hk, d], seed + 2);
    for vtk in [false, true] {
        let o = run_fp8(gpu, (&q, &k, &v), scaling, causal, vtk);
        let tol = 2.0 * o.err_model + 1e-2;
        tally.record(
            o.err_deq <= tol && o.lse <= 1e-3 && o.err_raw <= 0.15,
            format!(
                "fp8 {} d={d} causal={causal} b={b} sq={sq} sk={sk} hq={hq} hk={hk} {scaling:?}: \
                 err vs dequantised ref {:.2e} (tol {tol:.2e}, P-quant model {:.2e}), \
                 vs unquantised {:.2e}, lse {:.2e}",
                if vtk { "in-kernel-vt" } else { "prepass-vt" },
                o.err_deq,
                o.err_model,
                o.err_raw,
                o.lse,
            ),
        );
    }
}

/// Every FP8 kernel on one small shape (two query tiles, a full and a partial key tile, GQA):
/// the case set compute-sanitizer (memcheck, racecheck, synccheck) runs, `gpu_fp8
/// fp8_sanitizer_small`.
#[test]
fn fp8_sanitizer_small() {
    let Some(gpu) = hopper_or_skip("fp8 GPU test") else {
        return;
    };
    let mut tally = Tally::default();
    for d in fa3_fp8::HEAD_DIMS {
        for causal in [false, true] {
            let shape = [1, 150, 200, 4, 2, d];
            check_both_v_paths(
                &gpu,
                &mut tally,
                shape,
                causal,
                Fp8Scaling::PerHead,
                d as u64,
            );
        }
    }
    tally.finish("fp8 sanitizer set");
}

#[test]
fn fp8_forward_api_and_errors() {
    let q = rand_heads([1, 40, 2, 64], 1);
    let fq = Fp8Tensor::quantize(&q, Fp8Scaling::PerTensor).unwrap();
    let Some(gpu) = hopper_or_skip("fp8 GPU test") else {
        // Without a usable GPU the host API still answers with an error, not a panic.
        if Gpu::get(0).is_err() {
            assert!(fa3_fp8::forward_host(0, &fq, &fq, &fq, &AttnOptions::new()).is_err());
        }
        return;
    };
    // Host API, self-attention, against the dequantised reference.
    let r = fa3_fp8::forward_host(0, &fq, &fq, &fq, &AttnOptions::new()).unwrap();
    assert_eq!(r.out.dtype(), DType::BF16);
    assert_eq!(r.out.shape(), &[1, 40, 2, 64]);
    let x = fq.dequantize();
    let (want, _) = ref_forward(&Qkv::dense(&x, &x, &x), &AttnOptions::new());
    let e = rel_err(&r.out.to_f32_vec(), &want);
    eprintln!("forward_host rel err {e:.2e}");
    assert!(e < 0.08, "{e}");
    // No keys: out 0, lse -inf.
    let k0 = Fp8Tensor::from_parts(vec![], [1, 0, 2, 64], vec![1.0]).unwrap();
    let r = fa3_fp8::forward_host(0, &fq, &k0, &k0, &AttnOptions::new()).unwrap();
    assert!(r.out.to_f32_vec().iter().all(|&v| v == 0.0));
    assert!(r.lse.to_f32_vec().iter().all(|&v| v == f32::NEG_INFINITY));
    // Unsupported features and shapes are errors.
    let up = |t: &Fp8Tensor| Fp8DeviceTensor::upload(&gpu, t).unwrap();
    let dq = up(&fq);
    for (name, opts) in [
        ("window", AttnOptions::new().window(8, 0)),
        ("softcap", AttnOptions::new().softcap(5.0)),
        ("dropout", AttnOptions::new().dropout(0.1, 1)),
        (
            "alibi",
            AttnOptions::new().alibi(flashattn::AlibiSlopes::per_head(vec![0.1, 0.2])),
        ),
        ("scale", AttnOptions::new().scale(-1.0)),
    ] {
        let e = fa3_fp8::forward(&gpu, &dq, &dq, &dq, &opts);
        eprintln!("{name}: {:?}", e.as_ref().err());
        assert!(e.is_err(), "{name} must be rejected");
    }
    let q96 = Fp8Tensor::quantize(&rand_heads([1, 4, 1, 96], 2), Fp8Scaling::PerTensor).unwrap();
    let d96 = up(&q96);
    assert!(fa3_fp8::forward(&gpu, &d96, &d96, &d96, &AttnOptions::new()).is_err());
    let k3 =
        up(&Fp8Tensor::quantize(&rand_heads([1, 4, 3, 64], 3), Fp8Scaling::PerTensor).unwrap());
    assert!(fa3_fp8::forward(&gpu, &dq, &k3, &k3, &AttnOptions::new()).is_err());
}

/// Every FP8 variant compiles to CUBIN under NVRTC for sm_90a with no spills, no stack frame,
/// no ignored setmaxnreg (C7508) and no serialized wgmma (needs NVRTC, not a GPU).
#[test]
fn fp8_variants_compile_without_spills() {
    if let Err(e) = flashattn::cuda::loader::nvrtc() {
        if std::env::var("FLASHATTN_REQUIRE_NVRTC").as_deref() == Ok("1") {
            panic!("FLASHATTN_REQUIRE_NVRTC=1 but {e}");
        }
        eprintln!("skipping: {e}");
        return;
    }
    let specs = fa3_fp8::all_variants("sm_90a");
    assert_eq!(specs.len(), 18);
    // Spills only where `report::accepted_spill_bytes` allows them (the d = 256 kernels with
    // the dynamic scheduler, at most 8 bytes plain and 36 causal; the d = 256 in-kernel
    // transpose's causal kernel in the linear order, at most 24).
    let bad = hopper_compile_audit(&specs, std::env::var("FP8_CUBIN_DIR").ok().as_deref());
    assert!(fa3_fp8::all_variants("sm_80").is_empty());
    assert!(
        bad.is_empty(),
        "fp8 variants with spills:\n{}",
        bad.join("\n")
    );
}

/// RMSE study: inputs N(0,1)-like with outlier channels in Q and K; error of each method
/// against the float64 reference on the unquantised inputs.
#[test]
fn fp8_rmse_study() {
    let Some(gpu) = hopper_or_skip("fp8 GPU test") else {
        return;
    };
    let (b, s, h, d) = (1usize, 1024usize, 4usize, 128usize);
    let mut rng = Rng::new(77);
    let gauss = |rng: &mut Rng| {
        // Box–Muller.
        let u1 = rng.uniform().max(1e-12);
        let u2 = rng.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    };
    println!("RMSE vs f64 reference on the unquantised inputs (b={b} s={s} h={h} d={d})");
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10}",
        "inputs", "bf16", "fp8 tensor", "fp8 head", "fp8+Hadam"
    );
    for (label, mult) in [
        ("N(0,1), no outliers", 1.0f32),
        ("4 outlier channels x10 in Q, K", 10.0),
        ("4 outlier channels x50 in Q, K", 50.0),
    ] {
        for causal in [false, true] {
            let chans = [3usize, 40, 77, 120];
            let mk = |rng: &mut Rng, outl: bool| {
                let mut v: Vec<f32> = (0..b * s * h * d).map(|_| gauss(rng)).collect();
                if outl {
                    for r in 0..b * s * h {
                        for &c in &chans {
                            v[r * d + c] *= mult;
                        }
                    }
                }
                Tensor::from_f32(v, &[b, s, h, d]).unwrap()
            };
            // Q K^T / sqrt(d) with x50 outliers would be one-hot; scale 1/d keeps it soft.
            let q = mk(&mut rng, true);
            let k = mk(&mut rng, true);
            let v = mk(&mut rng, false);
            let scale = if mult > 1.0 {
                1.0 / d as f32
            } else {
                1.0 / (d as f32).sqrt()
            };
            let opts = AttnOptions::new().causal(causal).scale(scale);
            let (want, _) = ref_forward(&Qkv::dense(&q, &k, &v), &opts);
            let rmse = |got: &[f32]| -> f64 {
                if got.iter().any(|x| !x.is_finite()) {
                    return f64::INFINITY;
                }
                (got.iter()
                    .zip(&want)
                    .map(|(g, w)| (*g as f64 - w).powi(2))
                    .sum::<f64>()
                    / want.len() as f64)
                    .sqrt()
            };
            // bf16: our FA3 kernel on bf16-rounded inputs.
            let bf =
                |t: &Tensor| Tensor::from_f32_as(&t.to_f32_vec(), t.shape(), DType::BF16).unwrap();
            let (bq, bk, bv) = (bf(&q), bf(&k), bf(&v));
            let qkv = Qkv::dense(&bq, &bk, &bv);
            let p = Problem::new(&qkv, &opts).unwrap();
            let up = |t: &Tensor| DeviceTensor::upload(&gpu, t).unwrap();
            let (out, lse) = fa3::forward(&gpu, &p, &up(&bq), &up(&bk), &up(&bv), &opts).unwrap();
            drop(lse);
            let e_bf16 = rmse(&out.download().unwrap().to_f32_vec());
            let run = |q: &Tensor, k: &Tensor, sc: Fp8Scaling| -> f64 {
                let f = |t: &Tensor| Fp8Tensor::quantize(t, sc).unwrap();
                let r = fa3_fp8::forward_host(0, &f(q), &f(k), &f(&v), &opts).unwrap();
                rmse(&r.out.to_f32_vec())
            };
            let e_t = run(&q, &k, Fp8Scaling::PerTensor);
            let e_h = run(&q, &k, Fp8Scaling::PerHead);
            let (hq_, hk_) = incoherent_qk(&q, &k, 1234).unwrap();
            let e_had = run(&hq_, &hk_, Fp8Scaling::PerTensor);
            let ref_rms = (want.iter().map(|w| w * w).sum::<f64>() / want.len() as f64).sqrt();
            println!(
                "{:<34} {:>10.3e} {:>10.3e} {:>10.3e} {:>10.3e}   (causal={causal}, scale={scale:.4}, rms(ref)={ref_rms:.3e})",
                label, e_bf16, e_t, e_h, e_had
            );
            assert!(e_bf16.is_finite() && e_t.is_finite() && e_h.is_finite() && e_had.is_finite());
            // bf16 stays far below the output's RMS; with outlier channels the Hadamard
            // transform must beat plain per-tensor FP8 (the point of incoherent processing).
            // (H100, 2026-11-26: x50 outliers put per-tensor FP8 at 35% of the output's RMS
            // — the logits are large and e4m3's 3 mantissa bits move them by whole units.)
            assert!(
                e_bf16 < 0.05 * ref_rms,
                "{label}: bf16 rmse {e_bf16} vs rms {ref_rms}"
            );
            if mult > 1.0 {
                assert!(e_had < e_t, "{label}: Hadamard {e_had} vs per-tensor {e_t}");
            }
        }
    }
}

/// Random e4m3 codes of moderate magnitude (|x| in [2^-3, 2^1]), never NaN.
fn rand_codes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let r = rng.next_u64();
            let mag = 0x20 + (r % 0x20) as u8; // exponents 4..7: 2^-3 .. <2^1
            mag | if r & 0x100 != 0 { 0x80 } else { 0 }
        })
        .collect()
}

/// Vᵀ as the pre-pass must lay it out: `[b, hk, d, skp]`, position 4t + i of every 16-key group
/// holding key {2t, 2t+1, 2t+8, 2t+9}[i] of the group (kernels/sm90/fp8.cuh), zeros past sk.
fn vt_layout(codes: &[u8], [b, sk, hk, d]: [usize; 4], skp: usize) -> Vec<u8> {
    let mut out = vec![0u8; b * hk * d * skp];
    for bi in 0..b {
        for h in 0..hk {
            for dd in 0..d {
                for p in 0..skp {
                    let (t, i) = ((p % 16) / 4, p % 4);
                    let key = p / 16 * 16 + if i < 2 { 2 * t + i } else { 8 + 2 * t + i - 2 };
                    if key < sk {
                        out[((bi * hk + h) * d + dd) * skp + p] =
                            codes[((bi * sk + key) * hk + h) * d + dd];
                    }
                }
            }
        }
    }
    out
}

/// The V pre-pass byte for byte against [`vt_layout`]: key counts around its 16-key groups and
/// 128-key blocks, every FP8 head dim, several heads and batches; `transpose_v_into` over a
/// buffer that held another V's transpose, and its shape check.
#[test]
fn fp8_v_prepass_layout() {
    let Some(gpu) = hopper_or_skip("fp8 GPU test") else {
        return;
    };
    let mut tally = Tally::default();
    let mut seed = 7;
    for d in fa3_fp8::HEAD_DIMS {
        for sk in [1usize, 15, 16, 17, 127, 128, 129, 300, 1000] {
            let shape = [2, sk, 3, d];
            let n: usize = shape.iter().product();
            let mk = |seed| {
                let t = Fp8Tensor::from_parts(rand_codes(n, seed), shape, vec![0.5]).unwrap();
                let dev = Fp8DeviceTensor::upload(&gpu, &t).unwrap();
                (t, dev)
            };
            seed += 2;
            let ((a, da), (b, db)) = (mk(seed), mk(seed + 1));
            let mut vt = fa3_fp8::transpose_v(&gpu, &da).unwrap();
            let skp = vt.padded_keys();
            let first = vt.to_bytes().unwrap() == vt_layout(a.data(), shape, skp);
            fa3_fp8::transpose_v_into(&gpu, &db, &mut vt).unwrap();
            let again = vt.to_bytes().unwrap() == vt_layout(b.data(), shape, skp);
            tally.record(
                skp == sk.div_ceil(16) * 16 && first && again,
                format!("v pre-pass d={d} sk={sk} (skp {skp}): transpose_v {first}, _into {again}"),
            );
        }
    }
    let v = |sk| {
        let t = Fp8Tensor::from_parts(vec![0x38; 64 * sk], [1, sk, 1, 64], vec![1.0]).unwrap();
        Fp8DeviceTensor::upload(&gpu, &t).unwrap()
    };
    let mut vt = fa3_fp8::transpose_v(&gpu, &v(32)).unwrap();
    let e = fa3_fp8::transpose_v_into(&gpu, &v(48), &mut vt).map(|_| ());
    tally.record(
        matches!(&e, Err(e) if e.to_string().contains("vt")),
        format!("transpose_v_into with another shape: {e:?}"),
    );
    tally.finish("fp8 v pre-pass layout");
}

/// SPEC §4 sweep shapes (16k tokens, hidden 2048): FP8 attention kernel alone, FP8 with the V
/// pre-pass, and our bf16 FA3 forward; one JSON line per row after the table.
#[test]
fn fp8_bench() {
    if std::env::var("FP8_BENCH").as_deref() != Ok("1") {
        eprintln!("skipping fp8_bench (set FP8_BENCH=1)");
        return;
    }
    let Some(gpu) = hopper_or_skip("fp8 GPU test") else {
        return;
    };
    let seqs: Vec<usize> = std::env::var("FP8_BENCH_SEQ")
        .unwrap_or_else(|_| "1024,2048,4096,8192,16384".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!(
        "{:>4} {:>6} {:>6} {:>3} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "d",
        "causal",
        "seq",
        "b",
        "heads",
        "fp8 kern",
        "fp8+vt",
        "fp8 vtk",
        "bf16 fa3",
        "vt ms",
        "kern ms"
    );
    let mut json = Vec::new();
    // FP8_BENCH_COOL_MS=N: the GPU idles N ms before every timed column, so that each column's
    // few-ms burst starts below the power cap, as each shape of the bf16 sweep does (host work
    // between shapes); unset, the columns run back to back and the long rows run capped
    // (bench/RESULTS.md "Step 26b").
    let cool_ms: u64 = std::env::var("FP8_BENCH_COOL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let cool = || std::thread::sleep(std::time::Duration::from_millis(cool_ms));
    let dims: Vec<usize> = std::env::var("FP8_BENCH_DIMS")
        .unwrap_or_else(|_| "64,128,256".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    for d in dims {
        for &s in &seqs {
            let b = (16384 / s).max(1);
            let h = 2048 / d;
            let n = b * s * h * d;
            let mk = |seed| {
                Fp8Tensor::from_parts(rand_codes(n, seed), [b, s, h, d], vec![1.0 / 16.0]).unwrap()
            };
            let (fq, fk, fv) = (mk(1), mk(2), mk(3));
            let up = |t: &Fp8Tensor| Fp8DeviceTensor::upload(&gpu, t).unwrap();
            let (dq, dk, dv) = (up(&fq), up(&fk), up(&fv));
            let vt = fa3_fp8::transpose_v(&gpu, &dv).unwrap();
            let out = DeviceTensor::alloc(&gpu, DType::BF16, &[b, s, h, d]).unwrap();
            let lse = DeviceTensor::alloc(&gpu, DType::F32, &[b, h, s]).unwrap();
            let bq = rand_tensor(DType::BF16, &[b, s, h, d], 11);
            let bk = rand_tensor(DType::BF16, &[b, s, h, d], 12);
            let bv = rand_tensor(DType::BF16, &[b, s, h, d], 13);
            let (gq, gk, gv) = (
                DeviceTensor::upload(&gpu, &bq).unwrap(),
                DeviceTensor::upload(&gpu, &bk).unwrap(),
                DeviceTensor::upload(&gpu, &bv).unwrap(),
            );
            let vt_ms = event_median_ms(&gpu, 30, 8, || {
                fa3_fp8::transpose_v(&gpu, &dv).unwrap();
            });
            for causal in [false, true] {
                let opts = AttnOptions::new().causal(causal);
                let flops = 4.0
                    * (b * h) as f64
                    * (s * s) as f64
                    * d as f64
                    * if causal { 0.5 } else { 1.0 };
                // bf16 first, then FP8 (call 1 timed FP8 first: rules out the order as the cause of its low bf16 rows).
                let p = Problem::new(&Qkv::dense(&bq, &bk, &bv), &opts).unwrap();
                let bout = DeviceTensor::alloc(&gpu, DType::BF16, &p.q_shape).unwrap();
                let blse = DeviceTensor::alloc(&gpu, DType::F32, &p.lse_shape()).unwrap();
                cool();
                let b_ms = event_median_ms(&gpu, 30, 8, || {
                    fa3::forward_into(&gpu, &p, &gq, &gk, &gv, &bout, &blse).unwrap()
                });
                // The ways a call can take V: the kernel on a kept Vᵀ, the pre-pass into a Vᵀ
                // and then the kernel on it, and the in-kernel transpose.
                let kernel_on = |v: &fa3_fp8::Fp8VTransposed| {
                    fa3_fp8::attention_into(&gpu, &dq, &dk, v, &opts, &out, &lse).unwrap()
                };
                let prepass_then_kernel = |v: &mut fa3_fp8::Fp8VTransposed| {
                    fa3_fp8::transpose_v_into(&gpu, &dv, v).unwrap();
                    kernel_on(v)
                };
                let in_kernel_transpose = || {
                    fa3_fp8::attention_into_raw_v(&gpu, &dq, &dk, &dv, &opts, &out, &lse).unwrap()
                };
                cool();
                let k_ms = event_median_ms(&gpu, 30, 8, || kernel_on(&vt));
                // The pre-pass into a kept Vᵀ (transpose_v_into), then the kernel.
                let mut vt2 = fa3_fp8::transpose_v(&gpu, &dv).unwrap();
                cool();
                let f_ms = event_median_ms(&gpu, 30, 8, || prepass_then_kernel(&mut vt2));
                cool();
                let v_ms = event_median_ms(&gpu, 30, 8, &in_kernel_transpose);
                let tf = |ms: f64| flops / (ms * 1e-3) / 1e12;
                // FP8_BENCH_GAP=1: what the pre-pass adds to a call. The columns above run in a
                // fixed order, so their differences also carry the GPU's power state
                // (bench/RESULTS.md "Step 33b"). Two rounds, each in this order: the in-kernel
                // transpose, the pre-pass into a Vᵀ the kernel does not read (its presence
                // without the data dependency), a memset of V's size (dirty L2 lines without the
                // pre-pass), the memset alone, the pre-pass + kernel, the kernel alone, and the
                // in-kernel transpose again (after the round's sustained load).
                if std::env::var("FP8_BENCH_GAP").as_deref() == Ok("1") {
                    let scratch = DeviceBuffer::zeros(&gpu, n).unwrap();
                    for round in 0..2 {
                        cool();
                        let in_kernel_first = event_median_ms(&gpu, 30, 8, &in_kernel_transpose);
                        cool();
                        let other = event_median_ms(&gpu, 30, 8, || {
                            fa3_fp8::transpose_v_into(&gpu, &dv, &mut vt2).unwrap();
                            kernel_on(&vt)
                        });
                        cool();
                        let memset = event_median_ms(&gpu, 30, 8, || {
                            scratch.fill_bytes(0x11).unwrap();
                            kernel_on(&vt)
                        });
                        cool();
                        let memset_alone = event_median_ms(&gpu, 30, 8, || {
                            scratch.fill_bytes(0x11).unwrap();
                        });
                        cool();
                        let with_vt =
                            event_median_ms(&gpu, 30, 8, || prepass_then_kernel(&mut vt2));
                        cool();
                        let alone = event_median_ms(&gpu, 30, 8, || kernel_on(&vt));
                        cool();
                        let in_kernel = event_median_ms(&gpu, 30, 8, &in_kernel_transpose);
                        // Both ways must agree after these runs (the same scores, V in another
                        // layout).
                        let o_vtk = out.download().unwrap().to_f32_vec();
                        kernel_on(&vt);
                        let o_vt = out.download().unwrap().to_f32_vec();
                        let want: Vec<f64> = o_vt.iter().map(|&x| x as f64).collect();
                        let diff = rel_err(&o_vtk, &want);
                        assert!(
                            diff <= 1e-3,
                            "in-kernel transpose and kernel on Vᵀ disagree: rel err {diff}"
                        );
                        println!(
                            "GAP d={d} causal={} seq={s} round {round}: ms in-kernel transpose \
                             {in_kernel_first:.4} first, {in_kernel:.4} last (O's rel err against \
                             the kernel on Vᵀ {diff:.2e}), kernel {alone:.4}, \
                             pre-pass {vt_ms:.4}, pre-pass + kernel {with_vt:.4}, pre-pass \
                             elsewhere + kernel {other:.4}, memset {memset_alone:.4}, memset + \
                             kernel {memset:.4}",
                            causal as u8
                        );
                    }
                }
                // FP8_BENCH_TUNES_<d>="stages=2;stages=4": extra rows per setting, the kernel
                // on the kept Vᵀ and with the in-kernel transpose.
                if let Ok(tunes) = std::env::var(format!("FP8_BENCH_TUNES_{d}")) {
                    for t in tunes.split(';').filter(|t| !t.is_empty()) {
                        std::env::set_var("FLASHATTN_FP8_TUNE", t);
                        cool();
                        let ms = event_median_ms(&gpu, 20, 8, || kernel_on(&vt));
                        cool();
                        let vk_ms = event_median_ms(&gpu, 20, 8, &in_kernel_transpose);
                        cool();
                        let pk_ms = event_median_ms(&gpu, 20, 8, || prepass_then_kernel(&mut vt2));
                        println!(
                            "TUNE d={d} causal={} seq={s} {t}: kernel {:.1} pre-pass+kernel {:.1} \
                             vtk {:.1} TFLOP/s (default {:.1} / {:.1} / {:.1})",
                            causal as u8,
                            tf(ms),
                            tf(pk_ms),
                            tf(vk_ms),
                            tf(k_ms),
                            tf(f_ms),
                            tf(v_ms)
                        );
                        std::env::remove_var("FLASHATTN_FP8_TUNE");
                    }
                }
                let finite = out
                    .download()
                    .unwrap()
                    .to_f32_vec()
                    .iter()
                    .all(|x| x.is_finite());
                println!(
                    "{:>4} {:>6} {:>6} {:>3} {:>5} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.4} {:>9.4}{}",
                    d,
                    causal as u8,
                    s,
                    b,
                    h,
                    tf(k_ms),
                    tf(f_ms),
                    tf(v_ms),
                    tf(b_ms),
                    vt_ms,
                    k_ms,
                    if finite { "" } else { " NONFINITE" }
                );
                json.push(format!(
                    "{{\"d\":{d},\"seqlen\":{s},\"causal\":{causal},\"fp8_kernel\":{:.2},\"fp8_with_vt\":{:.2},\"fp8_vtk\":{:.2},\"bf16_fa3\":{:.2},\"vt_ms\":{vt_ms:.5},\"finite\":{finite}}}",
                    tf(k_ms),
                    tf(f_ms),
                    tf(v_ms),
                    tf(b_ms)
                ));
            }
        }
    }
    for j in json {
        println!("FP8JSON {j}");
    }
}
