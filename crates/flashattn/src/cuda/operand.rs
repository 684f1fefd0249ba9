//! Checks of the device tensors a kernel reads or writes, shared by the FA2 forward and
//! backward: what the user-facing `Problem` validated for host tensors, redone for device
//! views, plus what the kernels' 16-byte `cp.async` loads and vector stores need.

use super::tensor::DeviceTensor;
use crate::error::{Error, Result};
use crate::layout::Problem;
use crate::tensor::DType;

/// `(batch, row, head)` element strides of a `[b, s, h, d]` (or varlen `[t, h, d]`) operand,
/// after checking its dtype, its shape (`want`), a contiguous last dimension and 16-byte
/// alignment of every row and head that is actually stepped over (size-1 dims never are).
pub(crate) fn row_strides_16b(
    name: &str,
    t: &DeviceTensor,
    want: &[usize],
    dtype: DType,
    varlen: bool,
) -> Result<(i64, i64, i64)> {
    if t.dtype() != dtype {
        return Err(Error::invalid(
            name,
            format!("dtype {}", t.dtype()),
            format!("dtype {dtype}"),
        ));
    }
    if t.shape() != want {
        return Err(Error::invalid(
            name,
            format!("shape {:?}", t.shape()),
            format!("shape {want:?}"),
        ));
    }
    let (s, shape) = (t.strides(), t.shape());
    let rank = shape.len();
    if shape[rank - 1] > 1 && s[rank - 1] != 1 {
        return Err(Error::invalid(
            name,
            format!("last-dim stride {}", s[rank - 1]),
            "1 (a contiguous last dimension)",
        ));
    }
    let (b, r, h) = if varlen {
        (0, s[0], s[1])
    } else {
        (s[0], s[1], s[2])
    };
    let stepped_aligned = [
        (b, if varlen { 1 } else { shape[0] }),
        (r, shape[rank - 3]),
        (h, shape[rank - 2]),
    ]
    .iter()
    .all(|&(st, n)| n <= 1 || st % 8 == 0);
    if t.numel() > 0 && (!stepped_aligned || !t.ptr().is_multiple_of(16)) {
        return Err(Error::invalid(
            name,
            format!("strides {s:?} at an offset of {} elements", t.offset()),
            "16-byte aligned rows and heads (strides multiples of 8 elements)",
        ));
    }
    Ok((b as i64, r as i64, h as i64))
}

/// The log-sum-exp operand: contiguous f32 of `problem.lse_shape()`.
pub(crate) fn check_lse(lse: &DeviceTensor, problem: &Problem) -> Result<()> {
    if lse.dtype() != DType::F32
        || lse.shape() != problem.lse_shape().as_slice()
        || !lse.is_contiguous()
    {
        return Err(Error::invalid(
            "lse",
            format!(
                "{} {:?} strides {:?}",
                lse.dtype(),
                lse.shape(),
                lse.strides()
            ),
            format!("contiguous f32 {:?}", problem.lse_shape()),
        ));
    }
    Ok(())
}
