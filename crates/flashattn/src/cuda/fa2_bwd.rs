//! Host side of the FlashAttention-2 backward family (sm80+): `kernels/sm80/bwd.cu`.
//!
//! One call runs, on the device's stream:
//! 1. `fa2_bwd_pre`: `D = rowsum(dout ∘ out)` (f32, LSE layout) and, on the atomic path, zeroes
//!    the f32 dQ accumulator;
//! 2. `fa2_bwd_main`: grid (key blocks, heads_k, batch); dK, dV in registers (summed over the GQA
//!    group inside the CTA), dQ by f32 atomics (fast path);
//! 3. fast path: `fa2_bwd_convert` (dq = dtype(dq_accum)); deterministic path: `fa2_bwd_dq`, a
//!    second pass parallel over query blocks that recomputes P and dS and sums dQ in registers in
//!    a fixed order (bit-identical run to run; the main kernel then skips its dQ atomics).
//!
//! The tile shapes live in [`tiles`], one row per head dim.
//!
//! On sm 9.0, step 2 runs the Hopper main kernel instead ([`super::fa3_bwd`]: wgmma + TMA) for
//! every problem it supports, unless the caller asks for [`Family::Fa2`]; steps 1 and 3 are
//! shared.

use super::context::{driver_err, Gpu};
use super::fa3_bwd;
use super::jit::KernelSpec;
use super::operand::{check_lse, row_strides_16b};
use super::tensor::{DeviceBuffer, DeviceTensor};
use super::Family;
use crate::error::{Error, Result};
use crate::layout::Problem;
use crate::options::AttnOptions;
use crate::tensor::DType;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Head dims with a tile table entry.
pub const HEAD_DIMS: [usize; 6] = [32, 64, 96, 128, 192, 256];

const SOURCE: &str = "sm80/bwd.cu";

/// Tile shape of the main kernel (and of the deterministic dQ kernel, with `bc`/`br` as its
/// key/query tile). Warp grids: phase A (Sᵀ, dPᵀ) `wm_a × nw/wm_a`, phase B (dK, dV)
/// `wm_b × nw/wm_b`, phase C (dQ) `wm_c × nw/wm_c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiles {
    pub bc: usize,
    pub br: usize,
    pub nw: usize,
    pub wm_a: usize,
    pub wm_b: usize,
    pub wm_c: usize,
    /// `__launch_bounds__` minimum blocks per SM (caps registers at 65536 / (32·nw·minb)).
    pub minb: usize,
}

/// The tile table: one row per head dim (chosen by register/smem budget; see bench/RESULTS.md).
/// `FLASHATTN_BWD_TILES=bc,br,nw,wm_a,wm_b,wm_c[,minb]` overrides it (tuning runs only), for
/// every head dim or per head dim as `64=...;128=...`.
pub fn tiles(d: usize) -> Tiles {
    if let Ok(all) = std::env::var("FLASHATTN_BWD_TILES") {
        // Either one shape for every head dim, or `D=shape;D=shape` (others keep the table).
        let s = if all.contains('=') {
            all.split(';')
                .filter_map(|e| e.split_once('='))
                .find(|(k, _)| k.trim().parse() == Ok(d))
                .map(|(_, v)| v.to_string())
                .unwrap_or_default()
        } else {
            all
        };
        let v: Vec<usize> = s.split(',').filter_map(|x| x.trim().parse().ok()).collect();
        if v.len() == 6 || v.len() == 7 {
            return Tiles {
                bc: v[0],
                br: v[1],
                nw: v[2],
                wm_a: v[3],
                wm_b: v[4],
                wm_c: v[5],
                minb: v.get(6).copied().unwrap_or(1),
            };
        }
    }
    // Measured on an H200 (bench/RESULTS.md, 2026-11-26 tile sweep, bf16, seqlen 4k/16k):
    // bc = 128 won for d <= 128 (fewer Q/dO reloads and dQ atomics per FLOP); d >= 192 has no
    // registers for a 128-row key tile and keeps bc = 64.
    // H100 (same file, C3b section): dQ warp grid wm_c = 2 (32-row warp tiles: 0.5 instead of
    // 0.75 ldmatrix per mma) +1..3%; d = 64: 128 query rows per tile (FA2's 128x128) +7..8%.
    let bc = if d <= 128 { 128 } else { 64 };
    Tiles {
        bc,
        br: if d == 64 { 128 } else { 64 },
        nw: 8,
        wm_a: 4,
        wm_b: 4,
        // wm_c = 2 (measured for d = 64, 128, 256 only; it needs d % 64 == 0).
        wm_c: if matches!(d, 64 | 128 | 256) { 2 } else { 4 },
        minb: 1,
    }
}

fn smem_main(d: usize, t: &Tiles, stages: usize) -> usize {
    2 * t.bc * d * 2 + stages * 2 * t.br * d * 2 + 2 * t.bc * t.br * 2 + stages * 2 * t.br * 4
}

fn smem_dq(d: usize, t: &Tiles, stages: usize) -> usize {
    2 * t.br * d * 2 + stages * 2 * t.bc * d * 2 + t.br * t.bc * 2 + 2 * t.br * 4
}

/// Feature switches of one compiled variant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Features {
    pub mask: bool,
    pub softcap: bool,
    pub alibi: bool,
    pub dropout: bool,
}

impl Features {
    const ALL: Features = Features {
        mask: true,
        softcap: true,
        alibi: true,
        dropout: true,
    };
    fn of(problem: &Problem, opts: &AttnOptions) -> Features {
        Features {
            mask: problem.mask.left.is_some() || problem.mask.right.is_some(),
            softcap: problem.softcap > 0.0,
            alibi: opts.alibi_slopes.is_some(),
            dropout: problem.dropout.is_some(),
        }
    }
}

fn base_spec(entry: &str, d: usize, bf16: bool) -> KernelSpec {
    KernelSpec::new(SOURCE, entry)
        .define("FA_D", d)
        .define("FA_BF16", bf16 as u8)
}

fn tiled_spec(
    entry: &str,
    d: usize,
    bf16: bool,
    t: &Tiles,
    stages: usize,
    f: Features,
    det: bool,
) -> KernelSpec {
    base_spec(entry, d, bf16)
        .define("FA_BC", t.bc)
        .define("FA_BR", t.br)
        .define("FA_NW", t.nw)
        .define("FA_WM_A", t.wm_a)
        .define("FA_WM_B", t.wm_b)
        .define("FA_WM_C", t.wm_c)
        .define("FA_STAGES", stages)
        .define("FA_MINB", t.minb)
        .define("FA_MASK", f.mask as u8)
        .define("FA_SOFTCAP", f.softcap as u8)
        .define("FA_ALIBI", f.alibi as u8)
        .define("FA_DROPOUT", f.dropout as u8)
        .define("FA_DET", det as u8)
}

/// Pipeline depth of Q/dO (main) or K/V (dq) tiles that fits `smem_limit` bytes.
fn stages_for(smem: impl Fn(usize) -> usize, smem_limit: usize) -> Option<usize> {
    [2, 1].into_iter().find(|&s| smem(s) <= smem_limit)
}

/// Opt-in shared memory per block by architecture name (for compile-all without a device).
fn smem_limit_of(arch: &str) -> usize {
    match arch.trim_start_matches("sm_").trim_end_matches(['a', 'f']) {
        "80" | "87" => 166_912,
        "90" | "100" => 232_448,
        _ => 101_376,
    }
}

/// Every shipped variant for `arch`: per head dim and dtype, the preprocess and convert
/// kernels, and the main and deterministic-dQ kernels without options and with every option.
pub fn all_variants(arch: &str) -> Vec<KernelSpec> {
    let limit = smem_limit_of(arch);
    let mut v = Vec::new();
    for &d in &HEAD_DIMS {
        for bf16 in [false, true] {
            let t = tiles(d);
            v.push(base_spec("fa2_bwd_pre", d, bf16));
            v.push(base_spec("fa2_bwd_convert", d, bf16));
            let causal = Features {
                mask: true,
                ..Features::default()
            };
            for f in [Features::default(), causal, Features::ALL] {
                if let Some(s) = stages_for(|s| smem_main(d, &t, s), limit) {
                    v.push(tiled_spec("fa2_bwd_main", d, bf16, &t, s, f, false));
                    if f == Features::default() {
                        v.push(tiled_spec("fa2_bwd_main", d, bf16, &t, s, f, true));
                    }
                }
                if let Some(s) = stages_for(|s| smem_dq(d, &t, s), limit) {
                    v.push(tiled_spec("fa2_bwd_dq", d, bf16, &t, s, f, true));
                }
            }
        }
    }
    v
}

/// Mirrors `struct BwdParams` of kernels/sm80/bwd_params.cuh field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BwdParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    dout: u64,
    lse: u64,
    dsum: u64,
    dq_accum: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    cu_q: u64,
    cu_k: u64,
    alibi: u64,
    q_b: i64,
    q_r: i64,
    q_h: i64,
    k_b: i64,
    k_r: i64,
    k_h: i64,
    v_b: i64,
    v_r: i64,
    v_h: i64,
    o_b: i64,
    o_r: i64,
    o_h: i64,
    do_b: i64,
    do_r: i64,
    do_h: i64,
    lse_b: i64,
    lse_h: i64,
    n_dq: i64,
    batch: i32,
    heads_q: i32,
    heads_k: i32,
    group: i32,
    sq: i32,
    sk: i32,
    rows_q: i32,
    left: i32,
    right: i32,
    alibi_b: i32,
    drop_thr: u32,
    key0: u32,
    key1: u32,
    off_lo: u32,
    scale: f32,
    softcap: f32,
    drop_scale: f32,
    flags: i32,
}

// SAFETY: `BwdParams` is `#[repr(C)]` plain data (integers, floats, device addresses) with the
// exact layout of the CUDA struct; the kernels only read it.
unsafe impl cudarc::driver::DeviceRepr for BwdParams {}

fn launch(
    gpu: &Gpu,
    spec: &KernelSpec,
    grid: (u32, u32, u32),
    threads: u32,
    smem: usize,
    p: &BwdParams,
) -> Result<()> {
    let f = gpu.kernel_with_smem(spec, smem as u32)?;
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let stream = gpu.stream();
    let mut b = stream.launch_builder(&f);
    b.arg(p);
    // SAFETY: the params struct mirrors the kernel's; every pointer in it refers to a live
    // device allocation of the size the kernel indexes (checked shapes above), and all work is
    // ordered on this one stream.
    unsafe { b.launch(cfg) }.map_err(|e| driver_err(&format!("launching {}", spec.label()), e))?;
    Ok(())
}

/// FA2 backward on device tensors: `(dq, dk, dv)`, contiguous, in the input dtype.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &Gpu,
    problem: &Problem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    out: &DeviceTensor,
    lse: &DeviceTensor,
    dout: &DeviceTensor,
    opts: &AttnOptions,
    family: Family,
) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor)> {
    // The kernels write every element of dq, dk, dv (dk/dv rows that no query sees get zeros
    // from the main kernel), so no memsets.
    let dq = DeviceTensor::uninit(gpu, problem.dtype, &problem.q_shape)?;
    let dk = DeviceTensor::uninit(gpu, problem.dtype, &problem.k_shape)?;
    let dv = DeviceTensor::uninit(gpu, problem.dtype, &problem.k_shape)?;
    backward_into(
        gpu,
        problem,
        q,
        k,
        v,
        out,
        lse,
        dout,
        opts,
        [&dq, &dk, &dv],
        family,
    )?;
    Ok((dq, dk, dv))
}

/// The launches of [`backward`] into caller-owned contiguous `[dq, dk, dv]` (shapes of q, k, v,
/// input dtype). Every element is written, so tests can NaN-poison them first. `family` picks
/// the main kernel: `Auto` the Hopper one where [`fa3_bwd::supports`] the problem, `Fa2` always
/// the mma.sync one, `Fa3` the Hopper one or an error.
#[allow(clippy::too_many_arguments)]
pub fn backward_into(
    gpu: &Gpu,
    problem: &Problem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    out: &DeviceTensor,
    lse: &DeviceTensor,
    dout: &DeviceTensor,
    opts: &AttnOptions,
    grads: [&DeviceTensor; 3],
    family: Family,
) -> Result<()> {
    let [dq, dk, dv] = grads;
    let dtype = problem.dtype;
    let d = problem.head_dim;
    let arch = gpu.arch();
    if arch.major < 8 {
        return Err(Error::unsupported(
            gpu.device_name(),
            "architecture",
            arch,
            "sm 8.0 or newer",
        ));
    }
    let bf16 = match dtype {
        DType::F16 => false,
        DType::BF16 => true,
        DType::F32 => {
            return Err(Error::unsupported(
                gpu.device_name(),
                "dtype",
                dtype,
                "f16, bf16",
            ))
        }
    };
    if !HEAD_DIMS.contains(&d) {
        return Err(Error::unsupported(
            gpu.device_name(),
            "head_dim",
            d,
            format!("one of {HEAD_DIMS:?} for the FA2 backward"),
        ));
    }
    for (name, t, shape) in [
        ("dq", dq, &problem.q_shape),
        ("dk", dk, &problem.k_shape),
        ("dv", dv, &problem.k_shape),
    ] {
        if t.dtype() != dtype || t.shape() != shape.as_slice() || !t.is_contiguous() {
            return Err(Error::invalid(
                name,
                format!("{} {:?} strides {:?}", t.dtype(), t.shape(), t.strides()),
                format!("a contiguous {dtype} tensor of shape {shape:?}"),
            ));
        }
    }
    if problem.total_q == 0 || problem.total_k == 0 || problem.heads_q == 0 || problem.batch == 0 {
        for t in grads {
            t.fill_zero()?;
        }
        return Ok(());
    }
    let varlen = problem.varlen;
    let (qs, ks) = (&problem.q_shape, &problem.k_shape);
    let (q_b, q_r, q_h) = row_strides_16b("q", q, qs, dtype, varlen)?;
    let (k_b, k_r, k_h) = row_strides_16b("k", k, ks, dtype, varlen)?;
    let (v_b, v_r, v_h) = row_strides_16b("v", v, ks, dtype, varlen)?;
    let (o_b, o_r, o_h) = row_strides_16b("out", out, qs, dtype, varlen)?;
    let (do_b, do_r, do_h) = row_strides_16b("dout", dout, qs, dtype, varlen)?;
    check_lse(lse, problem)?;

    let det = opts.deterministic;
    let sm90 = match family {
        Family::Fa2 => false,
        Family::Auto => fa3_bwd::supports(gpu, problem, opts),
        Family::Fa3 => {
            if !fa3_bwd::supports(gpu, problem, opts) {
                return Err(Error::unsupported(
                    gpu.device_name(),
                    "family",
                    "fa3 backward",
                    "sm 9.0, head dim 64, 128 or 256, no softcap/ALiBi/dropout, not deterministic \
                     (use fa2 or auto)",
                ));
            }
            true
        }
    };
    let feats = Features::of(problem, opts);
    let t = tiles(d);
    let limit = gpu.max_smem_optin() as usize;
    let no_fit = || {
        Error::unsupported(
            gpu.device_name(),
            "head_dim",
            d,
            format!("a head dim whose backward tiles fit {limit} bytes of shared memory"),
        )
    };
    let st_main = stages_for(|s| smem_main(d, &t, s), limit).ok_or_else(no_fit)?;

    // Both written in full by fa2_bwd_pre (dsum for every row, dq_accum zeroed).
    let dsum = DeviceTensor::uninit(gpu, DType::F32, &problem.lse_shape())?;
    let n_dq = problem.total_q * problem.heads_q * d;
    let dq_accum = if det {
        None
    } else {
        Some(DeviceBuffer::uninit(gpu, n_dq * 4)?)
    };

    let (cu_q, cu_k) = if varlen {
        let mut cq: Vec<i32> = problem.seqs.iter().map(|s| s.q_start as i32).collect();
        let mut ck: Vec<i32> = problem.seqs.iter().map(|s| s.k_start as i32).collect();
        cq.push(problem.total_q as i32);
        ck.push(problem.total_k as i32);
        (
            Some(DeviceBuffer::from_i32(gpu, &cq)?),
            Some(DeviceBuffer::from_i32(gpu, &ck)?),
        )
    } else {
        (None, None)
    };
    let alibi = match &opts.alibi_slopes {
        Some(a) => Some((DeviceBuffer::from_f32(gpu, &a.values)?, a.per_batch)),
        None => None,
    };
    let side = |x: Option<usize>| x.map(|v| v.min(i32::MAX as usize) as i32).unwrap_or(-1);
    let (sq, sk) = if varlen {
        (0, 0)
    } else {
        (problem.q_shape[1], problem.k_shape[1])
    };
    let (lse_b, lse_h) = problem.lse_strides();
    let (lse_b, lse_h) = (lse_b as i64, lse_h as i64);
    // The kernels take the grid (key blocks, heads, batch) with the Q-tile walk rotated per key
    // block (flags bits 0 and 1): CTAs resident together share one head's Q/dO/dQ in L2
    // (+3..+51% over (heads, batch, blocks) on the H100, bench/RESULTS.md). The other orders
    // are no longer launched; the kernel source still reads both bits.
    const FLAGS_KFIRST_ROTATE: i32 = 0b11;
    let mut p = BwdParams {
        q: q.ptr(),
        k: k.ptr(),
        v: v.ptr(),
        o: out.ptr(),
        dout: dout.ptr(),
        lse: lse.ptr(),
        dsum: dsum.ptr(),
        dq_accum: dq_accum.as_ref().map_or(0, |b| b.ptr()),
        dq: dq.ptr(),
        dk: dk.ptr(),
        dv: dv.ptr(),
        cu_q: cu_q.as_ref().map_or(0, |b| b.ptr()),
        cu_k: cu_k.as_ref().map_or(0, |b| b.ptr()),
        alibi: alibi.as_ref().map_or(0, |(b, _)| b.ptr()),
        q_b,
        q_r,
        q_h,
        k_b,
        k_r,
        k_h,
        v_b,
        v_r,
        v_h,
        o_b,
        o_r,
        o_h,
        do_b,
        do_r,
        do_h,
        lse_b,
        lse_h,
        n_dq: n_dq as i64,
        batch: problem.batch as i32,
        heads_q: problem.heads_q as i32,
        heads_k: problem.heads_k as i32,
        group: problem.group() as i32,
        sq: sq as i32,
        sk: sk as i32,
        rows_q: problem.total_q as i32,
        left: side(problem.mask.left),
        right: side(problem.mask.right),
        alibi_b: match &alibi {
            Some((_, true)) => problem.heads_q as i32,
            _ => 0,
        },
        scale: problem.scale,
        softcap: problem.softcap,
        drop_scale: 1.0,
        flags: FLAGS_KFIRST_ROTATE,
        ..Default::default()
    };
    if let Some(dr) = &problem.dropout {
        p.drop_thr = dr.threshold();
        p.key0 = dr.key()[0];
        p.key1 = dr.key()[1];
        p.off_lo = dr.counter(0, 0, 0, 0)[3];
        p.drop_scale = dr.scale;
    }

    // 1. D = rowsum(dout ∘ out); zero dq_accum.
    let pairs = problem.total_q * problem.heads_q;
    launch(
        gpu,
        &base_spec("fa2_bwd_pre", d, bf16),
        (pairs.div_ceil(8) as u32, 1, 1),
        256,
        0,
        &p,
    )?;

    // 2. dK, dV (and dQ atomics on the fast path).
    let grid_limit = |n: usize, what: &str| -> Result<u32> {
        if n > 65_535 {
            return Err(Error::unsupported(
                gpu.device_name(),
                what,
                n,
                "at most 65535 for the FA2 backward grid",
            ));
        }
        Ok(n as u32)
    };
    // Grid: (kv blocks, heads_k, batch) by default, so that the CTAs running together share
    // their Q, dO and dQ rows in L2 (as FA2); with a causal mask block 0 is the heaviest and
    // starts first within each head. (The A/B against (heads_k, batch, kv blocks) and against
    // no rotation is in bench/RESULTS.md; those orders are no longer selectable here.)
    let n_kb = problem.max_sk.div_ceil(t.bc);
    if sm90 {
        let ws = fa3_bwd::Workspace {
            dsum: dsum.ptr(),
            dq_accum: dq_accum.as_ref().map_or(0, |b| b.ptr()),
            cu_q: cu_q.as_ref().map_or(0, |b| b.ptr()),
            cu_k: cu_k.as_ref().map_or(0, |b| b.ptr()),
        };
        fa3_bwd::launch_main(gpu, problem, q, k, v, dout, lse, dk, dv, &ws)?;
    } else if n_kb > 0 {
        let spec = tiled_spec("fa2_bwd_main", d, bf16, &t, st_main, feats, det);
        let grid_main = (
            n_kb as u32,
            grid_limit(problem.heads_k, "key heads")?,
            grid_limit(problem.batch, "batch")?,
        );
        launch(
            gpu,
            &spec,
            grid_main,
            (t.nw * 32) as u32,
            smem_main(d, &t, st_main),
            &p,
        )?;
    }

    // 3. dq.
    if det {
        let st = stages_for(|s| smem_dq(d, &t, s), limit).ok_or_else(no_fit)?;
        let spec = tiled_spec("fa2_bwd_dq", d, bf16, &t, st, feats, true);
        let n_qb = problem.max_sq.div_ceil(t.br);
        let grid = (
            n_qb as u32,
            grid_limit(problem.heads_q, "query heads")?,
            grid_limit(problem.batch, "batch")?,
        );
        if n_qb > 0 {
            launch(gpu, &spec, grid, (t.nw * 32) as u32, smem_dq(d, &t, st), &p)?;
        }
    } else {
        let blocks = (n_dq.div_ceil(512))
            .min(gpu.sm_count() as usize * 16)
            .max(1);
        launch(
            gpu,
            &base_spec("fa2_bwd_convert", d, bf16),
            (blocks as u32, 1, 1),
            256,
            0,
            &p,
        )?;
    }
    // The temporaries are freed stream-ordered (cuMemFreeAsync) after the kernels that read them.
    drop((dsum, dq_accum, cu_q, cu_k, alibi));
    Ok(())
}
