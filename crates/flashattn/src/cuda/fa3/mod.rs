//! Host side of the FlashAttention-3 Hopper forward family (sm_90a): `kernels/sm90/fwd.cu`.
//!
//! One CTA per (query tile, query head, batch): a TMA producer warp and two (Bq 128) or three
//! (Bq 192, d=64 bf16) wgmma consumer warpgroups of 64 query rows (see the kernel's header
//! comment for the math and the pipeline); persistent modes (one CTA per SM walking the tiles
//! with a static stride — default for plain problems with ≤ 1024 keys and dense plain d = 64 —
//! or taking them from a global counter, longest first — default for dense causal, plain dense
//! d = 256 and plain dense d = 96/128 beyond 1024 keys; `persist=0|1|2` overrides); QKᵀ with
//! Q's fragments in registers at d = 96/128 (`qrs`); GQA packing (the query heads of a group
//! share a tile's rows, 5-D Q/O maps; dense or varlen) where it cuts the tiles of a group, i.e.
//! short query lengths (`pack=0` turns it off). The host encodes one tensor map per input
//! (`cuTensorMapEncodeTiled`, 4-D `[d, rows, heads, batch]`, 64-column boxes, 128-byte
//! swizzle, zero fill out of bounds) and passes them by value in one `__grid_constant__`
//! parameter struct.
//!
//! The epilogue writes O through shared memory and TMA stores (`FA3_OTMA`, [`Variant::otma`];
//! on by default). Where TMA cannot address the caller's output view (a row, head or batch
//! stride that is not a multiple of 16 bytes, or a base that is not 16-byte aligned; see
//! [`out_uses_tma`]) the same kernel copies the staged tile out with 4-byte stores instead: a
//! layout-driven choice made per launch, with identical results, not a missing feature. Varlen
//! tiles that end inside a consumer's 64 rows are copied out that way too (a TMA box would run
//! into the next sequence's rows), and tiles without keys write their zeros directly (see the
//! kernel's header).
//!
//! [`supports`] is the exact envelope of the kernel: dense or varlen (cu_seqlens) bf16/f16,
//! head dim 64, 96, 128, 192 or 256, no mask, causal or any sliding window (bottom-right),
//! softcap, ALiBi, GQA/MQA, any lengths, 16-byte aligned row/head/batch strides, no dropout.
//! Three kernel modes per (head dim, dtype, dense/varlen): plain, causal, and "full" (window,
//! softcap and ALiBi compiled in, each switched at run time) for everything masked or
//! transformed other than plain causal. Dropout goes to FA2 through the dispatcher.
//!
//! Here: the envelope ([`supports`]) and the launch ([`forward_into_with`]). Beside it:
//! `variant.rs` (the compiled configurations and the shipped tuning), `maps.rs` (tensor maps),
//! `sched.rs` (persistent scheduling and the split tail's plan), `params.rs` (the kernel's
//! argument struct).

mod maps;
mod params;
mod sched;
mod variant;

pub use maps::out_uses_tma;
use maps::{bshd, encode_packed};
pub(crate) use maps::{encode_map, encode_raw, o_map};
pub(crate) use params::Fa3Params;
pub use sched::split_plan;
pub(crate) use sched::{persistent_grid, sched_group, tile_counter};
use sched::{split_of, work_and_grid};
use variant::needs_full;
pub use variant::{
    all_variants, OStaging, Variant, LAZY_RESCALE, LONG_CAUSAL_SQ, PERSIST_MAX_SK, SHORT_CAUSAL_SQ,
    SMEM_LIMIT, SPLIT_MIN_KEY_TILES,
};
pub(crate) use variant::{o_stage_bytes, tune_knobs};

use super::context::{driver_err, Gpu};
use super::operand::check_lse;
use super::tensor::{DeviceBuffer, DeviceTensor};
use crate::error::{Error, Result};
use crate::layout::Problem;
use crate::options::{AlibiSlopes, AttnOptions};
use crate::tensor::DType;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Kernel source (under `kernels/`) and entry point.
pub const SOURCE: &str = "sm90/fwd.cu";
pub const ENTRY: &str = "fa3_fwd";
/// Head dims the kernel is compiled for.
pub const HEAD_DIMS: [usize; 5] = [64, 96, 128, 192, 256];

/// Longest sequence (either side) the sm90 kernels take: window arithmetic stays inside i32.
pub(super) const MAX_LEN: usize = 1 << 28;

/// Window bounds `(left, right)` for the sm90 kernels: unbounded sides become
/// `max_sq + max_sk + 1` (no key is that far away), so that `i + sk − sq ± w` stays inside i32
/// for lengths ≤ [`MAX_LEN`].
pub(super) fn window_bounds(problem: &Problem) -> (i32, i32) {
    let unb = (problem.max_sq + problem.max_sk + 1) as i32;
    let clamp = |w: Option<usize>| w.map_or(unb, |x| x.min(unb as usize) as i32);
    (clamp(problem.mask.left), clamp(problem.mask.right))
}

/// Whether FA3 handles `problem` on `gpu` exactly (anything else must go to FA2): the kernel's
/// whole envelope, ALiBi included (window/softcap/ALiBi and varlen passed `gpu_fa3` on an H100,
/// 2026-11-26; see bench/RESULTS.md).
pub fn supports(gpu: &Gpu, problem: &Problem) -> bool {
    let arch = gpu.arch();
    if !(arch.major == 9 && arch.minor == 0) {
        return false;
    }
    if !matches!(problem.dtype, DType::BF16 | DType::F16) {
        return false;
    }
    if !HEAD_DIMS.contains(&problem.head_dim) || problem.dropout.is_some() {
        return false;
    }
    if !problem.scale.is_finite() {
        return false;
    }
    // Plain and causal modes take row maxima on raw scores: need a positive scale (the full
    // mode scales before the maximum).
    if !needs_full(problem, false) && problem.scale <= 0.0 {
        return false;
    }
    if problem.max_sq > MAX_LEN || problem.max_sk > MAX_LEN {
        return false;
    }
    let v = Variant::for_problem(problem, false);
    v.smem_bytes() <= gpu.max_smem_optin() as usize
}

/// The stores that do not go through TMA write 4-byte pairs: `out` needs a contiguous last
/// dim, even strides and a 4-byte aligned first element.
fn check_out_pairs(out: &DeviceTensor) -> Result<()> {
    let (sh, st) = bshd(out);
    let bad_stride = (0..3).any(|i| sh[i] > 1 && st[i] % 2 != 0);
    if (sh[3] > 1 && st[3] != 1) || bad_stride || !out.ptr().is_multiple_of(4) {
        return Err(Error::invalid(
            "out",
            format!(
                "strides {:?} at an offset of {} elements",
                out.strides(),
                out.offset()
            ),
            "a contiguous last dim, even strides and a 4-byte aligned start",
        ));
    }
    Ok(())
}

/// FA3 forward: `(out, lse)`; `out` contiguous with q's shape, `lse` f32 `[batch, heads_q, sq]`.
pub fn forward(
    gpu: &Gpu,
    problem: &Problem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    opts: &AttnOptions,
) -> Result<(DeviceTensor, DeviceTensor)> {
    if !supports(gpu, problem) {
        return Err(Error::unsupported(
            gpu.device_name(),
            "problem",
            "fa3",
            "bf16/f16, head dim 64/96/128/192/256, no dropout, sm 9.0",
        ));
    }
    let out = DeviceTensor::alloc(gpu, problem.dtype, &problem.q_shape)?;
    let lse_shape = problem.lse_shape();
    if problem.total_q > 0 && problem.total_k == 0 {
        // No keys: out = 0 (alloc zero-fills), lse = -inf.
        let n: usize = lse_shape.iter().product();
        let t = crate::tensor::Tensor::from_f32(vec![f32::NEG_INFINITY; n], &lse_shape)?;
        return Ok((out, DeviceTensor::upload(gpu, &t)?));
    }
    let lse = DeviceTensor::alloc(gpu, DType::F32, &lse_shape)?;
    forward_into_with(
        gpu,
        problem,
        q,
        k,
        v,
        &out,
        &lse,
        opts.alibi_slopes.as_ref(),
        "",
    )?;
    Ok((out, lse))
}

/// The launch itself, into caller-provided `out` (q's shape; a contiguous last dim, even
/// strides and a 4-byte aligned start; TMA stores where [`out_uses_tma`]) and contiguous f32
/// `lse`. Every element of both is written (tests
/// poison them first). Needs `supports(gpu, problem)` and at least one key per sequence.
pub fn forward_into(
    gpu: &Gpu,
    problem: &Problem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    out: &DeviceTensor,
    lse: &DeviceTensor,
) -> Result<()> {
    forward_into_with(gpu, problem, q, k, v, out, lse, None, "")
}

/// [`forward_into`] with ALiBi slopes; runs anything [`supports`] accepts (varlen: `out` packed
/// like q, `lse` `[heads_q, total_q]`). `tune` takes tuning knobs (`FLASHATTN_FA3_TUNE` syntax,
/// applied after the environment's) on top of the variant the problem selects, for tests and
/// benchmarks that need a particular scheduler or tile without touching the process
/// environment; `""` runs the shipped choice.
#[allow(clippy::too_many_arguments)]
pub fn forward_into_with(
    gpu: &Gpu,
    problem: &Problem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    out: &DeviceTensor,
    lse: &DeviceTensor,
    alibi: Option<&AlibiSlopes>,
    tune: &str,
) -> Result<()> {
    let sq = problem.max_sq;
    let sk = problem.max_sk;
    if out.shape() != problem.q_shape.as_slice() || out.dtype() != problem.dtype {
        return Err(Error::invalid(
            "out",
            format!("{} {:?}", out.dtype(), out.shape()),
            "q's dtype and shape",
        ));
    }
    check_lse(lse, problem)?;
    if problem.batch == 0 || sq == 0 || problem.heads_q == 0 {
        return Ok(());
    }
    check_out_pairs(out)?;
    if problem.total_k == 0 {
        return Err(Error::invalid(
            "k",
            "no keys",
            "at least one key (use fa3::forward)",
        ));
    }
    let mut var = Variant::tuned(problem, alibi.is_some(), tune);
    // Packed tiles leave through 5-D TMA boxes only.
    if var.pack > 1 && !out_uses_tma(out) {
        var.pack = 1;
    }
    let smem = var.smem_bytes();
    let f = gpu.kernel_with_smem(&var.spec(), smem as u32)?;
    let m_tiles = (sq * var.pack).div_ceil(var.bq());
    let ost = bshd(out).1;
    let (wl, wr) = window_bounds(problem);
    let mut cu = None;
    if problem.varlen {
        let mut cq: Vec<i32> = problem.seqs.iter().map(|s| s.q_start as i32).collect();
        let mut ck: Vec<i32> = problem.seqs.iter().map(|s| s.k_start as i32).collect();
        cq.push(problem.total_q as i32);
        ck.push(problem.total_k as i32);
        cu = Some((
            DeviceBuffer::from_i32(gpu, &cq)?,
            DeviceBuffer::from_i32(gpu, &ck)?,
        ));
    }
    let slopes = match alibi {
        Some(a) => Some(DeviceBuffer::from_f32(gpu, &a.values)?),
        None => None,
    };
    let (om, o_tma) = if var.pack > 1 {
        (encode_packed(out, "out", 64, var.pack)?, 1)
    } else if var.otma {
        o_map(out)
    } else {
        ([0; 16], 0)
    };
    let sms = gpu.sm_count() as usize;
    let pairs = problem.heads_q * problem.batch;
    let kv_pair = 2 * problem.max_sk * problem.head_dim * 2;
    let sched_group = sched_group(var.sched_group, var.dynamic, m_tiles, pairs, sms, kv_pair);
    let tile_ctr = tile_counter(gpu, var.persistent && var.dynamic)?;
    let mut params = Fa3Params {
        q: if var.pack > 1 {
            encode_packed(q, "q", var.bq(), var.pack)?
        } else {
            encode_map(q, "q", var.q_box_rows())?
        },
        k: encode_map(k, "k", var.bk)?,
        v: encode_map(v, "v", var.bk)?,
        om,
        o: out.ptr(),
        lse: lse.ptr(),
        o_batch: if problem.varlen { 0 } else { ost[0] as i64 },
        o_row: ost[1] as i64,
        o_head: ost[2] as i64,
        sq: sq as i32,
        sk: sk as i32,
        heads_q: problem.heads_q as i32,
        group: problem.group() as i32,
        m_tiles: m_tiles as i32,
        scale_log2: problem.scale * std::f32::consts::LOG2_E,
        batch: problem.batch as i32,
        pad1: 0,
        cu_q: cu.as_ref().map_or(0, |c| c.0.ptr()),
        cu_k: cu.as_ref().map_or(0, |c| c.1.ptr()),
        alibi: slopes.as_ref().map_or(0, |s| s.ptr()),
        lse_b: problem.lse_strides().0 as i64,
        lse_h: problem.lse_strides().1 as i64,
        wl,
        wr,
        sc_in: if problem.softcap > 0.0 {
            problem.scale / problem.softcap
        } else {
            0.0
        },
        sc_out: if problem.softcap > 0.0 {
            problem.softcap * std::f32::consts::LOG2_E
        } else {
            0.0
        },
        alibi_bs: match alibi {
            Some(a) if a.per_batch => problem.heads_q as i32,
            _ => 0,
        },
        pad2: 0,
        o_tma,
        sched_group: sched_group.min(i32::MAX as usize) as i32,
        tile_ctr,
        ..Fa3Params::zeroed()
    };
    if !var.persistent
        && (m_tiles > i32::MAX as usize || problem.heads_q > 65535 || problem.batch > 65535)
    {
        return Err(Error::invalid(
            "shape",
            format!(
                "{} query tiles x {} heads x {} batch",
                m_tiles, problem.heads_q, problem.batch
            ),
            "grid within (2^31-1, 65535, 65535)",
        ));
    }
    let (total, persistent_ctas) = work_and_grid(&var, problem, sms);
    debug_assert_eq!(total, m_tiles * problem.heads_q * problem.batch);
    if let Some((t_main, ranges, w)) = split_of(&var, problem, total, persistent_ctas) {
        // Two pieces' slots per range, one per consumer warp: its accumulator and (m, l).
        let warp_slot = (var.d / 8 + 1) * 32 * 16;
        let ws_bytes = 2 * ranges * 4 * var.nc * warp_slot;
        let (ws, ctr) = gpu.split_workspace(ws_bytes, (total - t_main) * var.nc)?;
        params.t_main = t_main as i32;
        params.split_ranges = ranges as i32;
        params.split_w = w as i32;
        params.split_n = sk.div_ceil(var.bk) as i32;
        params.split_ws = ws;
        params.split_ctr = ctr;
    }
    let grid_dim = if var.persistent {
        // The dynamic counter runs up to total + grid − 1, split pieces' ids up to
        // total + 2 · ranges (at most 8 per CTA, `split_of`).
        if total > i32::MAX as usize - 16 * sms {
            return Err(Error::invalid(
                "shape",
                format!("{total} work tiles"),
                "fewer than 2^31 - 16 x (multiprocessors)",
            ));
        }
        (persistent_ctas as u32, 1, 1)
    } else {
        // Packed: grid y runs over key heads (a CTA takes all the query heads of one).
        (
            m_tiles as u32,
            (problem.heads_q / var.pack) as u32,
            problem.batch as u32,
        )
    };
    let cfg = LaunchConfig {
        grid_dim,
        block_dim: (128 * (var.nc as u32 + 1), 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let stream = gpu.stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&params);
    // SAFETY: the kernel's single parameter is `Fa3Params` by value (layout mirrored above);
    // the tensor maps address q/k/v, which outlive the launch (the stream is synchronized
    // before they can be dropped by callers that download), and out/lse are sized by Problem.
    unsafe { b.launch(cfg) }.map_err(|e| driver_err("launching fa3_fwd", e))?;
    // cu_seqlens and slopes are freed stream-ordered, after the launch (as fa2 does).
    drop((cu, slopes));
    Ok(())
}
