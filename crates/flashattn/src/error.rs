//! The one error type of the crate. Every message names the argument, what was given and what
//! was expected, so that a CLI user can act on it without reading code.

/// Everything that can go wrong in flashattn. Nothing in the crate panics on user input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A user-supplied argument violates a precondition (shape, range, layout).
    #[error("invalid argument `{arg}`: got {got}, expected {expected}")]
    InvalidArgument {
        arg: String,
        got: String,
        expected: String,
    },
    /// The argument is valid in general but this device/backend does not support it.
    #[error("unsupported on {device}: `{arg}` is {got}; supported: {supported}")]
    Unsupported {
        device: String,
        arg: String,
        got: String,
        supported: String,
    },
    /// No usable CUDA GPU or driver (or the crate was built without the `cuda` feature).
    #[error("no CUDA GPU available: {0}")]
    NoGpu(String),
    /// The NVRTC library could not be loaded.
    #[error("NVRTC not found: {0}")]
    NoNvrtc(String),
    /// The CUDA headers NVRTC needs could not be located.
    #[error("CUDA headers not found: {0}")]
    NoCudaHeaders(String),
    /// A device allocation failed.
    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),
    /// Any other CUDA driver error.
    #[error("CUDA error: {0}")]
    Cuda(String),
    /// A kernel failed to compile under NVRTC (the log is included).
    #[error("kernel compilation failed: {0}")]
    Compile(String),
    /// File-system or I/O failure (kernel cache, CLI files).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds an [`Error::InvalidArgument`] from anything printable.
    pub fn invalid(
        arg: impl Into<String>,
        got: impl std::fmt::Display,
        expected: impl std::fmt::Display,
    ) -> Self {
        Error::InvalidArgument {
            arg: arg.into(),
            got: got.to_string(),
            expected: expected.to_string(),
        }
    }

    /// Builds an [`Error::Unsupported`] from anything printable.
    pub fn unsupported(
        device: impl Into<String>,
        arg: impl Into<String>,
        got: impl std::fmt::Display,
        supported: impl std::fmt::Display,
    ) -> Self {
        Error::Unsupported {
            device: device.into(),
            arg: arg.into(),
            got: got.to_string(),
            supported: supported.to_string(),
        }
    }
}
