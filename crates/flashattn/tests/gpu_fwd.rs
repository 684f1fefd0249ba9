//! FA2 forward on the GPU against the float64 reference and the CPU path (same rounded inputs).
//! Skips, printing why, when no GPU/driver/NVRTC is present.
#![cfg(feature = "cuda")]

mod common;

use common::*;
use flashattn::cuda::fa2::{self, Features, Variant};
use flashattn::cuda::{DeviceTensor, Gpu};
use flashattn::{forward, AlibiSlopes, AttnOptions, DType, Device, Problem};

/// SPEC tolerances for the GPU: relative Frobenius error vs f64 on the same rounded inputs.
fn gpu_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 5e-3,
        _ => 2e-2,
    }
}

/// `FA2_TEST_TILES=128:128x64w4u2,256:128x32w8s3` runs every case of that head dim on that
/// tile instead of the table's (tuning: a candidate tile must pass the same checks).
fn tile_override(head_dim: usize) -> Option<fa2::Tile> {
    let list = std::env::var("FA2_TEST_TILES").ok()?;
    list.split(',').find_map(|item| {
        let (d, t) = item.split_once(':')?;
        (d.parse::<usize>().ok()? == head_dim).then(|| fa2::Tile::parse(t).expect("FA2_TEST_TILES"))
    })
}

/// Runs FA2 into poisoned outputs and returns (out, lse) as f32 host vectors.
fn run_fa2(g: &Gpu, c: &Case) -> (Vec<f32>, Vec<f32>) {
    let what = c.spec.describe();
    let qkv = c.qkv();
    let problem = Problem::new(&qkv, c.opts()).unwrap_or_else(|e| panic!("{e}: {what}"));
    let up = |t| DeviceTensor::upload(g, t).unwrap();
    let (q, k, v) = (up(&c.q), up(&c.k), up(&c.v));
    let out = DeviceTensor::alloc(g, problem.dtype, &problem.q_shape).unwrap();
    let lse = DeviceTensor::alloc(g, DType::F32, &problem.lse_shape()).unwrap();
    out.fill_poison().unwrap();
    lse.fill_poison().unwrap();
    let tile = tile_override(problem.head_dim);
    fa2::forward_into(g, &problem, &q, &k, &v, &out, &lse, c.opts(), tile)
        .unwrap_or_else(|e| panic!("{e}: {what}"));
    g.synchronize().unwrap_or_else(|e| panic!("{e}: {what}"));
    let o = out.download().unwrap().to_f32_vec();
    let l = lse.download().unwrap().to_f32_vec();
    (o, l)
}

/// Checks one case against the reference and the CPU backend; returns (out err, lse err).
fn check(g: &Gpu, c: &Case) -> (f64, f64) {
    let what = c.spec.describe();
    let (o, l) = run_fa2(g, c);
    let (want_o, want_l) = c.ref_forward();
    let eo = rel_err(&o, &want_o);
    let el = lse_err(&l, &want_l);
    let tol = gpu_tol(c.spec.dtype);
    assert!(eo <= tol, "out rel err {eo:e} > {tol:e}: {what}");
    assert!(el <= 1e-3, "lse err {el:e}: {what}");
    // Same answer as the CPU path (dropout: the same mask, so the same output).
    let cpu = forward(&c.qkv(), c.opts(), Device::Cpu).unwrap();
    let cpu_o: Vec<f64> = cpu.out.to_f32_vec().iter().map(|&x| x as f64).collect();
    let ec = rel_err(&o, &cpu_o);
    assert!(ec <= 2.0 * tol, "GPU vs CPU rel err {ec:e}: {what}");
    (eo, el)
}

#[test]
fn random_cases() {
    let Some(g) = gpu_or_skip("GPU test") else {
        return;
    };
    let mut rng = Rng::new(0xC2F0);
    let cfg = CaseConfig::gpu();
    let mut worst = [0.0f64; 2];
    for n in 0..160 {
        let c = random_case(&mut rng, &cfg);
        let (eo, _) = check(&g, &c);
        let i = (c.spec.dtype == DType::BF16) as usize;
        worst[i] = worst[i].max(eo);
        if n % 40 == 0 {
            eprintln!("case {n}: err {eo:.2e} {}", c.spec.describe());
        }
    }
    eprintln!(
        "worst out rel err: f16 {:.2e}, bf16 {:.2e}",
        worst[0], worst[1]
    );
}

#[test]
fn every_head_dim_dtype_and_feature_group() {
    let Some(g) = gpu_or_skip("GPU test") else {
        return;
    };
    let mut seed = 1;
    for d in fa2::HEAD_DIMS {
        for dtype in [DType::F16, DType::BF16] {
            for (sq, sk) in [(1, 1), (77, 200), (300, 129), (256, 256)] {
                for opts in [
                    AttnOptions::new(),
                    AttnOptions::new().causal(true),
                    AttnOptions::new().window(40, 7),
                    AttnOptions::new()
                        .causal(true)
                        .softcap(5.0)
                        .alibi(AlibiSlopes::per_head(vec![0.1, 0.03, 0.5, 0.25]))
                        .dropout(0.2, 99),
                ] {
                    seed += 1;
                    let c = Case::dense(dtype, 2, sq, sk, 4, 2, d, opts, seed);
                    check(&g, &c);
                }
            }
        }
    }
}

#[test]
fn empty_rows_and_zero_length_sequences() {
    let Some(g) = gpu_or_skip("GPU test") else {
        return;
    };
    // Causal with sq > sk: the first sq - sk rows see nothing (out 0, lse -inf).
    let c = Case::dense(
        DType::BF16,
        2,
        150,
        40,
        2,
        1,
        64,
        AttnOptions::new().causal(true),
        7,
    );
    let (o, l) = run_fa2(&g, &c);
    assert!(o.iter().all(|x| x.is_finite()));
    assert!(l.contains(&f32::NEG_INFINITY));
    check(&g, &c);
    // A window that leaves rows empty in the middle of the tile range.
    check(
        &g,
        &Case::dense(
            DType::F16,
            1,
            200,
            50,
            2,
            2,
            128,
            AttnOptions::new().window(0, 0),
            8,
        ),
    );
    // Varlen with zero-length queries and keys.
    let lens = [(0, 5), (17, 0), (130, 257), (0, 0), (1, 1), (64, 63)];
    for opts in [
        AttnOptions::new(),
        AttnOptions::new().causal(true),
        AttnOptions::new().dropout(0.3, 5),
    ] {
        let c = Case::varlen(DType::BF16, &lens, 6, 3, 128, opts.clone(), 9);
        let (o, l) = run_fa2(&g, &c);
        assert!(o.iter().all(|x| x.is_finite()), "NaN in out: {opts:?}");
        assert!(l.iter().all(|x| !x.is_nan()), "NaN in lse: {opts:?}");
        check(&g, &c);
    }
}

#[test]
fn gqa_mqa_long_and_public_api() {
    let Some(g) = gpu_or_skip("GPU test") else {
        return;
    };
    // MQA, GQA, sq != sk both ways, long enough for many K/V tiles.
    for (hq, hk, sq, sk) in [(8, 1, 1000, 1300), (6, 2, 1537, 900), (4, 4, 2048, 2048)] {
        for opts in [AttnOptions::new(), AttnOptions::new().causal(true)] {
            let c = Case::dense(DType::BF16, 1, sq, sk, hq, hk, 128, opts, (hq * sq) as u64);
            check(&g, &c);
        }
    }
    // The public API (upload, dispatch, download).
    let c = Case::dense(
        DType::F16,
        2,
        333,
        333,
        4,
        2,
        64,
        AttnOptions::new().causal(true),
        3,
    );
    let got = forward(&c.qkv(), c.opts(), Device::Cuda(0)).unwrap();
    let (want_o, want_l) = c.ref_forward();
    assert!(rel_err(&got.out.to_f32_vec(), &want_o) <= 5e-3);
    assert!(lse_err(&got.lse.to_f32_vec(), &want_l) <= 1e-3);
}

#[test]
fn dropout_matches_cpu_mask() {
    let Some(g) = gpu_or_skip("GPU test") else {
        return;
    };
    for (p, seed, offset) in [(0.1f32, 1u64, 0u64), (0.5, 0xDEAD_BEEF_1234, 1 << 40 | 77)] {
        let opts = AttnOptions::new().dropout(p, seed).dropout_offset(offset);
        let c = Case::dense(DType::F16, 2, 190, 301, 4, 4, 64, opts, seed ^ 5);
        let (o, _) = run_fa2(&g, &c);
        let cpu = forward(&c.qkv(), c.opts(), Device::Cpu)
            .unwrap()
            .out
            .to_f32_vec();
        // Same mask => tiny differences; a different mask would give O(1) errors.
        let cpu64: Vec<f64> = cpu.iter().map(|&x| x as f64).collect();
        let e = rel_err(&o, &cpu64);
        assert!(e < 5e-3, "dropout GPU vs CPU {e:e}");
    }
}

#[test]
fn variant_specs_are_distinct() {
    let v = fa2::all_variants("sm_80");
    assert_eq!(v.len(), 36);
    let set: std::collections::HashSet<_> = v.iter().collect();
    assert_eq!(set.len(), v.len());
    let var = Variant::new(128, DType::BF16, Features::Mask);
    assert!(var.spec().label().contains("HAS_MASK=1"));
}

/// A few small launches covering every code path; also the case set compute-sanitizer
/// (memcheck, racecheck) runs: `gpu_fwd sanitizer_small`.
#[test]
fn sanitizer_small() {
    let Some(g) = gpu_or_skip("GPU test") else {
        return;
    };
    let full = AttnOptions::new()
        .window(30, 0)
        .softcap(5.0)
        .alibi(AlibiSlopes::per_head(vec![0.1, 0.2]))
        .dropout(0.2, 1);
    for (d, opts) in [
        (64, AttnOptions::new()),
        (128, AttnOptions::new().causal(true)),
        (256, full.clone()),
        (96, full),
    ] {
        let c = Case::dense(DType::BF16, 1, 150, 133, 2, 1, d, opts, d as u64);
        check(&g, &c);
    }
    let lens = [(0, 5), (17, 0), (70, 129), (1, 1)];
    check(
        &g,
        &Case::varlen(
            DType::F16,
            &lens,
            2,
            2,
            32,
            AttnOptions::new().causal(true),
            4,
        ),
    );
    check(
        &g,
        &Case::varlen(DType::F16, &lens, 2, 1, 192, AttnOptions::new(), 5),
    );
}

/// Every shipped tile fits the architecture's shared memory (no GPU needed).
#[test]
fn tiles_fit_shared_memory() {
    for arch in ["sm_80", "sm_86", "sm_89", "sm_90a"] {
        let max = fa2::max_smem_for_arch(arch);
        for d in fa2::HEAD_DIMS {
            for f in Features::ALL {
                let t = fa2::fit_tile(fa2::tile_for(d, f), d, max);
                assert!(
                    t.smem_bytes(d) <= max,
                    "{arch} d={d} {f:?}: {t} needs {}",
                    t.smem_bytes(d)
                );
                assert_eq!(t.bq % (16 * t.warps), 0);
            }
        }
        assert_eq!(fa2::all_variants(arch).len(), 36);
    }
    let t = fa2::fit_tile(
        fa2::Tile::new(128, 64, 8),
        256,
        fa2::max_smem_for_arch("sm_86"),
    );
    assert_eq!(t.to_string(), "128x32w8s1");
    assert_eq!(
        fa2::Tile::parse("128x64w4s1")
            .map(|t| t.to_string())
            .as_deref(),
        Some("128x64w4s1")
    );
    assert!(fa2::Tile::parse("100x64w4").is_none());
    let lean = fa2::Tile::parse("128x32w4s3u2l").expect("lean 3-stage tile");
    assert!(lean.lean && lean.stages == 3 && lean.unroll == 2);
    assert_eq!(lean.to_string(), "128x32w4s3u2l");
    assert!(
        fa2::Tile::parse("128x32w4s3").is_none(),
        "3 stages need the LEAN loop"
    );
}

/// Resource report (registers, spills) of candidate tiles, compiled through NVRTC for sm_80 and
/// sm_90a in every feature group and dtype (no GPU needed). Tuning aid: set
/// `FA2_TILE_CANDIDATES=128:128x64w4,256:128x32w8s3` (head_dim:tile, comma separated).
#[test]
fn candidate_tile_resources() {
    let Ok(list) = std::env::var("FA2_TILE_CANDIDATES") else {
        eprintln!("skipping: set FA2_TILE_CANDIDATES=d:tile,... to report candidate tiles");
        return;
    };
    for item in list.split(',').filter(|s| !s.is_empty()) {
        let (d, t) = item.split_once(':').expect("d:tile");
        let d: usize = d.parse().expect("head dim");
        let tile = fa2::Tile::parse(t).expect("tile");
        for arch in ["sm_80", "sm_90a"] {
            for f in Features::ALL {
                for dtype in [DType::F16, DType::BF16] {
                    let mut v = Variant::new(d, dtype, f);
                    v.tile = tile;
                    let mut spec = v.spec();
                    // Extra -D switches for experiments, e.g. FA2_EXTRA_DEFINES=S_UNROLL=2.
                    for kv in std::env::var("FA2_EXTRA_DEFINES")
                        .unwrap_or_default()
                        .split(',')
                    {
                        if let Some((k, x)) = kv.split_once('=') {
                            spec = spec.define(k, x);
                        }
                    }
                    match flashattn::cuda::jit::compile(&spec, arch) {
                        Ok(c) => {
                            let r = &c.resources;
                            eprintln!(
                                "{arch} {}: regs {} spill st/ld {}/{} stack {}",
                                v.name(),
                                r.registers,
                                r.spill_stores,
                                r.spill_loads,
                                r.stack_bytes
                            );
                        }
                        Err(e) => eprintln!("{arch} {}: ERROR {e}", v.name()),
                    }
                }
            }
        }
    }
}
