//! The GPU backward: the FA2 kernels (kernels/sm80/bwd.cu, cuda/fa2_bwd.rs) and, on sm 9.0, the
//! Hopper main kernel (kernels/sm90/bwd.cu, cuda/fa3_bwd.rs). Every case it supports runs
//! through both main kernels (`Family::Fa2` and `Family::Fa3`), so neither hides behind the other.
//!
//! - every shipped variant compiles (NVRTC only, no GPU needed) with its register/spill report;
//! - against the float64 reference gradients (on the same rounded inputs, with `D` from the
//!   rounded `out` the backward is given) and against the CPU backward, over random shapes and
//!   options, with poisoned (NaN-filled) outputs so that an unwritten element fails;
//! - deterministic mode is bit-identical over repeated runs;
//! - a small training run (SGD on q/k/v projections) gives the same loss curve on CPU and GPU;
//! - `bwd_bench` (only with FLASHATTN_BENCH=1) prints backward TFLOP/s for the standard sweep.
//!
//! Tolerances (relative Frobenius vs f64): f16 1e-2, bf16 3e-2. Tests skip, with the reason
//! printed, when there is no GPU (or no NVRTC for the compile test).
#![cfg(feature = "cuda")]

mod common;

use common::*;
use flashattn::cuda::jit;
use flashattn::cuda::{fa2_bwd, fa3_bwd};
use flashattn::cuda::{loader, DeviceTensor, Family, Gpu};
use flashattn::{AlibiSlopes, AttnOptions, DType, Device, Error, Problem, Qkv, Tensor};
use std::time::Instant;

fn bwd_tol(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 3e-2,
        _ => 1e-2,
    }
}

/// Forward on the CPU (out, lse in the case's dtype), then backward on `device`.
fn run_case(
    case: &Case,
    dout: &Tensor,
    device: Device,
    det: bool,
    family: Family,
) -> Result<(flashattn::Gradients, Tensor), Error> {
    let opts = case.opts().clone().deterministic(det);
    let fwd = flashattn::forward(&case.qkv(), &opts, Device::Cpu)?;
    let g = match device {
        Device::Cuda(_) => {
            gpu_backward_poisoned(&case.qkv(), &fwd.out, &fwd.lse, dout, &opts, family)?
        }
        Device::Cpu => flashattn::backward(&case.qkv(), &fwd.out, &fwd.lse, dout, &opts, device)?,
    };
    Ok((g, fwd.out))
}

/// The GPU backward into NaN-filled gradient buffers, so that any element the kernels leave
/// unwritten fails the comparison. Empty inputs go through the public API (answered on the host).
fn gpu_backward_poisoned(
    qkv: &Qkv<'_>,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    opts: &AttnOptions,
    family: Family,
) -> Result<flashattn::Gradients, Error> {
    if qkv.q.numel() == 0 || qkv.k.numel() == 0 {
        return flashattn::backward(qkv, out, lse, dout, opts, Device::Cuda(0));
    }
    let gpu = Gpu::get(0)?;
    let problem = Problem::new(qkv, opts)?;
    let up = |t: &Tensor| DeviceTensor::upload(&gpu, t);
    let (q, k, v) = (up(qkv.q)?, up(qkv.k)?, up(qkv.v)?);
    let (o, l, d) = (up(out)?, up(lse)?, up(dout)?);
    let poisoned = |shape: &[usize]| -> Result<DeviceTensor, Error> {
        let t = DeviceTensor::uninit(&gpu, problem.dtype, shape)?;
        t.fill_poison()?;
        Ok(t)
    };
    let dq = poisoned(&problem.q_shape)?;
    let dk = poisoned(&problem.k_shape)?;
    let dv = poisoned(&problem.k_shape)?;
    fa2_bwd::backward_into(
        &gpu,
        &problem,
        &q,
        &k,
        &v,
        &o,
        &l,
        &d,
        opts,
        [&dq, &dk, &dv],
        family,
    )?;
    Ok(flashattn::Gradients {
        dq: dq.download()?,
        dk: dk.download()?,
        dv: dv.download()?,
    })
}

struct Errs {
    vs_ref: [f64; 3],
    vs_cpu: [f64; 3],
}

impl std::fmt::Display for Errs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [rq, rk, rv] = self.vs_ref;
        let [cq, ck, cv] = self.vs_cpu;
        write!(
            f,
            "vs f64 {rq:.2e}/{rk:.2e}/{rv:.2e} vs cpu {cq:.2e}/{ck:.2e}/{cv:.2e}"
        )
    }
}

/// The main kernels that can run `case`: FA2 always; the Hopper one too where it supports it.
fn families(case: &Case, det: bool) -> Vec<Family> {
    let gpu = Gpu::get(0).expect("gpu");
    let opts = case.opts().clone().deterministic(det);
    let hopper = Problem::new(&case.qkv(), &opts)
        .map(|p| fa3_bwd::supports(&gpu, &p, &opts))
        .unwrap_or(false);
    if hopper {
        vec![Family::Fa2, Family::Fa3]
    } else {
        vec![Family::Fa2]
    }
}

/// `check_case_with` for every main kernel that can run `case`; returns the worst errors.
fn check_case(case: &Case, det: bool) -> Errs {
    let mut worst = Errs {
        vs_ref: [0.0; 3],
        vs_cpu: [0.0; 3],
    };
    for fam in families(case, det) {
        let e = check_case_with(case, det, fam);
        for i in 0..3 {
            worst.vs_ref[i] = worst.vs_ref[i].max(e.vs_ref[i]);
            worst.vs_cpu[i] = worst.vs_cpu[i].max(e.vs_cpu[i]);
        }
    }
    worst
}

fn check_case_with(case: &Case, det: bool, family: Family) -> Errs {
    let dout = case.dout();
    let (g, out) = run_case(case, &dout, Device::Cuda(0), det, family).unwrap_or_else(|e| {
        panic!(
            "GPU backward ({family:?}) failed: {e}\n{}",
            case.spec.describe()
        )
    });
    let (cg, _) = run_case(case, &dout, Device::Cpu, det, family).expect("CPU backward");
    let (rq, rk, rv) = case.ref_backward_given_out(&dout, &out);
    let got = [g.dq.to_f32_vec(), g.dk.to_f32_vec(), g.dv.to_f32_vec()];
    let cpu = [cg.dq.to_f32_vec(), cg.dk.to_f32_vec(), cg.dv.to_f32_vec()];
    let refs = [rq, rk, rv];
    let mut e = Errs {
        vs_ref: [0.0; 3],
        vs_cpu: [0.0; 3],
    };
    // Errors relative to each gradient's norm, but never to less than 1e-3 of ‖dV‖ (the
    // backward's natural scale, which does not cancel): below that, dq and dk are rounding
    // noise (e.g. one key: dS = P (dP − D) = 0 in exact arithmetic) on every backend.
    let floor = 1e-3 * refs[2].iter().map(|w| w * w).sum::<f64>().sqrt();
    let tol = bwd_tol(case.spec.dtype);
    for (i, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
        e.vs_ref[i] = rel_err_floor(&got[i], &refs[i], floor);
        let c64: Vec<f64> = cpu[i].iter().map(|&x| x as f64).collect();
        e.vs_cpu[i] = rel_err_floor(&got[i], &c64, floor);
        assert!(
            e.vs_ref[i] <= tol && e.vs_cpu[i] <= tol,
            "{name} ({family:?}, det={det}): vs f64 {:.3e}, vs CPU {:.3e} > {tol:e}\n{}",
            e.vs_ref[i],
            e.vs_cpu[i],
            case.spec.describe()
        );
    }
    e
}

#[test]
fn bwd_variants_compile() {
    if let Err(e) = loader::nvrtc() {
        eprintln!("skipping: {e}");
        return;
    }
    let all = std::env::var("FLASHATTN_BWD_COMPILE_ALL").as_deref() == Ok("1");
    // Tuning: FLASHATTN_BWD_COMPILE_D=64,128 limits the head dims (with FLASHATTN_BWD_TILES).
    let dims: Option<Vec<String>> = std::env::var("FLASHATTN_BWD_COMPILE_D")
        .ok()
        .map(|s| s.split(',').map(|x| x.trim().to_string()).collect());
    for arch in ["sm_80", "sm_90a"] {
        let mut specs = fa2_bwd::all_variants(arch);
        specs.extend(fa3_bwd::all_variants(arch));
        assert!(!specs.is_empty());
        for spec in specs {
            // Base: bf16, no dropout/softcap/ALiBi, not deterministic (causal included).
            let base = !spec.defines.iter().any(|(n, v)| {
                (n == "FA_DROPOUT" && v == "1")
                    || (n == "FA_BF16" && v == "0")
                    || (n == "FA_DET" && v == "1")
            });
            if !all && !base {
                continue;
            }
            if let Some(ds) = &dims {
                let d = spec
                    .defines
                    .iter()
                    .find(|(n, _)| n == "FA_D" || n == "FB_D")
                    .map(|(_, v)| v);
                if !d.is_some_and(|d| ds.contains(d)) || !spec.entry.contains("main") {
                    continue;
                }
            }
            let t = Instant::now();
            // Through the shared disk cache: kernels_compile.rs compiles these again.
            let c = jit::compile(&spec, arch)
                .unwrap_or_else(|e| panic!("{arch} {}: {e}", spec.label()));
            let r = c.resources;
            // ptxas says so when it must serialise wgmma (an async operand it cannot prove safe,
            // or wgmma on a divergent path): the Hopper kernel must have none, and no spills.
            let serialised: Vec<&str> = c.log.lines().filter(|l| l.contains("wgmma")).collect();
            if spec.entry == fa3_bwd::ENTRY {
                assert!(
                    serialised.is_empty() && r.spill_stores == 0 && r.spill_loads == 0,
                    "{arch} {}: spills {}/{} or serialised wgmma {serialised:?}",
                    spec.label(),
                    r.spill_stores,
                    r.spill_loads
                );
            }
            eprintln!(
                "{arch} {:<80} regs {:>3} spill {:>4}/{:<4} stack {:>4}  ({:.1}s)",
                spec.label(),
                r.registers,
                r.spill_stores,
                r.spill_loads,
                r.stack_bytes,
                t.elapsed().as_secs_f64()
            );
        }
    }
}

#[test]
fn bwd_random_cases_vs_reference_and_cpu() {
    let Some(_gpu) = gpu_or_skip("GPU backward test") else {
        return;
    };
    let n: usize = std::env::var("FLASHATTN_BWD_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let cfg = CaseConfig::gpu();
    let mut rng = Rng::new(0xC3B0);
    let mut worst = [0.0f64; 2];
    for c in 0..n {
        let case = random_case(&mut rng, &cfg);
        let det = c % 4 == 3;
        let e = check_case(&case, det);
        let wr = e.vs_ref.iter().cloned().fold(0.0, f64::max);
        let wc = e.vs_cpu.iter().cloned().fold(0.0, f64::max);
        worst[0] = worst[0].max(wr);
        worst[1] = worst[1].max(wc);
        eprintln!(
            "case {c:>3} det={det} vs f64 {wr:.2e} vs cpu {wc:.2e}: {}",
            case.spec.describe()
        );
    }
    eprintln!(
        "random cases: {n}, worst rel err vs f64 {:.3e}, vs CPU {:.3e}",
        worst[0], worst[1]
    );
}

#[test]
fn bwd_edge_cases() {
    let Some(_gpu) = gpu_or_skip("GPU backward test") else {
        return;
    };
    let mut cases = Vec::new();
    let s = |x: u64| x * 7919;
    for (i, &d) in [32usize, 64, 96, 128, 192, 256].iter().enumerate() {
        let dt = if i % 2 == 0 { DType::BF16 } else { DType::F16 };
        // Odd lengths, sq != sk both ways, causal (empty rows when sq > sk), GQA.
        cases.push(Case::dense(
            dt,
            2,
            77,
            131,
            4,
            2,
            d,
            AttnOptions::new().causal(true),
            s(1 + i as u64),
        ));
        cases.push(Case::dense(
            dt,
            1,
            131,
            45,
            3,
            1,
            d,
            AttnOptions::new().causal(true),
            s(2 + i as u64),
        ));
        cases.push(Case::dense(
            dt,
            1,
            200,
            200,
            2,
            2,
            d,
            AttnOptions::new().window(17, 5),
            s(3 + i as u64),
        ));
    }
    // Every option at once, MQA.
    cases.push(Case::dense(
        DType::BF16,
        2,
        150,
        170,
        4,
        1,
        64,
        AttnOptions::new()
            .causal(true)
            .window(40, -1)
            .softcap(20.0)
            .alibi(AlibiSlopes::per_head(vec![0.5, 0.25, 0.125, 0.0625]))
            .dropout(0.2, 1234)
            .dropout_offset(0x1_0000_0003),
        11,
    ));
    cases.push(Case::dense(
        DType::F16,
        1,
        96,
        64,
        2,
        2,
        128,
        AttnOptions::new().softcap(5.0).dropout(0.5, 7).scale(0.3),
        12,
    ));
    // Varlen with empty sequences on either side.
    cases.push(Case::varlen(
        DType::BF16,
        &[(33, 65), (0, 17), (129, 0), (1, 1), (250, 190)],
        4,
        2,
        128,
        AttnOptions::new().causal(true).dropout(0.1, 99),
        13,
    ));
    cases.push(Case::varlen(
        DType::F16,
        &[(64, 64), (100, 300), (7, 3)],
        6,
        3,
        64,
        AttnOptions::new(),
        14,
    ));
    for (ci, case) in cases.iter().enumerate() {
        for det in [false, true] {
            let e = check_case(case, det);
            eprintln!("edge {ci:>2} det={det} {e}: {}", case.spec.describe());
        }
    }
}

/// Shapes aimed at the Hopper main kernel (128-key blocks; 128-row query tiles at d = 64, 64 at
/// d = 128): partial tiles, sq != sk both ways, one token, empty rows and sequences, GQA, a
/// window, and long enough walks that the two-stage ring wraps many times. Each runs through
/// both main kernels; on sm 9.0 the test fails if the Hopper one does not take them.
#[test]
fn bwd_hopper_cases() {
    let Some(gpu) = gpu_or_skip("GPU backward test") else {
        return;
    };
    let hopper = gpu.arch().major == 9 && gpu.arch().minor == 0;
    if !hopper {
        eprintln!(
            "note: not sm 9.0 ({}); these cases run the FA2 main kernel only",
            gpu.arch()
        );
    }
    let causal = || AttnOptions::new().causal(true);
    let cases = [
        Case::dense(
            DType::BF16,
            2,
            1000,
            1000,
            4,
            4,
            128,
            AttnOptions::new(),
            41,
        ),
        Case::dense(DType::BF16, 2, 1000, 1000, 4, 2, 128, causal(), 42),
        Case::dense(DType::F16, 1, 300, 700, 6, 2, 64, causal(), 43),
        Case::dense(
            DType::BF16,
            1,
            513,
            129,
            2,
            1,
            64,
            AttnOptions::new().window(64, 32),
            44,
        ),
        Case::dense(DType::F16, 1, 700, 300, 2, 2, 128, causal(), 45),
        Case::dense(DType::BF16, 3, 1, 1, 2, 2, 128, AttnOptions::new(), 46),
        Case::dense(DType::BF16, 1, 1, 300, 4, 1, 64, causal(), 47),
        Case::dense(DType::F16, 1, 300, 1, 2, 1, 128, causal(), 48),
        Case::dense(DType::BF16, 1, 2048, 2048, 2, 1, 64, causal(), 49),
        Case::dense(
            DType::BF16,
            1,
            256,
            384,
            2,
            2,
            128,
            AttnOptions::new().window(-1, 0).scale(-0.2),
            50,
        ),
        Case::varlen(
            DType::BF16,
            &[(33, 65), (0, 17), (129, 0), (1, 1), (250, 190)],
            4,
            2,
            128,
            causal(),
            51,
        ),
        Case::varlen(
            DType::F16,
            &[(64, 64), (100, 300), (7, 3)],
            6,
            3,
            64,
            AttnOptions::new(),
            52,
        ),
        Case::dense(DType::BF16, 2, 1000, 1000, 4, 2, 256, causal(), 54),
        Case::dense(DType::F16, 1, 130, 333, 2, 1, 256, AttnOptions::new(), 55),
        Case::dense(DType::BF16, 1, 333, 130, 2, 2, 256, causal(), 56),
        Case::varlen(
            DType::BF16,
            &[(1, 1), (200, 77), (0, 5), (150, 260)],
            2,
            1,
            256,
            AttnOptions::new().window(50, 10),
            57,
        ),
        Case::varlen(
            DType::BF16,
            &[(200, 500), (385, 129)],
            2,
            2,
            64,
            AttnOptions::new().window(100, 20),
            53,
        ),
    ];
    for (ci, case) in cases.iter().enumerate() {
        let fams = families(case, false);
        assert!(
            !hopper || fams.contains(&Family::Fa3),
            "the Hopper backward does not take {}",
            case.spec.describe()
        );
        for fam in fams {
            let e = check_case_with(case, false, fam);
            eprintln!("hopper {ci:>2} {fam:?} {e}: {}", case.spec.describe());
        }
    }
}

/// Several waves of CTAs (more key blocks than two per SM), GQA, key blocks without visible
/// queries (zero dK/dV), varlen key blocks past a sequence's end: through both main kernels,
/// against f64 and the CPU. (Written for a persistent variant of the Hopper kernel whose CTAs
/// walk several blocks each — kept on branch exp/bwd-persistent, see bench/RESULTS.md.)
#[test]
fn bwd_hopper_many_blocks() {
    let Some(gpu) = hopper_or_skip("Hopper backward many-blocks test") else {
        return;
    };
    let causal = || AttnOptions::new().causal(true);
    let mut rng = Rng::new(71);
    let ragged: Vec<(usize, usize)> = (0..40)
        .map(|i| {
            if i % 9 == 4 {
                (0, rng.range(1, 301))
            } else {
                (rng.range(0, 420), rng.range(1, 421))
            }
        })
        .collect();
    let cases = [
        // (key block, case): 8 x 8 x 5 = 320 blocks of 128 keys.
        (
            128,
            Case::dense(DType::BF16, 8, 640, 640, 8, 8, 64, causal(), 61),
        ),
        // GQA 2:1, 12 x 4 x 6 = 288 blocks; sq < sk (every key block sees some query).
        (
            128,
            Case::dense(DType::F16, 12, 500, 700, 8, 4, 128, causal(), 62),
        ),
        // d = 256 (64-key blocks): 8 x 4 x 10 = 320; the window leaves the first blocks
        // of each head without visible queries (zero dK/dV).
        (
            64,
            Case::dense(
                DType::BF16,
                8,
                400,
                600,
                4,
                4,
                256,
                AttnOptions::new().window(60, 0),
                63,
            ),
        ),
        // Varlen, 40 sequences incl. empty query sides: 4 x 2 x 40 = 320 blocks, many past a
        // sequence's end.
        (
            128,
            Case::varlen(DType::BF16, &ragged, 4, 2, 128, causal(), 64),
        ),
    ];
    let sms = gpu.sm_count() as usize;
    for (ci, (bk, case)) in cases.iter().enumerate() {
        let sp = &case.spec;
        let max_sk = sp.seqlens.iter().map(|s| s.1).max().unwrap_or(0);
        let items = max_sk.div_ceil(*bk) * sp.heads_k * sp.batch;
        assert!(
            items > 2 * sms,
            "case {ci}: {items} key blocks are not several waves on {sms} SMs"
        );
        assert!(families(case, false).contains(&Family::Fa3));
        for fam in [Family::Fa2, Family::Fa3] {
            let e = check_case_with(case, false, fam);
            eprintln!(
                "many-blocks {ci} ({items} blocks) {fam:?} {e}: {}",
                sp.describe()
            );
        }
    }
}

/// A small case for compute-sanitizer (memcheck / racecheck).
#[test]
fn bwd_sanitizer_case() {
    let Some(_gpu) = gpu_or_skip("GPU backward test") else {
        return;
    };
    let case = Case::dense(
        DType::BF16,
        1,
        70,
        130,
        2,
        1,
        64,
        AttnOptions::new().causal(true).dropout(0.1, 5),
        21,
    );
    for det in [false, true] {
        check_case(&case, det);
    }
    let case = Case::varlen(
        DType::F16,
        &[(40, 20), (0, 5), (90, 90)],
        2,
        2,
        128,
        AttnOptions::new(),
        22,
    );
    for det in [false, true] {
        check_case(&case, det);
    }
    // The Hopper kernel's split-roles mode (d = 256) and its masked tiles.
    let case = Case::dense(
        DType::BF16,
        1,
        70,
        130,
        2,
        1,
        256,
        AttnOptions::new().causal(true),
        23,
    );
    check_case(&case, false);
    // Several waves of CTAs on the Hopper kernel, both of its modes (d = 128 and split-roles
    // d = 256), with the masked tiles.
    for (d, sk, seed) in [(128, 150, 24), (256, 130, 25)] {
        let case = Case::dense(
            DType::BF16,
            70,
            150,
            sk,
            2,
            2,
            d,
            AttnOptions::new().causal(true),
            seed,
        );
        check_case(&case, false);
    }
}

#[test]
fn bwd_deterministic_bit_identical() {
    let Some(_gpu) = gpu_or_skip("GPU backward test") else {
        return;
    };
    let cases = [
        Case::dense(
            DType::BF16,
            2,
            300,
            300,
            8,
            2,
            128,
            AttnOptions::new().causal(true),
            31,
        ),
        Case::dense(
            DType::F16,
            1,
            257,
            511,
            4,
            4,
            64,
            AttnOptions::new().dropout(0.1, 3),
            32,
        ),
        Case::varlen(
            DType::BF16,
            &[(100, 200), (300, 50)],
            4,
            1,
            256,
            AttnOptions::new(),
            33,
        ),
    ];
    for case in &cases {
        let dout = case.dout();
        let run = || run_case(case, &dout, Device::Cuda(0), true, Family::Auto);
        let (first, _) = run().expect("gpu backward");
        for rep in 0..5 {
            let (g, _) = run().expect("gpu backward");
            assert!(
                g.dq == first.dq && g.dk == first.dk && g.dv == first.dv,
                "deterministic backward differs on repeat {rep}: {}",
                case.spec.describe()
            );
        }
        eprintln!("deterministic: 6 identical runs: {}", case.spec.describe());
    }
}

// ---------------------------------------------------------------------------------------------
// Training check: learn q/k/v projections so that attention(X Wq, X Wk, X Wv) fits a target.
// ---------------------------------------------------------------------------------------------

/// `x [n, a] · w [a, b]` (row-major f32).
fn matmul(x: &[f32], w: &[f32], n: usize, a: usize, b: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * b];
    for i in 0..n {
        for k in 0..a {
            let xv = x[i * a + k];
            for j in 0..b {
                y[i * b + j] += xv * w[k * b + j];
            }
        }
    }
    y
}

/// `xᵀ [a, n] · g [n, b]`.
fn matmul_tn(x: &[f32], g: &[f32], n: usize, a: usize, b: usize) -> Vec<f32> {
    let mut y = vec![0f32; a * b];
    for i in 0..n {
        for k in 0..a {
            let xv = x[i * a + k];
            for j in 0..b {
                y[k * b + j] += xv * g[i * b + j];
            }
        }
    }
    y
}

/// Loss curve of `steps` SGD steps; forward on the CPU, backward on `device`.
fn train(device: Device, steps: usize, dtype: DType) -> Vec<f64> {
    let (batch, s, heads, d) = (2usize, 96usize, 2usize, 32usize);
    let hid = heads * d;
    let n = batch * s;
    let x = rand_values(n * hid, 101);
    let init = |seed| -> Vec<f32> {
        rand_values(hid * hid, seed)
            .iter()
            .map(|v| v * 0.25)
            .collect()
    };
    let (tq, tk, tv) = (init(201), init(202), init(203));
    let opts = AttnOptions::new().causal(true);
    let shape = [batch, s, heads, d];
    let attn = |wq: &[f32], wk: &[f32], wv: &[f32]| {
        let q = Tensor::from_f32_as(&matmul(&x, wq, n, hid, hid), &shape, dtype).unwrap();
        let k = Tensor::from_f32_as(&matmul(&x, wk, n, hid, hid), &shape, dtype).unwrap();
        let v = Tensor::from_f32_as(&matmul(&x, wv, n, hid, hid), &shape, dtype).unwrap();
        let f = flashattn::forward(&Qkv::dense(&q, &k, &v), &opts, Device::Cpu).unwrap();
        (q, k, v, f)
    };
    let target = attn(&tq, &tk, &tv).3.out.to_f32_vec();
    let (mut wq, mut wk, mut wv) = (init(301), init(302), init(303));
    let lr = 0.5f32;
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let (q, k, v, f) = attn(&wq, &wk, &wv);
        let o = f.out.to_f32_vec();
        let diff: Vec<f32> = o.iter().zip(&target).map(|(a, b)| a - b).collect();
        let loss = diff.iter().map(|&e| (e as f64) * (e as f64)).sum::<f64>() / n as f64;
        losses.push(loss);
        let dout = Tensor::from_f32_as(
            &diff.iter().map(|e| 2.0 * e / n as f32).collect::<Vec<_>>(),
            &shape,
            dtype,
        )
        .unwrap();
        let g = flashattn::backward(
            &Qkv::dense(&q, &k, &v),
            &f.out,
            &f.lse,
            &dout,
            &opts,
            device,
        )
        .unwrap();
        let gq = matmul_tn(&x, &g.dq.to_f32_vec(), n, hid, hid);
        let gk = matmul_tn(&x, &g.dk.to_f32_vec(), n, hid, hid);
        let gv = matmul_tn(&x, &g.dv.to_f32_vec(), n, hid, hid);
        for (w, gw) in [(&mut wq, gq), (&mut wk, gk), (&mut wv, gv)] {
            for (a, b) in w.iter_mut().zip(gw) {
                *a -= lr * b;
            }
        }
    }
    losses
}

#[test]
fn bwd_training_loss_curve_matches_cpu() {
    let Some(_gpu) = gpu_or_skip("GPU backward test") else {
        return;
    };
    let steps = 300;
    let dtype = DType::F16;
    let cpu = train(Device::Cpu, steps, dtype);
    let gpu = train(Device::Cuda(0), steps, dtype);
    let mut worst = 0f64;
    for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        let rel = (c - g).abs() / c.abs().max(1e-12);
        worst = worst.max(rel);
        if i % 50 == 0 || i + 1 == steps {
            eprintln!("step {i:>3}: loss cpu {c:.6e} gpu {g:.6e} (rel diff {rel:.2e})");
        }
    }
    eprintln!("training: {steps} SGD steps, worst relative loss difference {worst:.3e}");
    assert!(
        cpu[steps - 1] < 0.5 * cpu[0],
        "CPU training did not learn: {} -> {}",
        cpu[0],
        cpu[steps - 1]
    );
    assert!(
        gpu[steps - 1] < 0.5 * gpu[0],
        "GPU training did not learn: {} -> {}",
        gpu[0],
        gpu[steps - 1]
    );
    assert!(worst < 0.05, "loss curves differ by {worst:.3e} (relative)");
}

// ---------------------------------------------------------------------------------------------
// Timing, only with FLASHATTN_BENCH=1: `FLASHATTN_BENCH=1 gpu_bwd bwd_bench --nocapture`.
// ---------------------------------------------------------------------------------------------

#[test]
fn bwd_bench() {
    if std::env::var("FLASHATTN_BENCH").as_deref() != Ok("1") {
        eprintln!("skipped: bwd_bench times the backward sweep; set FLASHATTN_BENCH=1 to run it");
        return;
    }
    let Some(gpu) = gpu_or_skip("GPU backward test") else {
        return;
    };
    let dims: Vec<usize> = std::env::var("BENCH_DIMS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![64, 128, 256]);
    let seqs: Vec<usize> = std::env::var("BENCH_SEQS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1024, 4096, 16384]);
    let det = std::env::var("BENCH_DET").as_deref() == Ok("1");
    for &d in &dims {
        for &s in &seqs {
            for causal in [false, true] {
                let (b, h) = (16384 / s, 2048 / d);
                let shape = [b, s, h, d];
                let mk = |seed| rand_tensor(DType::BF16, &shape, seed);
                let (q, k, v, dout) = (mk(1), mk(2), mk(3), mk(4));
                let opts = AttnOptions::new().causal(causal).deterministic(det);
                let qkv = Qkv::dense(&q, &k, &v);
                let problem = Problem::new(&qkv, &opts).unwrap();
                // out/lse: any valid values do for timing (the kernels read them once).
                let out = mk(5);
                let lse = Tensor::from_f32(vec![2.0; b * h * s], &[b, h, s]).unwrap();
                let up = |t: &Tensor| DeviceTensor::upload(&gpu, t).unwrap();
                let (dq_, dk_, dv_, do_, dl_, dd_) =
                    (up(&q), up(&k), up(&v), up(&out), up(&lse), up(&dout));
                let run = || {
                    fa2_bwd::backward(
                        &gpu,
                        &problem,
                        &dq_,
                        &dk_,
                        &dv_,
                        &do_,
                        &dl_,
                        &dd_,
                        &opts,
                        Family::Auto,
                    )
                    .unwrap();
                };
                for _ in 0..3 {
                    run();
                }
                gpu.synchronize().unwrap();
                let mut times = Vec::new();
                for _ in 0..20 {
                    let t = Instant::now();
                    run();
                    gpu.synchronize().unwrap();
                    times.push(t.elapsed().as_secs_f64());
                }
                times.sort_by(|a, b| a.partial_cmp(b).unwrap());
                let med = times[times.len() / 2];
                let flops = 2.5 * problem.forward_flops();
                println!(
                    "BENCH ours d={d} seqlen={s} causal={} det={} ms={:.4} tflops={:.1}",
                    causal as u8,
                    det as u8,
                    med * 1e3,
                    flops / med / 1e12
                );
            }
        }
    }
}
