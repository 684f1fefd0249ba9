//! `flashattn bench --device cuda`: SPEC §4's sweep on the GPU (bf16, 16k tokens, hidden 2048,
//! d ∈ {64, 128, 256}, seqlen 512 … 16384, causal and not). CUDA events around every call,
//! warm-up first, median of many repeats, several random (non-zero) input sets rotated so L2
//! never serves them; TFLOP/s by FlashAttention's FLOP convention. bench/run_gpu.sh runs this
//! next to PyTorch SDPA (bench/anchors.py) in the same device command and prints the ratios.

use std::sync::Arc;

use flashattn::cuda::{self, fa2, DeviceTensor, Family, Gpu};
use flashattn::{AttnOptions, DType, Error, Problem, Qkv, Tensor};

#[derive(clap::Args, Debug, Clone)]
pub struct CudaBenchArgs {
    /// fwd or bwd.
    #[arg(long, default_value = "fwd")]
    pub pass: String,
    /// Kernel family: auto, fa2 or fa3.
    #[arg(long, default_value = "auto")]
    pub family: String,
    /// Total tokens per shape: batch = max(1, tokens / seqlen).
    #[arg(long, default_value_t = 16384)]
    pub tokens: usize,
    /// Hidden size: heads = hidden / head_dim.
    #[arg(long, default_value_t = 2048)]
    pub hidden: usize,
    #[arg(long, value_delimiter = ',', default_values_t = vec![64, 128, 256])]
    pub head_dims: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_values_t = vec![512, 1024, 2048, 4096, 8192, 16384])]
    pub seqlens: Vec<usize>,
    /// Which masks: both, causal, full.
    #[arg(long, default_value = "both")]
    pub masks: String,
    /// f16 or bf16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Untimed warm-up calls per case.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Timed calls per case (median reported).
    #[arg(long, default_value_t = 30)]
    pub repeats: usize,
    /// Idle time before each case's warm-up, so that every case starts from the same power
    /// state (sustained runs hold an H100 at its power cap, bench/RESULTS.md "Step 26b").
    #[arg(long, default_value_t = 0)]
    pub cooldown_ms: u64,
    /// Input sets rotated between calls (each set q, k, v is 3 × tokens × hidden × 2 bytes).
    #[arg(long, default_value_t = 3)]
    pub sets: usize,
    /// FA2 tile override(s), e.g. `128x64w8` (comma separated: each is timed; fa2 only).
    #[arg(long, value_delimiter = ',')]
    pub tile: Vec<String>,
    /// Seqlen of the peak-memory report (batch 1, heads 16, d 128, causal); 0 skips it.
    #[arg(long, default_value_t = 131072)]
    pub mem_seqlen: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

struct Row {
    d: usize,
    seqlen: usize,
    batch: usize,
    heads: usize,
    causal: bool,
    family: String,
    tile: String,
    ms: f64,
    tflops: f64,
    finite: bool,
}

fn parse_family(s: &str) -> Result<Family, Error> {
    match s {
        "auto" => Ok(Family::Auto),
        "fa2" => Ok(Family::Fa2),
        "fa3" => Ok(Family::Fa3),
        x => Err(Error::invalid("--family", x, "auto, fa2 or fa3")),
    }
}

use fa2::timing_event as event;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

struct Inputs {
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    out: DeviceTensor,
    lse: DeviceTensor,
    dout: DeviceTensor,
}

#[allow(clippy::too_many_arguments)]
fn time_case(
    gpu: &Arc<Gpu>,
    args: &CudaBenchArgs,
    family: Family,
    tile: Option<fa2::Tile>,
    sets: &[Inputs],
    problem: &Problem,
    opts: &AttnOptions,
) -> Result<(f64, bool), Error> {
    let bwd = args.pass == "bwd";
    let stream = gpu.stream();
    // Time the launch alone, into preallocated outputs, for whichever family `forward_device`
    // would pick (so neither family pays for allocation inside the timed region).
    let use_fa3 = match family {
        Family::Fa2 => false,
        Family::Fa3 => true,
        Family::Auto => {
            gpu.arch().is_hopper()
                && cuda::fa3::supports(gpu, problem)
                && opts.alibi_slopes.is_none()
        }
    };
    let call = |s: &Inputs| -> Result<(), Error> {
        if bwd {
            cuda::backward_device(
                gpu, problem, &s.q, &s.k, &s.v, &s.out, &s.lse, &s.dout, opts, family,
            )
            .map(|_| ())
        } else if use_fa3 {
            cuda::fa3::forward_into(gpu, problem, &s.q, &s.k, &s.v, &s.out, &s.lse)
        } else {
            fa2::forward_into(gpu, problem, &s.q, &s.k, &s.v, &s.out, &s.lse, opts, tile)
        }
    };
    // Backward needs a real forward output and LSE.
    if bwd {
        for s in sets {
            fa2::forward_into(gpu, problem, &s.q, &s.k, &s.v, &s.out, &s.lse, opts, None)?;
        }
    }
    if args.cooldown_ms > 0 {
        gpu.synchronize()?;
        std::thread::sleep(std::time::Duration::from_millis(args.cooldown_ms));
    }
    for i in 0..args.warmup {
        call(&sets[i % sets.len()])?;
    }
    gpu.synchronize()?;
    let mut evs = Vec::with_capacity(args.repeats);
    for i in 0..args.repeats {
        let (a, b) = (event(gpu)?, event(gpu)?);
        a.record(stream)
            .map_err(|e| cuda::context::driver_err("event record", e))?;
        call(&sets[i % sets.len()])?;
        b.record(stream)
            .map_err(|e| cuda::context::driver_err("event record", e))?;
        evs.push((a, b));
    }
    gpu.synchronize()?;
    let mut times = Vec::with_capacity(evs.len());
    for (a, b) in &evs {
        times.push(
            a.elapsed_ms(b)
                .map_err(|e| cuda::context::driver_err("event time", e))? as f64,
        );
    }
    // Sanity: the forward output of the last set is finite.
    let finite = if !bwd {
        let o = sets[(args.repeats + sets.len() - 1) % sets.len()]
            .out
            .download()?;
        o.to_f32_vec().iter().all(|x| x.is_finite())
    } else {
        true
    };
    Ok((median(times), finite))
}

/// Peak device memory of one forward beyond q, k, v and out (driver free-memory delta).
fn memory_report(
    gpu: &Arc<Gpu>,
    dtype: DType,
    seqlen: usize,
    family: Family,
) -> Result<String, Error> {
    let (b, h, d) = (1usize, 16usize, 128usize);
    let shape = [b, seqlen, h, d];
    let q = DeviceTensor::upload(gpu, &Tensor::random(dtype, &shape, 11))?;
    let k = DeviceTensor::upload(gpu, &Tensor::random(dtype, &shape, 12))?;
    let v = DeviceTensor::upload(gpu, &Tensor::random(dtype, &shape, 13))?;
    let opts = AttnOptions::new().causal(true);
    let qt = Tensor::zeros(dtype, &shape);
    let problem = Problem::new(&Qkv::dense(&qt, &qt, &qt), &opts)?;
    drop(qt);
    gpu.synchronize()?;
    let free = || fa2::free_memory(gpu);
    let before = free()?;
    let e0 = event(gpu)?;
    e0.record(gpu.stream())
        .map_err(|e| cuda::context::driver_err("event", e))?;
    let (out, lse) = cuda::forward_device(gpu, &problem, &q, &k, &v, &opts, family)?;
    let e1 = event(gpu)?;
    e1.record(gpu.stream())
        .map_err(|e| cuda::context::driver_err("event", e))?;
    gpu.synchronize()?;
    let after = free()?;
    let ms = e0
        .elapsed_ms(&e1)
        .map_err(|e| cuda::context::driver_err("event", e))? as f64;
    let io = 4 * seqlen * h * d * dtype.size();
    let out_bytes = seqlen * h * d * dtype.size();
    let used = before.saturating_sub(after);
    let extra = used.saturating_sub(out_bytes);
    let lse_bytes = lse.numel() * 4;
    drop((out, lse));
    let mib = |x: usize| x as f64 / (1024.0 * 1024.0);
    Ok(format!(
        "memory: seqlen {seqlen}, batch 1, heads 16, d 128, causal fwd ({ms:.1} ms): q+k+v+out {:.1} MiB; \
         device memory beyond them {:.1} MiB (lse {:.1} MiB = batch*heads*seqlen*4 B; the driver \
         allocates in 2 MiB pages)",
        mib(io),
        mib(extra),
        mib(lse_bytes)
    ))
}

/// Runs the sweep and returns the table (or JSON).
pub fn run(args: &CudaBenchArgs) -> Result<String, Error> {
    let gpu = Gpu::get(0)?;
    let family = parse_family(&args.family)?;
    let dtype = match args.dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        x => return Err(Error::invalid("--dtype", x, "f16 or bf16")),
    };
    if !matches!(args.pass.as_str(), "fwd" | "bwd") {
        return Err(Error::invalid("--pass", &args.pass, "fwd or bwd"));
    }
    let masks: Vec<bool> = match args.masks.as_str() {
        "both" => vec![false, true],
        "causal" => vec![true],
        "full" => vec![false],
        x => return Err(Error::invalid("--masks", x, "both, causal or full")),
    };
    let mut tiles: Vec<Option<fa2::Tile>> = Vec::new();
    for t in &args.tile {
        let tile = fa2::Tile::parse(t)
            .ok_or_else(|| Error::invalid("--tile", t, "BQxBKwW, e.g. 128x64w8"))?;
        tiles.push(Some(tile));
    }
    if tiles.is_empty() {
        tiles.push(None);
    }
    // One pool of random inputs, viewed with each case's shape (batch * seqlen * heads * d is
    // the same for every case with seqlen <= tokens). Each set is tokens x hidden per tensor.
    let max_elems = args
        .head_dims
        .iter()
        .flat_map(|&d| {
            args.seqlens
                .iter()
                .map(move |&s| (args.tokens / s).max(1) * s * (args.hidden / d).max(1) * d)
        })
        .max()
        .unwrap_or(0);
    let n_tensors = if args.pass == "bwd" { 4 } else { 3 };
    let mut base: Vec<Vec<DeviceTensor>> = Vec::new();
    for s in 0..args.sets.max(1) {
        let mut set = Vec::new();
        for t in 0..4 {
            let seed = (s * 16 + t + 1) as u64;
            if t < n_tensors {
                set.push(DeviceTensor::upload(
                    &gpu,
                    &Tensor::random(dtype, &[max_elems], seed),
                )?);
            } else {
                set.push(set[0].clone());
            }
        }
        base.push(set);
    }
    let mut rows = Vec::new();
    let mut log = String::new();
    for &d in &args.head_dims {
        let heads = (args.hidden / d).max(1);
        for &seqlen in &args.seqlens {
            let batch = (args.tokens / seqlen).max(1);
            let shape = [batch, seqlen, heads, d];
            let strides = [seqlen * heads * d, heads * d, d, 1];
            let mut sets = Vec::new();
            for b in &base {
                let view = |t: &DeviceTensor| t.view(&shape, &strides, 0);
                sets.push(Inputs {
                    q: view(&b[0])?,
                    k: view(&b[1])?,
                    v: view(&b[2])?,
                    out: DeviceTensor::alloc(&gpu, dtype, &shape)?,
                    lse: DeviceTensor::alloc(&gpu, DType::F32, &[batch, heads, seqlen])?,
                    dout: view(&b[3])?,
                });
            }
            let ht = Tensor::zeros(dtype, &shape);
            for &causal in &masks {
                let opts = AttnOptions::new().causal(causal);
                let problem = Problem::new(&Qkv::dense(&ht, &ht, &ht), &opts)?;
                let mut flops = problem.forward_flops();
                if args.pass == "bwd" {
                    flops *= 2.5;
                }
                for tile in &tiles {
                    let (ms, finite) =
                        time_case(&gpu, args, family, *tile, &sets, &problem, &opts)?;
                    let tile_name = match (family, tile) {
                        (_, Some(t)) => t.to_string(),
                        (Family::Fa2, None) => {
                            let f = fa2::Features::of(&problem, &opts);
                            let max = gpu.max_smem_optin() as usize;
                            fa2::fit_tile(fa2::tile_for(d, f), d, max).to_string()
                        }
                        _ => "-".to_string(),
                    };
                    let row = Row {
                        d,
                        seqlen,
                        batch,
                        heads,
                        causal,
                        family: args.family.clone(),
                        tile: tile_name,
                        ms,
                        tflops: flops / (ms * 1e-3) / 1e12,
                        finite,
                    };
                    if !args.json {
                        eprintln!(
                            "d={d} seqlen={seqlen} causal={causal} tile={} {:.3} ms {:.1} TFLOP/s",
                            row.tile, row.ms, row.tflops
                        );
                    }
                    rows.push(row);
                }
            }
        }
    }
    let mem = if args.mem_seqlen > 0 && args.pass == "fwd" {
        match memory_report(&gpu, dtype, args.mem_seqlen, family) {
            Ok(s) => s,
            Err(e) => format!("memory: report failed: {e}"),
        }
    } else {
        String::new()
    };
    if args.json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"impl\":\"flashattn\",\"pass\":\"{}\",\"family\":\"{}\",\"tile\":\"{}\",\"dtype\":\"{}\",\"d\":{},\"seqlen\":{},\"batch\":{},\"heads\":{},\"causal\":{},\"ms\":{:.5},\"tflops\":{:.2},\"finite\":{}}}",
                    args.pass, r.family, r.tile, dtype, r.d, r.seqlen, r.batch, r.heads, r.causal, r.ms, r.tflops, r.finite
                )
            })
            .collect();
        return Ok(format!(
            "{{\"device\":\"{}\",\"rows\":[{}],\"memory\":\"{}\"}}\n",
            gpu.device_name(),
            items.join(","),
            mem.replace('"', "'")
        ));
    }
    log.push_str(&format!(
        "flashattn CUDA {} ({}, family {}) on {}\n",
        args.pass,
        dtype,
        args.family,
        gpu.device_name()
    ));
    log.push_str("   d  seqlen  batch heads causal  tile          ms   TFLOP/s\n");
    for r in &rows {
        log.push_str(&format!(
            "{:4} {:7} {:6} {:5} {:6}  {:10} {:9.3} {:9.1}{}\n",
            r.d,
            r.seqlen,
            r.batch,
            r.heads,
            r.causal,
            r.tile,
            r.ms,
            r.tflops,
            if r.finite { "" } else { "  NON-FINITE OUTPUT" }
        ));
    }
    if !mem.is_empty() {
        log.push_str(&mem);
        log.push('\n');
    }
    Ok(log)
}
