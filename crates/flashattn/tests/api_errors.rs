//! One test per error class of SPEC §2 through the public API: each must be an `Err` (never a
//! panic) whose message names the offending argument.

mod common;

use common::*;
use flashattn::{
    backward, forward, AlibiSlopes, AttnOptions, DType, Device, Error, Qkv, Storage, Tensor,
};

fn t(shape: &[usize]) -> Tensor {
    rand_tensor(DType::F32, shape, shape.iter().sum::<usize>() as u64)
}

/// Forward error message for these inputs (panics if the call succeeds).
fn fwd_err(qkv: &Qkv<'_>, o: &AttnOptions) -> String {
    match forward(qkv, o, Device::Cpu) {
        Ok(_) => panic!("expected an error for {o:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_names(msg: &str, arg: &str) {
    assert!(
        msg.contains(&format!("`{arg}`")),
        "message does not name `{arg}`: {msg}"
    );
}

#[test]
fn shape_mismatch() {
    let q = t(&[2, 5, 2, 8]);
    let k = t(&[2, 6, 2, 8]);
    // v differs from k.
    let v = t(&[2, 7, 2, 8]);
    assert_names(&fwd_err(&Qkv::dense(&q, &k, &v), &AttnOptions::new()), "v");
    // Wrong rank.
    let q3 = t(&[10, 2, 8]);
    assert_names(&fwd_err(&Qkv::dense(&q3, &k, &k), &AttnOptions::new()), "q");
    // Batch differs.
    let k3 = t(&[3, 6, 2, 8]);
    assert_names(
        &fwd_err(&Qkv::dense(&q, &k3, &k3), &AttnOptions::new()),
        "k",
    );
    // Head dim differs.
    let k9 = t(&[2, 6, 2, 9]);
    let msg = fwd_err(&Qkv::dense(&q, &k9, &k9), &AttnOptions::new());
    assert_names(&msg, "k");
    assert!(msg.contains('9') && msg.contains('8'), "{msg}");
    // ALiBi slopes of the wrong length.
    let o = AttnOptions::new().alibi(AlibiSlopes::per_head(vec![0.1; 3]));
    assert_names(&fwd_err(&Qkv::dense(&q, &k, &k), &o), "alibi_slopes");
    let o = AttnOptions::new().alibi(AlibiSlopes::per_batch(vec![0.1; 2]));
    assert_names(&fwd_err(&Qkv::dense(&q, &k, &k), &o), "alibi_slopes");
}

#[test]
fn heads_not_a_multiple() {
    let q = t(&[1, 5, 3, 8]);
    let k = t(&[1, 5, 2, 8]);
    let msg = fwd_err(&Qkv::dense(&q, &k, &k), &AttnOptions::new());
    assert_names(&msg, "heads");
    assert!(msg.contains('3') && msg.contains('2'), "{msg}");
    let k0 = t(&[1, 5, 0, 8]);
    assert_names(
        &fwd_err(&Qkv::dense(&q, &k0, &k0), &AttnOptions::new()),
        "heads",
    );
}

#[test]
fn unsupported_head_dim() {
    let q = t(&[1, 2, 1, 513]);
    let msg = fwd_err(&Qkv::dense(&q, &q, &q), &AttnOptions::new());
    assert_names(&msg, "head_dim");
    assert!(msg.contains("513"), "{msg}");
    let q = t(&[1, 2, 1, 0]);
    assert_names(
        &fwd_err(&Qkv::dense(&q, &q, &q), &AttnOptions::new()),
        "head_dim",
    );
}

#[test]
fn bad_cu_seqlens() {
    let q = t(&[6, 2, 8]);
    let k = t(&[7, 2, 8]);
    let o = AttnOptions::new();
    let cases: &[(&[i32], &[i32], &str)] = &[
        (&[1, 6], &[0, 7], "cu_seqlens_q"), // does not start at 0
        (&[0, 4, 2, 6], &[0, 1, 2, 7], "cu_seqlens_q"), // decreasing
        (&[0, 5], &[0, 7], "cu_seqlens_q"), // last != total_q
        (&[0, 6], &[0, 8], "cu_seqlens_k"), // last != total_k
        (&[0, 3, 6], &[0, 7], "cu_seqlens_k"), // length mismatch
        (&[], &[0, 7], "cu_seqlens_q"),     // empty
        (&[0, 6], &[0, -1, 7], "cu_seqlens_k"), // negative / decreasing
    ];
    for &(cq, ck, arg) in cases {
        let msg = fwd_err(&Qkv::varlen(&q, &k, &k, cq, ck), &o);
        assert_names(&msg, arg);
    }
}

#[test]
fn options_out_of_range() {
    let q = t(&[1, 4, 2, 8]);
    let qkv = Qkv::dense(&q, &q, &q);
    let cases = [
        (AttnOptions::new().window(-2, 0), "window"),
        (AttnOptions::new().window(3, -5), "window"),
        (AttnOptions::new().causal(true).window(2, 1), "window"),
        (AttnOptions::new().softcap(-1.0), "softcap"),
        (AttnOptions::new().softcap(f32::NAN), "softcap"),
        (AttnOptions::new().softcap(f32::INFINITY), "softcap"),
        (AttnOptions::new().dropout(1.0, 0), "dropout"),
        (AttnOptions::new().dropout(-0.1, 0), "dropout"),
        (AttnOptions::new().dropout(f32::NAN, 0), "dropout"),
        (AttnOptions::new().scale(f32::NAN), "scale"),
        (
            AttnOptions::new().alibi(AlibiSlopes::per_head(vec![0.1, f32::NAN])),
            "alibi_slopes",
        ),
    ];
    for (o, arg) in cases {
        assert_names(&fwd_err(&qkv, &o), arg);
    }
}

#[test]
fn non_contiguous_last_dim() {
    let base = t(&[1, 4, 2, 16]);
    // Every other element of the last dim: stride 2.
    let q = Tensor::strided(base.storage().clone(), &[1, 4, 2, 8], &[128, 32, 16, 2], 0).unwrap();
    let k = t(&[1, 4, 2, 8]);
    let msg = fwd_err(&Qkv::dense(&q, &k, &k), &AttnOptions::new());
    assert_names(&msg, "q");
    assert!(msg.contains("stride"), "{msg}");
    let msg = fwd_err(&Qkv::dense(&k, &k, &q), &AttnOptions::new());
    assert_names(&msg, "v");
}

#[test]
fn dtype_mismatch() {
    let q = t(&[1, 4, 2, 8]);
    let k = rand_tensor(DType::BF16, &[1, 4, 2, 8], 1);
    let msg = fwd_err(&Qkv::dense(&q, &k, &k), &AttnOptions::new());
    assert!(msg.contains("dtype"), "{msg}");
    assert!(msg.contains("bf16") && msg.contains("f32"), "{msg}");
}

#[test]
fn bad_backward_tensors() {
    let q = t(&[2, 5, 2, 8]);
    let k = t(&[2, 6, 1, 8]);
    let qkv = Qkv::dense(&q, &k, &k);
    let o = AttnOptions::new();
    let lse = Tensor::zeros(DType::F32, &[2, 2, 5]);
    let good = t(&[2, 5, 2, 8]);
    let bwd_err = |out: &Tensor, lse: &Tensor, dout: &Tensor| -> String {
        match backward(&qkv, out, lse, dout, &o, Device::Cpu) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    };
    // lse of the wrong shape (the transposed [b, s, h] layout) or dtype.
    assert_names(
        &bwd_err(&good, &Tensor::zeros(DType::F32, &[2, 5, 2]), &good),
        "lse",
    );
    assert_names(
        &bwd_err(&good, &Tensor::zeros(DType::BF16, &[2, 2, 5]), &good),
        "lse",
    );
    // dout / out of the wrong shape, dout of the wrong dtype.
    assert_names(&bwd_err(&good, &lse, &t(&[2, 5, 2, 7])), "dout");
    assert_names(&bwd_err(&t(&[2, 4, 2, 8]), &lse, &good), "out");
    let dout16 = rand_tensor(DType::F16, &[2, 5, 2, 8], 3);
    assert_names(&bwd_err(&good, &lse, &dout16), "dout");
    // dout with a strided last dim.
    let wide = t(&[2, 5, 2, 16]);
    let dout_s =
        Tensor::strided(wide.storage().clone(), &[2, 5, 2, 8], &[160, 32, 16, 2], 0).unwrap();
    assert_names(&bwd_err(&good, &lse, &dout_s), "dout");
    // The forward-side checks apply to backward too.
    let v_bad = t(&[2, 6, 1, 9]);
    let e = backward(
        &Qkv::dense(&q, &k, &v_bad),
        &good,
        &lse,
        &good,
        &o,
        Device::Cpu,
    )
    .unwrap_err();
    assert_names(&e.to_string(), "v");
}

#[test]
fn tensor_constructors_reject_bad_data() {
    let e = Tensor::new(Storage::F32(vec![0.0; 5]), &[2, 3]).unwrap_err();
    assert!(e.to_string().contains("tensor data"), "{e}");
    let e = Tensor::strided(Storage::F32(vec![0.0; 5]), &[2, 3], &[3, 1], 0).unwrap_err();
    assert!(e.to_string().contains("tensor strides"), "{e}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_without_the_feature_is_no_gpu() {
    let q = t(&[1, 4, 2, 8]);
    let qkv = Qkv::dense(&q, &q, &q);
    match forward(&qkv, &AttnOptions::new(), Device::Cuda(0)) {
        Err(Error::NoGpu(msg)) => assert!(msg.contains("cuda"), "{msg}"),
        other => panic!("expected NoGpu, got {other:?}"),
    }
    let lse = Tensor::zeros(DType::F32, &[1, 2, 4]);
    match backward(&qkv, &q, &lse, &q, &AttnOptions::new(), Device::Cuda(0)) {
        Err(Error::NoGpu(_)) => {}
        other => panic!("expected NoGpu, got {other:?}"),
    }
}

/// With the feature, a device ordinal that cannot exist is a clean error (no panic).
#[cfg(feature = "cuda")]
#[test]
fn cuda_device_that_does_not_exist_is_an_error() {
    let q = rand_tensor(DType::BF16, &[1, 4, 2, 64], 1);
    let qkv = Qkv::dense(&q, &q, &q);
    match forward(&qkv, &AttnOptions::new(), Device::Cuda(4096)) {
        Err(Error::NoGpu(_)) | Err(Error::NoNvrtc(_)) | Err(Error::Cuda(_)) => {}
        other => panic!("expected a no-GPU error, got {other:?}"),
    }
}

/// Validation happens before the device is touched, so user errors read the same on every
/// device (and never reach a kernel).
#[test]
fn validation_precedes_device_dispatch() {
    let q = t(&[1, 5, 3, 8]);
    let k = t(&[1, 5, 2, 8]);
    for dev in [Device::Cpu, Device::Cuda(0)] {
        let e = forward(&Qkv::dense(&q, &k, &k), &AttnOptions::new(), dev).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{dev}: {e}");
    }
}
