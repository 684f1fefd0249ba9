//! Command-line arguments (clap) and their conversion to library types.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use flashattn::{AttnOptions, Device};

/// FlashAttention in Rust: exact attention on the CPU and NVIDIA GPUs, tensors in safetensors.
#[derive(Parser, Debug)]
#[command(name = "flashattn", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attention forward: reads q, k, v (+ optional cu_seqlens_q/k, alibi_slopes) and writes
    /// `out` (dtype and shape of q) and `lse` (f32).
    Forward(RunArgs),
    /// Attention backward: reads q, k, v, dout (+ out and lse if present, otherwise the forward
    /// is run first to get them) and writes dq, dk, dv.
    Backward(RunArgs),
    /// Benchmark: `flashattn bench --device cpu [CPU options]` or
    /// `flashattn bench --device cuda[:N] [CUDA options]`; `flashattn bench --device cpu --help`
    /// lists the options of each.
    #[command(disable_help_flag = true)]
    Bench(BenchArgs),
    /// Devices found, NVRTC/driver versions, kernel cache location.
    Info,
    /// Ahead-of-time kernel checks: `kernels --compile-all --arch sm_80,sm_90a` compiles every
    /// shipped kernel variant with NVRTC and prints registers, spills and shared memory.
    Kernels(KernelsArgs),
}

/// Flags shared by `forward` and `backward`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Input safetensors file.
    #[arg(long, short = 'i', value_name = "IN.safetensors")]
    pub input: PathBuf,
    /// Output safetensors file (written atomically; untouched on any error).
    #[arg(long, short = 'o', value_name = "OUT.safetensors")]
    pub output: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// Causal mask (aligned bottom-right).
    #[arg(long)]
    pub causal: bool,
    /// Sliding window LEFT,RIGHT (-1 = unbounded on that side).
    #[arg(long, value_name = "LEFT,RIGHT", value_parser = parse_window, allow_hyphen_values = true)]
    pub window: Option<(i64, i64)>,
    /// Softcap: scores become X·tanh(S/X) (0 = off).
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    pub softcap: Option<f32>,
    /// Softmax scale (default 1/sqrt(head_dim)).
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    pub scale: Option<f32>,
    /// Dropout probability in [0, 1).
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub dropout: Option<f32>,
    /// Dropout RNG seed.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub seed: u64,
    /// Dropout RNG offset.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub offset: u64,
    /// Bit-identical backward from run to run.
    #[arg(long)]
    pub deterministic: bool,
}

impl RunArgs {
    /// The attention options these flags ask for (ALiBi slopes come from the input file).
    pub fn options(&self) -> AttnOptions {
        let mut o = AttnOptions::new()
            .causal(self.causal)
            .dropout(self.dropout.unwrap_or(0.0), self.seed)
            .dropout_offset(self.offset)
            .deterministic(self.deterministic);
        if let Some((l, r)) = self.window {
            o = o.window(l, r);
        }
        if let Some(x) = self.softcap {
            o = o.softcap(x);
        }
        if let Some(s) = self.scale {
            o = o.scale(s);
        }
        o
    }
}

/// `bench`: the device, then the device benchmark's own options (passed through).
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// Options of the chosen device's benchmark (`flashattn bench --device cpu --help`).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "OPTIONS"
    )]
    pub rest: Vec<String>,
}

#[derive(Args, Debug)]
pub struct KernelsArgs {
    /// Compile every shipped kernel variant for each architecture.
    #[arg(long)]
    pub compile_all: bool,
    /// Comma-separated NVRTC architectures.
    #[arg(long, value_delimiter = ',', default_value = "sm_80,sm_90a")]
    pub arch: Vec<String>,
}

/// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "cpu" {
        return Ok(Device::Cpu);
    }
    if t == "cuda" || t == "gpu" {
        return Ok(Device::Cuda(0));
    }
    if let Some(n) = t.strip_prefix("cuda:") {
        return n
            .parse::<usize>()
            .map(Device::Cuda)
            .map_err(|_| format!("bad CUDA ordinal `{n}` (expected cuda:0, cuda:1, ...)"));
    }
    Err(format!(
        "unknown device `{s}` (expected cpu, cuda or cuda:N)"
    ))
}

/// `LEFT,RIGHT` with each side an integer >= -1.
pub fn parse_window(s: &str) -> Result<(i64, i64), String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if parts.len() != 2 {
        return Err(format!(
            "`{s}` is not LEFT,RIGHT (two integers, -1 = unbounded)"
        ));
    }
    let side = |x: &str| {
        x.parse::<i64>()
            .map_err(|_| format!("`{x}` in `{s}` is not an integer"))
    };
    Ok((side(parts[0])?, side(parts[1])?))
}
