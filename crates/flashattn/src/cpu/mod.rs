//! The CPU backend: the FlashAttention algorithm itself (tiles, online softmax, LSE,
//! recomputation in the backward), threaded with rayon over batch × heads × query tiles.

use crate::error::Result;
use crate::layout::{Problem, Qkv};
use crate::options::AttnOptions;
use crate::tensor::Tensor;
use crate::{ForwardOutput, Gradients};

/// CPU forward. `problem` was validated from `inputs` and `opts`.
pub fn forward(problem: &Problem, inputs: &Qkv<'_>, opts: &AttnOptions) -> Result<ForwardOutput> {
    let _ = (problem, inputs, opts);
    todo!("cpu forward")
}

/// CPU backward. `problem` was validated from `inputs` and `opts`, and the backward tensors checked.
pub fn backward(
    problem: &Problem,
    inputs: &Qkv<'_>,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    opts: &AttnOptions,
) -> Result<Gradients> {
    let _ = (problem, inputs, out, lse, dout, opts);
    todo!("cpu backward")
}
