//! What `flashattn info` and `flashattn kernels --compile-all` print: the devices, libraries and
//! cache found, and a per-kernel resource table from compiling every shipped variant (no GPU
//! needed).

use super::cache::DiskCache;
use super::jit::{self, KernelSpec, Resources};
use super::{context, fa2, fa2_bwd, fa3, fa3_bwd, fa3_fp8, loader};
use crate::error::Result;
use rayon::prelude::*;
use std::fmt::Write as _;
use std::time::Instant;

/// One variant's compile result.
#[derive(Clone, Debug)]
pub struct KernelReport {
    /// `entry[DEFINE=..]`.
    pub name: String,
    /// Source path under `kernels/`.
    pub source: String,
    pub arch: String,
    /// Resources, or the compile error.
    pub result: std::result::Result<Resources, String>,
    /// Wall time of this compile (a disk-cache hit is fast).
    pub seconds: f64,
}

impl KernelReport {
    /// Spills in a forward kernel (sources `sm80/fwd*` and `sm90/*`), where they are not allowed
    /// beyond [`accepted_spill_bytes`].
    pub fn is_forward_spill(&self) -> bool {
        let fwd = self.source.starts_with("sm80/fwd") || self.source.starts_with("sm90/");
        fwd && matches!(&self.result, Ok(r) if !spill_accepted(&self.name, r))
    }
}

/// Spill (and stack) bytes accepted for the kernel labelled `label` (`entry[DEFINE=..]`): only
/// where the spilling variant measured faster than its spill-free alternative; the bound keeps
/// it from growing. With the softmax overlapping the PV wgmma (its P fragments live beside the
/// new scores), the d = 256 kernels that keep the most state hold bytes in local memory:
/// FP8 with the dynamic scheduler (plain 8 / 8: values kept across a tile's main loop, stored
/// before it and reloaded in the epilogue; causal 32 / 36: also two values around its PV issue,
/// two L1-resident loads per key tile as before, and since the tile is published decoded with
/// its descales (SLOT_HELD) the rest in the tile's prologue and epilogue, once per tile; +4..9%
/// at 4k–8k over one CTA per tile, bench/RESULTS.md "Step 10" / "Step 11b", and the published
/// tile +1..2% at 2k–4k causal, "Step 25"), and the 16-bit static persistent varlen kernel
/// (values kept across the main loop only; short varlen batches). SASS checked with cuobjdump.
pub fn accepted_spill_bytes(label: &str) -> u32 {
    const ACCEPTED: &[(&[&str], u32)] = &[
        (
            &[
                "fa3_fwd[",
                "FA3_D=256,",
                "FA3_DT=2,",
                "FA3_CAUSAL=0,",
                "FA3_PERSISTENT=2,",
            ],
            8,
        ),
        (
            &[
                "fa3_fwd[",
                "FA3_D=256,",
                "FA3_DT=2,",
                "FA3_CAUSAL=1,",
                "FA3_PERSISTENT=2,",
            ],
            36,
        ),
        // The in-kernel transpose's causal kernel in the linear order keeps its decoded tile
        // live (NVRTC: 20 / 20 bytes, one 8-byte refill per key tile; 24 / 24 with the
        // warpgroup-wide rescale vote, one more 4-byte store and reload per key tile) and is
        // still 4..8% faster than the grid order from 4k (bench/RESULTS.md "Step 22", c6; the
        // vote moved its 4k causal rate by 0..−1%, "Step 23c").
        (
            &[
                "fa3_fwd[",
                "FA3_D=256,",
                "FA3_DT=2,",
                "FA3_VTK=1,",
                "FA3_LINEAR=1",
            ],
            24,
        ),
        (
            &[
                "fa3_fwd[",
                "FA3_D=256,",
                "FA3_PERSISTENT=1,",
                "FA3_VARLEN=1,",
            ],
            12,
        ),
    ];
    ACCEPTED
        .iter()
        .filter(|(frags, _)| frags.iter().all(|f| label.contains(f)))
        .map(|&(_, bytes)| bytes)
        .max()
        .unwrap_or(0)
}

/// Whether `r` spills no more than [`accepted_spill_bytes`] allows for `label`.
pub fn spill_accepted(label: &str, r: &Resources) -> bool {
    let allowed = accepted_spill_bytes(label);
    r.spill_stores <= allowed && r.spill_loads <= allowed && r.stack_bytes <= allowed
}

/// All variants of every family, compiled for some architectures.
#[derive(Clone, Debug, Default)]
pub struct CompileReport {
    pub kernels: Vec<KernelReport>,
}

impl CompileReport {
    pub fn has_errors(&self) -> bool {
        self.kernels.iter().any(|k| k.result.is_err())
    }
    pub fn has_forward_spills(&self) -> bool {
        self.kernels.iter().any(|k| k.is_forward_spill())
    }
    /// `(name, arch, error)` of every failed variant.
    pub fn errors(&self) -> Vec<(&str, &str, &str)> {
        self.kernels
            .iter()
            .filter_map(|k| {
                k.result
                    .as_ref()
                    .err()
                    .map(|e| (k.name.as_str(), k.arch.as_str(), e.as_str()))
            })
            .collect()
    }
}

impl std::fmt::Display for CompileReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = self
            .kernels
            .iter()
            .map(|k| k.name.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let s = self
            .kernels
            .iter()
            .map(|k| k.source.len())
            .max()
            .unwrap_or(6)
            .max(6);
        writeln!(
            f,
            "{:<w$}  {:<s$}  {:<7} {:>5} {:>7} {:>7} {:>6} {:>7} {:>7}",
            "kernel", "source", "arch", "regs", "spill-st", "spill-ld", "stack", "smem", "time_s"
        )?;
        for k in &self.kernels {
            match &k.result {
                Ok(r) => writeln!(
                    f,
                    "{:<w$}  {:<s$}  {:<7} {:>5} {:>7} {:>7} {:>6} {:>7} {:>7.2}{}",
                    k.name,
                    k.source,
                    k.arch,
                    r.registers,
                    r.spill_stores,
                    r.spill_loads,
                    r.stack_bytes,
                    r.smem_static,
                    k.seconds,
                    if k.is_forward_spill() { "  SPILLS" } else { "" }
                )?,
                Err(_) => writeln!(f, "{:<w$}  {:<s$}  {:<7} FAILED", k.name, k.source, k.arch)?,
            }
        }
        let failed = self.errors();
        writeln!(
            f,
            "{} kernels, {} failed{}",
            self.kernels.len(),
            failed.len(),
            if self.has_forward_spills() {
                ", forward spills present"
            } else {
                ""
            }
        )?;
        for (name, arch, err) in failed {
            writeln!(f, "\n--- {name} ({arch}) ---\n{err}")?;
        }
        Ok(())
    }
}

/// Every variant of every family for `arch` (fa3 only for sm_90a).
pub fn all_variants(arch: &str) -> Vec<KernelSpec> {
    let mut v = fa2::all_variants(arch);
    v.extend(fa2_bwd::all_variants(arch));
    if arch == "sm_90a" {
        v.extend(fa3::all_variants(arch));
        v.extend(fa3_fp8::all_variants(arch));
        v.extend(fa3_bwd::all_variants(arch));
    }
    v
}

/// Compiles every shipped variant for each of `archs` (e.g. `["sm_80", "sm_90a"]`) in parallel.
/// Fails only when NVRTC itself is missing; per-kernel failures are in the report.
pub fn compile_all(archs: &[&str]) -> Result<CompileReport> {
    loader::nvrtc()?;
    let jobs: Vec<(String, KernelSpec)> = archs
        .iter()
        .flat_map(|a| all_variants(a).into_iter().map(move |s| (a.to_string(), s)))
        .collect();
    let kernels = jobs
        .par_iter()
        .map(|(arch, spec)| {
            let t = Instant::now();
            let result = jit::compile(spec, arch)
                .map(|c| c.resources)
                .map_err(|e| e.to_string());
            KernelReport {
                name: spec.label(),
                source: spec.source.to_string(),
                arch: arch.clone(),
                result,
                seconds: t.elapsed().as_secs_f64(),
            }
        })
        .collect();
    Ok(CompileReport { kernels })
}

/// Devices (or why none), driver and NVRTC versions, where NVRTC and the CUDA headers come
/// from, and the kernel cache.
pub fn info_report() -> String {
    let mut s = String::new();
    match context::device_count() {
        Ok(n) => {
            match context::driver_version() {
                Ok((a, b)) => writeln!(s, "CUDA driver: {a}.{b}").ok(),
                Err(e) => writeln!(s, "CUDA driver: version unknown ({e})").ok(),
            };
            writeln!(s, "devices: {n}").ok();
            for i in 0..n {
                match context::Gpu::get(i) {
                    Ok(g) => writeln!(
                        s,
                        "  cuda:{i}: {}, sm {} (nvrtc target {}), {} SMs, {:.1} GiB, {} KiB smem/block opt-in",
                        g.name(),
                        g.arch(),
                        g.arch().nvrtc_name(),
                        g.sm_count(),
                        g.total_mem() as f64 / (1u64 << 30) as f64,
                        g.max_smem_optin() / 1024
                    ),
                    Err(e) => writeln!(s, "  cuda:{i}: unavailable: {e}"),
                }
                .ok();
            }
        }
        Err(e) => {
            writeln!(s, "devices: none ({e})").ok();
        }
    }
    match loader::nvrtc() {
        Ok(nv) => writeln!(
            s,
            "NVRTC: {} (loaded from {})",
            nv.version_string(),
            nv.dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "the system library path".into())
        ),
        Err(e) => writeln!(s, "NVRTC: unavailable ({e})"),
    }
    .ok();
    if let Some(note) = loader::nvrtc().ok().and_then(|nv| nv.note.as_ref()) {
        writeln!(s, "  note: {note}").ok();
    }
    match loader::cuda_include_dir() {
        Ok(d) => writeln!(
            s,
            "CUDA headers: {} (kernels do not need them)",
            d.display()
        ),
        Err(_) => writeln!(s, "CUDA headers: not found (kernels do not need them)"),
    }
    .ok();
    writeln!(s, "embedded kernel sources: {}", jit::sources().len()).ok();
    match DiskCache::default_location() {
        Some(c) => writeln!(
            s,
            "kernel cache: {} ({} entries)",
            c.dir().display(),
            c.entries()
        ),
        None => writeln!(s, "kernel cache: disabled (memory only)"),
    }
    .ok();
    s
}
