//! The CUDA backend (feature `cuda`): kernels are CUDA C++ sources under `kernels/`, embedded
//! in the binary and JIT-compiled with NVRTC for the device's own architecture.
//!
//! Layers: `context` (driver, device, stream) → `jit` + `cache` (NVRTC, disk/memory cache) →
//! `tensor` (device buffers) → kernel families (`fa2` forward, `fa2_bwd` backward, `fa3` Hopper).

pub mod cache;
pub mod context;
pub mod fa2;
pub mod fa2_bwd;
pub mod fa3;
pub mod jit;
pub mod tensor;

use crate::error::Result;
use crate::layout::{Problem, Qkv};
use crate::options::AttnOptions;
use crate::tensor::Tensor;
use crate::{ForwardOutput, Gradients};

/// Forward on host tensors: upload, run the best kernel family for the device, download.
pub fn forward_host(
    ordinal: usize,
    problem: &Problem,
    inputs: &Qkv<'_>,
    opts: &AttnOptions,
) -> Result<ForwardOutput> {
    let _ = (ordinal, problem, inputs, opts);
    todo!("C1: context + dispatch to fa3 (sm90) or fa2")
}

/// Backward on host tensors.
pub fn backward_host(
    ordinal: usize,
    problem: &Problem,
    inputs: &Qkv<'_>,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    opts: &AttnOptions,
) -> Result<Gradients> {
    let _ = (ordinal, problem, inputs, out, lse, dout, opts);
    todo!("C1: dispatch to fa2_bwd")
}
