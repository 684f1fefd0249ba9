//! Kernel JIT: embedded CUDA C++ sources → NVRTC → CUBIN for one architecture, cached.
//!
//! A [`KernelSpec`] names a source under `kernels/` (embedded by `build.rs`), its `extern "C"`
//! entry point and the `-D` defines that specialise it. [`compile`] looks the variant up in the
//! in-memory cache, then the disk cache ([`super::cache`]), and only then runs NVRTC with
//!
//! ```text
//! -std=c++17 --gpu-architecture=sm_XX -default-device --ptxas-options=-v -DNAME=VALUE...
//! ```
//! (plus `-I<CUDA headers>` when they can be found; kernels should not need them). The output
//! is always a CUBIN, so inline PTX (`mma.sync`, `wgmma`) is checked here, not on the GPU.
//! `#include "common/x.cuh"` (paths relative to `kernels/`) resolve from the embedded sources;
//! a header's bare file name works too when no other embedded file shares it.

use super::cache::{DiskCache, Fnv64, Lookup};
use super::{loader, nvrtc};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Every embedded kernel source: (path relative to `kernels/`, contents).
pub fn sources() -> &'static [(&'static str, &'static str)] {
    embedded::SOURCES
}

/// The embedded source at `path` (relative to `kernels/`).
pub fn source(path: &str) -> Option<&'static str> {
    sources().iter().find(|(p, _)| *p == path).map(|(_, s)| *s)
}

/// One kernel variant: source file, entry point, specialisation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelSpec {
    /// Path under `kernels/`, e.g. `"sm80/fwd.cu"`.
    pub source: &'static str,
    /// The `extern "C"` symbol to load.
    pub entry: String,
    /// `-DNAME=VALUE` pairs, in order.
    pub defines: Vec<(String, String)>,
}

impl KernelSpec {
    pub fn new(source: &'static str, entry: impl Into<String>) -> Self {
        KernelSpec {
            source,
            entry: entry.into(),
            defines: Vec::new(),
        }
    }

    /// Adds `-DNAME=VALUE`.
    pub fn define(mut self, name: impl Into<String>, value: impl ToString) -> Self {
        self.defines.push((name.into(), value.to_string()));
        self
    }

    /// `entry[NAME=VALUE,...]`, for reports.
    pub fn label(&self) -> String {
        if self.defines.is_empty() {
            return self.entry.clone();
        }
        let d: Vec<String> = self
            .defines
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        format!("{}[{}]", self.entry, d.join(","))
    }
}

/// Per-kernel resource usage reported by ptxas (`--ptxas-options=-v`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub registers: u32,
    /// Bytes of spill stores / loads (0 in a healthy hot kernel).
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// Bytes of stack frame.
    pub stack_bytes: u32,
    /// Bytes of static shared memory (dynamic smem is set at launch).
    pub smem_static: u32,
}

impl Resources {
    pub fn spills(&self) -> bool {
        self.spill_stores > 0 || self.spill_loads > 0
    }
}

/// A compiled variant.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub spec: KernelSpec,
    pub arch: String,
    pub cubin: Vec<u8>,
    /// NVRTC + ptxas log.
    pub log: String,
    pub resources: Resources,
}

/// Where [`compile_with`] found its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Read from the disk cache.
    Hit,
    /// Not on disk: compiled (and stored).
    Miss,
    /// A corrupt/stale file was on disk: compiled again and overwritten.
    Rebuilt,
    /// No disk cache given: compiled.
    Uncached,
}

/// The cache key of `spec` for `arch`: hash of the sources it includes (the file and its
/// `#include "..."` closure among the embedded files; every embedded file when an include cannot
/// be resolved textually), the entry, the defines, the arch, the NVRTC version and the crate
/// version. Editing one kernel therefore leaves the other kernels' cache entries valid.
pub fn cache_key(spec: &KernelSpec, arch: &str) -> Result<u64> {
    let nv = loader::nvrtc()?;
    let mut h = Fnv64::new()
        .u64(deps_hash(spec.source))
        .str(spec.source)
        .str(&spec.entry)
        .u64(spec.defines.len() as u64);
    for (n, v) in &spec.defines {
        h = h.str(n).str(v);
    }
    Ok(h.str(arch)
        .u64(nv.version.0 as u64)
        .u64(nv.version.1 as u64)
        .str(env!("CARGO_PKG_VERSION"))
        .finish())
}

/// Hash of `source` and every embedded file it includes, transitively (memoised per source).
fn deps_hash(source: &'static str) -> u64 {
    static MEMO: OnceLock<Mutex<HashMap<&'static str, u64>>> = OnceLock::new();
    let memo = MEMO.get_or_init(Default::default);
    if let Some(h) = memo.lock().unwrap_or_else(|e| e.into_inner()).get(source) {
        return *h;
    }
    let h = match include_closure(source) {
        Some(files) => files
            .iter()
            .fold(Fnv64::new(), |h, p| {
                h.str(p).str(self::source(p).unwrap_or(""))
            })
            .finish(),
        None => sources_hash(),
    };
    memo.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(source, h);
    h
}

/// `source` and the embedded files it includes, sorted; `None` when some quoted include is not
/// an embedded file or an include is not a literal (then every source counts).
fn include_closure(source: &'static str) -> Option<Vec<&'static str>> {
    let resolve = |name: &str| -> Option<&'static str> {
        if let Some((p, _)) = sources().iter().find(|(p, _)| *p == name) {
            return Some(p);
        }
        let mut it = sources()
            .iter()
            .filter(|(p, _)| p.rsplit('/').next() == Some(name));
        match (it.next(), it.next()) {
            (Some((p, _)), None) => Some(p),
            _ => None,
        }
    };
    let mut seen: Vec<&'static str> = vec![source];
    let mut todo = vec![source];
    while let Some(file) = todo.pop() {
        let text = self::source(file)?;
        for line in text.lines() {
            let l = line.trim_start();
            let Some(rest) = l.strip_prefix('#') else {
                continue;
            };
            let Some(arg) = rest.trim_start().strip_prefix("include") else {
                continue;
            };
            let arg = arg.trim();
            if arg.starts_with('<') {
                continue; // a CUDA/system header: versioned by NVRTC, not embedded
            }
            let name = arg.strip_prefix('"')?.split('"').next()?;
            let dep = resolve(name)?;
            if !seen.contains(&dep) {
                seen.push(dep);
                todo.push(dep);
            }
        }
    }
    seen.sort_unstable();
    Some(seen)
}

fn sources_hash() -> u64 {
    static H: OnceLock<u64> = OnceLock::new();
    *H.get_or_init(|| {
        sources()
            .iter()
            .fold(Fnv64::new(), |h, (p, s)| h.str(p).str(s))
            .finish()
    })
}

/// Compiles `spec` for `arch` (`"sm_80"`, `"sm_90a"`, ...) through the memory and disk caches.
/// Concurrent callers asking for the same variant wait for one compile instead of repeating it;
/// a failed compile is not remembered (the next call tries again).
pub fn compile(spec: &KernelSpec, arch: &str) -> Result<Arc<Compiled>> {
    type Slot = Arc<Mutex<Option<Arc<Compiled>>>>;
    static MEM: OnceLock<Mutex<HashMap<u64, Slot>>> = OnceLock::new();
    let key = cache_key(spec, arch)?;
    let slot = MEM
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default()
        .clone();
    let mut entry = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = entry.as_ref() {
        return Ok(c.clone());
    }
    let disk = DiskCache::default_location();
    let (c, _) = compile_with(spec, arch, disk.as_ref())?;
    *entry = Some(c.clone());
    Ok(c)
}

/// Compiles `specs` for `arch` in parallel into the memory and disk caches, so that the
/// launches that follow find them there: a test or benchmark about to run many variants one
/// after the other otherwise compiles them one at a time. A failed compile is not reported here
/// (the launch that needs it reports it).
pub fn warm(specs: &[KernelSpec], arch: &str) {
    specs.par_iter().for_each(|s| {
        let _ = compile(s, arch);
    });
}

/// Compiles `spec` for `arch` through `disk` only (no memory cache): tests and tools.
pub fn compile_with(
    spec: &KernelSpec,
    arch: &str,
    disk: Option<&DiskCache>,
) -> Result<(Arc<Compiled>, CacheOutcome)> {
    let key = cache_key(spec, arch)?;
    let make = |cubin: Vec<u8>, log: String| {
        Arc::new(Compiled {
            resources: parse_resources(&log, &spec.entry),
            spec: spec.clone(),
            arch: arch.to_string(),
            cubin,
            log,
        })
    };
    let Some(disk) = disk else {
        let (cubin, log) = compile_nvrtc(spec, arch)?;
        return Ok((make(cubin, log), CacheOutcome::Uncached));
    };
    let outcome = match disk.load(key) {
        Lookup::Hit(e) => return Ok((make(e.cubin, e.log), CacheOutcome::Hit)),
        Lookup::Miss => CacheOutcome::Miss,
        Lookup::Corrupt => CacheOutcome::Rebuilt,
    };
    let (cubin, log) = compile_nvrtc(spec, arch)?;
    // A cache that cannot be written (read-only home, full disk) only costs speed.
    let _ = disk.store(key, &cubin, &log);
    Ok((make(cubin, log), outcome))
}

/// NVRTC options for `spec` on `arch`.
pub fn options(spec: &KernelSpec, arch: &str) -> Vec<String> {
    let mut o = vec![
        "-std=c++17".to_string(),
        format!("--gpu-architecture={arch}"),
        "-default-device".to_string(),
        "--ptxas-options=-v".to_string(),
    ];
    o.extend(spec.defines.iter().map(|(n, v)| {
        if v.is_empty() {
            format!("-D{n}")
        } else {
            format!("-D{n}={v}")
        }
    }));
    if let Ok(inc) = loader::cuda_include_dir() {
        o.push(format!("-I{}", inc.display()));
    }
    o
}

/// Runs NVRTC (no cache). Returns (cubin, log).
fn compile_nvrtc(spec: &KernelSpec, arch: &str) -> Result<(Vec<u8>, String)> {
    loader::nvrtc()?;
    if !arch.starts_with("sm_") {
        return Err(Error::invalid(
            "arch",
            arch,
            "a real architecture such as sm_80, sm_86, sm_89 or sm_90a",
        ));
    }
    let src = source(spec.source).ok_or_else(|| {
        Error::Compile(format!(
            "kernel source `{}` is not embedded (known: {})",
            spec.source,
            sources()
                .iter()
                .map(|(p, _)| *p)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let headers = include_table();
    let opts = options(spec, arch);
    // cudarc panics when a symbol is missing from an old libnvrtc: report that as NoNvrtc.
    let result =
        std::panic::catch_unwind(|| nvrtc::compile_cubin(src, spec.source, &headers, &opts))
            .map_err(|_| {
                Error::NoNvrtc(
                    "the loaded libnvrtc lacks a function flashattn needs (too old?)".into(),
                )
            })?;
    match result {
        Ok(out) => Ok((out.cubin, out.log)),
        Err(f) => {
            if f.log.contains("cannot open source file") && f.log.contains('<') {
                loader::cuda_include_dir()?;
            }
            Err(Error::Compile(format!(
                "{} `{}` for {arch} ({}):\n{}",
                spec.source,
                spec.label(),
                f.stage,
                f.log.trim_end()
            )))
        }
    }
}

/// (include name, contents) for every embedded file: its path under `kernels/`, plus its bare
/// file name when that is unique.
fn include_table() -> Vec<(&'static str, &'static str)> {
    static T: OnceLock<Vec<(&'static str, &'static str)>> = OnceLock::new();
    T.get_or_init(|| {
        let mut t: Vec<(&str, &str)> = sources().to_vec();
        let base = |p: &'static str| p.rsplit('/').next().unwrap_or(p);
        for (p, s) in sources() {
            let b = base(p);
            if b != *p && sources().iter().filter(|(q, _)| base(q) == b).count() == 1 {
                t.push((b, s));
            }
        }
        t
    })
    .clone()
}

/// Parses ptxas `-v` output for `entry` (falls back to the largest numbers over all functions
/// when the entry's section is not found).
pub fn parse_resources(log: &str, entry: &str) -> Resources {
    let mut sections: Vec<(String, Resources)> = Vec::new();
    for line in log.lines() {
        let l = line.trim();
        if let Some(rest) = l
            .split_once("Compiling entry function '")
            .or_else(|| l.split_once("Function properties for "))
        {
            let name = rest.1.split('\'').next().unwrap_or("").trim().to_string();
            if !sections.iter().any(|(n, _)| *n == name) {
                sections.push((name.clone(), Resources::default()));
            }
            // Keep the current section last.
            let idx = sections.iter().position(|(n, _)| *n == name).unwrap_or(0);
            let s = sections.remove(idx);
            sections.push(s);
            continue;
        }
        let Some((_, r)) = sections.last_mut() else {
            continue;
        };
        let num_before = |needle: &str| -> Option<u32> {
            let pos = l.find(needle)?;
            l[..pos]
                .split(|c: char| !c.is_ascii_digit())
                .rfind(|s| !s.is_empty())?
                .parse()
                .ok()
        };
        if let Some(v) = num_before(" bytes stack frame") {
            r.stack_bytes = v;
        }
        if let Some(v) = num_before(" bytes spill stores") {
            r.spill_stores = v;
        }
        if let Some(v) = num_before(" bytes spill loads") {
            r.spill_loads = v;
        }
        if let Some(v) = num_before(" registers") {
            r.registers = v;
        }
        if let Some(v) = num_before(" bytes smem") {
            r.smem_static = v;
        }
    }
    if let Some((_, r)) = sections.iter().find(|(n, _)| n == entry) {
        return *r;
    }
    sections
        .iter()
        .fold(Resources::default(), |a, (_, r)| Resources {
            registers: a.registers.max(r.registers),
            spill_stores: a.spill_stores.max(r.spill_stores),
            spill_loads: a.spill_loads.max(r.spill_loads),
            stack_bytes: a.stack_bytes.max(r.stack_bytes),
            smem_static: a.smem_static.max(r.smem_static),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_closure_follows_quoted_includes() {
        let c = include_closure("test/axpy.cu").unwrap();
        assert_eq!(c, vec!["test/axpy.cu", "test/axpy_util.cuh"]);
        for (p, _) in sources().iter().filter(|(p, _)| p.ends_with(".cu")) {
            let c = include_closure(p);
            assert!(
                c.is_some(),
                "{p}: an #include does not resolve to an embedded file"
            );
            eprintln!("{p}: {:?}", c.unwrap());
        }
    }

    #[test]
    fn parses_ptxas_report() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'other' for 'sm_80'\n\
ptxas info    : Function properties for other\n\
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
ptxas info    : Used 255 registers, used 1 barriers, 380 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'axpy' for 'sm_80'\n\
ptxas info    : Function properties for axpy\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 10 registers, used 0 barriers, 1024 bytes smem, 372 bytes cmem[0]\n";
        let r = parse_resources(log, "axpy");
        assert_eq!(
            r,
            Resources {
                registers: 10,
                spill_stores: 0,
                spill_loads: 0,
                stack_bytes: 0,
                smem_static: 1024
            }
        );
        let o = parse_resources(log, "other");
        assert_eq!((o.registers, o.spill_stores, o.stack_bytes), (255, 4, 8));
    }
}
