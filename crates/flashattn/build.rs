//! Embeds every file under `kernels/` (the CUDA C++ sources) into the library: generates
//! `$OUT_DIR/kernels.rs` with `SOURCES: &[(&str, &str)]` = (path relative to kernels/, contents).
//! The JIT compiles from this table, so the binary needs no source tree at run time.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || name.ends_with('~') {
            continue;
        }
        if path.is_dir() {
            walk(&path, root, out);
        } else if path.is_file() && std::fs::read_to_string(&path).is_ok() {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let rel: Vec<_> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push((rel.join("/"), path.clone()));
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let kernels = manifest.join("../../kernels");
    println!("cargo:rerun-if-changed={}", kernels.display());
    println!("cargo:rerun-if-changed=build.rs");

    let mut files = Vec::new();
    if let Ok(root) = kernels.canonicalize() {
        walk(&root, &root, &mut files);
    }
    let mut code = String::from(
        "/// (path relative to `kernels/`, contents) of every embedded kernel source.\n\
         pub static SOURCES: &[(&str, &str)] = &[\n",
    );
    for (rel, abs) in &files {
        writeln!(
            code,
            "    ({rel:?}, include_str!({:?})),",
            abs.display().to_string()
        )
        .unwrap();
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("kernels.rs");
    std::fs::write(out, code).expect("write kernels.rs");
}
