//! The CUDA backend (feature `cuda`): kernels are CUDA C++ sources under `kernels/`, embedded
//! in the binary and JIT-compiled with NVRTC for the device's own architecture.
//!
//! Layers, raw to safe: `loader` (find/preload libcuda, libnvrtc) → `nvrtc` (raw NVRTC FFI) →
//! `jit` + `cache` (specs, options, disk/memory cache) → `context` (device, stream, loaded
//! kernels) → `tensor` (device buffers) → kernel families (`fa2` forward, `fa2_bwd` backward,
//! `fa3` Hopper forward, `fa3_bwd` Hopper backward main kernel) → this module's dispatch, and
//! `report` (info, compile-all).

pub mod cache;
pub mod context;
pub mod fa2;
pub mod fa2_bwd;
pub mod fa3;
pub mod fa3_bwd;
pub mod fa3_fp8;
pub mod jit;
pub mod loader;
mod nvrtc;
mod operand;
pub mod report;
pub mod tensor;

pub use context::{Arch, Gpu};
pub use jit::{Compiled, KernelSpec, Resources};
pub use report::{compile_all, info_report, CompileReport, KernelReport};
pub use tensor::{DeviceBuffer, DeviceTensor};

use crate::error::{Error, Result};
use crate::layout::{Problem, Qkv};
use crate::options::AttnOptions;
use crate::tensor::{DType, Tensor};
use crate::{ForwardOutput, Gradients};

/// Which kernel family runs a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Family {
    /// FA3 on sm_90 when it supports the problem, else FA2.
    #[default]
    Auto,
    /// FlashAttention-2 (mma.sync, sm80+).
    Fa2,
    /// FlashAttention-3 (wgmma + TMA, sm_90a only).
    Fa3,
}

/// Forward on device tensors: `(out, lse)`.
pub fn forward_device(
    gpu: &Gpu,
    problem: &Problem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    opts: &AttnOptions,
    family: Family,
) -> Result<(DeviceTensor, DeviceTensor)> {
    let use_fa3 = match family {
        Family::Fa2 => false,
        Family::Fa3 => {
            if !gpu.arch().is_hopper() || !fa3::supports(gpu, problem) {
                return Err(Error::unsupported(
                    gpu.device_name(),
                    "family",
                    "fa3",
                    "fa3 needs sm 9.0 and a problem fa3::supports (use fa2 or auto)",
                ));
            }
            true
        }
        Family::Auto => gpu.arch().is_hopper() && fa3::supports(gpu, problem),
    };
    if use_fa3 {
        fa3::forward(gpu, problem, q, k, v, opts)
    } else {
        fa2::forward(gpu, problem, q, k, v, opts)
    }
}

/// Backward on device tensors: `(dq, dk, dv)`. `Auto` runs the Hopper main kernel where it
/// supports the problem ([`fa3_bwd::supports`]), `Fa2` the mma.sync one, `Fa3` the Hopper one
/// or an error.
#[allow(clippy::too_many_arguments)]
pub fn backward_device(
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
    fa2_bwd::backward(gpu, problem, q, k, v, out, lse, dout, opts, family)
}

fn check_dtype(gpu: &Gpu, dtype: DType) -> Result<()> {
    match dtype {
        DType::F16 | DType::BF16 => Ok(()),
        DType::F32 => Err(Error::unsupported(
            gpu.device_name(),
            "dtype",
            dtype,
            "f16, bf16",
        )),
    }
}

/// Forward on host tensors: upload, run the best kernel family for the device, download.
pub fn forward_host(
    ordinal: usize,
    problem: &Problem,
    inputs: &Qkv<'_>,
    opts: &AttnOptions,
) -> Result<ForwardOutput> {
    let gpu = Gpu::get(ordinal)?;
    check_dtype(&gpu, problem.dtype)?;
    if inputs.q.numel() == 0 || problem.seqs.iter().all(|s| s.sk == 0) {
        // Nothing to attend to: out = 0, lse = -inf (empty when there are no query rows).
        let lse_n: usize = problem.lse_shape().iter().product();
        return Ok(ForwardOutput {
            out: Tensor::zeros(problem.dtype, &problem.q_shape),
            lse: Tensor::from_f32(vec![f32::NEG_INFINITY; lse_n], &problem.lse_shape())?,
        });
    }
    let q = DeviceTensor::upload(&gpu, inputs.q)?;
    let k = DeviceTensor::upload(&gpu, inputs.k)?;
    let v = DeviceTensor::upload(&gpu, inputs.v)?;
    let (out, lse) = forward_device(&gpu, problem, &q, &k, &v, opts, Family::Auto)?;
    Ok(ForwardOutput {
        out: out.download()?,
        lse: lse.download()?,
    })
}

/// Backward on host tensors: upload, run FA2 backward, download.
pub fn backward_host(
    ordinal: usize,
    problem: &Problem,
    inputs: &Qkv<'_>,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    opts: &AttnOptions,
) -> Result<Gradients> {
    let gpu = Gpu::get(ordinal)?;
    check_dtype(&gpu, problem.dtype)?;
    if inputs.q.numel() == 0 || inputs.k.numel() == 0 {
        return Ok(Gradients {
            dq: Tensor::zeros(problem.dtype, &problem.q_shape),
            dk: Tensor::zeros(problem.dtype, &problem.k_shape),
            dv: Tensor::zeros(problem.dtype, inputs.v.shape()),
        });
    }
    let up = |t: &Tensor| DeviceTensor::upload(&gpu, t);
    let (q, k, v) = (up(inputs.q)?, up(inputs.k)?, up(inputs.v)?);
    let (o, l, d) = (up(out)?, up(lse)?, up(dout)?);
    let (dq, dk, dv) = backward_device(&gpu, problem, &q, &k, &v, &o, &l, &d, opts, Family::Auto)?;
    Ok(Gradients {
        dq: dq.download()?,
        dk: dk.download()?,
        dv: dv.download()?,
    })
}
