//! Host side of the FlashAttention-2 forward family (sm80/86/89/90, `kernels/sm80/fwd.cu`):
//! the variant (head dim, dtype, feature group, tile shape) → [`KernelSpec`], the tile table,
//! the grid, the dynamic shared memory and the launch.
//!
//! Feature groups keep the shipped set small (6 head dims × 2 dtypes × 3 groups = 36 kernels):
//! `Plain` (no mask, softcap, ALiBi or dropout), `Mask` (causal / sliding window) and `Full`
//! (every switch compiled in; a feature that is off at run time costs one uniform branch).

use std::sync::Arc;

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use super::context::{driver_err, Gpu};
use super::jit::KernelSpec;
use super::operand::{check_lse, row_strides_16b};
use super::tensor::{DeviceBuffer, DeviceTensor};
use crate::error::{Error, Result};
use crate::layout::Problem;
use crate::options::AttnOptions;
use crate::tensor::DType;

/// Head dimensions with a compiled kernel.
pub const HEAD_DIMS: [usize; 6] = [32, 64, 96, 128, 192, 256];

/// Which optional features a kernel is compiled with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Features {
    /// Plain softmax attention (any scale, GQA, varlen).
    Plain,
    /// Plus causal / sliding-window masking.
    Mask,
    /// Plus softcap, ALiBi and dropout (and masking).
    Full,
}

impl Features {
    pub const ALL: [Features; 3] = [Features::Plain, Features::Mask, Features::Full];

    /// The smallest group that covers `problem`'s options.
    pub fn of(problem: &Problem, opts: &AttnOptions) -> Features {
        if problem.softcap > 0.0 || opts.alibi_slopes.is_some() || problem.dropout.is_some() {
            Features::Full
        } else if !problem.mask.is_none() {
            Features::Mask
        } else {
            Features::Plain
        }
    }
    fn name(self) -> &'static str {
        match self {
            Features::Plain => "plain",
            Features::Mask => "mask",
            Features::Full => "full",
        }
    }
}

/// A tile shape: `bq` query rows per block (16-row slabs spread over `warps` warps), `bk` keys
/// per K/V tile, `stages` K/V buffers (2 or 3: one barrier per tile; 1: two), and the
/// `__launch_bounds__` minimum blocks per SM, and `unroll`: how many of the head-dim k-steps of
/// S = Q Kᵀ are unrolled (0 = all; 2 frees the registers that make 128x64w4 at d=128 spill), and
/// `lean`: the register-lean main loop (kernel switch LEAN: P packed to 16 bits right after the
/// row sums, output pointers formed in the epilogue, V_0 in its own cp.async group; needed for
/// `stages` = 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tile {
    pub bq: usize,
    pub bk: usize,
    pub warps: usize,
    pub stages: usize,
    pub min_blocks: usize,
    pub unroll: usize,
    pub lean: bool,
}

impl Tile {
    pub const fn new(bq: usize, bk: usize, warps: usize) -> Tile {
        Tile {
            bq,
            bk,
            warps,
            stages: 2,
            min_blocks: 1,
            unroll: 0,
            lean: false,
        }
    }
    pub const fn stages(mut self, stages: usize) -> Tile {
        self.stages = stages;
        self
    }
    pub const fn unroll(mut self, unroll: usize) -> Tile {
        self.unroll = unroll;
        self
    }
    pub const fn lean(mut self) -> Tile {
        self.lean = true;
        self
    }
    /// Dynamic shared memory: the Q tile plus `stages` K and V tiles, `d` halves per row.
    pub fn smem_bytes(&self, d: usize) -> usize {
        (self.bq + 2 * self.stages * self.bk) * d * 2
    }
    /// Parses `BQxBKwW[sS][uU][l]`, e.g. `128x64w8`, `128x64w8s1` or `128x64w4u2l` (`l`: lean;
    /// benchmark overrides).
    #[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` needs Rust 1.87; MSRV is 1.80
    pub fn parse(s: &str) -> Option<Tile> {
        let (s, lean) = match s.strip_suffix('l') {
            Some(rest) => (rest, true),
            None => (s, false),
        };
        let (bq, rest) = s.split_once('x')?;
        let (bk, rest) = rest.split_once('w')?;
        let (rest, un) = rest.split_once('u').unwrap_or((rest, "0"));
        let (w, st) = rest.split_once('s').unwrap_or((rest, "2"));
        let t = Tile::new(bq.parse().ok()?, bk.parse().ok()?, w.parse().ok()?)
            .stages(st.parse().ok()?)
            .unroll(un.parse().ok()?);
        let t = Tile { lean, ..t };
        let ok = t.bk % 16 == 0
            && t.warps > 0
            && t.bq % (16 * t.warps) == 0
            && t.bq > 0
            && ((1..=2).contains(&t.stages) || (t.lean && t.stages == 3));
        ok.then_some(t)
    }
}

impl std::fmt::Display for Tile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}w{}", self.bq, self.bk, self.warps)?;
        if self.stages != 2 {
            write!(f, "s{}", self.stages)?;
        }
        if self.unroll != 0 {
            write!(f, "u{}", self.unroll)?;
        }
        if self.lean {
            write!(f, "l")?;
        }
        Ok(())
    }
}

/// The tile table: per head dim and feature group, the fastest tile measured that compiles
/// without spills (ptxas -v through NVRTC 13.0, sm_80 and sm_90a, f16 and bf16).
///
/// d=128 plain and mask: chosen by the H100 sweep of 2026-11-26 (device call C2b; bf16, 16k
/// tokens, hidden 2048; TFLOP/s at seqlen 1k / 4k / 16k, non-causal then causal; `l` = LEAN loop,
/// `uN` = N k-steps of Q Kᵀ unrolled; bench/RESULTS.md "CUDA FA2 forward", H100 step 4):
///   non-causal: 128x64w4u4l 342/378/381, 128x64w4u2l 333/357/351, 128x64w4l 349/375/367
///               (spills), 128x32w4l 305/330/336, 128x32w4s3l 309/331/331, 64x64w4l 280/302/294
///   causal:     128x64w4u2l 259/351/373, 128x64w4u4l 253/339/364 (spills 40 B on sm_90a),
///               128x64w4l 271/370/393 (spills), 128x32w4l 226/311/337, 64x64w4l 241/297/297
///   (the non-LEAN 05:45 defaults on the same H100 model: 128x32w4 321/349/350, 64x64w4 258/312/305).
/// Every other entry keeps the non-LEAN loop (LEAN measured 5-10% slower there: d=64 128x64w4
/// 300 vs 318, d=256 128x64w8 299 vs 333 at 16k non-causal) and the H200 sweep below
/// (TFLOP/s at seqlen 16384 non-causal / causal), all with 2 K/V stages:
///   d=32:  128x128w4 241/249, 128x64w4 227/223
///   d=64:  128x64w4 307/311, 128x128w8 273/273, 64x64w4 254/275, 128x64w8 242/240
///   d=96:  128x32w4 288/302, 128x64w8 262/252
///   d=128 full: 128x32w4 338/334 (128x64w4 spills 88-276 B with every switch compiled in)
///   d=192: 128x64w8 314/322, 128x32w8 261/260
///   d=256: 128x64w8 305/313, 128x32w8 277/274, 64x32w4 276/283; on the H100 (C2b, LEAN):
///          128x64w8 299/312, 128x64w8u4 297/302, 64x32w4 278/275, 128x32w8s3 263/263
/// Two 16-row slabs per warp (BQ 128 on 4 warps) halve the shared-memory traffic per MMA and
/// win wherever they fit in 255 registers; elsewhere one slab per warp.
pub fn tile_for(head_dim: usize, features: Features) -> Tile {
    use Features::*;
    match (head_dim, features) {
        (32, Plain) => Tile::new(128, 128, 4),
        (32, _) | (64, _) => Tile::new(128, 64, 4),
        (96, _) | (128, Full) => Tile::new(128, 32, 4),
        (128, Plain) => Tile::new(128, 64, 4).unroll(4).lean(),
        (128, Mask) => Tile::new(128, 64, 4).unroll(2).lean(),
        (256, Full) => Tile::new(128, 32, 8),
        _ => Tile::new(128, 64, 8),
    }
}

/// One compiled FA2 forward kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub head_dim: usize,
    pub dtype: DType,
    pub features: Features,
    pub tile: Tile,
}

impl Variant {
    pub fn new(head_dim: usize, dtype: DType, features: Features) -> Variant {
        Variant {
            head_dim,
            dtype,
            features,
            tile: tile_for(head_dim, features),
        }
    }

    pub fn spec(&self) -> KernelSpec {
        let (mask, full) = match self.features {
            Features::Plain => (0, 0),
            Features::Mask => (1, 0),
            Features::Full => (1, 1),
        };
        KernelSpec::new("sm80/fwd.cu", "fa2_fwd")
            .define("HEAD_DIM", self.head_dim)
            .define("IS_BF16", (self.dtype == DType::BF16) as u32)
            .define("BLOCK_Q", self.tile.bq)
            .define("BLOCK_K", self.tile.bk)
            .define("N_WARPS", self.tile.warps)
            .define("STAGES", self.tile.stages)
            .define("MIN_BLOCKS", self.tile.min_blocks)
            .define("S_UNROLL", self.s_unroll())
            .define("LEAN", self.tile.lean as u32)
            .define("HAS_MASK", mask)
            .define("HAS_SOFTCAP", full)
            .define("HAS_ALIBI", full)
            .define("HAS_DROPOUT", full)
    }

    /// `#pragma unroll` count of the Q Kᵀ k-loop (64: all of it).
    fn s_unroll(&self) -> usize {
        if self.tile.unroll == 0 {
            64
        } else {
            self.tile.unroll
        }
    }

    /// Short name for reports, e.g. `d128 bf16 mask 128x64w8`.
    pub fn name(&self) -> String {
        format!(
            "d{} {} {} {}",
            self.head_dim,
            self.dtype,
            self.features.name(),
            self.tile
        )
    }
}

/// Opt-in shared memory per block by architecture (CUDA programming guide, table of compute
/// capabilities); unknown archs get the sm86 figure.
pub fn max_smem_for_arch(arch: &str) -> usize {
    match arch.trim_start_matches("sm_").trim_end_matches('a') {
        "80" | "87" => 166_912,
        "90" | "100" => 232_448,
        _ => 101_376,
    }
}

/// Shrinks `tile` until it fits `max_smem` bytes: one K/V stage, then 32-key tiles, then 64
/// query rows on 4 warps. (sm86/89 at d=256: 128x32w8s1, 96 KiB, no spills; 64x64w4s1 spills
/// 88 B and 64x32w4 8-20 B there.)
pub fn fit_tile(tile: Tile, head_dim: usize, max_smem: usize) -> Tile {
    let tries = [
        tile,
        tile.stages(1),
        Tile::new(tile.bq, tile.bk.min(32), tile.warps).stages(1),
        Tile::new(64, 32, 4).stages(1),
    ];
    tries
        .into_iter()
        .find(|t| t.smem_bytes(head_dim) <= max_smem)
        .unwrap_or(tries[3])
}

/// Every shipped variant for `arch` (compile-all): the table's tiles, shrunk where the
/// architecture has less shared memory (sm86/89).
pub fn all_variants(arch: &str) -> Vec<KernelSpec> {
    let max = max_smem_for_arch(arch);
    let mut v = Vec::new();
    for d in HEAD_DIMS {
        for dtype in [DType::F16, DType::BF16] {
            for f in Features::ALL {
                let mut var = Variant::new(d, dtype, f);
                var.tile = fit_tile(var.tile, d, max);
                v.push(var.spec());
            }
        }
    }
    v
}

/// Kernel arguments; mirrors `kernels/sm80/fwd_params.cuh` field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FwdParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub lse: u64,
    pub cu_seqlens_q: u64,
    pub cu_seqlens_k: u64,
    pub alibi_slopes: u64,
    pub q_batch_stride: i64,
    pub q_row_stride: i64,
    pub q_head_stride: i64,
    pub k_batch_stride: i64,
    pub k_row_stride: i64,
    pub k_head_stride: i64,
    pub v_batch_stride: i64,
    pub v_row_stride: i64,
    pub v_head_stride: i64,
    pub o_batch_stride: i64,
    pub o_row_stride: i64,
    pub o_head_stride: i64,
    pub lse_batch_stride: i64,
    pub lse_head_stride: i64,
    pub seqlen_q: i32,
    pub seqlen_k: i32,
    pub heads_q: i32,
    pub group: i32,
    pub window_left: i32,
    pub window_right: i32,
    pub alibi_batch_stride: i32,
    pub dropout_key0: u32,
    pub dropout_key1: u32,
    pub dropout_offset_lo: u32,
    pub dropout_threshold: u32,
    pub scale: f32,
    pub scale_log2: f32,
    pub softcap_inner: f32,
    pub softcap_outer: f32,
    pub dropout_scale: f32,
}

// SAFETY: plain-old-data, #[repr(C)], laid out as the CUDA struct it mirrors.
unsafe impl DeviceRepr for FwdParams {}

/// "Unbounded" window side for the kernel (keeps `i + sk - sq ± w` inside i32).
const UNBOUNDED: i32 = 1 << 29;

fn unsupported(gpu: &Gpu, arg: &str, got: impl std::fmt::Display, ok: &str) -> Error {
    Error::unsupported(gpu.device_name(), arg, got, ok)
}

/// Checks that FA2 can run `problem` on `gpu`.
pub fn check(gpu: &Gpu, problem: &Problem) -> Result<()> {
    if gpu.arch().major < 8 {
        return Err(unsupported(
            gpu,
            "compute capability",
            gpu.arch().nvrtc_name(),
            "sm_80 or newer",
        ));
    }
    if !matches!(problem.dtype, DType::F16 | DType::BF16) {
        return Err(unsupported(gpu, "dtype", problem.dtype, "f16, bf16"));
    }
    if !HEAD_DIMS.contains(&problem.head_dim) {
        return Err(unsupported(
            gpu,
            "head_dim",
            problem.head_dim,
            "32, 64, 96, 128, 192, 256",
        ));
    }
    if problem.max_sq.max(problem.max_sk) >= (1 << 28) {
        return Err(unsupported(
            gpu,
            "seqlen",
            problem.max_sq.max(problem.max_sk),
            "< 2^28",
        ));
    }
    if problem.batch > 65535 {
        return Err(unsupported(gpu, "batch", problem.batch, "at most 65535"));
    }
    Ok(())
}

/// FA2 forward: allocates `out` (shape and dtype of `q`) and `lse` (f32) and runs the kernel.
pub fn forward(
    gpu: &Gpu,
    problem: &Problem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    opts: &AttnOptions,
) -> Result<(DeviceTensor, DeviceTensor)> {
    check(gpu, problem)?;
    let out = DeviceTensor::alloc(gpu, problem.dtype, &problem.q_shape)?;
    let lse = DeviceTensor::alloc(gpu, DType::F32, &problem.lse_shape())?;
    forward_into(gpu, problem, q, k, v, &out, &lse, opts, None)?;
    Ok((out, lse))
}

/// FA2 forward into caller-owned `out` (shape of `q`, its own strides) and contiguous `lse`;
/// `tile` overrides the table (benchmarks). Launches asynchronously on the GPU's stream.
#[allow(clippy::too_many_arguments)]
pub fn forward_into(
    gpu: &Gpu,
    problem: &Problem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    out: &DeviceTensor,
    lse: &DeviceTensor,
    opts: &AttnOptions,
    tile: Option<Tile>,
) -> Result<()> {
    check(gpu, problem)?;
    let features = Features::of(problem, opts);
    let mut variant = Variant::new(problem.head_dim, problem.dtype, features);
    if let Some(t) = tile {
        variant.tile = t;
    }
    variant.tile = fit_tile(
        variant.tile,
        problem.head_dim,
        gpu.max_smem_optin() as usize,
    );
    let p = prepare(gpu, problem, q, k, v, out, lse, opts)?;
    launch(gpu, problem, &variant, p)
}

/// Device-side inputs that must live until the launch is queued.
struct Prepared {
    params: FwdParams,
    _cu: Option<(DeviceBuffer, DeviceBuffer)>,
    _alibi: Option<DeviceBuffer>,
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    gpu: &Gpu,
    problem: &Problem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    out: &DeviceTensor,
    lse: &DeviceTensor,
    opts: &AttnOptions,
) -> Result<Prepared> {
    let (dt, vl) = (problem.dtype, problem.varlen);
    let (qb, qr, qh) = row_strides_16b("q", q, &problem.q_shape, dt, vl)?;
    let (kb, kr, kh) = row_strides_16b("k", k, &problem.k_shape, dt, vl)?;
    let (vb, vr, vh) = row_strides_16b("v", v, &problem.k_shape, dt, vl)?;
    let (ob, or, oh) = row_strides_16b("out", out, &problem.q_shape, dt, vl)?;
    check_lse(lse, problem)?;

    let mut p = FwdParams {
        q: q.ptr(),
        k: k.ptr(),
        v: v.ptr(),
        o: out.ptr(),
        lse: lse.ptr(),
        q_batch_stride: qb,
        q_row_stride: qr,
        q_head_stride: qh,
        k_batch_stride: kb,
        k_row_stride: kr,
        k_head_stride: kh,
        v_batch_stride: vb,
        v_row_stride: vr,
        v_head_stride: vh,
        o_batch_stride: ob,
        o_row_stride: or,
        o_head_stride: oh,
        heads_q: problem.heads_q as i32,
        group: problem.group() as i32,
        scale: problem.scale,
        scale_log2: problem.scale * std::f32::consts::LOG2_E,
        dropout_scale: 1.0,
        window_left: problem
            .mask
            .left
            .map_or(UNBOUNDED, |l| l.min(UNBOUNDED as usize) as i32),
        window_right: problem
            .mask
            .right
            .map_or(UNBOUNDED, |r| r.min(UNBOUNDED as usize) as i32),
        ..Default::default()
    };
    let mut cu = None;
    if problem.varlen {
        let mut cq: Vec<i32> = problem.seqs.iter().map(|s| s.q_start as i32).collect();
        let mut ck: Vec<i32> = problem.seqs.iter().map(|s| s.k_start as i32).collect();
        cq.push(problem.total_q as i32);
        ck.push(problem.total_k as i32);
        let (bq, bk) = (
            DeviceBuffer::from_i32(gpu, &cq)?,
            DeviceBuffer::from_i32(gpu, &ck)?,
        );
        p.cu_seqlens_q = bq.ptr();
        p.cu_seqlens_k = bk.ptr();
        cu = Some((bq, bk));
    } else {
        p.seqlen_q = problem.q_shape[1] as i32;
        p.seqlen_k = problem.k_shape[1] as i32;
    }
    let (lse_b, lse_h) = problem.lse_strides();
    p.lse_batch_stride = lse_b as i64;
    p.lse_head_stride = lse_h as i64;
    if problem.softcap > 0.0 {
        p.softcap_inner = problem.scale / problem.softcap;
        p.softcap_outer = problem.softcap * std::f32::consts::LOG2_E;
    }
    let mut alibi = None;
    if let Some(a) = &opts.alibi_slopes {
        let buf = DeviceBuffer::from_f32(gpu, &a.values)?;
        p.alibi_slopes = buf.ptr();
        p.alibi_batch_stride = if a.per_batch {
            problem.heads_q as i32
        } else {
            0
        };
        alibi = Some(buf);
    }
    if let Some(d) = &problem.dropout {
        let key = d.key();
        p.dropout_key0 = key[0];
        p.dropout_key1 = key[1];
        // counter word 3 is batch ^ offset_lo: read offset_lo back through batch 0.
        p.dropout_offset_lo = d.counter(0, 0, 0, 0)[3];
        p.dropout_threshold = d.threshold();
        p.dropout_scale = d.scale;
    }
    Ok(Prepared {
        params: p,
        _cu: cu,
        _alibi: alibi,
    })
}

/// The function for `variant` with its shared memory raised (cached by the runtime).
pub fn kernel(gpu: &Gpu, variant: &Variant) -> Result<Arc<cudarc::driver::CudaFunction>> {
    gpu.kernel_with_smem(
        &variant.spec(),
        variant.tile.smem_bytes(variant.head_dim) as u32,
    )
}

fn launch(gpu: &Gpu, problem: &Problem, variant: &Variant, prep: Prepared) -> Result<()> {
    if problem.batch == 0 || problem.max_sq == 0 || problem.heads_q == 0 {
        return Ok(());
    }
    let tile = variant.tile;
    let m_blocks = problem.max_sq.div_ceil(tile.bq);
    if m_blocks > 65535 {
        return Err(unsupported(
            gpu,
            "seqlen_q",
            problem.max_sq,
            "at most 65535 query tiles",
        ));
    }
    let f = kernel(gpu, variant)?;
    let cfg = LaunchConfig {
        // x = query head (fastest: GQA heads share K/V in L2), y = query tile (reversed in the
        // kernel for masks: longest first), z = batch.
        grid_dim: (
            problem.heads_q as u32,
            m_blocks as u32,
            problem.batch as u32,
        ),
        block_dim: ((tile.warps * 32) as u32, 1, 1),
        shared_mem_bytes: tile.smem_bytes(variant.head_dim) as u32,
    };
    let stream = gpu.stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&prep.params);
    // SAFETY: the params struct matches the kernel's by-value argument; every pointer in it
    // refers to a live device allocation covering the strided extents validated above.
    unsafe { b.launch(cfg) }
        .map_err(|e| driver_err(&format!("launching {}", variant.name()), e))?;
    drop(prep);
    Ok(())
}

/// A CUDA event that records timing (for benchmarks, so callers need not name cudarc).
pub fn timing_event(gpu: &Gpu) -> Result<cudarc::driver::CudaEvent> {
    gpu.ctx()
        .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| driver_err("creating a timing event", e))
}

/// Free device memory in bytes as the driver reports it (cuMemGetInfo).
pub fn free_memory(gpu: &Gpu) -> Result<usize> {
    gpu.ctx()
        .bind_to_thread()
        .map_err(|e| driver_err("binding the context", e))?;
    cudarc::driver::result::mem_get_info()
        .map(|(free, _total)| free)
        .map_err(|e| driver_err("cuMemGetInfo", e))
}
