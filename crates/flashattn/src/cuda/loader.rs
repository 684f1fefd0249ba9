//! Finding the dynamic libraries before cudarc touches them.
//!
//! cudarc (feature `dynamic-loading`) opens `libcuda` and `libnvrtc` by bare name and panics when
//! they are absent, and NVRTC itself opens `libnvrtc-builtins.so.13.0` by bare name. So before any
//! cudarc NVRTC call we look for the libraries in the usual places (FLASHATTN_NVRTC_DIR,
//! CUDA_HOME/CUDA_PATH, /usr/local/cuda, the pip wheels' `nvidia/cu13/lib`) and `dlopen` the
//! builtins, then libnvrtc, by absolute path. The dynamic loader then resolves the later bare-name
//! opens to the already-loaded objects (matched by SONAME), so no `LD_LIBRARY_PATH` is needed.
//! Every failure becomes an `Err` ([`Error::NoGpu`], [`Error::NoNvrtc`]) instead of a panic.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where NVRTC was loaded from and its version.
#[derive(Clone, Debug)]
pub struct NvrtcInfo {
    /// Directory the library was preloaded from; `None` = found by the system loader.
    pub dir: Option<PathBuf>,
    /// `(major, minor)` from `nvrtcVersion`.
    pub version: (i32, i32),
    /// Anything surprising about how it was loaded.
    pub note: Option<String>,
}

impl NvrtcInfo {
    /// `"13.0"`.
    pub fn version_string(&self) -> String {
        format!("{}.{}", self.version.0, self.version.1)
    }
}

/// Libraries preloaded by absolute path; kept alive for the life of the process.
static PRELOADED: OnceLock<Vec<libloading::Library>> = OnceLock::new();
static NVRTC: OnceLock<std::result::Result<NvrtcInfo, String>> = OnceLock::new();
static DRIVER: OnceLock<bool> = OnceLock::new();

/// Loads NVRTC once (preloading it by absolute path where found) and returns where it came from.
pub fn nvrtc() -> Result<&'static NvrtcInfo> {
    NVRTC
        .get_or_init(load_nvrtc)
        .as_ref()
        .map_err(|e| Error::NoNvrtc(e.clone()))
}

/// True when the CUDA driver library (`libcuda`) can be opened.
pub fn driver_present() -> bool {
    // SAFETY: opening libcuda runs its initialisers only; cudarc drops the handle again and
    // the call has no other effects. It does not panic when the library is absent.
    *DRIVER.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

const NVRTC_NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

fn load_nvrtc() -> std::result::Result<NvrtcInfo, String> {
    let dirs = nvrtc_dirs();
    let found = dirs
        .iter()
        .find_map(|d| NVRTC_NAMES.iter().map(|n| d.join(n)).find(|p| p.is_file()));
    let mut dir = None;
    if let Some(lib_path) = found {
        let d = lib_path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let mut libs = Vec::new();
        // The builtins first: libnvrtc opens them by bare name at compile time.
        for b in builtins_in(&d) {
            // SAFETY: loading NVIDIA's NVRTC builtins library runs only its ELF initialisers;
            // the handle is kept alive for the whole process in PRELOADED.
            if let Ok(lib) = unsafe { libloading::Library::new(&b) } {
                libs.push(lib);
            }
        }
        // SAFETY: as above, for libnvrtc itself; kept alive in PRELOADED.
        match unsafe { libloading::Library::new(&lib_path) } {
            Ok(lib) => libs.push(lib),
            Err(e) => return Err(format!("could not load {}: {e}", lib_path.display())),
        }
        let _ = PRELOADED.set(libs);
        dir = Some(d);
    }
    // SAFETY: see driver_present; this only probes cudarc's candidate names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(format!(
            "libnvrtc (CUDA 13) was not found; searched {} and the system library path. \
             Install it (`pip install nvidia-cuda-nvrtc==13.0.88`) or set FLASHATTN_NVRTC_DIR \
             to the directory holding libnvrtc.so.13",
            if dirs.is_empty() {
                "no candidate directories".to_string()
            } else {
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
    }
    // cudarc opens libnvrtc by bare name; make sure that resolved to the library we preloaded
    // (a different libnvrtc.so earlier on the system path would win otherwise).
    let mut note = None;
    if let (Some(d), Some(ours)) = (dir.clone(), PRELOADED.get().and_then(|v| v.last())) {
        // SAFETY: both handles are open libraries; we only compare symbol addresses and never
        // call through these pointers.
        let same = unsafe {
            let theirs = cudarc::nvrtc::sys::culib();
            match (
                ours.get::<unsafe extern "C" fn()>(b"nvrtcVersion\0"),
                theirs.get::<unsafe extern "C" fn()>(b"nvrtcVersion\0"),
            ) {
                (Ok(a), Ok(b)) => *a as usize == *b as usize,
                _ => false,
            }
        };
        if !same {
            note = Some(format!(
                "a libnvrtc on the system library path took precedence over the one in {}",
                d.display()
            ));
            dir = None;
        }
    }
    let version = std::panic::catch_unwind(|| {
        let (mut major, mut minor) = (0i32, 0i32);
        // SAFETY: both out-pointers are valid, live i32s; the library is present (checked).
        let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        (r, major, minor)
    })
    .map_err(|_| "libnvrtc could not be loaded (cudarc panicked while opening it)".to_string())?;
    if version.0 != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {:?}", version.0));
    }
    Ok(NvrtcInfo {
        dir,
        version: (version.1, version.2),
        note,
    })
}

fn builtins_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libnvrtc-builtins.so"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Candidate directories for libnvrtc, most specific first.
pub fn nvrtc_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = env_path("FLASHATTN_NVRTC_DIR") {
        dirs.push(d);
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(d) = env_path(var) {
            dirs.push(d.join("lib64"));
            dirs.push(d.join("lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    dirs.extend(pip_cu13_dirs().into_iter().map(|d| d.join("lib")));
    dirs.retain(|d| d.is_dir());
    dirs.dedup();
    dirs
}

/// Candidate directories for the CUDA headers (`cuda_fp16.h`), most specific first.
pub fn cuda_include_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = env_path("FLASHATTN_CUDA_INCLUDE") {
        dirs.push(d);
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(d) = env_path(var) {
            dirs.push(d.join("include"));
        }
    }
    dirs.push("/usr/local/cuda/include".into());
    dirs.extend(pip_cu13_dirs().into_iter().map(|d| d.join("include")));
    dirs.retain(|d| d.join("cuda_fp16.h").is_file());
    dirs.dedup();
    dirs
}

/// The first directory holding the CUDA headers, or why none was found.
pub fn cuda_include_dir() -> Result<PathBuf> {
    cuda_include_dirs().into_iter().next().ok_or_else(|| {
        Error::NoCudaHeaders(
            "no cuda_fp16.h in FLASHATTN_CUDA_INCLUDE, CUDA_HOME/include, CUDA_PATH/include, \
             /usr/local/cuda/include or a pip nvidia/cu13/include \
             (`pip install nvidia-cuda-runtime==13.0.*`)"
                .into(),
        )
    })
}

/// `site-packages/nvidia/cu13` directories of pip wheels: well-known locations first, then
/// (only if none exists) ask `python3` where the `nvidia` namespace package lives.
fn pip_cu13_dirs() -> Vec<PathBuf> {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let mut roots: Vec<PathBuf> = Vec::new();
        if let Some(v) = env_path("VIRTUAL_ENV") {
            roots.push(v.join("lib"));
        }
        if let Some(v) = env_path("CONDA_PREFIX") {
            roots.push(v.join("lib"));
        }
        if let Some(home) = env_path("HOME") {
            roots.push(home.join(".local/lib"));
            if let Ok(rd) = std::fs::read_dir(home.join(".pyenv/versions")) {
                roots.extend(rd.filter_map(|e| e.ok()).map(|e| e.path().join("lib")));
            }
        }
        roots.push("/usr/local/lib".into());
        roots.push("/usr/lib".into());
        roots.push("/opt/conda/lib".into());
        let mut found = Vec::new();
        for root in roots {
            let Ok(rd) = std::fs::read_dir(&root) else {
                continue;
            };
            let mut pys: Vec<PathBuf> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("python3"))
                })
                .collect();
            pys.sort();
            for py in pys {
                for sub in ["site-packages", "dist-packages"] {
                    let d = py.join(sub).join("nvidia/cu13");
                    if d.is_dir() {
                        found.push(d);
                    }
                }
            }
        }
        if found.is_empty() {
            if let Some(d) = python_nvidia_dir() {
                found.push(d.join("cu13"));
            }
        }
        found.retain(|d| d.is_dir());
        found
    })
    .clone()
}

fn python_nvidia_dir() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import nvidia, sys; sys.stdout.write(list(nvidia.__path__)[0])",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    let p = PathBuf::from(s.trim());
    p.is_dir().then_some(p)
}
