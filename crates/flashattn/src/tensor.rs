//! Host tensors: a typed buffer plus shape, element strides and an element offset.
//!
//! The attention entry points need the last dimension contiguous; every other stride is free,
//! so views such as a slice of a fused QKV projection work without copies.

use crate::error::{Error, Result};
use half::{bf16, f16};

/// Element types flashattn understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    /// Lower-case name as used by the CLI and error messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A scalar the CPU kernels can load and store; arithmetic always happens in f32.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}
impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// The typed backing buffer of a [`Tensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn get_f32(&self, i: usize) -> f32 {
        match self {
            Storage::F32(v) => v[i],
            Storage::F16(v) => v[i].to_f32(),
            Storage::BF16(v) => v[i].to_f32(),
        }
    }
    fn from_f32_slice(dtype: DType, data: &[f32]) -> Storage {
        match dtype {
            DType::F32 => Storage::F32(data.to_vec()),
            DType::F16 => Storage::F16(data.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => Storage::BF16(data.iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }
}

/// A host tensor: storage, shape, strides (in elements) and a starting offset (in elements).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    storage: Storage,
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

/// Row-major element strides of a dense tensor of `shape`.
pub(crate) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// `n` deterministic pseudo-random values in `[-1, 1]` (xorshift64 seeded by `seed`), never
/// within 1e-3 of zero: inputs for benchmarks, examples and tests, where zeros would hide
/// unwritten outputs and wrong indexing.
pub fn random_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            if x.abs() < 1e-3 {
                0.5
            } else {
                x
            }
        })
        .collect()
}

impl Tensor {
    /// A contiguous tensor over `storage`; its length must equal the product of `shape`.
    pub fn new(storage: Storage, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if storage.len() != n {
            return Err(Error::invalid(
                "tensor data",
                format!("{} elements", storage.len()),
                format!("{n} elements for shape {shape:?}"),
            ));
        }
        Ok(Tensor {
            storage,
            strides: contiguous_strides(shape),
            shape: shape.to_vec(),
            offset: 0,
        })
    }

    /// A strided view over `storage`. Every addressable element must lie inside the buffer.
    pub fn strided(
        storage: Storage,
        shape: &[usize],
        strides: &[usize],
        offset: usize,
    ) -> Result<Self> {
        if strides.len() != shape.len() {
            return Err(Error::invalid(
                "tensor strides",
                format!("{} strides", strides.len()),
                format!("one stride per dimension ({})", shape.len()),
            ));
        }
        if shape.iter().all(|&s| s > 0) {
            let last: usize = offset
                + shape
                    .iter()
                    .zip(strides)
                    .map(|(&s, &st)| (s - 1) * st)
                    .sum::<usize>();
            if last >= storage.len() {
                return Err(Error::invalid(
                    "tensor strides",
                    format!("a view reaching element {last}"),
                    format!("a view inside the buffer of {} elements", storage.len()),
                ));
            }
        }
        Ok(Tensor {
            storage,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            offset,
        })
    }

    pub fn from_f32(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        Tensor::new(Storage::F32(data), shape)
    }
    pub fn from_f16(data: Vec<f16>, shape: &[usize]) -> Result<Self> {
        Tensor::new(Storage::F16(data), shape)
    }
    pub fn from_bf16(data: Vec<bf16>, shape: &[usize]) -> Result<Self> {
        Tensor::new(Storage::BF16(data), shape)
    }
    /// Converts f32 values to `dtype` (round to nearest even) into a contiguous tensor.
    pub fn from_f32_as(data: &[f32], shape: &[usize], dtype: DType) -> Result<Self> {
        Tensor::new(Storage::from_f32_slice(dtype, data), shape)
    }
    /// A contiguous tensor of [`random_values`] rounded to `dtype`.
    pub fn random(dtype: DType, shape: &[usize], seed: u64) -> Self {
        let n: usize = shape.iter().product();
        let storage = Storage::from_f32_slice(dtype, &random_values(n, seed));
        Tensor {
            storage,
            strides: contiguous_strides(shape),
            shape: shape.to_vec(),
            offset: 0,
        }
    }

    /// A contiguous tensor of zeros.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Self {
        let n: usize = shape.iter().product();
        let storage = match dtype {
            DType::F32 => Storage::F32(vec![0.0; n]),
            DType::F16 => Storage::F16(vec![f16::ZERO; n]),
            DType::BF16 => Storage::BF16(vec![bf16::ZERO; n]),
        };
        Tensor {
            storage,
            strides: contiguous_strides(shape),
            shape: shape.to_vec(),
            offset: 0,
        }
    }

    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    pub fn into_storage(self) -> Storage {
        self.storage
    }
    /// Number of logical elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// True when the view is dense, row-major and starts at 0.
    pub fn is_contiguous(&self) -> bool {
        self.offset == 0
            && self.storage.len() == self.numel()
            && self
                .shape
                .iter()
                .zip(self.strides.iter().zip(contiguous_strides(&self.shape)))
                .all(|(&s, (&a, b))| s <= 1 || a == b)
    }

    /// The logical elements in row-major order, converted to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        if self.is_contiguous() {
            if let Storage::F32(v) = &self.storage {
                return v.clone();
            }
        }
        let n = self.numel();
        let mut out = Vec::with_capacity(n);
        let rank = self.shape.len();
        if n == 0 {
            return out;
        }
        let mut idx = vec![0usize; rank];
        for _ in 0..n {
            let off: usize = self.offset
                + idx
                    .iter()
                    .zip(&self.strides)
                    .map(|(&i, &s)| i * s)
                    .sum::<usize>();
            out.push(self.storage.get_f32(off));
            for d in (0..rank).rev() {
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    }

    /// A contiguous copy in `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() && self.is_contiguous() {
            return self.clone();
        }
        Tensor {
            storage: Storage::from_f32_slice(dtype, &self.to_f32_vec()),
            strides: contiguous_strides(&self.shape),
            shape: self.shape.clone(),
            offset: 0,
        }
    }

    /// A contiguous copy (same dtype).
    pub fn contiguous(&self) -> Tensor {
        self.to_dtype(self.dtype())
    }
}
