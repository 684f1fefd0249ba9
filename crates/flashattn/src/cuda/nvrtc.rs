//! The raw NVRTC layer: one program in (source, embedded headers, options), CUBIN and log out.
//!
//! cudarc's safe `create_program` takes no headers and `compile_ptx` returns PTX only (which does
//! not check inline PTX such as `wgmma`), so this calls `cudarc::nvrtc::sys` directly. Callers
//! must have loaded NVRTC with [`super::loader::nvrtc`] first.

use cudarc::nvrtc::sys;
use std::ffi::{c_char, CString};

/// What a successful compile produced.
pub struct CubinOutput {
    pub cubin: Vec<u8>,
    /// Compiler + ptxas log (`--ptxas-options=-v` puts registers and spills here).
    pub log: String,
}

/// A failed compile: what failed and the full log.
pub struct CompileFailure {
    pub stage: String,
    pub log: String,
}

fn check(r: sys::nvrtcResult, stage: &str) -> Result<(), CompileFailure> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(CompileFailure {
            stage: format!("{stage}: {r:?}"),
            log: String::new(),
        })
    }
}

fn cstring(s: &str) -> CString {
    // Interior NULs cannot occur in our sources/options; strip them rather than panic.
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

/// Owns an `nvrtcProgram` and destroys it on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: self.0 was created by nvrtcCreateProgram and is destroyed exactly once here.
        unsafe {
            let _ = sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

/// Compiles `src` (named `name` in diagnostics) with `headers` = (include name, contents)
/// available to `#include "name"`, and returns the CUBIN and the log.
pub fn compile_cubin(
    src: &str,
    name: &str,
    headers: &[(&str, &str)],
    options: &[String],
) -> Result<CubinOutput, CompileFailure> {
    let c_src = cstring(src);
    let c_name = cstring(name);
    let c_hdr_src: Vec<CString> = headers.iter().map(|(_, s)| cstring(s)).collect();
    let c_hdr_name: Vec<CString> = headers.iter().map(|(n, _)| cstring(n)).collect();
    let p_hdr_src: Vec<*const c_char> = c_hdr_src.iter().map(|c| c.as_ptr()).collect();
    let p_hdr_name: Vec<*const c_char> = c_hdr_name.iter().map(|c| c.as_ptr()).collect();
    let c_opts: Vec<CString> = options.iter().map(|o| cstring(o)).collect();
    let p_opts: Vec<*const c_char> = c_opts.iter().map(|c| c.as_ptr()).collect();

    let mut raw: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer refers to a NUL-terminated CString alive until this function
    // returns; the header arrays both have headers.len() entries; `raw` is a valid out-pointer.
    let r = unsafe {
        sys::nvrtcCreateProgram(
            &mut raw,
            c_src.as_ptr(),
            c_name.as_ptr(),
            headers.len() as i32,
            p_hdr_src.as_ptr(),
            p_hdr_name.as_ptr(),
        )
    };
    check(r, "nvrtcCreateProgram")?;
    let prog = Program(raw);

    // SAFETY: prog.0 is a live program; p_opts holds p_opts.len() valid C strings.
    let compiled =
        unsafe { sys::nvrtcCompileProgram(prog.0, p_opts.len() as i32, p_opts.as_ptr()) };
    let log = program_log(&prog);
    if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CompileFailure {
            stage: format!("nvrtcCompileProgram: {compiled:?}"),
            log,
        });
    }

    let mut size = 0usize;
    // SAFETY: prog.0 compiled successfully; `size` is a valid out-pointer.
    check(
        unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) },
        "nvrtcGetCUBINSize",
    )
    .map_err(|e| CompileFailure {
        log: log.clone(),
        ..e
    })?;
    if size == 0 {
        return Err(CompileFailure {
            stage: "nvrtcGetCUBIN: empty CUBIN (was a virtual compute_XX architecture given?)"
                .into(),
            log,
        });
    }
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has exactly the `size` bytes NVRTC reported for this program.
    check(
        unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr() as *mut c_char) },
        "nvrtcGetCUBIN",
    )
    .map_err(|e| CompileFailure {
        log: log.clone(),
        ..e
    })?;
    Ok(CubinOutput { cubin, log })
}

fn program_log(prog: &Program) -> String {
    let mut size = 0usize;
    // SAFETY: prog.0 is a live program; `size` is a valid out-pointer.
    if unsafe { sys::nvrtcGetProgramLogSize(prog.0, &mut size) } != sys::nvrtcResult::NVRTC_SUCCESS
        || size == 0
    {
        return String::new();
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` has the `size` bytes NVRTC asked for (including the trailing NUL).
    if unsafe { sys::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr() as *mut c_char) }
        != sys::nvrtcResult::NVRTC_SUCCESS
    {
        return String::new();
    }
    while buf.last() == Some(&0) {
        buf.pop();
    }
    String::from_utf8_lossy(&buf).into_owned()
}
