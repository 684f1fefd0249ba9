//! Criterion benchmarks of the CPU backend on small shapes (forward and backward, f32 and
//! bf16, causal and not). The full sweep against the naive baseline and the GEMM rate is
//! `flashattn bench --device cpu`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flashattn::{backward, forward, AttnOptions, DType, Device, Problem, Qkv, Tensor};

fn rand_tensor(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_f32_as(&v, shape, dtype).unwrap()
}

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
        let q = rand_tensor(&shape, dtype, 1);
        let k = rand_tensor(&shape, dtype, 2);
        let v = rand_tensor(&shape, dtype, 3);
        let dout = rand_tensor(&shape, dtype, 4);
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
