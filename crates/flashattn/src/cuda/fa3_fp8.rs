//! Host side of the FP8 (e4m3) Hopper forward: `kernels/sm90/fwd.cu` with `FA3_DT=2`, plus the
//! V pre-pass `kernels/sm90/fp8_vt.cu`.
//!
//! Inputs are [`Fp8Tensor`]s (`[batch, seqlen, heads, d]` e4m3 codes with per-tensor or
//! per-(batch, head) descales, see [`crate::fp8`]); the output is bf16 `[batch, sq, heads_q, d]`
//! and the LSE f32 `[batch, heads_q, sq]` of the *real* scores
//! `scale · q_descale · k_descale · Q Kᵀ`.
//!
//! The PV wgmma on 8-bit types needs both operands K-major, i.e. Vᵀ with keys contiguous. Two
//! ways, chosen by [`in_kernel_transpose`]: a **separate pre-pass kernel** (`fa3_fp8_vt`, one
//! extra read and write of V, launched before the attention kernel on the same stream; the
//! default above 1024 keys, 2048 for causal problems), or the **in-kernel transpose**
//! (`FA3_VTK=1`: the producer warpgroup TMA-loads V as stored and transposes it in shared
//! memory; [`attention_into_raw_v`]).
//!
//! Envelope: sm 9.0; head dims 64, 128, 256; dense (no cu_seqlens); no mask or causal
//! (bottom-right); GQA/MQA; any lengths; a positive finite scale. Sliding windows, softcap,
//! ALiBi, dropout and varlen are **not** supported for FP8 and return
//! [`Error::Unsupported`](crate::Error) naming the option.

use super::context::{driver_err, Gpu};
use super::fa3::{encode_raw, o_map, o_stage_bytes, Fa3Params, OStaging, MAX_LEN, SMEM_LIMIT};
use super::jit::KernelSpec;
use super::tensor::{DeviceBuffer, DeviceTensor};
use crate::error::{Error, Result};
use crate::fp8::{Fp8Scaling, Fp8Tensor};
use crate::options::AttnOptions;
use crate::tensor::{DType, Tensor};
use crate::ForwardOutput;
use cudarc::driver::sys;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Head dims with a compiled FP8 variant.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];
/// Key tile (one Vᵀ row of 128 bytes is one 128-byte swizzle row).
pub const BK: usize = 128;
/// Query rows per CTA (two consumer warpgroups).
pub const BQ: usize = 128;
/// The V pre-pass.
pub const VT_SOURCE: &str = "sm90/fp8_vt.cu";
pub const VT_ENTRY: &str = "fa3_fp8_vt";

/// Whether [`forward`] transposes V inside the attention kernel (`FA3_VTK=1`) instead of the
/// pre-pass, for `sk` keys and the mask: `FLASHATTN_FP8_VT=kernel` or `prepass` overrides the
/// shipped choice ([`vtk_by_default`]).
pub fn in_kernel_transpose(sk: usize, causal: bool) -> bool {
    match std::env::var("FLASHATTN_FP8_VT").as_deref() {
        Ok("kernel") => true,
        Ok("prepass") => false,
        _ => vtk_by_default(sk, causal),
    }
}
/// The shipped choice: the in-kernel transpose up to [`VTK_MAX_SK`] keys, and for causal
/// problems up to [`VTK_MAX_SK_CAUSAL`], where the pre-pass's extra launch and pass over V cost
/// more than the transpose's shared-memory traffic inside a kernel that already has less work
/// per tile. H100, d = 64 / 128 / 256 (bench/RESULTS.md "Step 22", three rounds), against
/// pre-pass + kernel: 1k plain −1..+15%, 1k causal +5..12%, 2k causal +2..13%; 2k plain
/// −6..0%, 4k plain −10..0%, 4k causal −9..+4%. H200, alternating rounds (d = 128 / 256 at
/// 4k, "Step 33b"): the in-kernel transpose 5–17% slower than the pre-pass path.
pub fn vtk_by_default(sk: usize, causal: bool) -> bool {
    sk <= if causal {
        VTK_MAX_SK_CAUSAL
    } else {
        VTK_MAX_SK
    }
}
/// Longest key sequence for which [`vtk_by_default`] picks the in-kernel transpose.
pub const VTK_MAX_SK: usize = 1024;
/// [`VTK_MAX_SK`] for causal problems.
pub const VTK_MAX_SK_CAUSAL: usize = 2048;

/// Causal problems with at least this many keys run one CTA per tile in the linear order
/// ([`Fp8Variant::linear`]). H100 (bench/RESULTS.md "Step 22", c6, two rounds against the
/// blockIdx order): 4k / 8k causal d = 64 +4..6%, d = 128 −1..+4%, d = 256 with the in-kernel
/// transpose +4..8%; at 2k d = 64 / 128 / 256 −3..+3%, so shorter problems keep the grid order.
pub const LINEAR_MIN_SK: usize = 4096;

/// One compiled FP8 configuration of the sm90 forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8Variant {
    pub d: usize,
    pub causal: bool,
    pub stages: usize,
    /// In-kernel V transpose (`FA3_VTK=1`) instead of the pre-pass layout.
    pub vtk: bool,
    /// bf16 O leaves through shared memory and TMA stores (`FA3_OTMA`), staged in a buffer of
    /// its own, or with `vtk` in the V staging ring (idle by then; a buffer of its own would not
    /// fit at d = 256). From d = 128 on, an 8-bit Q slice is smaller than its bf16 O tile.
    pub otma: bool,
    /// Persistent CTAs taking their tiles from a global counter (`FA3_PERSISTENT=2`; not with
    /// `vtk`).
    pub dynamic: bool,
    /// Never with `dynamic`: one CTA per tile in a 1-D grid decoded in the persistent tile order
    /// (`FA3_LINEAR`; causal: longest first within L2-sized head groups), so the hardware's
    /// in-order dispatch balances the causal tail.
    pub linear: bool,
    /// Softmax exponentials on the FMA pipe for this many n8-blocks of every 8 (`FA3_EMU`).
    pub emu: usize,
    /// S = Q Kᵀ with Q's A fragments in registers (`FA3_QRS`: 0 off, 1 all, 2 / 4 half / quarter).
    pub qrs: usize,
    /// Lazy rescaling threshold in log2 units (`FA3_LAZY`; 0 = rescale O on every key tile).
    pub lazy: usize,
    /// Q released after a tile's last QKᵀ instead of its last PV (`FA3_QEARLY`).
    pub qearly: bool,
    /// A tile's first K loaded before its Q (`FA3_KVFIRST`; the pre-pass layout only).
    pub kvfirst: bool,
    /// Persistent causal order: (head, batch) pairs per longest-first group (0: the L2 rule of
    /// `fa3::sched_group`).
    pub group: usize,
    /// Persistent CTAs of the dynamic scheduler (`grid`, a launch parameter, as the 16-bit
    /// kernels' `grid_cap`: 0 = one per SM, 1 = the fewest with the same rounds, n > 1 = at most
    /// n): `grid=2` makes a small problem walk many tiles per CTA (compute-sanitizer runs).
    pub grid: usize,
}

impl Fp8Variant {
    /// The shipped configuration for head dim `d`; `FLASHATTN_FP8_TUNE="stages=N,otma=0,
    /// persist=0|2,emu=E,qrs=N,lazy=T,linear=0|1,qearly=1,kvfirst=1,group=G,grid=N"` overrides
    /// the ring depth, the TMA-store epilogue, the scheduler, the exp2 emulation, Q in registers,
    /// lazy rescaling, the linear tile order, the Q release, the first loads' order, the
    /// causal longest-first group and the dynamic scheduler's CTAs (benchmarks, sanitizer runs)
    /// when it fits in shared memory.
    pub fn new(d: usize, causal: bool) -> Fp8Variant {
        Self::with_vt(d, causal, false)
    }

    /// [`new`](Self::new) for either V path (`vtk`: in-kernel transpose), for short keys.
    pub fn with_vt(d: usize, causal: bool, vtk: bool) -> Fp8Variant {
        Self::for_keys(d, causal, vtk, 0)
    }

    /// The shipped configuration for head dim `d`, the mask, the V path and `sk` keys (the
    /// linear tile order for causal problems from [`LINEAR_MIN_SK`] keys), then the
    /// `FLASHATTN_FP8_TUNE` overrides.
    pub fn for_keys(d: usize, causal: bool, vtk: bool, sk: usize) -> Fp8Variant {
        let dynamic = d == 256 && !vtk;
        let mut v = Fp8Variant {
            d,
            causal,
            stages: if d <= 128 { 3 } else { 2 },
            vtk,
            otma: true,
            // H100 (bench/RESULTS.md "Step 10" / "Step 11b", A/B under clock drift): the
            // dynamic scheduler at d = 256 causal +4..5% at 4k and +4..9% at 8k, plain −1.4..+1.8%
            // at 4k and +1..5% at 8k; exp2 on the FMA pipe for 2 of every 8 n8-blocks at d = 64
            // +0..4% (the MUFU binds there).
            dynamic,
            linear: causal && sk >= LINEAR_MIN_SK && !dynamic,
            emu: if d == 64 { 2 } else { 0 },
            qrs: 0,
            // Lazy rescaling as the 16-bit kernels (p ≤ 2^8 stays inside e4m3's range).
            lazy: super::fa3::LAZY_RESCALE,
            qearly: false,
            kvfirst: false,
            group: 0,
            grid: 0,
        };
        if let Ok(s) = std::env::var("FLASHATTN_FP8_TUNE") {
            for (k, n) in super::fa3::tune_knobs(&s) {
                let t = match k {
                    "stages" if (1..=4).contains(&n) => Fp8Variant { stages: n, ..v },
                    "otma" => Fp8Variant { otma: n != 0, ..v },
                    "emu" if n <= 8 => Fp8Variant { emu: n, ..v },
                    "qrs" if matches!(n, 0 | 1 | 2 | 4) => Fp8Variant { qrs: n, ..v },
                    "lazy" if n <= 8 => Fp8Variant { lazy: n, ..v },
                    "qearly" => Fp8Variant {
                        qearly: n != 0,
                        ..v
                    },
                    "kvfirst" if !v.vtk => Fp8Variant {
                        kvfirst: n != 0,
                        ..v
                    },
                    "group" => Fp8Variant { group: n, ..v },
                    "grid" => Fp8Variant { grid: n, ..v },
                    "linear" => Fp8Variant {
                        linear: n != 0,
                        ..v
                    },
                    "persist" if !v.vtk => Fp8Variant {
                        dynamic: n == 2,
                        ..v
                    },
                    _ => continue,
                };
                if t.smem_bytes() <= SMEM_LIMIT {
                    v = t;
                }
            }
        }
        // The dynamic scheduler already takes its tiles longest first (a tune may set both).
        v.linear &= !v.dynamic;
        v
    }

    /// Where O is staged (`None` without `otma`).
    pub fn o_staging(&self) -> Option<OStaging> {
        match (self.otma, self.vtk) {
            (false, _) => None,
            (true, false) => Some(OStaging::Own),
            (true, true) => Some(OStaging::VtRing),
        }
    }

    /// Dynamic shared memory as the kernel lays it out: Q, then per stage a K tile (d padded
    /// to 128 bytes) and a Vᵀ tile (d rows of BK bytes), with `vtk` two staging tiles of V as
    /// stored (K's layout) and their 2 barriers, the bf16 O tile when it has a buffer of its
    /// own, barriers, 1 KiB alignment slack.
    pub fn smem_bytes(&self) -> usize {
        let dp = self.d.div_ceil(128) * 128;
        let staging = if self.vtk { 2 * BK * dp + 16 } else { 0 };
        let own = match self.o_staging() {
            Some(OStaging::Own) => o_stage_bytes(BQ, self.d),
            _ => 0,
        };
        BQ * dp
            + self.stages * (BK * dp + self.d * BK)
            + staging
            + own
            + 8 * (2 + 4 * self.stages)
            // The dynamic scheduler's 4 + 4 barriers and 4 tile slots of 32 bytes (the tile
            // decoded, with its descales).
            + if self.dynamic { 4 * (16 + 32) } else { 0 }
            + 1024
    }

    pub fn spec(&self) -> KernelSpec {
        let spec = KernelSpec::new(super::fa3::SOURCE, super::fa3::ENTRY)
            .define("FA3_D", self.d)
            .define("FA3_BK", BK)
            .define("FA3_STAGES", self.stages)
            .define("FA3_DT", 2)
            .define("FA3_CAUSAL", u32::from(self.causal))
            .define("FA3_OVERLAP", 1)
            .define("FA3_PINGPONG", 1)
            .define("FA3_PERSISTENT", if self.dynamic { 2 } else { 0 })
            .define("FA3_NC", 2)
            .define("FA3_WINDOW", 0)
            .define("FA3_SOFTCAP", 0)
            .define("FA3_ALIBI", 0)
            .define("FA3_VARLEN", 0)
            .define("FA3_VTK", u32::from(self.vtk))
            .define("FA3_EMU", self.emu)
            .define("FA3_QRS", self.qrs)
            .define("FA3_LAZY", self.lazy)
            .define("FA3_OTMA", u32::from(self.otma))
            .define("FA3_OBUF", self.o_staging().map_or(0, |o| o as u32))
            .define("FA3_SMEM", self.smem_bytes());
        // Passed only where they change the kernel, so the others keep their labels.
        [
            ("FA3_LINEAR", self.linear),
            ("FA3_QEARLY", self.qearly),
            ("FA3_KVFIRST", self.kvfirst),
        ]
        .into_iter()
        .filter(|&(_, on)| on)
        .fold(spec, |spec, (name, _)| spec.define(name, 1))
    }
}

/// The V pre-pass kernel.
pub fn vt_spec() -> KernelSpec {
    KernelSpec::new(VT_SOURCE, VT_ENTRY)
}

/// Every shipped FP8 kernel for `arch` (compile-all): 3 head dims × {plain, causal} × {V
/// pre-pass layout, in-kernel transpose}, the causal ones that are not dynamic also in the
/// linear tile order (long keys), and the V pre-pass; none outside sm_90a.
pub fn all_variants(arch: &str) -> Vec<KernelSpec> {
    if arch != "sm_90a" {
        return vec![];
    }
    let mut v: Vec<KernelSpec> = HEAD_DIMS
        .iter()
        .flat_map(|&d| {
            [(false, false), (true, false), (false, true), (true, true)].map(|(c, vtk)| {
                let short = Fp8Variant::with_vt(d, c, vtk);
                let long = Fp8Variant::for_keys(d, c, vtk, LINEAR_MIN_SK);
                (short.spec(), (long != short).then(|| long.spec()))
            })
        })
        .flat_map(|(short, long)| std::iter::once(short).chain(long))
        .collect();
    v.push(vt_spec());
    v
}

/// An [`Fp8Tensor`] on the device: codes and descales.
#[derive(Clone, Debug)]
pub struct Fp8DeviceTensor {
    data: DeviceBuffer,
    descale: DeviceBuffer,
    shape: [usize; 4],
    per_head: bool,
}

impl Fp8DeviceTensor {
    pub fn upload(gpu: &Gpu, t: &Fp8Tensor) -> Result<Fp8DeviceTensor> {
        // An empty tensor still gets a 16-byte buffer so that pointers stay valid.
        let data = if t.data().is_empty() {
            DeviceBuffer::zeros(gpu, 16)?
        } else {
            DeviceBuffer::from_bytes(gpu, t.data())?
        };
        Ok(Fp8DeviceTensor {
            data,
            descale: DeviceBuffer::from_f32(gpu, t.descale())?,
            shape: t.shape(),
            per_head: t.scaling() == Fp8Scaling::PerHead,
        })
    }
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
    /// (batch, head) element strides of the descale array (0, 0 per tensor).
    fn descale_strides(&self) -> (i32, i32) {
        if self.per_head {
            (self.shape[2] as i32, 1)
        } else {
            (0, 0)
        }
    }
}

/// V transposed for the PV wgmma by the pre-pass: `[batch, heads_k, d, skp]` e4m3, skp = sk
/// rounded up to 16, keys permuted within 16-key groups (see `kernels/sm90/fp8.cuh`).
#[derive(Clone, Debug)]
pub struct Fp8VTransposed {
    data: DeviceBuffer,
    descale: DeviceBuffer,
    shape: [usize; 4],
    per_head: bool,
    skp: usize,
}

impl Fp8VTransposed {
    /// A Vᵀ buffer for `v`'s shape whose contents are undefined until [`transpose_v_into`]
    /// writes them.
    pub fn uninit(gpu: &Gpu, v: &Fp8DeviceTensor) -> Result<Fp8VTransposed> {
        let [b, sk, hk, d] = v.shape;
        let skp = sk.div_ceil(16) * 16;
        Ok(Fp8VTransposed {
            data: DeviceBuffer::uninit(gpu, (b * hk * d * skp).max(16))?,
            descale: v.descale.clone(),
            shape: v.shape,
            per_head: v.per_head,
            skp,
        })
    }

    /// Fills the buffer with 0xFF bytes (e4m3 NaN), to catch bytes a transpose leaves
    /// unwritten in tests.
    pub fn fill_poison(&self) -> Result<()> {
        self.data.fill_bytes(0xFF)
    }

    /// Keys per Vᵀ row: sk rounded up to 16.
    pub fn padded_keys(&self) -> usize {
        self.skp
    }

    /// Vᵀ's bytes, `[batch, heads_k, d, padded_keys]` with the keys of every 16-key group in the
    /// PV wgmma's order (kernels/sm90/fp8.cuh, `fp8_key_of`) and zeros past sk (tests).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let [b, _, hk, d] = self.shape;
        let mut bytes = self.data.to_bytes()?;
        bytes.truncate(b * hk * d * self.skp);
        Ok(bytes)
    }
}

/// Shapes and options checked once: `(batch, sq, sk, heads_q, heads_k, d, scale)`.
struct Dims {
    b: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hk: usize,
    d: usize,
    scale: f32,
}

fn check(
    gpu: &Gpu,
    q: [usize; 4],
    k: [usize; 4],
    v: [usize; 4],
    opts: &AttnOptions,
) -> Result<Dims> {
    let a = gpu.arch();
    if !(a.major == 9 && a.minor == 0) {
        return Err(Error::unsupported(
            gpu.device_name(),
            "dtype",
            "e4m3",
            "the FP8 forward needs sm 9.0 (Hopper, wgmma)",
        ));
    }
    opts.validate()?;
    let [b, sq, hq, d] = q;
    let [bk, sk, hk, dk] = k;
    if k != v {
        return Err(Error::invalid(
            "v",
            format!("shape {v:?}"),
            format!("k's shape {k:?}"),
        ));
    }
    if bk != b || dk != d {
        return Err(Error::invalid(
            "k",
            format!("shape {k:?}"),
            format!("batch {b} and head dim {d} as q {q:?}"),
        ));
    }
    if hk == 0 || hq % hk != 0 {
        return Err(Error::invalid(
            "heads",
            format!("heads_q {hq}, heads_k {hk}"),
            "heads_q a multiple of heads_k (> 0)",
        ));
    }
    if !HEAD_DIMS.contains(&d) {
        return Err(Error::unsupported(
            gpu.device_name(),
            "head_dim",
            d,
            "64, 128 or 256 for the FP8 forward",
        ));
    }
    let unsupported = |what: &str| {
        Err(Error::unsupported(
            gpu.device_name(),
            what,
            "set",
            "the FP8 forward takes no mask or causal only (no window, softcap, ALiBi, dropout, varlen)",
        ))
    };
    match opts.effective_window() {
        (None, None) | (None, Some(0)) if opts.causal || opts.window == (-1, -1) => {}
        _ => return unsupported("window"),
    }
    if opts.softcap > 0.0 {
        return unsupported("softcap");
    }
    if opts.alibi_slopes.is_some() {
        return unsupported("alibi_slopes");
    }
    if opts.dropout_p > 0.0 {
        return unsupported("dropout");
    }
    let scale = opts.scale.unwrap_or(1.0 / (d as f32).sqrt());
    if !(scale > 0.0 && scale.is_finite()) {
        return Err(Error::invalid(
            "scale",
            scale,
            "a positive finite scale (FP8 forward)",
        ));
    }
    if sq > MAX_LEN || sk > MAX_LEN || hq > 65535 || b > 65535 || b * hk > 65535 {
        return Err(Error::invalid(
            "shape",
            format!("q {q:?}, k {k:?}"),
            "lengths below 2^28, heads_q and batch·heads_k at most 65535",
        ));
    }
    Ok(Dims {
        b,
        sq,
        sk,
        hq,
        hk,
        d,
        scale,
    })
}

/// The pre-pass: V → Vᵀ (permuted keys, zero padded to a multiple of 16 keys), into a new
/// buffer.
pub fn transpose_v(gpu: &Gpu, v: &Fp8DeviceTensor) -> Result<Fp8VTransposed> {
    let out = Fp8VTransposed::uninit(gpu, v)?;
    launch_vt(gpu, v, &out)?;
    Ok(out)
}

/// [`transpose_v`] into `vt`, a Vᵀ of a V of the same shape (e.g. the previous step's): no
/// allocation. `vt` takes `v`'s descale factors.
pub fn transpose_v_into(gpu: &Gpu, v: &Fp8DeviceTensor, vt: &mut Fp8VTransposed) -> Result<()> {
    if vt.shape != v.shape {
        return Err(Error::invalid(
            "vt",
            format!("the transpose of a V of shape {:?}", vt.shape),
            format!("that of a V of shape {:?}", v.shape),
        ));
    }
    vt.descale = v.descale.clone();
    vt.per_head = v.per_head;
    launch_vt(gpu, v, vt)
}

fn launch_vt(gpu: &Gpu, v: &Fp8DeviceTensor, out: &Fp8VTransposed) -> Result<()> {
    let [b, sk, hk, d] = v.shape;
    let skp = out.skp;
    if b * hk * d * skp == 0 {
        return Ok(());
    }
    if b * hk > 65535 || d.div_ceil(128) > 65535 || skp.div_ceil(128) > i32::MAX as usize {
        return Err(Error::invalid(
            "v",
            format!("shape {:?}", v.shape),
            "batch·heads_k at most 65535",
        ));
    }
    let f = gpu.kernel(&vt_spec())?;
    // One CTA per 128 keys × 128 d columns × (batch, head): kernels/sm90/fp8_vt.cu.
    let cfg = LaunchConfig {
        grid_dim: (
            skp.div_ceil(128) as u32,
            d.div_ceil(128) as u32,
            (b * hk) as u32,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (src, dst) = (v.data.ptr(), out.data.ptr());
    let (sk_i, skp_i, hk_i, d_i) = (sk as i32, skp as i32, hk as i32, d as i32);
    let (v_row, v_batch) = ((hk * d) as i64, (sk * hk * d) as i64);
    let stream = gpu.stream();
    let mut lb = stream.launch_builder(&f);
    lb.arg(&src)
        .arg(&dst)
        .arg(&sk_i)
        .arg(&skp_i)
        .arg(&hk_i)
        .arg(&d_i)
        .arg(&v_row)
        .arg(&v_batch);
    // SAFETY: the arguments match `fa3_fp8_vt(const u8*, u8*, int, int, int, int, i64, i64)`;
    // `src` holds b·sk·hk·d bytes (read only below sk), `dst` b·hk·d·skp bytes (written
    // exactly: the shapes were checked equal), both alive until the stream is synchronized
    // (buffers free stream-ordered).
    unsafe { lb.launch(cfg) }.map_err(|e| driver_err("launching fa3_fp8_vt", e))?;
    Ok(())
}

/// The attention kernel on pre-transposed V, into caller-provided `out` (bf16, contiguous
/// `[batch, sq, heads_q, d]`) and `lse` (f32, contiguous `[batch, heads_q, sq]`). Every element
/// of both is written when there is at least one key.
pub fn attention_into(
    gpu: &Gpu,
    q: &Fp8DeviceTensor,
    k: &Fp8DeviceTensor,
    vt: &Fp8VTransposed,
    opts: &AttnOptions,
    out: &DeviceTensor,
    lse: &DeviceTensor,
) -> Result<()> {
    launch(gpu, q, k, VSource::Transposed(vt), opts, out, lse)
}

/// [`attention_into`] with V as stored: the attention kernel transposes it in shared memory
/// (`FA3_VTK=1`, no pre-pass).
pub fn attention_into_raw_v(
    gpu: &Gpu,
    q: &Fp8DeviceTensor,
    k: &Fp8DeviceTensor,
    v: &Fp8DeviceTensor,
    opts: &AttnOptions,
    out: &DeviceTensor,
    lse: &DeviceTensor,
) -> Result<()> {
    launch(gpu, q, k, VSource::Raw(v), opts, out, lse)
}

enum VSource<'a> {
    Transposed(&'a Fp8VTransposed),
    Raw(&'a Fp8DeviceTensor),
}

fn launch(
    gpu: &Gpu,
    q: &Fp8DeviceTensor,
    k: &Fp8DeviceTensor,
    vs: VSource<'_>,
    opts: &AttnOptions,
    out: &DeviceTensor,
    lse: &DeviceTensor,
) -> Result<()> {
    let (v_shape, v_per_head, v_descale) = match &vs {
        VSource::Transposed(t) => (t.shape, t.per_head, &t.descale),
        VSource::Raw(t) => (t.shape, t.per_head, &t.descale),
    };
    let dm = check(gpu, q.shape, k.shape, v_shape, opts)?;
    let (b, sq, sk, hq, hk, d) = (dm.b, dm.sq, dm.sk, dm.hq, dm.hk, dm.d);
    if out.dtype() != DType::BF16 || out.shape() != [b, sq, hq, d] || !out.is_contiguous() {
        return Err(Error::invalid(
            "out",
            format!("{} {:?}", out.dtype(), out.shape()),
            format!("contiguous bf16 {:?}", [b, sq, hq, d]),
        ));
    }
    if lse.dtype() != DType::F32 || lse.shape() != [b, hq, sq] || !lse.is_contiguous() {
        return Err(Error::invalid(
            "lse",
            format!("{} {:?}", lse.dtype(), lse.shape()),
            format!("contiguous f32 {:?}", [b, hq, sq]),
        ));
    }
    if b == 0 || sq == 0 || hq == 0 {
        return Ok(());
    }
    if sk == 0 {
        return Err(Error::invalid(
            "k",
            "no keys",
            "at least one key (use forward)",
        ));
    }
    let var = Fp8Variant::for_keys(d, opts.causal, matches!(vs, VSource::Raw(_)), sk);
    let smem = var.smem_bytes();
    let f = gpu.kernel_with_smem(&var.spec(), smem as u32)?;
    let m_tiles = sq.div_ceil(BQ);
    let u8t = sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8;
    let (qd, kd) = (q.descale_strides(), k.descale_strides());
    let vd = if v_per_head { (hk as i32, 1) } else { (0, 0) };
    let (bq, bk, dd) = (BQ as u32, BK as u32, d as u64);
    // `out` is contiguous bf16, so TMA can always address it.
    let (om, o_tma) = if var.otma { o_map(out) } else { ([0; 16], 0) };
    let sms = gpu.sm_count() as usize;
    let total = m_tiles * hq * b;
    if (var.dynamic || var.linear) && total > i32::MAX as usize - sms {
        return Err(Error::invalid(
            "q",
            format!("{total} work tiles"),
            "fewer than 2^31 - (multiprocessors)",
        ));
    }
    let tile_ctr = super::fa3::tile_counter(gpu, var.dynamic)?;
    // A dense [batch, rows, heads, d] e4m3 tensor, boxes of `box_rows` x 128 bytes.
    let bshd_map = |name: &str, ptr: u64, rows: usize, heads: usize, box_rows: u32| {
        encode_raw(
            name,
            ptr,
            u8t,
            [dd, rows as u64, heads as u64, b as u64],
            [heads as u64 * dd, dd, (rows * heads) as u64 * dd],
            [128, box_rows, 1, 1],
        )
    };
    let params = Fa3Params {
        q: bshd_map("q", q.data.ptr(), sq, hq, bq)?,
        k: bshd_map("k", k.data.ptr(), sk, hk, bk)?,
        v: match &vs {
            VSource::Transposed(vt) => encode_raw(
                "v (transposed)",
                vt.data.ptr(),
                u8t,
                [vt.skp as u64, dd, hk as u64, b as u64],
                [vt.skp as u64, dd * vt.skp as u64, (hk * d * vt.skp) as u64],
                [BK as u32, d as u32, 1, 1],
            )?,
            // As stored, loaded like K into the staging ring.
            VSource::Raw(v) => bshd_map("v", v.data.ptr(), sk, hk, bk)?,
        },
        om,
        o_tma,
        o: out.ptr(),
        lse: lse.ptr(),
        o_batch: (sq * hq * d) as i64,
        o_row: (hq * d) as i64,
        o_head: d as i64,
        sq: sq as i32,
        sk: sk as i32,
        heads_q: hq as i32,
        group: (hq / hk) as i32,
        m_tiles: m_tiles as i32,
        scale_log2: dm.scale * std::f32::consts::LOG2_E,
        batch: b as i32,
        lse_b: (hq * sq) as i64,
        lse_h: sq as i64,
        qd: q.descale.ptr(),
        kd: k.descale.ptr(),
        vd: v_descale.ptr(),
        qd_b: qd.0,
        qd_h: qd.1,
        kd_b: kd.0,
        kd_h: kd.1,
        vd_b: vd.0,
        vd_h: vd.1,
        sched_group: super::fa3::sched_group(var.group, true, m_tiles, hq * b, sms, 2 * sk * d)
            as i32,
        tile_ctr,
        ..Fa3Params::zeroed()
    };
    let cfg = LaunchConfig {
        grid_dim: if var.dynamic {
            (
                super::fa3::persistent_grid(total, sms, var.grid) as u32,
                1,
                1,
            )
        } else if var.linear {
            (total as u32, 1, 1)
        } else {
            (m_tiles as u32, hq as u32, b as u32)
        },
        block_dim: (384, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let stream = gpu.stream();
    let mut lb = stream.launch_builder(&f);
    lb.arg(&params);
    // SAFETY: the kernel's single parameter is `Fa3Params` by value (layout mirrored in
    // fa3/params.rs); the tensor maps address q, k and Vᵀ, whose buffers (and the descale arrays)
    // outlive the launch on this stream; out/lse were checked to be contiguous with the
    // shapes the kernel writes.
    unsafe { lb.launch(cfg) }.map_err(|e| driver_err("launching fa3_fwd (fp8)", e))?;
    Ok(())
}

/// FP8 forward on device tensors: `(out bf16 [batch, sq, heads_q, d], lse f32 [batch, heads_q,
/// sq])`. Runs the V pre-pass, then the attention kernel, or the attention kernel with the
/// in-kernel transpose ([`in_kernel_transpose`]).
pub fn forward(
    gpu: &Gpu,
    q: &Fp8DeviceTensor,
    k: &Fp8DeviceTensor,
    v: &Fp8DeviceTensor,
    opts: &AttnOptions,
) -> Result<(DeviceTensor, DeviceTensor)> {
    let dm = check(gpu, q.shape, k.shape, v.shape, opts)?;
    let out = DeviceTensor::alloc(gpu, DType::BF16, &[dm.b, dm.sq, dm.hq, dm.d])?;
    let lse_shape = [dm.b, dm.hq, dm.sq];
    if dm.sk == 0 {
        let n: usize = lse_shape.iter().product();
        let t = Tensor::from_f32(vec![f32::NEG_INFINITY; n], &lse_shape)?;
        return Ok((out, DeviceTensor::upload(gpu, &t)?));
    }
    let lse = DeviceTensor::alloc(gpu, DType::F32, &lse_shape)?;
    if dm.b * dm.sq * dm.hq == 0 {
        return Ok((out, lse));
    }
    if in_kernel_transpose(dm.sk, opts.causal) {
        attention_into_raw_v(gpu, q, k, v, opts, &out, &lse)?;
    } else {
        let vt = transpose_v(gpu, v)?;
        attention_into(gpu, q, k, &vt, opts, &out, &lse)?;
    }
    Ok((out, lse))
}

/// FP8 forward from host tensors on CUDA device `ordinal`: `out` bf16, `lse` f32.
pub fn forward_host(
    ordinal: usize,
    q: &Fp8Tensor,
    k: &Fp8Tensor,
    v: &Fp8Tensor,
    opts: &AttnOptions,
) -> Result<ForwardOutput> {
    let gpu = Gpu::get(ordinal)?;
    let up = |t: &Fp8Tensor| Fp8DeviceTensor::upload(&gpu, t);
    let (dq, dk, dv) = (up(q)?, up(k)?, up(v)?);
    let (out, lse) = forward(&gpu, &dq, &dk, &dv, opts)?;
    Ok(ForwardOutput {
        out: out.download()?,
        lse: lse.download()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtk_default_only_for_short_keys() {
        assert!(vtk_by_default(1, false) && vtk_by_default(VTK_MAX_SK, false));
        assert!(!vtk_by_default(VTK_MAX_SK + 1, false));
        assert!(vtk_by_default(VTK_MAX_SK + 1, true) && vtk_by_default(VTK_MAX_SK_CAUSAL, true));
        assert!(!vtk_by_default(VTK_MAX_SK_CAUSAL + 1, true));
    }

    #[test]
    fn linear_order_only_for_long_causal_one_tile_ctas() {
        if std::env::var("FLASHATTN_FP8_TUNE").is_ok() {
            return; // the knobs override the rule under test
        }
        for d in HEAD_DIMS {
            for vtk in [false, true] {
                let long = Fp8Variant::for_keys(d, true, vtk, LINEAR_MIN_SK);
                assert_eq!(long.linear, !long.dynamic, "d={d} vtk={vtk}");
                assert_eq!(long.spec().label().contains("FA3_LINEAR=1"), long.linear);
                assert!(!Fp8Variant::for_keys(d, true, vtk, LINEAR_MIN_SK - 1).linear);
                assert!(!Fp8Variant::for_keys(d, false, vtk, 1 << 20).linear);
            }
        }
        // d = 256 on pre-transposed V is dynamic (already longest first): no linear kernel.
        assert!(!Fp8Variant::for_keys(256, true, false, 1 << 16).linear);
        // Compile-all has the 12 grid-order kernels, 5 linear ones and the pre-pass.
        let n = all_variants("sm_90a");
        assert_eq!(n.len(), 12 + 5 + 1);
        assert_eq!(
            n.iter()
                .filter(|k| k.label().contains("FA3_LINEAR=1"))
                .count(),
            5
        );
    }

    #[test]
    fn boundary_knobs_reach_the_kernel_only_when_set() {
        if std::env::var("FLASHATTN_FP8_TUNE").is_ok() {
            return; // the knobs change the default under test
        }
        let base = Fp8Variant::for_keys(256, true, false, 4096);
        let label = base.spec().label();
        assert!(!label.contains("FA3_QEARLY") && !label.contains("FA3_KVFIRST"));
        let both = Fp8Variant {
            qearly: true,
            kvfirst: true,
            ..base
        };
        let label = both.spec().label();
        assert!(label.contains("FA3_QEARLY=1") && label.contains("FA3_KVFIRST=1"));
        assert_eq!(both.smem_bytes(), base.smem_bytes());
    }

    #[test]
    fn fp8_kernels_rescale_lazily() {
        for d in HEAD_DIMS {
            let v = Fp8Variant::new(d, true);
            assert_eq!(v.lazy, super::super::fa3::LAZY_RESCALE);
            assert!(v.spec().label().contains("FA3_LAZY=8,"));
        }
    }

    #[test]
    fn variants_and_smem() {
        assert!(all_variants("sm_80").is_empty());
        let v = all_variants("sm_90a");
        // 12 grid-order kernels and the pre-pass (+ the linear ones, counted in
        // linear_order_only_for_long_causal_one_tile_ctas).
        let grid_order = v.iter().filter(|s| !s.label().contains("FA3_LINEAR=1"));
        assert_eq!(grid_order.count(), 13);
        assert!(v.iter().any(|s| s.entry == VT_ENTRY));
        for d in HEAD_DIMS {
            let var = Fp8Variant::new(d, false);
            assert!(
                var.smem_bytes() <= SMEM_LIMIT,
                "d={d}: {}",
                var.smem_bytes()
            );
            assert!(var.spec().label().contains("FA3_DT=2"));
        }
        // d = 256, 2 stages: Q 32 KiB + 2 × (K 32 KiB + Vᵀ 32 KiB) + O 64 KiB + barriers +
        // the dynamic scheduler's tile ring + slack: fits (227 KiB).
        let v256 = Fp8Variant::new(256, true);
        assert_eq!(v256.o_staging(), Some(OStaging::Own));
        assert!(v256.dynamic);
        assert_eq!(
            v256.smem_bytes(),
            32768 + 2 * 65536 + 65536 + 80 + 192 + 1024
        );
        assert!(v256.smem_bytes() <= SMEM_LIMIT);
        // In-kernel transpose: + two 32 KiB staging tiles and their barriers, which then stage
        // O; still fits.
        let vk = Fp8Variant::with_vt(256, true, true);
        assert_eq!(vk.o_staging(), Some(OStaging::VtRing));
        assert_eq!(vk.smem_bytes(), 32768 + 2 * 65536 + 65536 + 16 + 80 + 1024);
        assert!(vk.smem_bytes() <= SMEM_LIMIT);
        assert!(vk.spec().label().contains("FA3_VTK=1"));
    }
}
