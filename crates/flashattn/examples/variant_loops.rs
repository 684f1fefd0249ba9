//! The FA3 / FP8 forward variants whose defines contain every `NAME=VALUE` of FILTER, compiled
//! with OVERRIDES applied (`NAME=VALUE` sets or adds a define, `NAME=-` drops it), one line each:
//! registers, spill bytes, and the main loop's size read from the SASS (the smallest loop with at
//! least two wgmma: instructions, `R2UR` moves, wgmma) — so that a kernel idea's effect on the
//! hot loop is known before any device time is spent:
//!
//! ```text
//! source .ci/nvrtc-env.sh      # NVRTC and nvdisasm from PyPI
//! cargo run --release --features cuda --example variant_loops -- \
//!     FA3_D=256,FA3_PERSISTENT=1,FA3_CAUSAL=0,FA3_VARLEN=0 FA3_QOPQ=1
//! ```
//!
//! (An override the host would not produce may need `FA3_SMEM=-`: the kernel checks its layout
//! against that define.) Compiles through the kernel cache (`FLASHATTN_CACHE_DIR`). ptxas's
//! performance notes (`C75xx`: serialized wgmma, injected waits, ignored setmaxnreg) are printed
//! in brackets after the label; with `DUMP_SASS=DIR` each variant's SASS is also written to
//! `DIR/<hash of the label>.sass`, the label on its first line.
use flashattn::cuda::{fa3, fa3_fp8, jit};
use rayon::prelude::*;
use std::hash::{Hash, Hasher};
use std::process::ExitCode;

// The tests' helpers: `common::sass` is the disassembler call they use.
#[path = "../tests/common/mod.rs"]
mod common;

fn pairs(arg: Option<&String>) -> Vec<(String, String)> {
    arg.map(|s| {
        s.split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    })
    .unwrap_or_default()
}

/// (instructions, R2UR, wgmma) of the smallest backward-branch loop with at least two wgmma.
fn main_loop(sass: &str) -> Option<(usize, usize, usize)> {
    let lines: Vec<&str> = sass.lines().collect();
    let label_at = |name: &str| {
        lines
            .iter()
            .position(|l| l.trim_end() == format!("{name}:"))
    };
    let is_ins = |l: &str| l.trim_start().starts_with("/*") && l.contains("*/") && l.contains(';');
    let mut best: Option<(usize, usize, usize)> = None;
    for (i, l) in lines.iter().enumerate() {
        let Some(target) = l.split("BRA `(").nth(1).and_then(|t| t.split(')').next()) else {
            continue;
        };
        let Some(start) = label_at(target).filter(|&s| s < i) else {
            continue;
        };
        let body: Vec<&str> = lines[start..=i]
            .iter()
            .copied()
            .filter(|l| is_ins(l))
            .collect();
        let gmma = body.iter().filter(|l| l.contains("GMMA.")).count();
        if gmma >= 2 && best.is_none_or(|b| body.len() < b.0) {
            let r2ur = body.iter().filter(|l| l.contains("R2UR")).count();
            best = Some((body.len(), r2ur, gmma));
        }
    }
    best
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (filter, overrides) = (pairs(args.get(1)), pairs(args.get(2)));
    let arch = "sm_90a";
    let mut specs = fa3::all_variants(arch);
    specs.extend(fa3_fp8::all_variants(arch));
    specs.retain(|s| filter.iter().all(|f| s.defines.contains(f)));
    for spec in &mut specs {
        for (k, v) in &overrides {
            let at = spec.defines.iter().position(|(n, _)| n == k);
            match (at, v.as_str()) {
                (Some(i), "-") => drop(spec.defines.remove(i)),
                (Some(i), _) => spec.defines[i].1 = v.clone(),
                (None, "-") => {}
                (None, _) => spec.defines.push((k.clone(), v.clone())),
            }
        }
    }
    let lines: Vec<Result<String, String>> = specs
        .par_iter()
        .map(|spec| {
            let label = spec.label();
            let c = jit::compile(spec, arch).map_err(|e| format!("{label}: {e}"))?;
            let r = &c.resources;
            let sass = common::sass(&c.cubin);
            if let (Ok(dir), Some(text)) = (std::env::var("DUMP_SASS"), sass.as_ref()) {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                label.hash(&mut h);
                let path = format!("{dir}/{:016x}.sass", h.finish());
                std::fs::write(&path, format!("{label}\n{text}"))
                    .map_err(|e| format!("{label}: writing {path}: {e}"))?;
            }
            let notes: Vec<&str> = c.log.lines().filter(|l| l.contains("(C75")).collect();
            let lp = sass
                .as_deref()
                .and_then(main_loop)
                .map_or("no loop found (nvdisasm?)".into(), |(n, u, g)| {
                    format!("loop {n} instructions, {u} R2UR, {g} wgmma")
                });
            let notes = if notes.is_empty() {
                String::new()
            } else {
                format!(" [{}]", notes.join(" | "))
            };
            Ok(format!(
                "{label}{notes}\n  {} registers, spill {} / {} bytes, stack {}; {lp}",
                r.registers, r.spill_stores, r.spill_loads, r.stack_bytes
            ))
        })
        .collect();
    let mut ok = true;
    for l in lines {
        match l {
            Ok(l) => println!("{l}"),
            Err(e) => {
                eprintln!("variant_loops: {e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
