//! Host side of the Hopper backward main kernel (sm_90a): `kernels/sm90/bwd.cu`.
//!
//! It replaces only the main kernel of the backward: `fa2_bwd_pre` (D = rowsum(dO ∘ O), dQ
//! accumulator zeroed) runs before it and `fa2_bwd_convert` (dq = dtype(dq_accum)) after it,
//! exactly as around the FA2 main kernel (see [`super::fa2_bwd`], which dispatches). One CTA per
//! (key block, key head, batch): a TMA producer warp and two wgmma consumer warpgroups, of 64
//! keys each (d = 64, 128: 128-key blocks) or splitting the work of one 64-key block by role
//! and head-dim half (d = 256); the kernel's header comment has the math and the pipeline.
//!
//! [`supports`] is its exact envelope: sm 9.0, bf16/f16, head dim 64, 128 or 256, dense or varlen,
//! no mask, causal or any sliding window, GQA/MQA; not softcap, ALiBi, dropout or the
//! deterministic mode (those run the FA2 main kernel).

use super::context::{driver_err, Gpu};
use super::fa3::{encode_map, window_bounds, MAX_LEN};
use super::jit::KernelSpec;
use super::tensor::DeviceTensor;
use crate::error::{Error, Result};
use crate::layout::Problem;
use crate::options::AttnOptions;
use crate::tensor::DType;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

pub const SOURCE: &str = "sm90/bwd.cu";
pub const ENTRY: &str = "fa3_bwd_main";
/// Head dims the kernel is compiled for.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];
const STAGES: usize = 2;

/// One compiled configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub d: usize,
    pub f16: bool,
    /// Causal or sliding window (tile ranges and per-element masks).
    pub mask: bool,
    pub varlen: bool,
}

impl Variant {
    fn of(problem: &Problem) -> Variant {
        Variant {
            d: problem.head_dim,
            f16: problem.dtype == DType::F16,
            mask: !problem.mask.is_none(),
            varlen: problem.varlen,
        }
    }

    /// Query rows per tile: 128 at d = 64 (the two warpgroups split dQ by query rows), 64 at
    /// d = 128 (they split it by head-dim halves; registers of dK and dV leave no room for more).
    pub fn bq(&self) -> usize {
        if self.d == 64 {
            128
        } else {
            64
        }
    }

    /// Keys per CTA: two consumer warpgroups of 64, or one 64-key block shared by role at
    /// d = 256.
    pub fn bk(&self) -> usize {
        if self.d == 256 {
            64
        } else {
            128
        }
    }

    /// Dynamic shared memory as the kernel lays it out (1 KiB alignment slack included): K, V,
    /// the Q/dO ring, double-buffered dSᵀ (and Pᵀ at d = 256), LSE/D, barriers.
    pub fn smem_bytes(&self) -> usize {
        let (d, bq, bk) = (self.d, self.bq(), self.bk());
        let tiles_t = if d == 256 { 2 } else { 1 };
        2 * bk * d * 2
            + STAGES * 2 * bq * d * 2
            + tiles_t * 2 * bk * bq * 2
            + STAGES * 2 * bq * 4
            + 8 * (1 + 3 * STAGES)
            + 1024
    }

    pub fn spec(&self) -> KernelSpec {
        KernelSpec::new(SOURCE, ENTRY)
            .define("FB_D", self.d)
            .define("FB_BQ", self.bq())
            .define("FB_DT", u32::from(self.f16))
            .define("FB_STAGES", STAGES)
            .define("FB_MASK", u32::from(self.mask))
            .define("FB_VARLEN", u32::from(self.varlen))
    }
}

/// Every shipped variant for `arch` (compile-all; only sm_90a has any).
pub fn all_variants(arch: &str) -> Vec<KernelSpec> {
    if arch != "sm_90a" {
        return vec![];
    }
    let mut v = Vec::new();
    for d in HEAD_DIMS {
        for f16 in [false, true] {
            for mask in [false, true] {
                for varlen in [false, true] {
                    v.push(
                        Variant {
                            d,
                            f16,
                            mask,
                            varlen,
                        }
                        .spec(),
                    );
                }
            }
        }
    }
    v
}

/// Whether the Hopper main kernel computes this backward exactly (else the FA2 one runs).
pub fn supports(gpu: &Gpu, problem: &Problem, opts: &AttnOptions) -> bool {
    let arch = gpu.arch();
    arch.major == 9
        && arch.minor == 0
        && matches!(problem.dtype, DType::BF16 | DType::F16)
        && HEAD_DIMS.contains(&problem.head_dim)
        && problem.softcap == 0.0
        && opts.alibi_slopes.is_none()
        && problem.dropout.is_none()
        && !opts.deterministic
        && problem.scale.is_finite()
        && problem.max_sq <= MAX_LEN
        && problem.max_sk <= MAX_LEN
        && problem.batch <= 65_535
        && problem.heads_k <= 65_535
        && Variant::of(problem).smem_bytes() <= gpu.max_smem_optin() as usize
}

/// Mirrors `struct Fa3BwdParams` in kernels/sm90/bwd.cu (C layout, 64-byte aligned).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Fa3BwdParams {
    q: [u64; 16],
    k: [u64; 16],
    v: [u64; 16],
    dout: [u64; 16],
    lse: u64,
    dsum: u64,
    dq_accum: u64,
    dk: u64,
    dv: u64,
    cu_q: u64,
    cu_k: u64,
    lse_b: i64,
    lse_h: i64,
    sq: i32,
    sk: i32,
    heads_q: i32,
    heads_k: i32,
    group: i32,
    batch: i32,
    wl: i32,
    wr: i32,
    scale_log2: f32,
    scale: f32,
}
// SAFETY: plain old data with the kernel's C layout; passed by value as the one kernel argument.
unsafe impl DeviceRepr for Fa3BwdParams {}

/// Device addresses of the backward's workspace, owned by the caller ([`super::fa2_bwd`]).
pub(super) struct Workspace {
    /// f32 D = rowsum(dO ∘ O), LSE layout.
    pub dsum: u64,
    /// f32 `[rows_q, heads_q, d]`, zeroed.
    pub dq_accum: u64,
    /// int32 cu_seqlens (varlen), else 0.
    pub cu_q: u64,
    pub cu_k: u64,
}

/// Launches the main kernel: writes every element of `dk`, `dv` (contiguous) and adds dQ into
/// the workspace's accumulator. Needs [`supports`] and validated operands (the caller checks).
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_main(
    gpu: &Gpu,
    problem: &Problem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    dout: &DeviceTensor,
    lse: &DeviceTensor,
    dk: &DeviceTensor,
    dv: &DeviceTensor,
    ws: &Workspace,
) -> Result<()> {
    let var = Variant::of(problem);
    let smem = var.smem_bytes();
    let f = gpu.kernel_with_smem(&var.spec(), smem as u32)?;
    let sk = problem.max_sk;
    let (wl, wr) = window_bounds(problem);
    let dense_len = |shape: &[usize]| if problem.varlen { 0 } else { shape[1] as i32 };
    let bk = var.bk();
    let params = Fa3BwdParams {
        q: encode_map(q, "q", var.bq())?,
        k: encode_map(k, "k", bk)?,
        v: encode_map(v, "v", bk)?,
        dout: encode_map(dout, "dout", var.bq())?,
        lse: lse.ptr(),
        dsum: ws.dsum,
        dq_accum: ws.dq_accum,
        dk: dk.ptr(),
        dv: dv.ptr(),
        cu_q: ws.cu_q,
        cu_k: ws.cu_k,
        lse_b: problem.lse_strides().0 as i64,
        lse_h: problem.lse_strides().1 as i64,
        sq: dense_len(&problem.q_shape),
        sk: dense_len(&problem.k_shape),
        heads_q: problem.heads_q as i32,
        heads_k: problem.heads_k as i32,
        group: problem.group() as i32,
        batch: problem.batch as i32,
        wl,
        wr,
        scale_log2: problem.scale * std::f32::consts::LOG2_E,
        scale: problem.scale,
    };
    let n_kb = sk.div_ceil(bk);
    if n_kb == 0 {
        return Ok(());
    }
    if n_kb > i32::MAX as usize {
        return Err(Error::invalid(
            "k",
            format!("{sk} keys"),
            "fewer than 2^38 (grid)",
        ));
    }
    let cfg = LaunchConfig {
        grid_dim: (n_kb as u32, problem.heads_k as u32, problem.batch as u32),
        block_dim: (384, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let stream = gpu.stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&params);
    // SAFETY: the kernel's single parameter is `Fa3BwdParams` by value (layout mirrored above);
    // the tensor maps address q/k/v/dout and every pointer refers to a live device allocation of
    // the size the kernel indexes (shapes validated by the caller); all work is on this stream.
    unsafe { b.launch(cfg) }.map_err(|e| driver_err("launching fa3_bwd_main", e))?;
    Ok(())
}
