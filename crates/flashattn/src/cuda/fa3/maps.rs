//! Tensor maps for the TMA engine (`cuTensorMapEncodeTiled`): 4-D `[d, rows, heads, batch]`
//! maps of the FA3 operands, the 5-D packed-GQA maps, and O's map for the TMA-store epilogue.

use crate::cuda::tensor::DeviceTensor;
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::driver::sys;

/// Strides (elements) of a `[batch, rows, heads, d]` device tensor that TMA can address:
/// last dim contiguous, every other stride a multiple of 16 bytes (or irrelevant: extent 1).
fn tma_strides(t: &DeviceTensor, name: &str) -> Result<[u64; 3]> {
    let (sh, st) = bshd(t);
    if sh[3] > 1 && st[3] != 1 {
        return Err(Error::invalid(
            name,
            format!("shape {sh:?} strides {st:?}"),
            "[batch, rows, heads, d] with a contiguous d",
        ));
    }
    let esz = t.dtype().size() as u64;
    // Map dims 1, 2, 3 are the tensor's rows (1), heads (2) and batch (0).
    let mut out = [0u64; 3];
    let mut extent = sh[3] as u64 * esz; // bytes spanned so far, for strides of extent-1 dims
    for (slot, dim) in [(0usize, 1usize), (1, 2), (2, 0)] {
        let s = st[dim] as u64 * esz;
        let v = if s.is_multiple_of(16) && s > 0 && s < (1u64 << 40) {
            s
        } else if sh[dim] <= 1 {
            extent.div_ceil(16) * 16
        } else {
            return Err(Error::invalid(
                name,
                format!("stride {} of dim {dim}", st[dim]),
                "strides that are multiples of 16 bytes (fa3 TMA)",
            ));
        };
        extent = extent.max(v * sh[dim].max(1) as u64);
        out[slot] = v;
    }
    if !t.ptr().is_multiple_of(16) {
        return Err(Error::invalid(
            name,
            "a base address not 16-byte aligned",
            "16-byte aligned (fa3 TMA)",
        ));
    }
    Ok(out)
}

/// Shape and strides as `[batch, rows, heads, d]`: a packed (varlen) `[total, heads, d]` tensor
/// is one batch entry.
pub(super) fn bshd(t: &DeviceTensor) -> ([usize; 4], [usize; 4]) {
    let (sh, st) = (t.shape(), t.strides());
    match sh.len() {
        3 => (
            [1, sh[0], sh[1], sh[2]],
            [st[0] * sh[0].max(1), st[0], st[1], st[2]],
        ),
        4 => ([sh[0], sh[1], sh[2], sh[3]], [st[0], st[1], st[2], st[3]]),
        _ => ([0; 4], [0; 4]),
    }
}

pub(crate) fn encode_map(t: &DeviceTensor, name: &str, box_rows: usize) -> Result<[u64; 16]> {
    let (sh, _) = bshd(t);
    if !matches!(t.shape().len(), 3 | 4) || sh.contains(&0) {
        return Err(Error::invalid(
            name,
            format!("shape {:?}", t.shape()),
            "[batch, rows, heads, d] or [total, heads, d], no zero extent (fa3 TMA)",
        ));
    }
    let strides = tma_strides(t, name)?;
    let dtype = match t.dtype() {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::F32 => return Err(Error::invalid(name, "f32", "bf16 or f16 (fa3)")),
    };
    let dims: [u64; 4] = [sh[3] as u64, sh[1] as u64, sh[2] as u64, sh[0] as u64];
    // `ptr()` is the view's first element (its offset applied).
    encode_raw(
        name,
        t.ptr(),
        dtype,
        dims,
        strides,
        [64, box_rows as u32, 1, 1],
    )
}

/// The packed-GQA map (`Variant::pack` = g) of q or out, dense `[batch, rows, heads_q, d]` or
/// varlen `[total, heads_q, d]` (one batch entry): 5-D `[d, g, rows, heads_q / g, batch]`, boxes
/// of 64 columns × `box_rows` packed rows (`box_rows / g` queries × the g heads of a group), so
/// packed row r is query r / g of head r % g.
pub(super) fn encode_packed(
    t: &DeviceTensor,
    name: &str,
    box_rows: usize,
    g: usize,
) -> Result<[u64; 16]> {
    let (sh, _) = bshd(t);
    if !matches!(t.shape().len(), 3 | 4) || sh.contains(&0) || sh[2] % g != 0 {
        return Err(Error::invalid(
            name,
            format!("shape {:?}", t.shape()),
            format!(
                "[batch, rows, heads, d] or [total, heads, d] with heads a multiple of {g} \
                 (GQA packing)"
            ),
        ));
    }
    let [rs, hs, bs] = tma_strides(t, name)?;
    let dtype = match t.dtype() {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::F32 => return Err(Error::invalid(name, "f32", "bf16 or f16 (fa3)")),
    };
    let dims = [
        sh[3] as u64,
        g as u64,
        sh[1] as u64,
        (sh[2] / g) as u64,
        sh[0] as u64,
    ];
    let boxd = [64, g as u32, (box_rows / g) as u32, 1, 1];
    encode_tiled(
        name,
        t.ptr(),
        dtype,
        &dims,
        &[hs, rs, hs * g as u64, bs],
        &boxd,
    )
}

/// A 4-D tiled tensor map with 128-byte swizzle and zero fill out of bounds: `dims` innermost
/// first, `strides` the byte strides of dims 1..3 (multiples of 16), `boxd` the box (its inner
/// extent at most 128 bytes). Shared with the FP8 forward (`fa3_fp8`).
pub(crate) fn encode_raw(
    name: &str,
    addr: u64,
    dtype: sys::CUtensorMapDataType,
    dims: [u64; 4],
    strides: [u64; 3],
    boxd: [u32; 4],
) -> Result<[u64; 16]> {
    encode_tiled(name, addr, dtype, &dims, &strides, &boxd)
}

/// [`encode_raw`] for any rank 1..=5 (`strides` one shorter than `dims`, `boxd` as long).
fn encode_tiled(
    name: &str,
    addr: u64,
    dtype: sys::CUtensorMapDataType,
    dims: &[u64],
    strides: &[u64],
    boxd: &[u32],
) -> Result<[u64; 16]> {
    let rank = dims.len();
    assert!(
        (1..=5).contains(&rank) && strides.len() + 1 == rank && boxd.len() == rank,
        "tensor map rank"
    );
    let sh = dims;
    let estr = [1u32; 5];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: all arrays live for the call and have at least the lengths the rank implies
    // (checked above); the map is plain output memory of the right size and alignment.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            rank as u32,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            estr.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::invalid(
            name,
            format!("shape {sh:?}, byte strides {strides:?}: cuTensorMapEncodeTiled {r:?}"),
            "a tensor the TMA engine can address",
        ));
    }
    Ok(map.opaque)
}

/// The tensor map of `out` (q's shape and dtype, bf16 or f16) for the TMA-store epilogue and
/// the kernel's `o_tma` flag: `(map, 1)` when TMA can address it, `(zeros, 0)` otherwise —
/// strides that are not multiples of 16 bytes or a base that is not 16-byte aligned — and the
/// kernel then copies its staged O out with 4-byte stores (the layout decides, not the
/// problem). Shared with `fa3_fp8`.
pub(crate) fn o_map(out: &DeviceTensor) -> ([u64; 16], i32) {
    match encode_map(out, "out", 64) {
        Ok(m) => (m, 1),
        Err(_) => ([0; 16], 0),
    }
}

/// Whether the FA3 forward writes `out` through TMA stores (`FA3_OTMA`; else 4-byte stores:
/// strides that are not multiples of 16 bytes, or a base that is not 16-byte aligned). For
/// tests and benchmarks.
pub fn out_uses_tma(out: &DeviceTensor) -> bool {
    o_map(out).1 == 1
}
