//! The CUDA runtime without attention kernels: errors instead of panics when no GPU, the NVRTC
//! JIT and its disk cache (hit, timing, corruption), and device round trips when a GPU exists.
#![cfg(feature = "cuda")]

use flashattn::cuda::cache::DiskCache;
use flashattn::cuda::jit::{self, CacheOutcome, KernelSpec};
use flashattn::cuda::{loader, DeviceTensor, Gpu};
use flashattn::{DType, Error, Tensor};
use std::time::Instant;

fn nvrtc_or_skip() -> bool {
    match loader::nvrtc() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("FLASHATTN_REQUIRE_NVRTC").as_deref() == Ok("1") {
                panic!("FLASHATTN_REQUIRE_NVRTC=1 but {e}");
            }
            eprintln!("skipping: {e}");
            false
        }
    }
}

fn temp_cache(tag: &str) -> DiskCache {
    let dir = std::env::temp_dir().join(format!("flashattn-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    DiskCache::at(dir)
}

fn axpy(alpha: &str) -> KernelSpec {
    KernelSpec::new("test/axpy.cu", "axpy").define("ALPHA", alpha)
}

#[test]
fn no_gpu_is_an_error_not_a_panic() {
    let r = std::panic::catch_unwind(|| Gpu::get(0).map(|_| ()));
    let r = r.expect("Gpu::get must not panic");
    match r {
        Ok(()) => eprintln!("a GPU is present; the no-GPU path is not exercised here"),
        Err(Error::NoGpu(m)) => eprintln!("no GPU (as expected here): {m}"),
        Err(Error::NoNvrtc(m)) => eprintln!("GPU but no NVRTC: {m}"),
        Err(e) => panic!("unexpected error kind: {e}"),
    }
    // Through the public API as well.
    let q = Tensor::from_f32_as(&[0.5; 16], &[1, 2, 1, 8], DType::F16).unwrap();
    let res = std::panic::catch_unwind(|| {
        flashattn::forward(
            &flashattn::Qkv::dense(&q, &q, &q),
            &Default::default(),
            flashattn::Device::Cuda(0),
        )
    })
    .expect("forward on cuda must not panic");
    if let Err(e) = res {
        eprintln!("forward on cuda:0: {e}");
    }
}

#[test]
fn info_report_does_not_panic() {
    let s = flashattn::cuda::info_report();
    eprintln!("{s}");
    assert!(s.contains("NVRTC"));
    assert!(s.contains("kernel cache"));
}

#[test]
fn compile_reports_resources_and_cache_hits() {
    if !nvrtc_or_skip() {
        return;
    }
    let cache = temp_cache("hit");
    let spec = axpy("3.0f");
    let t = Instant::now();
    let (c1, o1) = jit::compile_with(&spec, "sm_80", Some(&cache)).unwrap();
    let cold = t.elapsed();
    assert_eq!(o1, CacheOutcome::Miss);
    assert!(c1.cubin.starts_with(b"\x7fELF"), "CUBIN is an ELF image");
    assert!(
        c1.resources.registers > 0,
        "ptxas -v report parsed: {:?}\n{}",
        c1.resources,
        c1.log
    );
    assert!(!c1.resources.spills());

    let t = Instant::now();
    let (c2, o2) = jit::compile_with(&spec, "sm_80", Some(&cache)).unwrap();
    let hit = t.elapsed();
    assert_eq!(o2, CacheOutcome::Hit);
    assert_eq!(c1.cubin, c2.cubin);
    assert_eq!(c1.resources, c2.resources);
    eprintln!("axpy sm_80: cold compile {cold:?}, cache hit {hit:?}");
    assert!(hit.as_millis() < 50, "cache hit took {hit:?}");

    // Another define or arch is another entry.
    let (_, o3) = jit::compile_with(&axpy("4.0f"), "sm_80", Some(&cache)).unwrap();
    assert_eq!(o3, CacheOutcome::Miss);
    let (c4, o4) = jit::compile_with(&spec, "sm_90a", Some(&cache)).unwrap();
    assert_eq!(o4, CacheOutcome::Miss);
    assert_ne!(c4.cubin, c1.cubin);
    assert_eq!(cache.entries(), 3);
    let _ = std::fs::remove_dir_all(cache.dir());
}

#[test]
fn corrupt_cache_entries_are_rebuilt() {
    if !nvrtc_or_skip() {
        return;
    }
    let cache = temp_cache("corrupt");
    let spec = axpy("5.0f");
    let (good, _) = jit::compile_with(&spec, "sm_86", Some(&cache)).unwrap();
    let key = jit::cache_key(&spec, "sm_86").unwrap();
    let path = cache.path(key);
    let bytes = std::fs::read(&path).unwrap();

    // A flipped byte in the CUBIN, a truncated file, garbage: each is rebuilt, never trusted.
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    for bad in [
        flipped,
        bytes[..bytes.len() / 3].to_vec(),
        b"garbage".to_vec(),
    ] {
        std::fs::write(&path, &bad).unwrap();
        let (c, o) = jit::compile_with(&spec, "sm_86", Some(&cache)).unwrap();
        assert_eq!(o, CacheOutcome::Rebuilt);
        assert_eq!(c.cubin, good.cubin);
        let rewritten = std::fs::read(&path).unwrap();
        assert!(
            rewritten.len() > good.cubin.len() && rewritten != bad,
            "file rewritten"
        );
        let (_, o) = jit::compile_with(&spec, "sm_86", Some(&cache)).unwrap();
        assert_eq!(o, CacheOutcome::Hit);
    }
    let _ = std::fs::remove_dir_all(cache.dir());
}

#[test]
fn compile_errors_carry_the_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let spec = KernelSpec::new("test/axpy.cu", "axpy").define("ALPHA", "undefined_symbol");
    match jit::compile_with(&spec, "sm_80", None) {
        Err(Error::Compile(m)) => assert!(m.contains("undefined_symbol"), "{m}"),
        other => panic!("expected a compile error, got {:?}", other.map(|c| c.1)),
    }
    let missing = KernelSpec::new("nope/none.cu", "x");
    assert!(matches!(
        jit::compile_with(&missing, "sm_80", None),
        Err(Error::Compile(_))
    ));
}

#[test]
fn device_roundtrip_when_a_gpu_exists() {
    let gpu = match Gpu::get(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("skipping device round trip: {e}");
            return;
        }
    };
    eprintln!(
        "{gpu:?} arch {} target {}",
        gpu.arch(),
        gpu.arch().nvrtc_name()
    );
    let data: Vec<f32> = (0..1000).map(|i| i as f32 * 0.25 - 7.0).collect();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let host = Tensor::from_f32_as(&data, &[10, 4, 25], dtype).unwrap();
        let dev = DeviceTensor::upload(&gpu, &host).unwrap();
        assert_eq!(
            (dev.dtype(), dev.shape(), dev.strides()),
            (dtype, &[10, 4, 25][..], &[100, 25, 1][..])
        );
        assert_eq!(dev.download().unwrap(), host);
        // A strided view: [10, 25] at head 2.
        let view = dev.view(&[10, 25], &[100, 1], 50).unwrap();
        let d = &data;
        let want: Vec<f32> = (0..10)
            .flat_map(|b| (0..25).map(move |j| d[b * 100 + 50 + j]))
            .collect();
        assert_eq!(
            view.download().unwrap().to_f32_vec(),
            host_round(&want, dtype)
        );
        dev.fill_poison().unwrap();
        assert!(dev
            .download()
            .unwrap()
            .to_f32_vec()
            .iter()
            .all(|x| x.is_nan()));
    }
    // A zero-size tensor is fine.
    let empty = DeviceTensor::alloc(&gpu, DType::BF16, &[0, 3]).unwrap();
    assert_eq!(empty.download().unwrap().numel(), 0);

    // A JIT kernel launch: y = 2x + y.
    use cudarc::driver::PushKernelArg;
    let f = gpu.kernel(&axpy("2.0f")).unwrap();
    let n = 1000u32;
    let x = DeviceTensor::upload(&gpu, &Tensor::from_f32(data.clone(), &[1000]).unwrap()).unwrap();
    let y =
        DeviceTensor::upload(&gpu, &Tensor::from_f32(vec![1.0; 1000], &[1000]).unwrap()).unwrap();
    let (px, py) = (x.ptr(), y.ptr());
    let cfg = cudarc::driver::LaunchConfig::for_num_elems(n);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&px).arg(&py).arg(&n);
    // SAFETY: axpy(const float*, float*, unsigned) gets two live 1000-element f32 buffers.
    unsafe { b.launch(cfg) }.unwrap();
    let got = y.download().unwrap().to_f32_vec();
    assert!(got.iter().zip(&data).all(|(g, x)| *g == 2.0 * x + 1.0));

    // Out of memory is an error, not a panic.
    match DeviceTensor::alloc(&gpu, DType::F32, &[1 << 40]) {
        Err(Error::OutOfMemory(m)) => eprintln!("OOM as expected: {m}"),
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
}

fn host_round(v: &[f32], dtype: DType) -> Vec<f32> {
    Tensor::from_f32_as(v, &[v.len()], dtype)
        .unwrap()
        .to_f32_vec()
}

/// Cold NVRTC compile time of the first variant of each family (no cache), and a disk-cache
/// hit of the same, only with FLASHATTN_TIMING=1 (it compiles real kernels, seconds each):
/// `FLASHATTN_TIMING=1 cargo test --features cuda --test cuda_runtime -- --nocapture cold_compile`.
#[test]
fn cold_compile_and_hit_times_per_family() {
    if std::env::var("FLASHATTN_TIMING").as_deref() != Ok("1") {
        eprintln!("skipped: timing report; set FLASHATTN_TIMING=1 to run it");
        return;
    }
    if !nvrtc_or_skip() {
        return;
    }
    let cache = temp_cache("timing");
    let firsts = [
        (
            "fa2 fwd",
            "sm_80",
            flashattn::cuda::fa2::all_variants("sm_80")
                .into_iter()
                .next(),
        ),
        (
            "fa2 bwd",
            "sm_80",
            flashattn::cuda::fa2_bwd::all_variants("sm_80")
                .into_iter()
                .find(|s| s.entry.contains("main")),
        ),
        (
            "fa3 fwd",
            "sm_90a",
            flashattn::cuda::fa3::all_variants("sm_90a")
                .into_iter()
                .next(),
        ),
    ];
    for (fam, arch, spec) in firsts {
        let Some(spec) = spec else {
            eprintln!("{fam}: no variants");
            continue;
        };
        let t = Instant::now();
        let (c, o) = jit::compile_with(&spec, arch, Some(&cache)).unwrap();
        let cold = t.elapsed();
        assert_eq!(o, CacheOutcome::Miss);
        let t = Instant::now();
        let (_, o) = jit::compile_with(&spec, arch, Some(&cache)).unwrap();
        let hit = t.elapsed();
        assert_eq!(o, CacheOutcome::Hit);
        eprintln!(
            "{fam} {arch} {}: cold {cold:.2?}, hit {hit:.2?}, {} B cubin, {:?}",
            spec.label(),
            c.cubin.len(),
            c.resources
        );
        assert!(cold.as_secs_f64() < 10.0, "cold compile over 10 s");
        assert!(hit.as_millis() < 50, "cache hit over 50 ms");
    }
    let _ = std::fs::remove_dir_all(cache.dir());
}
