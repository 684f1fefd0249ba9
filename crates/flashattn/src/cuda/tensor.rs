//! Device buffers: [`DeviceTensor`] (f32/f16/bf16 with shape, element strides and offset, like
//! the host [`Tensor`]) and [`DeviceBuffer`] (raw bytes: cu_seqlens, slopes, workspaces).
//!
//! Memory lives on the device's one stream ([`Gpu::stream`]); kernels get raw pointers through
//! `ptr()` for their `#[repr(C)]` params structs. Allocation failures are
//! [`Error::OutOfMemory`].

use super::context::{driver_err, Gpu};
use crate::error::{Error, Result};
use crate::tensor::{contiguous_strides, DType, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::{bf16, f16};
use std::sync::Arc;

/// A typed-less device allocation on one stream. Never zero bytes long (cuMemAlloc rejects 0).
#[derive(Clone)]
pub struct DeviceBuffer {
    buf: Arc<CudaSlice<u8>>,
    bytes: usize,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({} bytes @ {:#x})", self.bytes, self.ptr())
    }
}

fn oom_or(what: &str, bytes: usize, e: cudarc::driver::DriverError) -> Error {
    driver_err(&format!("allocating {bytes} bytes for {what}"), e)
}

impl DeviceBuffer {
    /// `bytes` zeroed bytes.
    pub fn zeros(gpu: &Gpu, bytes: usize) -> Result<Self> {
        let buf = gpu
            .stream()
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| oom_or("a device buffer", bytes, e))?;
        Ok(DeviceBuffer {
            buf: Arc::new(buf),
            bytes,
        })
    }

    /// `bytes` uninitialised bytes (cheaper than [`DeviceBuffer::zeros`] for outputs that a
    /// kernel overwrites; reading them back yields arbitrary bytes, never undefined behaviour).
    pub fn uninit(gpu: &Gpu, bytes: usize) -> Result<Self> {
        // SAFETY: u8 has no invalid bit patterns and device memory is only ever accessed by
        // kernels or copied as bytes, so uninitialised contents are merely unspecified values.
        let buf = unsafe { gpu.stream().alloc::<u8>(bytes.max(1)) }
            .map_err(|e| oom_or("a device buffer", bytes, e))?;
        Ok(DeviceBuffer {
            buf: Arc::new(buf),
            bytes,
        })
    }

    /// A copy of `data` (raw bytes).
    pub fn from_bytes(gpu: &Gpu, data: &[u8]) -> Result<Self> {
        if data.is_empty() {
            return Self::zeros(gpu, 0);
        }
        let buf = gpu
            .stream()
            .clone_htod(data)
            .map_err(|e| oom_or("a device copy", data.len(), e))?;
        Ok(DeviceBuffer {
            buf: Arc::new(buf),
            bytes: data.len(),
        })
    }

    /// A copy of `data` (e.g. `cu_seqlens`).
    pub fn from_i32(gpu: &Gpu, data: &[i32]) -> Result<Self> {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        Self::from_bytes(gpu, &bytes)
    }

    /// A copy of `data` (e.g. ALiBi slopes).
    pub fn from_f32(gpu: &Gpu, data: &[f32]) -> Result<Self> {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        Self::from_bytes(gpu, &bytes)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes
    }
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The device address of byte 0, for kernel params structs.
    pub fn ptr(&self) -> u64 {
        // Event tracking is off on our contexts (one stream), so the guard does nothing.
        let (p, _guard) = self.buf.device_ptr(self.buf.stream());
        p
    }

    fn stream(&self) -> &Arc<CudaStream> {
        self.buf.stream()
    }

    /// Copies all bytes to the host (waits for the stream).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.bytes];
        if self.bytes > 0 {
            let view = self.buf.slice(0..self.bytes);
            self.stream()
                .memcpy_dtoh(&view, &mut v)
                .map_err(|e| driver_err("copying to the host", e))?;
        }
        self.stream()
            .synchronize()
            .map_err(|e| driver_err("stream synchronize", e))?;
        Ok(v)
    }

    /// The contents as f32 (little-endian).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        Ok(self
            .to_bytes()?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// The contents as i32 (little-endian).
    pub fn to_i32(&self) -> Result<Vec<i32>> {
        Ok(self
            .to_bytes()?
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Sets every byte to `value` (asynchronously, on the stream).
    pub fn fill_bytes(&self, value: u8) -> Result<()> {
        if self.bytes == 0 {
            return Ok(());
        }
        self.stream()
            .context()
            .bind_to_thread()
            .map_err(|e| driver_err("binding the CUDA context", e))?;
        // SAFETY: the range [ptr, ptr + bytes) lies inside this live allocation, and the memset
        // is ordered on the same stream as every other use of the buffer.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                self.ptr(),
                value,
                self.bytes,
                self.stream().cu_stream(),
            )
        }
        .map_err(|e| driver_err("memset", e))
    }
}

/// A device tensor: a [`DeviceBuffer`] viewed with a dtype, shape, element strides and an
/// element offset. Views and clones share the buffer (`clone` is shallow, like an `Arc`).
#[derive(Clone, Debug)]
pub struct DeviceTensor {
    buf: DeviceBuffer,
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

fn storage_bytes(s: &Storage) -> &[u8] {
    match s {
        // SAFETY: f32, f16 and bf16 are plain 4/2-byte values with no padding or invalid bit
        // patterns; the byte slice covers exactly the vector's initialised elements.
        Storage::F32(v) => unsafe {
            std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4)
        },
        // SAFETY: as above.
        Storage::F16(v) => unsafe {
            std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 2)
        },
        // SAFETY: as above.
        Storage::BF16(v) => unsafe {
            std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 2)
        },
    }
}

fn storage_from_bytes(dtype: DType, b: &[u8]) -> Storage {
    match dtype {
        DType::F32 => Storage::F32(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::F16 => Storage::F16(
            b.chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        DType::BF16 => Storage::BF16(
            b.chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
    }
}

impl DeviceTensor {
    /// A contiguous, zero-filled tensor.
    pub fn alloc(gpu: &Gpu, dtype: DType, shape: &[usize]) -> Result<Self> {
        Self::alloc_with(gpu, dtype, shape, DeviceBuffer::zeros)
    }

    /// A contiguous tensor with unspecified contents (for outputs a kernel fully overwrites).
    pub fn uninit(gpu: &Gpu, dtype: DType, shape: &[usize]) -> Result<Self> {
        Self::alloc_with(gpu, dtype, shape, DeviceBuffer::uninit)
    }

    fn alloc_with(
        gpu: &Gpu,
        dtype: DType,
        shape: &[usize],
        make: fn(&Gpu, usize) -> Result<DeviceBuffer>,
    ) -> Result<Self> {
        let bytes = shape
            .iter()
            .try_fold(dtype.size(), |a, &s| a.checked_mul(s))
            .ok_or_else(|| {
                Error::invalid(
                    "tensor shape",
                    format!("{shape:?}"),
                    "a size that fits in memory",
                )
            })?;
        let buf = make(gpu, bytes).map_err(|e| match e {
            Error::OutOfMemory(m) => Error::OutOfMemory(format!("{m} (tensor {dtype} {shape:?})")),
            e => e,
        })?;
        Ok(DeviceTensor {
            buf,
            dtype,
            strides: contiguous_strides(shape),
            shape: shape.to_vec(),
            offset: 0,
        })
    }

    /// A contiguous device copy of `t` (any host strides; the copy is row-major).
    pub fn upload(gpu: &Gpu, t: &Tensor) -> Result<Self> {
        let c;
        let t = if t.is_contiguous() {
            t
        } else {
            c = t.contiguous();
            &c
        };
        let bytes = storage_bytes(t.storage());
        Ok(DeviceTensor {
            buf: DeviceBuffer::from_bytes(gpu, bytes)?,
            dtype: t.dtype(),
            strides: contiguous_strides(t.shape()),
            shape: t.shape().to_vec(),
            offset: 0,
        })
    }

    /// A view of the same memory with another shape/strides/offset (in elements); every
    /// addressable element must lie inside the buffer.
    pub fn view(&self, shape: &[usize], strides: &[usize], offset: usize) -> Result<Self> {
        if shape.len() != strides.len() {
            return Err(Error::invalid(
                "view strides",
                format!("{} strides", strides.len()),
                format!("one per dimension ({})", shape.len()),
            ));
        }
        let elems = self.buf.len() / self.dtype.size();
        if shape.iter().all(|&s| s > 0) {
            let last = offset
                + shape
                    .iter()
                    .zip(strides)
                    .map(|(&s, &st)| (s - 1) * st)
                    .sum::<usize>();
            if last >= elems {
                return Err(Error::invalid(
                    "view",
                    format!("a view reaching element {last}"),
                    format!("a view inside the buffer of {elems} elements"),
                ));
            }
        }
        Ok(DeviceTensor {
            buf: self.buf.clone(),
            dtype: self.dtype,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            offset,
        })
    }

    /// Copies to the host as a contiguous tensor (waits for the stream).
    pub fn download(&self) -> Result<Tensor> {
        let storage = storage_from_bytes(self.dtype, &self.buf.to_bytes()?);
        if self.is_contiguous() {
            return Tensor::new(storage, &self.shape);
        }
        Ok(Tensor::strided(storage, &self.shape, &self.strides, self.offset)?.contiguous())
    }

    /// Fills the whole buffer with 0xFF bytes (NaN in f32, f16 and bf16), to catch unwritten
    /// outputs in tests.
    pub fn fill_poison(&self) -> Result<()> {
        self.buf.fill_bytes(0xFF)
    }

    /// Fills the whole buffer with zeros.
    pub fn fill_zero(&self) -> Result<()> {
        self.buf.fill_bytes(0)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Element strides.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    /// Element offset of the view's first element.
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// True when dense, row-major, starting at element 0 and covering the whole buffer.
    pub fn is_contiguous(&self) -> bool {
        self.offset == 0
            && self.numel() * self.dtype.size() == self.buf.len()
            && self
                .shape
                .iter()
                .zip(self.strides.iter().zip(contiguous_strides(&self.shape)))
                .all(|(&s, (&a, b))| s <= 1 || a == b)
    }
    /// Device address of the view's first element (offset applied), for params structs.
    pub fn ptr(&self) -> u64 {
        self.buf.ptr() + (self.offset * self.dtype.size()) as u64
    }
    /// The underlying buffer.
    pub fn buffer(&self) -> &DeviceBuffer {
        &self.buf
    }
}
