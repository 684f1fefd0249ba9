//! # flashattn
//!
//! Exact softmax attention that never materialises the `seqlen_q × seqlen_k` score matrix:
//! queries are processed in tiles against tiles of keys and values, with an online softmax
//! (running row max `m_i` and sum `l_i`) and the log-sum-exp kept, so the backward pass
//! recomputes `P` tile by tile instead of storing it (FlashAttention, Dao et al. 2022/2023).
//!
//! One validated [`Problem`] (built from [`Qkv`] and [`AttnOptions`]) feeds every backend:
//! the CPU path here, and the CUDA path behind the `cuda` feature.
//!
//! ```
//! use flashattn::{forward, AttnOptions, Device, Qkv, Tensor};
//! let (b, s, h, d) = (1, 5, 2, 8);
//! let x: Vec<f32> = (0..b * s * h * d).map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0).collect();
//! let q = Tensor::from_f32(x.clone(), &[b, s, h, d]).unwrap();
//! let out = forward(&Qkv::dense(&q, &q, &q), &AttnOptions::new().causal(true), Device::Cpu).unwrap();
//! assert_eq!(out.out.shape(), &[b, s, h, d]);
//! assert_eq!(out.lse.shape(), &[b, h, s]);
//! ```

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod fp8;
pub mod layout;
pub mod math;
pub mod options;
pub mod tensor;

pub use error::{Error, Result};
pub use layout::{Problem, Qkv};
pub use options::{AlibiSlopes, AttnOptions};
pub use tensor::{DType, Element, Storage, Tensor};

/// Where a computation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU backend (rayon threads).
    #[default]
    Cpu,
    /// CUDA device with this ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Result of a forward pass.
#[derive(Clone, Debug)]
pub struct ForwardOutput {
    /// `out`, the dtype and shape of `q`.
    pub out: Tensor,
    /// Log-sum-exp of the scores (natural log, f32): dense `[batch, heads_q, seqlen_q]`,
    /// varlen `[heads_q, total_q]`; `-inf` for rows that see no key.
    pub lse: Tensor,
}

/// Result of a backward pass: gradients in the input dtype, shaped like `q`, `k`, `v`.
#[derive(Clone, Debug)]
pub struct Gradients {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

/// Attention forward on `device`: `out = softmax(mask(scale · Q Kᵀ)) V` and the LSE.
pub fn forward(inputs: &Qkv<'_>, opts: &AttnOptions, device: Device) -> Result<ForwardOutput> {
    let problem = Problem::new(inputs, opts)?;
    match device {
        Device::Cpu => cpu::forward(&problem, inputs, opts),
        Device::Cuda(ordinal) => cuda_forward(ordinal, &problem, inputs, opts),
    }
}

/// Attention backward on `device`: gradients of `sum(out · dout)` w.r.t. `q`, `k`, `v`,
/// recomputing the probabilities from `lse` (the forward's output).
pub fn backward(
    inputs: &Qkv<'_>,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    opts: &AttnOptions,
    device: Device,
) -> Result<Gradients> {
    let problem = Problem::new(inputs, opts)?;
    problem.check_backward(out, lse, dout)?;
    match device {
        Device::Cpu => cpu::backward(&problem, inputs, out, lse, dout, opts),
        Device::Cuda(ordinal) => cuda_backward(ordinal, &problem, inputs, out, lse, dout, opts),
    }
}

#[cfg(feature = "cuda")]
fn cuda_forward(
    ordinal: usize,
    problem: &Problem,
    inputs: &Qkv<'_>,
    opts: &AttnOptions,
) -> Result<ForwardOutput> {
    cuda::forward_host(ordinal, problem, inputs, opts)
}

#[cfg(not(feature = "cuda"))]
fn cuda_forward(
    _ordinal: usize,
    _problem: &Problem,
    _inputs: &Qkv<'_>,
    _opts: &AttnOptions,
) -> Result<ForwardOutput> {
    Err(no_cuda_feature())
}

#[cfg(feature = "cuda")]
fn cuda_backward(
    ordinal: usize,
    problem: &Problem,
    inputs: &Qkv<'_>,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    opts: &AttnOptions,
) -> Result<Gradients> {
    cuda::backward_host(ordinal, problem, inputs, out, lse, dout, opts)
}

#[cfg(not(feature = "cuda"))]
fn cuda_backward(
    _ordinal: usize,
    _problem: &Problem,
    _inputs: &Qkv<'_>,
    _out: &Tensor,
    _lse: &Tensor,
    _dout: &Tensor,
    _opts: &AttnOptions,
) -> Result<Gradients> {
    Err(no_cuda_feature())
}

#[cfg(not(feature = "cuda"))]
fn no_cuda_feature() -> Error {
    Error::NoGpu(
        "this build of flashattn has no CUDA support (rebuild with `--features cuda`)".into(),
    )
}
