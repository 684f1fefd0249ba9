//! One line per compiled FA3 / FP8 forward variant: its label, a hash of its SASS instruction
//! text (NVRTC cubin through `nvdisasm`, addresses, comments and data directives left out) and
//! the instruction count — so that a refactor of the kernel sources can be shown to leave every
//! kernel's code as it was without a GPU:
//!
//! ```text
//! source .ci/nvrtc-env.sh      # NVRTC and nvdisasm from PyPI
//! git checkout OLD && cargo run --release --features cuda --example sass_hashes > /tmp/old.txt
//! git checkout NEW && cargo run --release --features cuda --example sass_hashes > /tmp/new.txt
//! diff /tmp/old.txt /tmp/new.txt
//! ```
//!
//! Compiles through the kernel cache (`FLASHATTN_CACHE_DIR`); a few minutes on 16 cores cold.
use flashattn::cuda::{fa3, fa3_fp8, jit};
use rayon::prelude::*;
use std::hash::{Hash, Hasher};
use std::process::ExitCode;

// The tests' helpers: `common::sass` is the disassembler call they use.
#[path = "../tests/common/mod.rs"]
mod common;

fn main() -> ExitCode {
    let arch = "sm_90a";
    let mut specs = fa3::all_variants(arch);
    specs.extend(fa3_fp8::all_variants(arch));
    let lines: Result<Vec<String>, String> = specs
        .par_iter()
        .map(|spec| {
            let label = spec.label();
            let compiled = jit::compile(spec, arch).map_err(|e| format!("{label}: {e}"))?;
            let text = common::sass(&compiled.cubin).ok_or(format!(
                "{label}: nvdisasm failed or missing (source .ci/nvrtc-env.sh)"
            ))?;
            let ins: Vec<&str> = text
                .lines()
                .filter_map(|l| l.split("*/").nth(1))
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('.'))
                .collect();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            ins.hash(&mut h);
            Ok(format!("{label} {:016x} {}", h.finish(), ins.len()))
        })
        .collect();
    match lines {
        Ok(mut lines) => {
            lines.sort();
            println!("{}", lines.join("\n"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sass_hashes: {e}");
            ExitCode::FAILURE
        }
    }
}
