//! The `flashattn` binary end to end: round trips against the library, and one test per error
//! class (clean `error:` line, non-zero exit, no panic text, output file untouched).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flashattn::{AlibiSlopes, AttnOptions, DType, Device, Qkv, Storage, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

const BIN: &str = env!("CARGO_BIN_EXE_flashattn");

/// A fresh directory for one test.
fn tmpdir(name: &str) -> PathBuf {
    let d =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

enum Entry {
    T(Tensor),
    I32(Vec<i32>),
    F32(Vec<f32>, Vec<usize>),
    Raw(Dtype, Vec<usize>, Vec<u8>),
}

/// A random tensor entry (`Tensor::random`: reproducible, never zero).
fn rand_entry(dtype: DType, shape: &[usize], seed: u64) -> Entry {
    Entry::T(Tensor::random(dtype, shape, seed))
}

fn bytes_of(t: &Tensor) -> (Dtype, Vec<u8>) {
    match t.contiguous().storage() {
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

fn write_st(path: &Path, entries: Vec<(&str, Entry)>) {
    let enc: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = entries
        .into_iter()
        .map(|(n, e)| match e {
            Entry::T(t) => {
                let (d, b) = bytes_of(&t);
                (n.to_string(), d, t.shape().to_vec(), b)
            }
            Entry::I32(v) => (
                n.to_string(),
                Dtype::I32,
                vec![v.len()],
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            Entry::F32(v, shape) => (
                n.to_string(),
                Dtype::F32,
                shape,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            Entry::Raw(d, shape, b) => (n.to_string(), d, shape, b),
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = enc
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    fs::write(
        path,
        safetensors::serialize(views, None::<HashMap<String, String>>).unwrap(),
    )
    .unwrap();
}

/// Reads every tensor of an output file as (dtype, shape, f32 values).
fn read_st(path: &Path) -> HashMap<String, (Dtype, Vec<usize>, Vec<f32>)> {
    let bytes = fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let d = v.data();
            let vals: Vec<f32> = match v.dtype() {
                Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::F16 => d
                    .chunks_exact(2)
                    .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                    .collect(),
                Dtype::BF16 => d
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                    .collect(),
                other => panic!("unexpected dtype {other:?}"),
            };
            (n, (v.dtype(), v.shape().to_vec(), vals))
        })
        .collect()
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run flashattn")
}

fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

/// Asserts a clean failure: non-zero exit, an `error:` line naming `needle`, no panic text.
fn assert_clean_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert!(
        err.starts_with("error:") || err.contains("\nerror:"),
        "no `error:` line: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic text: {err}"
    );
    assert!(
        err.contains(needle),
        "stderr does not mention `{needle}`: {err}"
    );
}

/// Runs a failing command with a pre-existing output file and checks the file is untouched and
/// no temporary file is left behind.
fn assert_fails_untouched(dir: &Path, args_without_output: &[&str], needle: &str) {
    let out = dir.join("out.safetensors");
    let sentinel = b"precious bytes that must survive".to_vec();
    fs::write(&out, &sentinel).unwrap();
    let mut args: Vec<&str> = args_without_output.to_vec();
    args.extend(["--output", p(&out)]);
    let o = run(&args);
    assert_clean_error(&o, needle);
    assert_eq!(fs::read(&out).unwrap(), sentinel, "output file changed");
    let leftovers: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

fn dense_input(dir: &Path, dtype: DType, with_dout: bool) -> PathBuf {
    let input = dir.join("in.safetensors");
    let mut e = vec![
        ("q", rand_entry(dtype, &[2, 33, 4, 16], 1)),
        ("k", rand_entry(dtype, &[2, 40, 2, 16], 2)),
        ("v", rand_entry(dtype, &[2, 40, 2, 16], 3)),
    ];
    if with_dout {
        e.push(("dout", rand_entry(dtype, &[2, 33, 4, 16], 4)));
    }
    write_st(&input, e);
    input
}

fn assert_same(got: &(Dtype, Vec<usize>, Vec<f32>), want: &Tensor) {
    assert_eq!(got.1, want.shape());
    let w = want.to_f32_vec();
    assert_eq!(got.2.len(), w.len());
    for (a, b) in got.2.iter().zip(&w) {
        assert_eq!(a.to_bits(), b.to_bits(), "{a} vs {b}");
    }
}

#[test]
fn forward_round_trip_matches_library() {
    let dir = tmpdir("fwd");
    for (dtype, sdt) in [
        (DType::F32, Dtype::F32),
        (DType::BF16, Dtype::BF16),
        (DType::F16, Dtype::F16),
    ] {
        let input = dense_input(&dir, dtype, false);
        let output = dir.join("out.safetensors");
        let o = run(&[
            "forward",
            "--input",
            p(&input),
            "--output",
            p(&output),
            "--device",
            "cpu",
            "--causal",
            "--window",
            "-1,0",
            "--softcap",
            "5",
            "--scale",
            "0.3",
            "--dropout",
            "0.2",
            "--seed",
            "77",
            "--offset",
            "3",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = read_st(&output);
        assert_eq!(got.len(), 2);
        assert_eq!(got["out"].0, sdt);
        assert_eq!(got["lse"].0, Dtype::F32);
        let q = Tensor::random(dtype, &[2, 33, 4, 16], 1);
        let k = Tensor::random(dtype, &[2, 40, 2, 16], 2);
        let v = Tensor::random(dtype, &[2, 40, 2, 16], 3);
        let opts = AttnOptions::new()
            .causal(true)
            .window(-1, 0)
            .softcap(5.0)
            .scale(0.3)
            .dropout(0.2, 77)
            .dropout_offset(3);
        let f = flashattn::forward(&Qkv::dense(&q, &k, &v), &opts, Device::Cpu).unwrap();
        assert_same(&got["out"], &f.out);
        assert_same(&got["lse"], &f.lse);
        assert_eq!(got["lse"].1, vec![2, 4, 33]);
    }
}

#[test]
fn varlen_alibi_round_trip() {
    let dir = tmpdir("varlen");
    let input = dir.join("in.safetensors");
    let (q, k, v) = (
        Tensor::random(DType::BF16, &[9, 4, 8], 5),
        Tensor::random(DType::BF16, &[12, 1, 8], 6),
        Tensor::random(DType::BF16, &[12, 1, 8], 7),
    );
    let (cq, ck) = (vec![0, 4, 4, 9], vec![0, 3, 10, 12]);
    let slopes: Vec<f32> = (0..12).map(|i| 0.05 * i as f32).collect();
    write_st(
        &input,
        vec![
            ("q", Entry::T(q.clone())),
            ("k", Entry::T(k.clone())),
            ("v", Entry::T(v.clone())),
            ("cu_seqlens_q", Entry::I32(cq.clone())),
            ("cu_seqlens_k", Entry::I32(ck.clone())),
            ("alibi_slopes", Entry::F32(slopes.clone(), vec![3, 4])),
        ],
    );
    let output = dir.join("o.safetensors");
    let o = run(&["forward", "-i", p(&input), "-o", p(&output), "--causal"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = read_st(&output);
    let opts = AttnOptions::new()
        .causal(true)
        .alibi(AlibiSlopes::per_batch(slopes));
    let f = flashattn::forward(&Qkv::varlen(&q, &k, &v, &cq, &ck), &opts, Device::Cpu).unwrap();
    assert_same(&got["out"], &f.out);
    assert_same(&got["lse"], &f.lse);
    assert_eq!(got["lse"].1, vec![4, 9]);
}

#[test]
fn backward_round_trip_matches_library() {
    let dir = tmpdir("bwd");
    let dtype = DType::BF16;
    let input = dense_input(&dir, dtype, true);
    let output = dir.join("grads.safetensors");
    let flags = [
        "--softcap",
        "3",
        "--dropout",
        "0.1",
        "--seed",
        "5",
        "--deterministic",
    ];
    let mut args = vec!["backward", "--input", p(&input), "--output", p(&output)];
    args.extend(flags);
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = read_st(&output);
    assert_eq!(got.len(), 3);
    let q = Tensor::random(dtype, &[2, 33, 4, 16], 1);
    let k = Tensor::random(dtype, &[2, 40, 2, 16], 2);
    let v = Tensor::random(dtype, &[2, 40, 2, 16], 3);
    let dout = Tensor::random(dtype, &[2, 33, 4, 16], 4);
    let opts = AttnOptions::new()
        .softcap(3.0)
        .dropout(0.1, 5)
        .deterministic(true);
    let qkv = Qkv::dense(&q, &k, &v);
    let f = flashattn::forward(&qkv, &opts, Device::Cpu).unwrap();
    let g = flashattn::backward(&qkv, &f.out, &f.lse, &dout, &opts, Device::Cpu).unwrap();
    assert_same(&got["dq"], &g.dq);
    assert_same(&got["dk"], &g.dk);
    assert_same(&got["dv"], &g.dv);
    assert_eq!(got["dq"].0, Dtype::BF16);

    // With out and lse supplied in the file (as `forward` writes them): the same gradients.
    let input2 = dir.join("in2.safetensors");
    write_st(
        &input2,
        vec![
            ("q", Entry::T(q.clone())),
            ("k", Entry::T(k.clone())),
            ("v", Entry::T(v.clone())),
            ("dout", Entry::T(dout.clone())),
            ("out", Entry::T(f.out.clone())),
            ("lse", Entry::T(f.lse.clone())),
        ],
    );
    let output2 = dir.join("grads2.safetensors");
    let mut args = vec!["backward", "--input", p(&input2), "--output", p(&output2)];
    args.extend(flags);
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_st(&output2)["dk"].2, got["dk"].2);
}

#[test]
fn forward_output_feeds_backward() {
    // forward's file + the inputs + dout, merged, is a valid backward input.
    let dir = tmpdir("chain");
    let input = dense_input(&dir, DType::F32, true);
    let fwd = dir.join("fwd.safetensors");
    assert!(
        run(&["forward", "-i", p(&input), "-o", p(&fwd), "--causal"])
            .status
            .success()
    );
    let f = read_st(&fwd);
    let i = read_st(&input);
    let t = |m: &HashMap<String, (Dtype, Vec<usize>, Vec<f32>)>, n: &str| {
        Entry::T(Tensor::from_f32(m[n].2.clone(), &m[n].1).unwrap())
    };
    let merged = dir.join("merged.safetensors");
    write_st(
        &merged,
        vec![
            ("q", t(&i, "q")),
            ("k", t(&i, "k")),
            ("v", t(&i, "v")),
            ("dout", t(&i, "dout")),
            ("out", t(&f, "out")),
            ("lse", t(&f, "lse")),
        ],
    );
    let g1 = dir.join("g1.safetensors");
    let g2 = dir.join("g2.safetensors");
    assert!(
        run(&["backward", "-i", p(&merged), "-o", p(&g1), "--causal"])
            .status
            .success()
    );
    assert!(
        run(&["backward", "-i", p(&input), "-o", p(&g2), "--causal"])
            .status
            .success()
    );
    assert_eq!(read_st(&g1)["dq"].2, read_st(&g2)["dq"].2);
}

#[test]
fn error_missing_input_file() {
    let dir = tmpdir("e-missing");
    let missing = dir.join("nope.safetensors");
    assert_fails_untouched(
        &dir,
        &["forward", "--input", p(&missing)],
        "nope.safetensors",
    );
}

#[test]
fn error_not_a_safetensors_file() {
    let dir = tmpdir("e-garbage");
    let input = dir.join("garbage.safetensors");
    fs::write(
        &input,
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a safetensors file",
    )
    .unwrap();
    assert_fails_untouched(&dir, &["forward", "--input", p(&input)], "safetensors");
    fs::write(&input, b"").unwrap();
    assert_fails_untouched(&dir, &["forward", "--input", p(&input)], "safetensors");
}

#[test]
fn error_missing_tensor() {
    let dir = tmpdir("e-tensor");
    let input = dir.join("in.safetensors");
    write_st(
        &input,
        vec![
            ("q", rand_entry(DType::F32, &[1, 4, 1, 8], 1)),
            ("k", rand_entry(DType::F32, &[1, 4, 1, 8], 2)),
        ],
    );
    assert_fails_untouched(&dir, &["forward", "--input", p(&input)], "`v`");
    // backward needs dout.
    let input = dense_input(&dir, DType::F32, false);
    assert_fails_untouched(&dir, &["backward", "--input", p(&input)], "`dout`");
}

#[test]
fn error_bad_shapes() {
    let dir = tmpdir("e-shapes");
    let input = dir.join("in.safetensors");
    write_st(
        &input,
        vec![
            ("q", rand_entry(DType::F32, &[1, 4, 3, 8], 1)),
            ("k", rand_entry(DType::F32, &[1, 4, 2, 8], 2)),
            ("v", rand_entry(DType::F32, &[1, 4, 2, 8], 3)),
        ],
    );
    assert_fails_untouched(&dir, &["forward", "--input", p(&input)], "heads");
    write_st(
        &input,
        vec![
            ("q", rand_entry(DType::F32, &[1, 4, 2, 8], 1)),
            ("k", rand_entry(DType::F32, &[1, 4, 2, 8], 2)),
            ("v", rand_entry(DType::F32, &[1, 5, 2, 8], 3)),
        ],
    );
    assert_fails_untouched(&dir, &["forward", "--input", p(&input)], "`v`");
    // Bad cu_seqlens, and only one of the pair.
    let qv = || rand_entry(DType::F32, &[6, 2, 8], 1);
    write_st(
        &input,
        vec![
            ("q", qv()),
            ("k", qv()),
            ("v", qv()),
            ("cu_seqlens_q", Entry::I32(vec![0, 7])),
            ("cu_seqlens_k", Entry::I32(vec![0, 6])),
        ],
    );
    assert_fails_untouched(&dir, &["forward", "--input", p(&input)], "cu_seqlens_q");
    write_st(
        &input,
        vec![
            ("q", qv()),
            ("k", qv()),
            ("v", qv()),
            ("cu_seqlens_q", Entry::I32(vec![0, 6])),
        ],
    );
    assert_fails_untouched(&dir, &["forward", "--input", p(&input)], "cu_seqlens_k");
    // ALiBi of the wrong length.
    write_st(
        &input,
        vec![
            ("q", rand_entry(DType::F32, &[1, 4, 2, 8], 1)),
            ("k", rand_entry(DType::F32, &[1, 4, 2, 8], 2)),
            ("v", rand_entry(DType::F32, &[1, 4, 2, 8], 3)),
            ("alibi_slopes", Entry::F32(vec![0.1; 3], vec![3])),
        ],
    );
    assert_fails_untouched(&dir, &["forward", "--input", p(&input)], "alibi_slopes");
    // Backward: lse of the wrong shape, out without lse.
    let input = dense_input(&dir, DType::F32, true);
    let mut t = read_st(&input);
    let e = |m: &mut HashMap<String, (Dtype, Vec<usize>, Vec<f32>)>, n: &str| {
        let (_, s, v) = m.remove(n).unwrap();
        Entry::T(Tensor::from_f32(v, &s).unwrap())
    };
    let bad = dir.join("bad.safetensors");
    let (q, k, v, dout) = (
        e(&mut t, "q"),
        e(&mut t, "k"),
        e(&mut t, "v"),
        e(&mut t, "dout"),
    );
    write_st(
        &bad,
        vec![
            ("q", q),
            ("k", k),
            ("v", v),
            ("dout", dout),
            ("out", rand_entry(DType::F32, &[2, 33, 4, 16], 8)),
            ("lse", rand_entry(DType::F32, &[2, 33, 4], 9)),
        ],
    );
    assert_fails_untouched(&dir, &["backward", "--input", p(&bad)], "`lse`");
}

#[test]
fn error_bad_flags() {
    let dir = tmpdir("e-flags");
    let input = dense_input(&dir, DType::F32, true);
    let i = p(&input);
    assert_fails_untouched(
        &dir,
        &["forward", "--input", i, "--dropout", "1.5"],
        "dropout",
    );
    assert_fails_untouched(
        &dir,
        &["forward", "--input", i, "--softcap", "-1"],
        "softcap",
    );
    assert_fails_untouched(
        &dir,
        &["forward", "--input", i, "--window", "-3,2"],
        "window",
    );
    assert_fails_untouched(
        &dir,
        &["forward", "--input", i, "--window", "abc"],
        "window",
    );
    assert_fails_untouched(
        &dir,
        &["forward", "--input", i, "--causal", "--window", "4,4"],
        "window",
    );
    assert_fails_untouched(&dir, &["forward", "--input", i, "--scale", "nan"], "scale");
    assert_fails_untouched(&dir, &["forward", "--input", i, "--device", "tpu"], "tpu");
    assert_fails_untouched(
        &dir,
        &["backward", "--input", i, "--no-such-flag"],
        "--no-such-flag",
    );
    assert_fails_untouched(&dir, &["forward", "--input", i, "--seed", "-4"], "seed");
    // A missing required flag: nothing to touch, but still a clean error.
    assert_clean_error(&run(&["forward", "--input", i]), "--output");
}

#[test]
fn error_wrong_dtype() {
    let dir = tmpdir("e-dtype");
    let input = dir.join("in.safetensors");
    // f64 q.
    write_st(
        &input,
        vec![
            ("q", Entry::Raw(Dtype::F64, vec![1, 2, 1, 4], vec![0u8; 64])),
            ("k", rand_entry(DType::F32, &[1, 2, 1, 4], 2)),
            ("v", rand_entry(DType::F32, &[1, 2, 1, 4], 3)),
        ],
    );
    assert_fails_untouched(&dir, &["forward", "--input", p(&input)], "`q`");
    // q f32 with k bf16.
    write_st(
        &input,
        vec![
            ("q", rand_entry(DType::F32, &[1, 2, 1, 4], 1)),
            ("k", rand_entry(DType::BF16, &[1, 2, 1, 4], 2)),
            ("v", rand_entry(DType::BF16, &[1, 2, 1, 4], 3)),
        ],
    );
    assert_fails_untouched(&dir, &["forward", "--input", p(&input)], "dtype");
    // cu_seqlens as f32.
    let qv = || rand_entry(DType::F32, &[6, 2, 8], 1);
    write_st(
        &input,
        vec![
            ("q", qv()),
            ("k", qv()),
            ("v", qv()),
            ("cu_seqlens_q", Entry::F32(vec![0.0, 6.0], vec![2])),
            ("cu_seqlens_k", Entry::I32(vec![0, 6])),
        ],
    );
    assert_fails_untouched(&dir, &["forward", "--input", p(&input)], "cu_seqlens_q");
}

#[test]
fn error_output_directory_missing() {
    let dir = tmpdir("e-outdir");
    let input = dense_input(&dir, DType::F32, false);
    let out = dir.join("no/such/dir/out.safetensors");
    let o = run(&["forward", "--input", p(&input), "--output", p(&out)]);
    assert_clean_error(&o, "out.safetensors");
    assert!(!out.exists());
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_cuda_support_is_a_clean_error() {
    let dir = tmpdir("e-cuda");
    let input = dense_input(&dir, DType::BF16, true);
    assert_fails_untouched(
        &dir,
        &["forward", "--input", p(&input), "--device", "cuda"],
        "CUDA",
    );
    assert_fails_untouched(
        &dir,
        &["backward", "--input", p(&input), "--device", "cuda:1"],
        "CUDA",
    );
    assert_clean_error(&run(&["bench", "--device", "cuda"]), "CUDA");
    assert_clean_error(
        &run(&["kernels", "--compile-all", "--arch", "sm_80"]),
        "CUDA",
    );
    let o = run(&["info"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("no CUDA support"));
}

/// With CUDA support built in, a device that cannot exist is a clean error too.
#[cfg(feature = "cuda")]
#[test]
fn cuda_missing_device_is_a_clean_error() {
    let dir = tmpdir("e-cuda");
    let input = dense_input(&dir, DType::BF16, true);
    assert_fails_untouched(
        &dir,
        &["forward", "--input", p(&input), "--device", "cuda:4096"],
        "error",
    );
}

#[test]
fn info_and_help_work() {
    let o = run(&["info"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("CPU backend"));
    let o = run(&["--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for c in ["forward", "backward", "bench", "info", "kernels"] {
        assert!(help.contains(c), "{help}");
    }
    let o = run(&["bench", "--device", "cpu", "--help"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("--seqlens"));
    assert_clean_error(&run(&["kernels"]), "--compile-all");
}

#[test]
fn cpu_bench_runs_a_tiny_sweep() {
    let o = run(&[
        "bench",
        "--device",
        "cpu",
        "--tokens",
        "64",
        "--hidden",
        "32",
        "--head-dims",
        "32",
        "--seqlens",
        "64",
        "--repeats",
        "1",
        "--gemm-size",
        "64",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!o.stdout.is_empty());
}

#[test]
fn bench_argument_errors_are_clean() {
    assert_clean_error(&run(&["bench", "--device", "cpu", "--bogus"]), "--bogus");
    assert_clean_error(&run(&["bench", "--device", "quantum"]), "quantum");
    assert_clean_error(&run(&["bench", "--tokens", "64", "--device", "tpu"]), "tpu");
    // --device after the benchmark's options still selects the device.
    #[cfg(not(feature = "cuda"))]
    assert_clean_error(
        &run(&["bench", "--tokens", "64", "--device", "cuda"]),
        "CUDA",
    );
}
