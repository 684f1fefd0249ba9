//! Criterion benchmarks of the CPU backend on small shapes (forward and backward, f32 and
//! bf16, causal and not). The full sweep against the naive baseline and the GEMM rate is
//! `flashattn bench --device cpu`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flashattn::{backward, forward, AttnOptions, DType, Device, Problem, Qkv, Tensor};

fn bench_cpu(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10);
    for &(dtype, s, d, causal) in &[
        (DType::F32, 256, 64, false),
        (DType::F32, 512, 128, false),
        (DType::F32, 512, 128, true),
        (DType::BF16, 512, 128, true),
    ] {
        let shape = [1, s, 2, d];
        let q = Tensor::random(dtype, &shape, 1);
        let k = Tensor::random(dtype, &shape, 2);
        let v = Tensor::random(dtype, &shape, 3);
        let dout = Tensor::random(dtype, &shape, 4);
        let qkv = Qkv::dense(&q, &k, &v);
        let opts = AttnOptions::new().causal(causal);
        let flops = Problem::new(&qkv, &opts).unwrap().forward_flops();
        let name = format!("{dtype}_s{s}_d{d}{}", if causal { "_causal" } else { "" });
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_function(BenchmarkId::new("forward", &name), |b| {
            b.iter(|| forward(&qkv, &opts, Device::Cpu).unwrap())
        });
        let f = forward(&qkv, &opts, Device::Cpu).unwrap();
        g.throughput(Throughput::Elements((2.5 * flops) as u64));
        g.bench_function(BenchmarkId::new("backward", &name), |b| {
            b.iter(|| backward(&qkv, &f.out, &f.lse, &dout, &opts, Device::Cpu).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench_cpu);
criterion_main!(benches);
