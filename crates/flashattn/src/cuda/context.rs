//! One CUDA device: its context, the stream all our work goes to, its capability, and the
//! kernels loaded on it.
//!
//! [`Gpu::get`] opens a device once per ordinal (thread-safe, cached for the process) and never
//! panics: a missing driver or device is [`Error::NoGpu`], a missing NVRTC [`Error::NoNvrtc`].
//! All work is issued on one stream per device, so cudarc's cross-stream event tracking is
//! switched off and raw device pointers (for kernel params structs) are safe to use in order.

use super::jit::{self, KernelSpec};
use super::loader;
use super::tensor::DeviceBuffer;
use crate::error::{Error, Result};
use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DriverError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// A compute capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
}

impl Arch {
    pub fn new(major: u32, minor: u32) -> Self {
        Arch { major, minor }
    }

    /// The NVRTC target: `"sm_90a"` on 9.0 (so `wgmma`/`setmaxnreg` are available), else `"sm_XY"`.
    pub fn nvrtc_name(&self) -> String {
        if (self.major, self.minor) == (9, 0) {
            "sm_90a".into()
        } else {
            format!("sm_{}{}", self.major, self.minor)
        }
    }

    /// Parses `"sm_80"`, `"sm_90a"`, `"8.6"`.
    pub fn parse(s: &str) -> Option<Arch> {
        let s = s.trim();
        if let Some((a, b)) = s.split_once('.') {
            return Some(Arch::new(a.parse().ok()?, b.parse().ok()?));
        }
        let d = s.strip_prefix("sm_")?.trim_end_matches(['a', 'f']);
        if d.len() < 2 {
            return None;
        }
        let (a, b) = d.split_at(d.len() - 1);
        Some(Arch::new(a.parse().ok()?, b.parse().ok()?))
    }

    /// True on Hopper (sm_90), the FA3 target.
    pub fn is_hopper(&self) -> bool {
        self.major == 9 && self.minor == 0
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Maps a driver error to ours: out-of-memory becomes [`Error::OutOfMemory`].
pub fn driver_err(what: &str, e: DriverError) -> Error {
    use cudarc::driver::sys::CUresult;
    match e.0 {
        CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory(format!("{what}: {e}")),
        CUresult::CUDA_ERROR_NO_DEVICE => Error::NoGpu(format!("{what}: {e}")),
        _ => Error::Cuda(format!("{what}: {e}")),
    }
}

/// Runs a cudarc call that might panic (library loading) and turns a panic into `Err`.
pub(crate) fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(Error::NoGpu(format!(
            "{what}: the CUDA driver library failed to load"
        )))
    })
}

/// An opened CUDA device.
pub struct Gpu {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    arch: Arch,
    sm_count: u32,
    max_smem_optin: u32,
    total_mem: usize,
    functions: Mutex<HashMap<u64, Arc<CudaFunction>>>,
    /// The dynamic tile scheduler's counters (allocated and zeroed on first use).
    sched: Mutex<Option<DeviceBuffer>>,
    /// The split tail's counters and workspace ([`Gpu::split_workspace`]).
    split: Mutex<Option<DeviceBuffer>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Gpu(cuda:{} {} sm {}, {} SMs)",
            self.ordinal, self.name, self.arch, self.sm_count
        )
    }
}

/// Number of CUDA devices, or why there are none.
pub fn device_count() -> Result<usize> {
    if !loader::driver_present() {
        return Err(Error::NoGpu(
            "the CUDA driver library (libcuda.so) was not found: no NVIDIA driver on this machine"
                .into(),
        ));
    }
    no_panic("cuInit", || {
        cudarc::driver::result::init().map_err(|e| driver_err("cuInit", e))?;
        let n = CudaContext::device_count().map_err(|e| driver_err("cuDeviceGetCount", e))?;
        Ok(n.max(0) as usize)
    })
}

/// The driver's CUDA version, e.g. `(13, 0)`.
pub fn driver_version() -> Result<(i32, i32)> {
    device_count()?;
    let mut v = 0i32;
    // SAFETY: the driver is loaded and initialised (device_count succeeded); `v` is a valid
    // out-pointer.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        return Err(Error::Cuda(format!("cuDriverGetVersion: {r:?}")));
    }
    Ok((v / 1000, (v % 1000) / 10))
}

impl Gpu {
    /// Opens device `ordinal` (once per process; later calls return the same `Arc`).
    /// Fails with [`Error::NoGpu`] without a driver or device, [`Error::NoNvrtc`] without NVRTC.
    pub fn get(ordinal: usize) -> Result<Arc<Gpu>> {
        static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
        let gpus = GPUS.get_or_init(Default::default);
        let mut map = gpus.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = map.get(&ordinal) {
            return Ok(g.clone());
        }
        let n = device_count()?;
        if n == 0 {
            return Err(Error::NoGpu("the CUDA driver reports no devices".into()));
        }
        if ordinal >= n {
            return Err(Error::invalid(
                "device",
                format!("cuda:{ordinal}"),
                format!("an ordinal below the device count {n}"),
            ));
        }
        loader::nvrtc()?;
        let g = Arc::new(no_panic("opening the CUDA device", || Gpu::open(ordinal))?);
        map.insert(ordinal, g.clone());
        Ok(g)
    }

    fn open(ordinal: usize) -> Result<Gpu> {
        let what = format!("opening cuda:{ordinal}");
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err(&what, e))?;
        // SAFETY: every buffer and launch of this crate goes through the one stream below, so
        // stream order alone orders all accesses; no other stream touches our allocations.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let attr = |a: Attr| -> Result<u32> {
            ctx.attribute(a)
                .map(|v| v.max(0) as u32)
                .map_err(|e| driver_err("cuDeviceGetAttribute", e))
        };
        let arch = Arch::new(
            attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        Ok(Gpu {
            ordinal,
            name: ctx.name().unwrap_or_else(|_| "unknown".into()),
            sm_count: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            max_smem_optin: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
            total_mem: ctx.total_mem().unwrap_or(0),
            arch,
            stream,
            ctx,
            functions: Mutex::new(HashMap::new()),
            sched: Mutex::new(None),
            split: Mutex::new(None),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    pub fn ctx(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// Device address of the dynamic tile scheduler's two `i32` counters (next tile, CTAs
    /// done), zeroed once when first asked for. Kernels that use them leave them zero (the last
    /// CTA resets both), and every launch runs on [`Gpu::stream`], so launches never overlap on
    /// them: no allocation or memset per launch.
    pub(crate) fn sched_counters(&self) -> Result<u64> {
        let mut c = self.sched.lock().unwrap_or_else(|e| e.into_inner());
        if c.is_none() {
            *c = Some(DeviceBuffer::zeros(self, 8)?);
        }
        Ok(c.as_ref().map_or(0, |b| b.ptr()))
    }
    /// Device addresses of the FA3 split tail's workspace (`ws_bytes`, no initial contents
    /// needed) and its counters (`ctr_ints` of them: one per tail tile and consumer
    /// warpgroup, fewer than 4 per multiprocessor; zeroed once, kernels leave them zero), in one
    /// buffer that grows when a launch needs more. The counters have a fixed place at its start
    /// (never workspace, so never dirty). Launches run in stream order on [`Gpu::stream`], so
    /// they never share it, and a replaced buffer is freed after the launches queued before it.
    pub(crate) fn split_workspace(&self, ws_bytes: usize, ctr_ints: usize) -> Result<(u64, u64)> {
        let ctr_bytes = (16 * self.sm_count as usize).div_ceil(256) * 256;
        if 4 * ctr_ints > ctr_bytes {
            return Err(Error::invalid(
                "split tail",
                format!("{ctr_ints} counters"),
                "fewer than 4 per multiprocessor",
            ));
        }
        let need = ctr_bytes + ws_bytes;
        let mut b = self.split.lock().unwrap_or_else(|e| e.into_inner());
        if b.as_ref().is_none_or(|x| x.len() < need) {
            *b = Some(DeviceBuffer::zeros(self, need)?);
        }
        let base = b.as_ref().map_or(0, |x| x.ptr());
        Ok((base + ctr_bytes as u64, base))
    }
    /// The stream every launch and copy of this crate uses.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn arch(&self) -> Arch {
        self.arch
    }
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
    /// Largest dynamic shared memory per block after opting in (bytes).
    pub fn max_smem_optin(&self) -> u32 {
        self.max_smem_optin
    }
    /// Device memory in bytes.
    pub fn total_mem(&self) -> usize {
        self.total_mem
    }
    /// `"cuda:0"`, for error messages.
    pub fn device_name(&self) -> String {
        format!("cuda:{} ({}, sm {})", self.ordinal, self.name, self.arch)
    }

    /// Waits for all work on the stream; reports asynchronous kernel errors.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("stream synchronize", e))
    }

    /// The kernel `spec` compiled for this device (NVRTC JIT through the memory and disk caches)
    /// and loaded into its context; loaded once per device.
    pub fn kernel(&self, spec: &KernelSpec) -> Result<Arc<CudaFunction>> {
        let arch = self.arch.nvrtc_name();
        let key = jit::cache_key(spec, &arch)?;
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(f.clone());
        }
        let compiled = jit::compile(spec, &arch)?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(compiled.cubin.clone()))
            .map_err(|e| driver_err(&format!("loading module {}", spec.source), e))?;
        let f =
            Arc::new(module.load_function(&spec.entry).map_err(|e| {
                driver_err(&format!("kernel `{}` in {}", spec.entry, spec.source), e)
            })?);
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, f.clone());
        Ok(f)
    }

    /// [`Gpu::kernel`], with its dynamic shared memory limit raised to `smem_bytes`
    /// (needed above 48 KiB). Errors if the device cannot give that much.
    pub fn kernel_with_smem(
        &self,
        spec: &KernelSpec,
        smem_bytes: u32,
    ) -> Result<Arc<CudaFunction>> {
        if smem_bytes > self.max_smem_optin {
            return Err(Error::unsupported(
                self.device_name(),
                "shared memory per block",
                format!("{smem_bytes} bytes"),
                format!("at most {} bytes", self.max_smem_optin),
            ));
        }
        let f = self.kernel(spec)?;
        if smem_bytes > 48 * 1024 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes as i32,
            )
            .map_err(|e| driver_err(&format!("setting smem of `{}`", spec.entry), e))?;
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::Arch;

    #[test]
    fn arch_names() {
        assert_eq!(Arch::new(9, 0).nvrtc_name(), "sm_90a");
        assert_eq!(Arch::new(8, 6).nvrtc_name(), "sm_86");
        assert_eq!(Arch::parse("sm_90a"), Some(Arch::new(9, 0)));
        assert_eq!(Arch::parse("sm_80"), Some(Arch::new(8, 0)));
        assert_eq!(Arch::parse("sm_100a"), Some(Arch::new(10, 0)));
        assert_eq!(Arch::parse("8.9"), Some(Arch::new(8, 9)));
        assert_eq!(Arch::parse("compute_80"), None);
        assert!(Arch::new(9, 0).is_hopper() && !Arch::new(8, 0).is_hopper());
    }
}
