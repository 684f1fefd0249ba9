//! safetensors in and out, and atomic output files.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use flashattn::{AlibiSlopes, Storage, Tensor};
use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

/// A CLI error: one line for stderr (printed after "error: ").
pub type CliResult<T> = Result<T, String>;

/// The bytes of an input file, kept alive while its tensors are read.
pub struct InputFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl InputFile {
    pub fn open(path: &Path) -> CliResult<InputFile> {
        let bytes = fs::read(path)
            .map_err(|e| format!("cannot read input file `{}`: {e}", path.display()))?;
        // Parse once here so a corrupt file is reported before any work.
        SafeTensors::deserialize(&bytes).map_err(|e| {
            format!(
                "input file `{}` is not a valid safetensors file: {e}",
                path.display()
            )
        })?;
        Ok(InputFile {
            path: path.to_path_buf(),
            bytes,
        })
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated in open")
    }

    pub fn has(&self, name: &str) -> bool {
        self.st().names().contains(&name)
    }

    fn view(&self, name: &str) -> CliResult<TensorView<'_>> {
        let st = self.st();
        st.tensor(name).map_err(|_| {
            let mut names: Vec<&str> = st.names();
            names.sort_unstable();
            format!(
                "input file `{}` has no tensor `{name}` (it has: {})",
                self.path.display(),
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )
        })
    }

    /// A floating-point tensor (F32, F16 or BF16).
    pub fn tensor(&self, name: &str) -> CliResult<Tensor> {
        let v = self.view(name)?;
        let shape = v.shape().to_vec();
        let data = v.data();
        let storage = match v.dtype() {
            Dtype::F32 => Storage::F32(
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            Dtype::F16 => Storage::F16(
                data.chunks_exact(2)
                    .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            ),
            Dtype::BF16 => Storage::BF16(
                data.chunks_exact(2)
                    .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            ),
            other => {
                return Err(format!(
                    "tensor `{name}` has dtype {other:?}; expected F32, F16 or BF16"
                ))
            }
        };
        Tensor::new(storage, &shape).map_err(|e| format!("tensor `{name}`: {e}"))
    }

    /// An I32 vector (`cu_seqlens_*`), rank 1.
    pub fn i32_vec(&self, name: &str) -> CliResult<Vec<i32>> {
        let v = self.view(name)?;
        if v.dtype() != Dtype::I32 {
            return Err(format!(
                "tensor `{name}` has dtype {:?}; expected I32",
                v.dtype()
            ));
        }
        if v.shape().len() != 1 {
            return Err(format!(
                "tensor `{name}` has shape {:?}; expected rank 1 [batch + 1]",
                v.shape()
            ));
        }
        Ok(v.data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// `cu_seqlens_q` and `cu_seqlens_k`: both or neither.
    pub fn cu_seqlens(&self) -> CliResult<Option<(Vec<i32>, Vec<i32>)>> {
        match (self.has("cu_seqlens_q"), self.has("cu_seqlens_k")) {
            (false, false) => Ok(None),
            (true, true) => Ok(Some((
                self.i32_vec("cu_seqlens_q")?,
                self.i32_vec("cu_seqlens_k")?,
            ))),
            (true, false) => {
                Err("input has `cu_seqlens_q` but no `cu_seqlens_k`; varlen needs both".into())
            }
            (false, true) => {
                Err("input has `cu_seqlens_k` but no `cu_seqlens_q`; varlen needs both".into())
            }
        }
    }

    /// `alibi_slopes`: F32 `[heads_q]` or `[batch, heads_q]`.
    pub fn alibi(&self) -> CliResult<Option<AlibiSlopes>> {
        if !self.has("alibi_slopes") {
            return Ok(None);
        }
        let v = self.view("alibi_slopes")?;
        if v.dtype() != Dtype::F32 {
            return Err(format!(
                "tensor `alibi_slopes` has dtype {:?}; expected F32",
                v.dtype()
            ));
        }
        let vals: Vec<f32> = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        match v.shape().len() {
            1 => Ok(Some(AlibiSlopes::per_head(vals))),
            2 => Ok(Some(AlibiSlopes::per_batch(vals))),
            _ => Err(format!(
                "tensor `alibi_slopes` has shape {:?}; expected [heads_q] or [batch, heads_q]",
                v.shape()
            )),
        }
    }
}

/// Little-endian bytes of a tensor (made contiguous) and its safetensors dtype.
fn tensor_bytes(t: &Tensor) -> (Dtype, Vec<u8>) {
    let t = t.contiguous();
    match t.storage() {
        Storage::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        Storage::F16(v) => (
            Dtype::F16,
            v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        ),
        Storage::BF16(v) => (
            Dtype::BF16,
            v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        ),
    }
}

/// Serialises `tensors` into a safetensors file at `path`, atomically: the bytes go to a
/// temporary file in the same directory which is renamed over `path` only once complete, so
/// `path` is never created or changed when anything fails.
pub fn write_atomic(path: &Path, tensors: &[(&str, &Tensor)], device: &str) -> CliResult<()> {
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let (dt, b) = tensor_bytes(t);
            (n.to_string(), dt, t.shape().to_vec(), b)
        })
        .collect();
    let views = encoded
        .iter()
        .map(|(n, dt, shape, b)| {
            TensorView::new(*dt, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| format!("cannot encode tensor `{n}`: {e}"))
        })
        .collect::<CliResult<Vec<_>>>()?;
    let mut meta = HashMap::new();
    meta.insert(
        "producer".to_string(),
        format!("flashattn {}", env!("CARGO_PKG_VERSION")),
    );
    meta.insert("device".to_string(), device.to_string());
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| format!("cannot serialise the output: {e}"))?;

    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| format!("output path `{}` has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(format!(
            "cannot write output file `{}`: {e}",
            path.display()
        ));
    }
    Ok(())
}
