//! The kernel's one argument: `Fa3Params`, the host mirror of `struct Fa3Params` in
//! `kernels/sm90/fwd.cu`.

use cudarc::driver::DeviceRepr;

/// Mirrors `struct Fa3Params` in kernels/sm90/fwd.cu (C layout, 64-byte aligned).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct Fa3Params {
    pub(crate) q: [u64; 16],
    pub(crate) k: [u64; 16],
    pub(crate) v: [u64; 16],
    /// O's tensor map (64 × 64 boxes) for the TMA-store epilogue; valid when `o_tma` is 1.
    pub(crate) om: [u64; 16],
    pub(crate) o: u64,
    pub(crate) lse: u64,
    pub(crate) o_batch: i64,
    pub(crate) o_row: i64,
    pub(crate) o_head: i64,
    pub(crate) sq: i32,
    pub(crate) sk: i32,
    pub(crate) heads_q: i32,
    pub(crate) group: i32,
    pub(crate) m_tiles: i32,
    pub(crate) scale_log2: f32,
    pub(crate) batch: i32,
    pub(crate) pad1: i32,
    pub(crate) cu_q: u64,
    pub(crate) cu_k: u64,
    pub(crate) alibi: u64,
    pub(crate) lse_b: i64,
    pub(crate) lse_h: i64,
    pub(crate) wl: i32,
    pub(crate) wr: i32,
    pub(crate) sc_in: f32,
    pub(crate) sc_out: f32,
    pub(crate) alibi_bs: i32,
    pub(crate) pad2: i32,
    /// FP8 descales (f32 device pointers; unused, 0, for bf16/f16) and their (batch, head)
    /// element strides (0 = per tensor).
    pub(crate) qd: u64,
    pub(crate) kd: u64,
    pub(crate) vd: u64,
    pub(crate) qd_b: i32,
    pub(crate) qd_h: i32,
    pub(crate) kd_b: i32,
    pub(crate) kd_h: i32,
    pub(crate) vd_b: i32,
    pub(crate) vd_h: i32,
    pub(crate) o_tma: i32,
    /// Persistent causal order: (head, batch) pairs per longest-first group.
    pub(crate) sched_group: i32,
    /// The dynamic scheduler's counters (`[i32; 2]`, zero at launch; the kernel leaves them
    /// zero), [`Gpu::sched_counters`]; 0 without the dynamic scheduler.
    pub(crate) tile_ctr: u64,
    /// The split tail ([`split_tail`]; `split_ranges` 0 = off): whole tiles before it, ranges,
    /// key tiles in it, key tiles per tile; the pieces' workspace and per-(tail tile, consumer)
    /// counters ([`Gpu::split_workspace`]).
    pub(crate) t_main: i32,
    pub(crate) split_ranges: i32,
    pub(crate) split_w: i32,
    pub(crate) split_n: i32,
    pub(crate) split_ws: u64,
    pub(crate) split_ctr: u64,
}
// SAFETY: plain old data with the kernel's C layout; passed by value as the one kernel argument.
unsafe impl DeviceRepr for Fa3Params {}
// The C struct: four 128-byte maps, then 232 bytes of scalars padded to its 64-byte alignment.
const _: () = assert!(std::mem::size_of::<Fa3Params>() == 4 * 128 + 256);
const _: () = assert!(std::mem::offset_of!(Fa3Params, split_ctr) == 4 * 128 + 224);

impl Fa3Params {
    /// All fields zero (null maps and pointers), to be filled in by a launch.
    pub(crate) fn zeroed() -> Fa3Params {
        Fa3Params {
            q: [0; 16],
            k: [0; 16],
            v: [0; 16],
            om: [0; 16],
            o: 0,
            lse: 0,
            o_batch: 0,
            o_row: 0,
            o_head: 0,
            sq: 0,
            sk: 0,
            heads_q: 0,
            group: 0,
            m_tiles: 0,
            scale_log2: 0.0,
            batch: 0,
            pad1: 0,
            cu_q: 0,
            cu_k: 0,
            alibi: 0,
            lse_b: 0,
            lse_h: 0,
            wl: 0,
            wr: 0,
            sc_in: 0.0,
            sc_out: 0.0,
            alibi_bs: 0,
            pad2: 0,
            qd: 0,
            kd: 0,
            vd: 0,
            qd_b: 0,
            qd_h: 0,
            kd_b: 0,
            kd_h: 0,
            vd_b: 0,
            vd_h: 0,
            o_tma: 0,
            sched_group: 0,
            tile_ctr: 0,
            t_main: 0,
            split_ranges: 0,
            split_w: 0,
            split_n: 0,
            split_ws: 0,
            split_ctr: 0,
        }
    }
}
