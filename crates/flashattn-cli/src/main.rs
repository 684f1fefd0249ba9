//! `flashattn`: the command-line front end (SPEC §3).
//!
//! - `forward` / `backward`: tensors in and out as safetensors, on the CPU or a CUDA GPU.
//! - `bench --device cpu|cuda [options]`: the device benchmark (options passed through).
//! - `info`: devices, NVRTC/driver versions, kernel cache.
//! - `kernels --compile-all --arch sm_80,sm_90a`: NVRTC compile check of every kernel variant.
//!
//! Any error prints one `error: ...` line on stderr and exits non-zero; output files are
//! written to a temporary file and renamed into place only after success.

mod args;
mod bench_cpu;
#[cfg(feature = "cuda")]
mod bench_cuda;
mod io;

use std::fmt::Display;
use std::process::ExitCode;

use args::{BenchArgs, Cli, Command, KernelsArgs, RunArgs};
use clap::Parser;
use flashattn::{AttnOptions, Device, Qkv, Tensor};
use io::{write_atomic, CliResult, InputFile};

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
            s.to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "unknown panic".to_string()
        };
        eprintln!("error: internal error (a bug in flashattn, please report it): {msg}");
    }));
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Forward(a) => run_forward(a),
        Command::Backward(a) => run_backward(a),
        Command::Bench(b) => bench(b),
        Command::Info => info(),
        Command::Kernels(k) => kernels(k),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn lib<T>(r: flashattn::Result<T>) -> CliResult<T> {
    r.map_err(|e| e.to_string())
}

/// Inputs read from the file: q, k, v, optional cu_seqlens, options with ALiBi filled in.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu: Option<(Vec<i32>, Vec<i32>)>,
    opts: AttnOptions,
}

impl Inputs {
    fn read(file: &InputFile, a: &RunArgs) -> CliResult<Inputs> {
        let q = file.tensor("q")?;
        let k = file.tensor("k")?;
        let v = file.tensor("v")?;
        let cu = file.cu_seqlens()?;
        let mut opts = a.options();
        if let Some(slopes) = file.alibi()? {
            opts = opts.alibi(slopes);
        }
        Ok(Inputs { q, k, v, cu, opts })
    }
    fn qkv(&self) -> Qkv<'_> {
        match &self.cu {
            Some((cq, ck)) => Qkv::varlen(&self.q, &self.k, &self.v, cq, ck),
            None => Qkv::dense(&self.q, &self.k, &self.v),
        }
    }
}

fn run_forward(a: &RunArgs) -> CliResult<()> {
    let file = InputFile::open(&a.input)?;
    let inp = Inputs::read(&file, a)?;
    let f = lib(flashattn::forward(&inp.qkv(), &inp.opts, a.device))?;
    write_atomic(
        &a.output,
        &[("out", &f.out), ("lse", &f.lse)],
        &a.device.to_string(),
    )?;
    eprintln!(
        "forward on {}: {} q {:?} -> {} (out, lse)",
        a.device,
        inp.q.dtype(),
        inp.q.shape(),
        a.output.display()
    );
    Ok(())
}

fn run_backward(a: &RunArgs) -> CliResult<()> {
    let file = InputFile::open(&a.input)?;
    let inp = Inputs::read(&file, a)?;
    let dout = file.tensor("dout")?;
    let qkv = inp.qkv();
    // out and lse from the file when both are there; otherwise recompute them (same options,
    // so the same dropout mask).
    let (out, lse) = match (file.has("out"), file.has("lse")) {
        (true, true) => (file.tensor("out")?, file.tensor("lse")?),
        (false, false) => {
            let f = lib(flashattn::forward(&qkv, &inp.opts, a.device))?;
            (f.out, f.lse)
        }
        (true, false) => {
            return Err(
                "input has `out` but no `lse`; give both (from `forward`) or neither".into(),
            )
        }
        (false, true) => {
            return Err(
                "input has `lse` but no `out`; give both (from `forward`) or neither".into(),
            )
        }
    };
    let g = lib(flashattn::backward(
        &qkv, &out, &lse, &dout, &inp.opts, a.device,
    ))?;
    write_atomic(
        &a.output,
        &[("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)],
        &a.device.to_string(),
    )?;
    eprintln!(
        "backward on {}: {} q {:?} -> {} (dq, dk, dv)",
        a.device,
        inp.q.dtype(),
        inp.q.shape(),
        a.output.display()
    );
    Ok(())
}

/// What a device benchmark's `run` may return; prints its report.
trait BenchOutcome {
    fn finish(self) -> CliResult<()>;
}
impl<E: Display> BenchOutcome for Result<String, E> {
    fn finish(self) -> CliResult<()> {
        let s = self.map_err(|e| e.to_string())?;
        print!("{s}");
        if !s.ends_with('\n') {
            println!();
        }
        Ok(())
    }
}
impl<E: Display> BenchOutcome for Result<(), E> {
    fn finish(self) -> CliResult<()> {
        self.map_err(|e| e.to_string())
    }
}

/// Parses the pass-through options of `bench` with the device benchmark's own arguments.
fn parse_bench<A: clap::Args>(name: &'static str, about: &'static str, rest: &[String]) -> A {
    let cmd = A::augment_args(clap::Command::new(name).about(about));
    let argv = std::iter::once(name.to_string()).chain(rest.iter().cloned());
    let matches = cmd.try_get_matches_from(argv).unwrap_or_else(|e| e.exit());
    A::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// `--device` may also come after the benchmark's own options: take the last one given.
fn split_device(b: &BenchArgs) -> CliResult<(Device, Vec<String>)> {
    let mut device = b.device;
    let mut rest = Vec::with_capacity(b.rest.len());
    let mut it = b.rest.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            rest.extend(it.by_ref().cloned());
            break;
        }
        let value = if a == "--device" {
            Some(
                it.next()
                    .ok_or("a value is required for '--device <DEVICE>'")?
                    .clone(),
            )
        } else {
            a.strip_prefix("--device=").map(str::to_string)
        };
        match value {
            Some(v) => device = args::parse_device(&v).map_err(|e| format!("--device: {e}"))?,
            None => rest.push(a.clone()),
        }
    }
    Ok((device, rest))
}

fn bench(b: &BenchArgs) -> CliResult<()> {
    let (device, rest) = split_device(b)?;
    match device {
        Device::Cpu => {
            let a: bench_cpu::CpuBenchArgs = parse_bench(
                "flashattn bench --device cpu",
                "CPU benchmark: the flashattn CPU backend next to a naive attention and the GEMM rate, in one run",
                &rest,
            );
            bench_cpu::run(&a).finish()
        }
        Device::Cuda(ordinal) => bench_cuda_dispatch(ordinal, &rest),
    }
}

#[cfg(feature = "cuda")]
fn bench_cuda_dispatch(ordinal: usize, rest: &[String]) -> CliResult<()> {
    let a: bench_cuda::CudaBenchArgs = parse_bench(
        "flashattn bench --device cuda",
        "CUDA benchmark: flashattn kernels next to PyTorch SDPA anchors, in one run",
        rest,
    );
    select_cuda_ordinal(ordinal)?;
    bench_cuda::run(&a).finish()
}

/// The CUDA benchmark runs on device 0; `--device cuda:N` makes N that device by narrowing
/// `CUDA_VISIBLE_DEVICES` before CUDA is initialised.
#[cfg(feature = "cuda")]
fn select_cuda_ordinal(ordinal: usize) -> CliResult<()> {
    if ordinal == 0 {
        return Ok(());
    }
    let pick = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .nth(ordinal)
            .map(|s| s.trim().to_string())
            .ok_or_else(|| {
                format!(
                    "--device cuda:{ordinal}: CUDA_VISIBLE_DEVICES={list} has no device {ordinal}"
                )
            })?,
        _ => ordinal.to_string(),
    };
    std::env::set_var("CUDA_VISIBLE_DEVICES", pick);
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda_dispatch(_ordinal: usize, _rest: &[String]) -> CliResult<()> {
    Err(no_cuda("bench --device cuda"))
}

#[cfg(not(feature = "cuda"))]
fn no_cuda(what: &str) -> String {
    format!(
        "`{what}` needs CUDA, but this build of flashattn has no CUDA support \
         (rebuild with `cargo build --release --features cuda`)"
    )
}

fn cpu_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

fn info() -> CliResult<()> {
    println!("flashattn {}", env!("CARGO_PKG_VERSION"));
    println!(
        "CPU backend: {} threads (rayon; set RAYON_NUM_THREADS to change)",
        cpu_threads()
    );
    #[cfg(feature = "cuda")]
    {
        println!("{}", flashattn::cuda::info_report());
    }
    #[cfg(not(feature = "cuda"))]
    {
        println!(
            "CUDA: this build has no CUDA support (rebuild with `cargo build --release --features cuda`)"
        );
    }
    Ok(())
}

fn kernels(k: &KernelsArgs) -> CliResult<()> {
    if !k.compile_all {
        return Err("nothing to do: pass --compile-all (e.g. `flashattn kernels --compile-all --arch sm_80,sm_90a`)".into());
    }
    #[cfg(feature = "cuda")]
    {
        let archs: Vec<&str> = k
            .arch
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        if archs.is_empty() {
            return Err("--arch: give at least one architecture, e.g. sm_80,sm_90a".into());
        }
        let report = lib(flashattn::cuda::compile_all(&archs))?;
        println!("{report}");
        if report.has_errors() {
            return Err("some kernel variants failed to compile (see the table above)".into());
        }
        if report.has_forward_spills() {
            return Err("some forward kernels spill registers (see the table above)".into());
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = &k.arch;
        Err(no_cuda("kernels --compile-all"))
    }
}
