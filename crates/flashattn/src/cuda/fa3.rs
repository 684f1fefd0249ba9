//! Host side of the FlashAttention-3 Hopper forward family (sm_90a): `kernels/sm90/fwd.cu`.
//!
//! One CTA per (query tile, query head, batch): a TMA producer warp and two (Bq 128) or three
//! (Bq 192, d=64 bf16) wgmma consumer warpgroups of 64 query rows (see the kernel's header
//! comment for the math and the pipeline); persistent modes (one CTA per SM walking the tiles
//! with a static stride — default for plain problems with ≤ 1024 keys and dense plain d = 64 —
//! or taking them from a global counter, longest first — default for dense causal, plain dense
//! d = 256 and plain dense d = 96/128 beyond 1024 keys; `persist=0|1|2` overrides); QKᵀ with
//! Q's fragments in registers at d = 96/128 (`qrs`); GQA packing (the query heads of a group
//! share a tile's rows, 5-D Q/O maps; dense or varlen) where it cuts the tiles of a group, i.e.
//! short query lengths (`pack=0` turns it off). The host encodes one tensor map per input
//! (`cuTensorMapEncodeTiled`, 4-D `[d, rows, heads, batch]`, 64-column boxes, 128-byte
//! swizzle, zero fill out of bounds) and passes them by value in one `__grid_constant__`
//! parameter struct.
//!
//! The epilogue writes O through shared memory and TMA stores (`FA3_OTMA`, [`Variant::otma`];
//! on by default). Where TMA cannot address the caller's output view (a row, head or batch
//! stride that is not a multiple of 16 bytes, or a base that is not 16-byte aligned; see
//! [`out_uses_tma`]) the same kernel copies the staged tile out with 4-byte stores instead: a
//! layout-driven choice made per launch, with identical results, not a missing feature. Varlen
//! tiles that end inside a consumer's 64 rows are copied out that way too (a TMA box would run
//! into the next sequence's rows), and tiles without keys write their zeros directly (see the
//! kernel's header).
//!
//! [`supports`] is the exact envelope of the kernel: dense or varlen (cu_seqlens) bf16/f16,
//! head dim 64, 96, 128, 192 or 256, no mask, causal or any sliding window (bottom-right),
//! softcap, ALiBi, GQA/MQA, any lengths, 16-byte aligned row/head/batch strides, no dropout.
//! Three kernel modes per (head dim, dtype, dense/varlen): plain, causal, and "full" (window,
//! softcap and ALiBi compiled in, each switched at run time) for everything masked or
//! transformed other than plain causal. Dropout goes to FA2 through the dispatcher.

use super::context::{driver_err, Gpu};
use super::jit::KernelSpec;
use super::operand::check_lse;
use super::tensor::{DeviceBuffer, DeviceTensor};
use crate::error::{Error, Result};
use crate::layout::Problem;
use crate::options::{AlibiSlopes, AttnOptions};
use crate::tensor::DType;
use cudarc::driver::sys;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

/// Kernel source (under `kernels/`) and entry point.
pub const SOURCE: &str = "sm90/fwd.cu";
pub const ENTRY: &str = "fa3_fwd";
/// Head dims the kernel is compiled for.
pub const HEAD_DIMS: [usize; 5] = [64, 96, 128, 192, 256];

/// One compiled configuration of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub d: usize,
    pub bk: usize,
    pub stages: usize,
    pub f16: bool,
    pub causal: bool,
    /// Intra-warpgroup overlap (QKᵀ of the next tile issued before PV of this one).
    pub overlap: bool,
    /// Ping-pong of the two consumer warpgroups (needs `overlap`).
    pub pingpong: bool,
    /// Persistent CTAs (one per SM) walking the work tiles.
    pub persistent: bool,
    /// With `persistent`: each CTA takes its next tile from a global counter (dynamic load
    /// balance) instead of a static stride.
    pub dynamic: bool,
    /// Persistent causal order: (head, batch) pairs per longest-first group; 0 = automatic
    /// (a launch parameter, not part of the compiled kernel).
    pub sched_group: usize,
    /// GQA packing (`FA3_PACK`): the query heads of a group (this many, a power of two
    /// dividing 64) share each tile's rows, so their K/V head is streamed once per tile; 1 = off.
    pub pack: usize,
    /// Consumer warpgroups (64 query rows each): 2 or 3.
    pub nc: usize,
    /// Exponentials of the softmax computed on the FMA pipe by a polynomial (`FA3_EMU`): this
    /// many n8-blocks of every 8 of a row, the rest on the MUFU; 0 = all on the MUFU.
    pub emu: usize,
    /// S = Q Kᵀ with Q's A fragments in registers (`FA3_QRS`) instead of shared memory: 0 off,
    /// 1 all of Q, 2 or 4 the first half or quarter of the head dim (where all would spill).
    pub qrs: usize,
    /// Lazy rescaling (`FA3_LAZY`): a row's softmax base moves only when its maximum grows by
    /// more than 2^lazy, and O is rescaled only then; 0 = rescale on every key tile.
    pub lazy: usize,
    /// Window + softcap + ALiBi compiled in (run-time switches); excludes `causal`.
    pub full: bool,
    /// Packed q/k/v with cu_seqlens.
    pub varlen: bool,
    /// O leaves through shared memory and TMA stores (`FA3_OTMA`); staged in the consumer's
    /// slice of Q, or for persistent CTAs in a buffer of its own where shared memory allows, else
    /// (d = 256) in the tile's last K/V slots ([`Variant::o_staging`]).
    pub otma: bool,
    /// Allows [`Variant::skips`] (`skip=0` turns it off for A/B runs).
    pub skip: bool,
    /// The warpgroup index as a warp broadcast (`FA3_WGB`), so that ptxas keeps what derives
    /// from it in uniform registers (`wgb=0` turns it off for A/B runs).
    pub wgb: bool,
    /// Allows [`Variant::splits`]: 1 (shipped); 0 off; 2 compiled in but never planned (A/B runs
    /// of the kernel code alone).
    pub split: usize,
    /// Ranges of the split tail (`splitr`, up to 8 per CTA); 0 = one per CTA, the shipped
    /// choice (H100, bench/RESULTS.md "Step 16": 2–5 per CTA measured 1–10% slower).
    pub split_ranges: usize,
    /// The sum bound (`FA3_SUMB`, see [`sums_bounded`](Self::sums_bounded)): after a query
    /// tile's first key tile, the softmax takes its exponentials against the rows' current bases
    /// without the row maxima, and rebases only where a partial row sum leaves 2^`lazy`.
    pub sum_bound: bool,
    /// Per-consumer Q (`FA3_QSPLIT`): each consumer's 64-row slice of Q is loaded and released
    /// on barriers of its own, so a persistent CTA's first consumer to finish a tile's epilogue
    /// starts the next tile while the others finish theirs (16-bit, unpacked).
    pub qsplit: bool,
    /// The producer loads a tile's first K tile before its Q (`FA3_KVFIRST`).
    pub kv_first: bool,
    /// Allows [`OStaging::Ring`] (`ring=0` turns it off for A/B runs).
    pub ring_o: bool,
}

/// Lazy rescaling threshold of the shipped kernels (`FA3_LAZY`, log2 units): a row's softmax
/// base moves only when its maximum grows by more than 2^8, so O is almost never rescaled after
/// the first key tiles (H100, bench/RESULTS.md "Step 12": +0..9% over rescaling on every tile;
/// the warp-uniform branch it adds also keeps ptxas from hoisting the PV wait above the softmax).
pub const LAZY_RESCALE: usize = 8;

/// Longest key sequence for which the plain mode runs persistent CTAs by default.
pub const PERSIST_MAX_SK: usize = 1024;

/// Longest query sequence for which dense causal d = 64 runs two consumers with Q in registers.
pub const SHORT_CAUSAL_SQ: usize = 1024;

/// Shortest query sequence for which dense causal d = 128 runs three consumers without the
/// intra-warpgroup overlap (measured at 4k, 8k, 16k; the crossover lies between 4k and 8k).
pub const LONG_CAUSAL_SQ: usize = 8192;

/// Fewest key tiles per work tile for which the split tail is compiled in and planned (H100,
/// bench/RESULTS.md "Step 16", d = 128 against `split=0`: −1% at 16 key tiles (2k), +0.6% at
/// 32, +0.9% at 64 — the merge costs about as much time at every length, the tail it saves
/// grows with it).
pub const SPLIT_MIN_KEY_TILES: usize = 32;

/// Dynamic shared memory a block may opt into on sm 9.0 (227 KiB).
pub const SMEM_LIMIT: usize = 227 * 1024;

/// Where the epilogue stages O for its TMA stores (`FA3_OBUF`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OStaging {
    /// The consumer's own 64-row slice of Q (16-bit; a persistent CTA releases Q for the next
    /// tile only once the store has read it).
    QSlice = 0,
    /// A buffer after the K/V rings: lets a persistent producer load the next Q during the
    /// epilogue.
    Own = 1,
    /// The FP8 in-kernel transpose's V staging ring (idle at the epilogue of a one-tile CTA).
    VtRing = 2,
    /// The tile's last K slot (consumer 0) and last V slot (consumer 1): a persistent CTA
    /// without room for a buffer of its own then frees Q after the main loop all the same.
    Ring = 3,
}

/// Bytes of O staging for `bq` query rows of head dim `d` (16-bit, 64-column chunks).
pub(crate) fn o_stage_bytes(bq: usize, d: usize) -> usize {
    bq * d.div_ceil(64) * 64 * 2
}

/// Key-tile sizes the kernel has wgmma shapes for.
const BK_CHOICES: [usize; 9] = [64, 80, 96, 112, 128, 144, 160, 176, 192];

impl Variant {
    /// The shipped tuning for head dim `d` (measured on an H200, bench/RESULTS.md "CUDA FA3"):
    /// d=64 bf16 runs three consumer warpgroups (Bq 192; +6..17% over two at 2k–16k tokens);
    /// f16 d=64 keeps two (the three-consumer f16 path has not been run on a GPU yet);
    /// d=256 takes 80-key tiles (+4..6% over 64 at 8k/16k).
    pub fn default_for(d: usize, f16: bool, causal: bool) -> Variant {
        let mut v = Variant::base(d, f16, causal);
        v.apply_env();
        v
    }

    /// The shipped tuning before `FLASHATTN_FA3_TUNE`.
    fn base(d: usize, f16: bool, causal: bool) -> Variant {
        let (bk, stages) = match d {
            64 => (128, 3),
            96 | 128 => (128, 2),
            192 => (96, 2),
            _ => (80, 2),
        };
        let nc = if d == 64 && !f16 { 3 } else { 2 };
        // Q in registers for QKᵀ where all of it fits beside the accumulators (H100, bench/
        // RESULTS.md "Step 10": d = 96 +1..7%, d = 128 +0..9% at 1k–8k). Half of Q at d = 192
        // and a quarter at d = 256 (`qrs=2|4`) measured within ±3% of none: not shipped.
        let qrs = if d == 96 || d == 128 { 1 } else { 0 };
        Variant {
            d,
            bk,
            stages,
            f16,
            causal,
            overlap: true,
            pingpong: true,
            persistent: false,
            dynamic: false,
            sched_group: 0,
            pack: 1,
            nc,
            emu: 0,
            qrs,
            lazy: LAZY_RESCALE,
            full: false,
            varlen: false,
            otma: true,
            skip: true,
            wgb: true,
            split: 1,
            split_ranges: 0,
            sum_bound: true,
            qsplit: false,
            kv_first: false,
            ring_o: true,
        }
    }

    /// The variant that runs `problem` (with ALiBi when `alibi`). Plain (unmasked, no softcap
    /// or ALiBi) problems with at most [`PERSIST_MAX_SK`] keys run persistent CTAs: the
    /// prologue and epilogue of one tile hide behind the next (H100, 2026-11-26: +6% d=64,
    /// +16% d=128 and d=256 at 1k non-causal); so do dense plain d = 64 problems of any length
    /// (+2..5% at 2k–8k against one CTA per tile, 16k within its noise). Dense causal problems,
    /// and plain dense ones at d = 256, run persistent CTAs that take their tiles from a global
    /// counter, causal longest first (H100 against one CTA per tile: causal +2..8% at 1k–8k, except −1..2% for d = 128 from
    /// 4k and d = 256 at 1k; d = 256 plain +2..3% at 2k–8k; bench/RESULTS.md "Step 8"), and so
    /// do plain dense d = 96/128 problems with more keys than that ("Step 11").
    pub fn for_problem(problem: &Problem, alibi: bool) -> Variant {
        let full = needs_full(problem, alibi);
        let causal = !full && is_causal(problem);
        let mut v = Variant::base(problem.head_dim, problem.dtype == DType::F16, causal);
        // Plain d = 64 keeps the static stride at every length (H100, 2026-11-26, "Step 13":
        // +2..5% over one CTA per tile at 2k–8k, ahead of the dynamic scheduler).
        v.persistent = !full
            && !causal
            && (problem.max_sk <= PERSIST_MAX_SK || (problem.head_dim == 64 && !problem.varlen));
        // Dynamic persistent CTAs: dense causal; plain dense d = 256; plain dense d = 96/128
        // past the static stride's range, where Q in registers lets a CTA's next Q load early
        // (H100, "Step 11": d = 128 +2..4% at 2k–4k, d = 96 +2..6% at 2k–8k).
        let dyn_plain = match problem.head_dim {
            256 => true,
            96 | 128 => problem.max_sk > PERSIST_MAX_SK,
            _ => false,
        };
        if !full && !problem.varlen && (causal || dyn_plain) {
            v.persistent = true;
            v.dynamic = true;
        }
        // GQA packing where it cuts the tiles (and so the K/V passes) of a group: short query
        // lengths, e.g. decoding with 1–16 new tokens against a KV cache.
        let g = problem.group();
        if !full && g > 1 && g.is_power_of_two() && 64 % g == 0 {
            let bq = v.bq();
            if (problem.max_sq * g).div_ceil(bq) < g * problem.max_sq.div_ceil(bq) {
                v.pack = g;
                v.persistent = false;
                v.dynamic = false;
            }
        }
        // Short dense causal d = 64: two consumers (Bq 128: no third of the last tile wasted,
        // twice the tiles to balance) with Q in registers, +11% at 1k; from 2k the three-
        // consumer tile wins (−9..12% for this one).
        if causal
            && !problem.varlen
            && v.pack == 1
            && problem.head_dim == 64
            && problem.max_sq <= SHORT_CAUSAL_SQ
        {
            v.short_causal_tile();
        }
        // Long dense causal d = 128: three consumers (H100, "Step 13": +4% at 8k, +2.5% at 16k;
        // −3% at 4k).
        if causal
            && !problem.varlen
            && v.pack == 1
            && problem.head_dim == 128
            && problem.max_sq >= LONG_CAUSAL_SQ
        {
            v.long_causal_tile();
        }
        v.full = full;
        v.varlen = problem.varlen;
        if problem.max_sk.div_ceil(v.bk) < SPLIT_MIN_KEY_TILES {
            v.split = 0;
        }
        v.shorten_q_handoff();
        v.apply_env();
        v.fix_full();
        v
    }

    /// [`for_problem`](Self::for_problem) with the knobs `tune` on top (what a launch with them runs).
    pub fn tuned(problem: &Problem, alibi: bool, tune: &str) -> Variant {
        let mut v = Variant::for_problem(problem, alibi);
        v.apply_tune(tune);
        v.fix_full();
        v
    }

    /// Persistent CTAs without room for an O buffer of their own (d = 192/256) free Q late: after
    /// a tile's epilogue where Q stages O, after the main loop where the ring slots do. There each
    /// consumer gets its own Q barriers and the producer sends the next tile's first K ahead of
    /// Q (H100, bench/RESULTS.md "Step 18", with O in Q: d = 256 plain +0.5..1.3%, causal
    /// 0..+1.1% at 2k–8k; d = 192 causal +0.7..1.1% at 2k–4k).
    fn shorten_q_handoff(&mut self) {
        if self.persistent && matches!(self.o_staging(), Some(OStaging::QSlice | OStaging::Ring)) {
            self.qsplit = true;
            self.kv_first = true;
        }
    }

    /// The short dense causal d = 64 tile: two consumers (Bq 128) with Q in registers.
    fn short_causal_tile(&mut self) {
        self.nc = 2;
        self.qrs = 1;
    }

    /// The long dense causal d = 128 tile: three consumers (Bq 192), whose 160 registers hold
    /// O, S and P of a 128-key tile only without the intra-warpgroup overlap (so no ping-pong
    /// either: the three warpgroups' GEMMs and softmaxes interleave on their own) and with Q
    /// read from shared memory.
    fn long_causal_tile(&mut self) {
        self.nc = 3;
        self.qrs = 0;
        self.overlap = false;
        self.pingpong = false;
    }

    /// The full mode needs the registers of two consumers (three spill at d = 64), and at
    /// d = 128 those of Q's fragments too (with them its run-time switches spill beside the
    /// overlapped softmax's live P fragments).
    fn fix_full(&mut self) {
        if self.full {
            self.nc = 2;
            if self.d == 128 {
                self.qrs = 0;
            }
        }
    }

    /// `FLASHATTN_FA3_TUNE="bk=64,stages=3,overlap=0,pingpong=0,persist=1,otma=0,emu=2,qrs=1,lazy=0,skip=0,wgb=0,split=0,splitr=264,sumb=0"`
    /// overrides knobs (benchmarks); an override whose shared memory would not fit is ignored.
    fn apply_env(&mut self) {
        if let Ok(s) = std::env::var("FLASHATTN_FA3_TUNE") {
            self.apply_tune(&s);
        }
    }

    /// [`apply_env`](Self::apply_env) on the knob string `s`.
    fn apply_tune(&mut self, s: &str) {
        let orig = *self;
        for (k, n) in tune_knobs(s) {
            match k {
                "bk" if BK_CHOICES.contains(&n) => self.bk = n,
                "stages" if (1..=4).contains(&n) => self.stages = n,
                "overlap" => self.overlap = n != 0,
                "pingpong" => self.pingpong = n != 0,
                // 0: one CTA per tile, 1: persistent with a static stride, 2: dynamic.
                "persist" if n <= 2 => {
                    self.persistent = n != 0;
                    self.dynamic = n == 2;
                }
                "sgroup" => self.sched_group = n,
                // pack=0 turns GQA packing off (benchmarks).
                "pack" if n == 0 => self.pack = 1,
                "otma" => self.otma = n != 0,
                "skip" => self.skip = n != 0,
                "wgb" => self.wgb = n != 0,
                "split" if n <= 2 => self.split = n,
                "splitr" => self.split_ranges = n,
                "sumb" => self.sum_bound = n != 0,
                "qsplit" => self.qsplit = n != 0,
                "kvfirst" => self.kv_first = n != 0,
                "ring" => self.ring_o = n != 0,
                "emu" if n <= 8 => self.emu = n,
                "qrs" if matches!(n, 0 | 1 | 2 | 4) => self.qrs = n,
                "lazy" if n <= 8 => self.lazy = n,
                // Three consumers get 160 registers each: not enough for d = 256.
                "nc" if n == 2 || (n == 3 && self.d <= 192) => self.nc = n,
                _ => {}
            }
        }
        if !self.overlap {
            self.pingpong = false;
        }
        if !self.persistent {
            self.dynamic = false;
        }
        if self.persistent || !self.otma {
            self.pack = 1;
        }
        if self.smem_bytes() > SMEM_LIMIT {
            *self = orig;
        }
    }

    /// Each consumer skips the key tiles its own 64 rows cannot see (`FA3_SKIP`): past their
    /// causal diagonal (or all but one where its rows lie past the sequence's end). Only where
    /// that happens on the diagonal of most query tiles — causal tiles taller than a key tile
    /// (H100, bench/RESULTS.md "Step 14": three consumers at d = 64 +8..9% at 2k–4k, +2..4% at
    /// 8k–16k; d = 128 from 8k, d = 192, d = 256 up to 4k +1..2%); elsewhere its per-tile
    /// bookkeeping measured −1..2% (plain and short causal d = 64 at 1k).
    pub fn skips(&self) -> bool {
        self.skip && self.causal && self.bq() > self.bk
    }

    /// Whether the kernel runs the sum bound ([`sum_bound`](Self::sum_bound); it needs the lazy
    /// rule and MUFU exponentials). Measured against the row maxima (H100, bench/RESULTS.md
    /// "Step 17", 2k–8k, calls y7 and y9): plain d = 64 +8.4..10%, d = 96 +3.9..5.4%, d = 128
    /// +3.7..7.5%; causal +1..9%. Only for d ≤ 128 and dense problems: at d = 256 (and in some varlen kernels)
    /// the rare path's second QKᵀ makes ptxas spill, and d = 256 gains nothing from it (its
    /// loop is bound by the tensor pipe: +1.3% with the maxima simply left out). With the ring
    /// staging it compiled without spills at d = 256 but ran 7–8% slower ("Step 18c").
    pub fn sums_bounded(&self) -> bool {
        self.sum_bound && self.lazy > 0 && self.emu == 0 && self.d <= 128 && !self.varlen
    }

    /// The warpgroup index as a warp broadcast (`FA3_WGB`): its derived addresses then stay in
    /// uniform registers (H100, bench/RESULTS.md "Step 15": main loops up to 2% fewer
    /// instructions, d = 64 +1..5%, three-consumer d = 128 causal +3%, the rest −0.2..+1%). Not
    /// on the persistent d = 256 causal kernel with skipping and O staged in Q, where NVRTC then
    /// spills 4 bytes (with O in the ring slots it is the plain index that spills: 92 bytes).
    pub fn broadcasts_wg(&self) -> bool {
        self.wgb
            && !(self.d == 256
                && self.persistent
                && self.skips()
                && self.o_staging() == Some(OStaging::QSlice))
    }

    /// The split tail (`FA3_SPLIT`, kernels/sm90/split.cuh): a plain dense launch with the
    /// dynamic scheduler cuts the tiles of its last, partly filled round along the keys into
    /// one range per CTA and merges the pieces in the kernel (where [`split_plan`] finds it
    /// pays). 16-bit, d ≤ 128 (at d = 256 the merge beside the 128-register accumulator makes
    /// ptxas spill in the main loop), from [`SPLIT_MIN_KEY_TILES`] key tiles on; FP8 builds its
    /// own variants.
    pub fn splits(&self) -> bool {
        self.split != 0
            && self.d <= 128
            && self.persistent
            && self.dynamic
            && !self.causal
            && !self.full
            && !self.varlen
            && self.pack == 1
    }

    /// Whether each consumer's slice of Q has barriers of its own ([`qsplit`](Self::qsplit)).
    pub fn splits_q(&self) -> bool {
        self.qsplit && self.pack == 1
    }

    /// Rows of one Q box (the Q map's): a consumer's slice with [`splits_q`](Self::splits_q).
    pub fn q_box_rows(&self) -> usize {
        if self.splits_q() {
            64
        } else {
            self.bq()
        }
    }

    /// Query rows per CTA.
    pub fn bq(&self) -> usize {
        64 * self.nc
    }

    /// Where O is staged (`None` without `otma`): one-tile CTAs reuse the consumer's Q slice
    /// (free after its last QKᵀ, no extra shared memory); persistent CTAs take a buffer of
    /// their own where it fits (d ≤ 128 with the shipped tiles), else the ring slots
    /// ([`OStaging::Ring`], d = 256), else the Q slice.
    pub fn o_staging(&self) -> Option<OStaging> {
        if !self.otma {
            return None;
        }
        let own = self.base_smem_bytes() + o_stage_bytes(self.bq(), self.d);
        Some(if self.persistent && own <= SMEM_LIMIT {
            OStaging::Own
        } else if self.persistent && self.ring_fits() {
            OStaging::Ring
        } else {
            OStaging::QSlice
        })
    }

    /// Whether [`OStaging::Ring`] is used: at d = 256 (H100, bench/RESULTS.md "Step 18b", against
    /// O in Q: plain +0.9..1.2% at 2k–8k, causal +1.1% at 2k, +0.4% at 4k; d = 192 causal
    /// +0.8 / −0.4 / −0.9% at 2k / 4k / 8k, so not there), where a consumer's O fits a ring slot
    /// the way it uses them: two overlapped consumers, at least two stages, none of the kernels
    /// whose loops already hold the K slot longer (the sum bound's, the split tail's).
    fn ring_fits(&self) -> bool {
        let dp = self.d.div_ceil(64) * 64;
        self.ring_o
            && self.d == 256
            && self.nc == 2
            && self.stages >= 2
            && self.overlap
            && self.pack == 1
            && !self.sums_bounded()
            && !self.splits()
            && o_stage_bytes(64, self.d) <= self.bk * dp * 2
    }

    /// Dynamic shared memory, as the kernel lays it out (1 KiB of alignment slack included).
    pub fn smem_bytes(&self) -> usize {
        let own = match self.o_staging() {
            Some(OStaging::Own) => o_stage_bytes(self.bq(), self.d),
            _ => 0,
        };
        self.base_smem_bytes() + own
    }

    /// Shared memory without an O buffer of its own: Q, the K/V rings, barriers, slack.
    fn base_smem_bytes(&self) -> usize {
        let dp = self.d.div_ceil(64) * 64;
        let q = self.bq() * dp * 2;
        let kv = self.bk * dp * 2;
        let tile_ring = if self.persistent && self.dynamic {
            40
        } else {
            0
        };
        let q_bars = if self.splits_q() { self.nc } else { 1 };
        q + 2 * self.stages * kv + 8 * (2 * q_bars + 4 * self.stages) + tile_ring + 1024
    }

    pub fn spec(&self) -> KernelSpec {
        KernelSpec::new(SOURCE, ENTRY)
            .define("FA3_D", self.d)
            .define("FA3_BK", self.bk)
            .define("FA3_STAGES", self.stages)
            .define("FA3_DT", u32::from(self.f16))
            .define("FA3_CAUSAL", u32::from(self.causal))
            .define("FA3_OVERLAP", u32::from(self.overlap))
            .define("FA3_PINGPONG", u32::from(self.pingpong))
            .define(
                "FA3_PERSISTENT",
                u32::from(self.persistent) + u32::from(self.persistent && self.dynamic),
            )
            .define("FA3_NC", self.nc)
            .define("FA3_PACK", self.pack)
            .define("FA3_EMU", self.emu)
            .define("FA3_QRS", self.qrs)
            .define("FA3_LAZY", self.lazy)
            .define("FA3_WINDOW", u32::from(self.full))
            .define("FA3_SOFTCAP", u32::from(self.full))
            .define("FA3_ALIBI", u32::from(self.full))
            .define("FA3_VARLEN", u32::from(self.varlen))
            .define("FA3_OTMA", u32::from(self.otma))
            .define("FA3_SKIP", u32::from(self.skips()))
            .define("FA3_WGB", u32::from(self.broadcasts_wg()))
            .define("FA3_SPLIT", u32::from(self.splits()))
            .define("FA3_SUMB", u32::from(self.sums_bounded()))
            .define("FA3_QSPLIT", u32::from(self.splits_q()))
            .define("FA3_KVFIRST", u32::from(self.kv_first))
            .define("FA3_OBUF", self.o_staging().map_or(0, |o| o as u32))
            // The kernel static_asserts its own layout against this.
            .define("FA3_SMEM", self.smem_bytes())
    }
}

/// The `name=N` pairs of a tuning string (`FLASHATTN_FA3_TUNE`, `FLASHATTN_FP8_TUNE`), trimmed;
/// malformed entries are skipped (benchmark knobs, not an API).
pub(crate) fn tune_knobs(s: &str) -> impl Iterator<Item = (&str, usize)> {
    s.split(',').filter_map(|kv| {
        let (k, n) = kv.split_once('=')?;
        Some((k.trim(), n.trim().parse().ok()?))
    })
}

/// Every shipped variant for `arch` (compile-all; only sm_90a has any). All of them have
/// `otma`: an output TMA cannot address runs the same kernel (per-thread stores chosen at run
/// time), so `otma = false` kernels come only from `FLASHATTN_FA3_TUNE` (A/B benchmarks).
pub fn all_variants(arch: &str) -> Vec<KernelSpec> {
    if arch != "sm_90a" {
        return vec![];
    }
    let mut v = Vec::new();
    for d in HEAD_DIMS {
        for f16 in [false, true] {
            for varlen in [false, true] {
                // plain, causal, full, plain persistent (short sequences), causal with the
                // dynamic scheduler (dense), plain dynamic (dense, d = 96/128/256), short causal
                // d = 64 (dense, dynamic, two consumers with Q in registers), long causal d = 128
                // (dense, dynamic, three consumers without overlap)
                for mode in 0..8 {
                    if (mode >= 4 && varlen)
                        || (mode == 5 && !matches!(d, 96 | 128 | 256))
                        || (mode == 6 && d != 64)
                        || (mode == 7 && d != 128)
                    {
                        continue;
                    }
                    let mut var = Variant::default_for(d, f16, matches!(mode, 1 | 4 | 6 | 7));
                    var.full = mode == 2;
                    var.persistent = mode >= 3;
                    var.dynamic = mode >= 4;
                    if mode == 6 {
                        var.short_causal_tile();
                    }
                    if mode == 7 {
                        var.long_causal_tile();
                    }
                    var.varlen = varlen;
                    var.fix_full();
                    var.shorten_q_handoff();
                    v.push(var.spec());
                    // Plain dynamic: with the split tail (long keys) and without.
                    if var.splits() {
                        v.push(Variant { split: 0, ..var }.spec());
                    }
                }
                // GQA packing (dense or varlen, plain or causal) for groups of 2, 4, 8.
                for pack in [2, 4, 8] {
                    for causal in [false, true] {
                        let mut var = Variant::default_for(d, f16, causal);
                        var.pack = pack;
                        var.varlen = varlen;
                        v.push(var.spec());
                    }
                }
            }
        }
    }
    v
}

fn is_causal(problem: &Problem) -> bool {
    problem.mask.left.is_none() && problem.mask.right == Some(0)
}

/// Window other than causal, softcap or ALiBi: the "full" kernel mode.
fn needs_full(problem: &Problem, alibi: bool) -> bool {
    !(problem.mask.is_none() || is_causal(problem)) || problem.softcap > 0.0 || alibi
}

/// Longest sequence (either side) the sm90 kernels take: window arithmetic stays inside i32.
pub(super) const MAX_LEN: usize = 1 << 28;

/// Window bounds `(left, right)` for the sm90 kernels: unbounded sides become
/// `max_sq + max_sk + 1` (no key is that far away), so that `i + sk − sq ± w` stays inside i32
/// for lengths ≤ [`MAX_LEN`].
pub(super) fn window_bounds(problem: &Problem) -> (i32, i32) {
    let unb = (problem.max_sq + problem.max_sk + 1) as i32;
    let clamp = |w: Option<usize>| w.map_or(unb, |x| x.min(unb as usize) as i32);
    (clamp(problem.mask.left), clamp(problem.mask.right))
}

/// Whether FA3 handles `problem` on `gpu` exactly (anything else must go to FA2): the kernel's
/// whole envelope, ALiBi included (window/softcap/ALiBi and varlen passed `gpu_fa3` on an H100,
/// 2026-11-26; see bench/RESULTS.md).
pub fn supports(gpu: &Gpu, problem: &Problem) -> bool {
    let arch = gpu.arch();
    if !(arch.major == 9 && arch.minor == 0) {
        return false;
    }
    if !matches!(problem.dtype, DType::BF16 | DType::F16) {
        return false;
    }
    if !HEAD_DIMS.contains(&problem.head_dim) || problem.dropout.is_some() {
        return false;
    }
    if !problem.scale.is_finite() {
        return false;
    }
    // Plain and causal modes take row maxima on raw scores: need a positive scale (the full
    // mode scales before the maximum).
    if !needs_full(problem, false) && problem.scale <= 0.0 {
        return false;
    }
    if problem.max_sq > MAX_LEN || problem.max_sk > MAX_LEN {
        return false;
    }
    let v = Variant::for_problem(problem, false);
    v.smem_bytes() <= gpu.max_smem_optin() as usize
}

/// Strides (elements) of a `[batch, rows, heads, d]` device tensor that TMA can address:
/// last dim contiguous, every other stride a multiple of 16 bytes (or irrelevant: extent 1).
fn tma_strides(t: &DeviceTensor, name: &str) -> Result<[u64; 3]> {
    let (sh, st) = bshd(t);
    if sh[3] > 1 && st[3] != 1 {
        return Err(Error::invalid(
            name,
            format!("shape {sh:?} strides {st:?}"),
            "[batch, rows, heads, d] with a contiguous d",
        ));
    }
    let esz = t.dtype().size() as u64;
    // Map dims 1, 2, 3 are the tensor's rows (1), heads (2) and batch (0).
    let mut out = [0u64; 3];
    let mut extent = sh[3] as u64 * esz; // bytes spanned so far, for strides of extent-1 dims
    for (slot, dim) in [(0usize, 1usize), (1, 2), (2, 0)] {
        let s = st[dim] as u64 * esz;
        let v = if s.is_multiple_of(16) && s > 0 && s < (1u64 << 40) {
            s
        } else if sh[dim] <= 1 {
            extent.div_ceil(16) * 16
        } else {
            return Err(Error::invalid(
                name,
                format!("stride {} of dim {dim}", st[dim]),
                "strides that are multiples of 16 bytes (fa3 TMA)",
            ));
        };
        extent = extent.max(v * sh[dim].max(1) as u64);
        out[slot] = v;
    }
    if !t.ptr().is_multiple_of(16) {
        return Err(Error::invalid(
            name,
            "a base address not 16-byte aligned",
            "16-byte aligned (fa3 TMA)",
        ));
    }
    Ok(out)
}

/// Shape and strides as `[batch, rows, heads, d]`: a packed (varlen) `[total, heads, d]` tensor
/// is one batch entry.
fn bshd(t: &DeviceTensor) -> ([usize; 4], [usize; 4]) {
    let (sh, st) = (t.shape(), t.strides());
    match sh.len() {
        3 => (
            [1, sh[0], sh[1], sh[2]],
            [st[0] * sh[0].max(1), st[0], st[1], st[2]],
        ),
        4 => ([sh[0], sh[1], sh[2], sh[3]], [st[0], st[1], st[2], st[3]]),
        _ => ([0; 4], [0; 4]),
    }
}

pub(super) fn encode_map(t: &DeviceTensor, name: &str, box_rows: usize) -> Result<[u64; 16]> {
    let (sh, _) = bshd(t);
    if !matches!(t.shape().len(), 3 | 4) || sh.contains(&0) {
        return Err(Error::invalid(
            name,
            format!("shape {:?}", t.shape()),
            "[batch, rows, heads, d] or [total, heads, d], no zero extent (fa3 TMA)",
        ));
    }
    let strides = tma_strides(t, name)?;
    let dtype = match t.dtype() {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::F32 => return Err(Error::invalid(name, "f32", "bf16 or f16 (fa3)")),
    };
    let dims: [u64; 4] = [sh[3] as u64, sh[1] as u64, sh[2] as u64, sh[0] as u64];
    // `ptr()` is the view's first element (its offset applied).
    encode_raw(
        name,
        t.ptr(),
        dtype,
        dims,
        strides,
        [64, box_rows as u32, 1, 1],
    )
}

/// The packed-GQA map (`Variant::pack` = g) of q or out, dense `[batch, rows, heads_q, d]` or
/// varlen `[total, heads_q, d]` (one batch entry): 5-D `[d, g, rows, heads_q / g, batch]`, boxes
/// of 64 columns × `box_rows` packed rows (`box_rows / g` queries × the g heads of a group), so
/// packed row r is query r / g of head r % g.
fn encode_packed(t: &DeviceTensor, name: &str, box_rows: usize, g: usize) -> Result<[u64; 16]> {
    let (sh, _) = bshd(t);
    if !matches!(t.shape().len(), 3 | 4) || sh.contains(&0) || sh[2] % g != 0 {
        return Err(Error::invalid(
            name,
            format!("shape {:?}", t.shape()),
            format!(
                "[batch, rows, heads, d] or [total, heads, d] with heads a multiple of {g} \
                 (GQA packing)"
            ),
        ));
    }
    let [rs, hs, bs] = tma_strides(t, name)?;
    let dtype = match t.dtype() {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::F32 => return Err(Error::invalid(name, "f32", "bf16 or f16 (fa3)")),
    };
    let dims = [
        sh[3] as u64,
        g as u64,
        sh[1] as u64,
        (sh[2] / g) as u64,
        sh[0] as u64,
    ];
    let boxd = [64, g as u32, (box_rows / g) as u32, 1, 1];
    encode_tiled(
        name,
        t.ptr(),
        dtype,
        &dims,
        &[hs, rs, hs * g as u64, bs],
        &boxd,
    )
}

/// A 4-D tiled tensor map with 128-byte swizzle and zero fill out of bounds: `dims` innermost
/// first, `strides` the byte strides of dims 1..3 (multiples of 16), `boxd` the box (its inner
/// extent at most 128 bytes). Shared with the FP8 forward (`fa3_fp8`).
pub(crate) fn encode_raw(
    name: &str,
    addr: u64,
    dtype: sys::CUtensorMapDataType,
    dims: [u64; 4],
    strides: [u64; 3],
    boxd: [u32; 4],
) -> Result<[u64; 16]> {
    encode_tiled(name, addr, dtype, &dims, &strides, &boxd)
}

/// [`encode_raw`] for any rank 1..=5 (`strides` one shorter than `dims`, `boxd` as long).
fn encode_tiled(
    name: &str,
    addr: u64,
    dtype: sys::CUtensorMapDataType,
    dims: &[u64],
    strides: &[u64],
    boxd: &[u32],
) -> Result<[u64; 16]> {
    let rank = dims.len();
    assert!(
        (1..=5).contains(&rank) && strides.len() + 1 == rank && boxd.len() == rank,
        "tensor map rank"
    );
    let sh = dims;
    let estr = [1u32; 5];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: all arrays live for the call and have at least the lengths the rank implies
    // (checked above); the map is plain output memory of the right size and alignment.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            rank as u32,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            estr.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::invalid(
            name,
            format!("shape {sh:?}, byte strides {strides:?}: cuTensorMapEncodeTiled {r:?}"),
            "a tensor the TMA engine can address",
        ));
    }
    Ok(map.opaque)
}

/// (head, batch) pairs per longest-first group of the persistent causal order (`Fa3Params::
/// sched_group`): `knob` when set (> 0). `kv_pair_bytes` is what one pair's K and V occupy.
pub(crate) fn sched_group(
    knob: usize,
    dynamic: bool,
    m_tiles: usize,
    pairs: usize,
    sms: usize,
    kv_pair_bytes: usize,
) -> usize {
    let g = match (knob, dynamic) {
        (g, _) if g > 0 => return g.min(pairs),
        // Static stride: longest first over the whole grid.
        (_, false) => return pairs,
        // Short sequences: groups of enough tiles for two waves of CTAs, so that the CTAs
        // running together read the K/V of a few heads (L2).
        _ if m_tiles <= 32 => (2 * sms).div_ceil(m_tiles),
        // Long ones: longest first over as many pairs as keep their K/V within a budget of L2
        // (H100, "Step 13": causal 8k +3..5% over the whole grid, which streams the K/V of
        // every head at once).
        _ => usize::MAX,
    };
    let g = g
        .min((SCHED_L2_BYTES / kv_pair_bytes.max(1)).max(1))
        .clamp(1, pairs);
    // Groups of (nearly) equal size: a small last group would leave its longest tiles for the
    // end of the launch (the kernel runs a smaller group first anyway).
    pairs.div_ceil(pairs.div_ceil(g))
}

/// K/V bytes the CTAs running together should stay within (H100: 50 MB of L2).
const SCHED_L2_BYTES: usize = 32 << 20;

/// The dynamic scheduler's counters ([`Gpu::sched_counters`]) when `dynamic`, else 0.
pub(crate) fn tile_counter(gpu: &Gpu, dynamic: bool) -> Result<u64> {
    if dynamic {
        gpu.sched_counters()
    } else {
        Ok(0)
    }
}

/// The split tail of a launch (`Fa3Params::t_main` ..): `tiles` equal work tiles of `n` key
/// tiles each on `grid` CTAs, the tail cut into `ranges` ranges. `None` where it cannot pay: no
/// partly filled last round, or ranges so short that a piece's extra tile boundary and merge
/// (counted as two key tiles) leave the tail no shorter than a whole tile, or more key tiles
/// than the kernel's 32-bit range arithmetic takes. Else (t_main, ranges, key tiles in the tail).
pub(crate) fn split_tail(
    tiles: usize,
    grid: usize,
    ranges: usize,
    n: usize,
) -> Option<(usize, usize, usize)> {
    if grid == 0 || ranges == 0 || tiles <= grid || tiles.is_multiple_of(grid) {
        return None;
    }
    let tail = tiles % grid;
    let w = tail * n;
    // The kernel's range arithmetic is 32-bit: W · ranges < 2^31.
    (w.div_ceil(ranges) + 2 < n && w * ranges <= i32::MAX as usize).then_some((
        tiles - tail,
        ranges,
        w,
    ))
}

/// The split tail of `var` launched on `problem` with `sms` multiprocessors ([`split_tail`]).
fn split_of(var: &Variant, problem: &Problem, sms: usize) -> Option<(usize, usize, usize)> {
    if !var.splits() || var.split != 1 || problem.batch == 0 || problem.max_sq == 0 {
        return None;
    }
    let tiles = (problem.max_sq * var.pack).div_ceil(var.bq()) * problem.heads_q * problem.batch;
    let grid = tiles.min(sms);
    let ranges = if var.split_ranges > 0 {
        var.split_ranges.min(8 * grid)
    } else {
        grid
    };
    split_tail(tiles, grid, ranges, problem.max_sk.div_ceil(var.bk))
}

/// The split tail that [`forward_into_with`] runs for `problem` with knobs `tune` on `gpu`
/// (tests, benchmarks): (whole tiles before it, ranges, key tiles in it), `None` without one.
pub fn split_plan(gpu: &Gpu, problem: &Problem, tune: &str) -> Option<(usize, usize, usize)> {
    split_of(
        &Variant::tuned(problem, false, tune),
        problem,
        gpu.sm_count() as usize,
    )
}

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

/// The tensor map of `out` (q's shape and dtype, bf16 or f16) for the TMA-store epilogue and
/// the kernel's `o_tma` flag: `(map, 1)` when TMA can address it, `(zeros, 0)` otherwise —
/// strides that are not multiples of 16 bytes or a base that is not 16-byte aligned — and the
/// kernel then copies its staged O out with 4-byte stores (the layout decides, not the
/// problem). Shared with `fa3_fp8`.
pub(crate) fn o_map(out: &DeviceTensor) -> ([u64; 16], i32) {
    match encode_map(out, "out", 64) {
        Ok(m) => (m, 1),
        Err(_) => ([0; 16], 0),
    }
}

/// Whether the FA3 forward writes `out` through TMA stores (`FA3_OTMA`; else 4-byte stores:
/// strides that are not multiples of 16 bytes, or a base that is not 16-byte aligned). For
/// tests and benchmarks.
pub fn out_uses_tma(out: &DeviceTensor) -> bool {
    o_map(out).1 == 1
}

/// The stores that do not go through TMA write 4-byte pairs: `out` needs a contiguous last
/// dim, even strides and a 4-byte aligned first element.
fn check_out_pairs(out: &DeviceTensor) -> Result<()> {
    let (sh, st) = bshd(out);
    let bad_stride = (0..3).any(|i| sh[i] > 1 && st[i] % 2 != 0);
    if (sh[3] > 1 && st[3] != 1) || bad_stride || !out.ptr().is_multiple_of(4) {
        return Err(Error::invalid(
            "out",
            format!(
                "strides {:?} at an offset of {} elements",
                out.strides(),
                out.offset()
            ),
            "a contiguous last dim, even strides and a 4-byte aligned start",
        ));
    }
    Ok(())
}

/// FA3 forward: `(out, lse)`; `out` contiguous with q's shape, `lse` f32 `[batch, heads_q, sq]`.
pub fn forward(
    gpu: &Gpu,
    problem: &Problem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    opts: &AttnOptions,
) -> Result<(DeviceTensor, DeviceTensor)> {
    if !supports(gpu, problem) {
        return Err(Error::unsupported(
            gpu.device_name(),
            "problem",
            "fa3",
            "bf16/f16, head dim 64/96/128/192/256, no dropout, sm 9.0",
        ));
    }
    let out = DeviceTensor::alloc(gpu, problem.dtype, &problem.q_shape)?;
    let lse_shape = problem.lse_shape();
    if problem.total_q > 0 && problem.total_k == 0 {
        // No keys: out = 0 (alloc zero-fills), lse = -inf.
        let n: usize = lse_shape.iter().product();
        let t = crate::tensor::Tensor::from_f32(vec![f32::NEG_INFINITY; n], &lse_shape)?;
        return Ok((out, DeviceTensor::upload(gpu, &t)?));
    }
    let lse = DeviceTensor::alloc(gpu, DType::F32, &lse_shape)?;
    forward_into_with(
        gpu,
        problem,
        q,
        k,
        v,
        &out,
        &lse,
        opts.alibi_slopes.as_ref(),
        "",
    )?;
    Ok((out, lse))
}

/// The launch itself, into caller-provided `out` (q's shape; a contiguous last dim, even
/// strides and a 4-byte aligned start; TMA stores where [`out_uses_tma`]) and contiguous f32
/// `lse`. Every element of both is written (tests
/// poison them first). Needs `supports(gpu, problem)` and at least one key per sequence.
pub fn forward_into(
    gpu: &Gpu,
    problem: &Problem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    out: &DeviceTensor,
    lse: &DeviceTensor,
) -> Result<()> {
    forward_into_with(gpu, problem, q, k, v, out, lse, None, "")
}

/// [`forward_into`] with ALiBi slopes; runs anything [`supports`] accepts (varlen: `out` packed
/// like q, `lse` `[heads_q, total_q]`). `tune` takes tuning knobs (`FLASHATTN_FA3_TUNE` syntax,
/// applied after the environment's) on top of the variant the problem selects, for tests and
/// benchmarks that need a particular scheduler or tile without touching the process
/// environment; `""` runs the shipped choice.
#[allow(clippy::too_many_arguments)]
pub fn forward_into_with(
    gpu: &Gpu,
    problem: &Problem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    out: &DeviceTensor,
    lse: &DeviceTensor,
    alibi: Option<&AlibiSlopes>,
    tune: &str,
) -> Result<()> {
    let sq = problem.max_sq;
    let sk = problem.max_sk;
    if out.shape() != problem.q_shape.as_slice() || out.dtype() != problem.dtype {
        return Err(Error::invalid(
            "out",
            format!("{} {:?}", out.dtype(), out.shape()),
            "q's dtype and shape",
        ));
    }
    check_lse(lse, problem)?;
    if problem.batch == 0 || sq == 0 || problem.heads_q == 0 {
        return Ok(());
    }
    check_out_pairs(out)?;
    if problem.total_k == 0 {
        return Err(Error::invalid(
            "k",
            "no keys",
            "at least one key (use fa3::forward)",
        ));
    }
    let mut var = Variant::tuned(problem, alibi.is_some(), tune);
    // Packed tiles leave through 5-D TMA boxes only.
    if var.pack > 1 && !out_uses_tma(out) {
        var.pack = 1;
    }
    let smem = var.smem_bytes();
    let f = gpu.kernel_with_smem(&var.spec(), smem as u32)?;
    let m_tiles = (sq * var.pack).div_ceil(var.bq());
    let ost = bshd(out).1;
    let (wl, wr) = window_bounds(problem);
    let mut cu = None;
    if problem.varlen {
        let mut cq: Vec<i32> = problem.seqs.iter().map(|s| s.q_start as i32).collect();
        let mut ck: Vec<i32> = problem.seqs.iter().map(|s| s.k_start as i32).collect();
        cq.push(problem.total_q as i32);
        ck.push(problem.total_k as i32);
        cu = Some((
            DeviceBuffer::from_i32(gpu, &cq)?,
            DeviceBuffer::from_i32(gpu, &ck)?,
        ));
    }
    let slopes = match alibi {
        Some(a) => Some(DeviceBuffer::from_f32(gpu, &a.values)?),
        None => None,
    };
    let (om, o_tma) = if var.pack > 1 {
        (encode_packed(out, "out", 64, var.pack)?, 1)
    } else if var.otma {
        o_map(out)
    } else {
        ([0; 16], 0)
    };
    let sms = gpu.sm_count() as usize;
    let pairs = problem.heads_q * problem.batch;
    let kv_pair = 2 * problem.max_sk * problem.head_dim * 2;
    let sched_group = sched_group(var.sched_group, var.dynamic, m_tiles, pairs, sms, kv_pair);
    let tile_ctr = tile_counter(gpu, var.persistent && var.dynamic)?;
    let mut params = Fa3Params {
        q: if var.pack > 1 {
            encode_packed(q, "q", var.bq(), var.pack)?
        } else {
            encode_map(q, "q", var.q_box_rows())?
        },
        k: encode_map(k, "k", var.bk)?,
        v: encode_map(v, "v", var.bk)?,
        om,
        o: out.ptr(),
        lse: lse.ptr(),
        o_batch: if problem.varlen { 0 } else { ost[0] as i64 },
        o_row: ost[1] as i64,
        o_head: ost[2] as i64,
        sq: sq as i32,
        sk: sk as i32,
        heads_q: problem.heads_q as i32,
        group: problem.group() as i32,
        m_tiles: m_tiles as i32,
        scale_log2: problem.scale * std::f32::consts::LOG2_E,
        batch: problem.batch as i32,
        pad1: 0,
        cu_q: cu.as_ref().map_or(0, |c| c.0.ptr()),
        cu_k: cu.as_ref().map_or(0, |c| c.1.ptr()),
        alibi: slopes.as_ref().map_or(0, |s| s.ptr()),
        lse_b: if problem.varlen {
            0
        } else {
            (problem.heads_q * sq) as i64
        },
        lse_h: if problem.varlen {
            problem.total_q as i64
        } else {
            sq as i64
        },
        wl,
        wr,
        sc_in: if problem.softcap > 0.0 {
            problem.scale / problem.softcap
        } else {
            0.0
        },
        sc_out: if problem.softcap > 0.0 {
            problem.softcap * std::f32::consts::LOG2_E
        } else {
            0.0
        },
        alibi_bs: match alibi {
            Some(a) if a.per_batch => problem.heads_q as i32,
            _ => 0,
        },
        pad2: 0,
        o_tma,
        sched_group: sched_group.min(i32::MAX as usize) as i32,
        tile_ctr,
        ..Fa3Params::zeroed()
    };
    if !var.persistent
        && (m_tiles > i32::MAX as usize || problem.heads_q > 65535 || problem.batch > 65535)
    {
        return Err(Error::invalid(
            "shape",
            format!(
                "{} query tiles x {} heads x {} batch",
                m_tiles, problem.heads_q, problem.batch
            ),
            "grid within (2^31-1, 65535, 65535)",
        ));
    }
    let total = m_tiles * problem.heads_q * problem.batch;
    if let Some((t_main, ranges, w)) = split_of(&var, problem, sms) {
        // Two pieces' slots per range, one per consumer warp: its accumulator and (m, l).
        let warp_slot = (var.d / 8 + 1) * 32 * 16;
        let ws_bytes = 2 * ranges * 4 * var.nc * warp_slot;
        let (ws, ctr) = gpu.split_workspace(ws_bytes, (total - t_main) * var.nc)?;
        params.t_main = t_main as i32;
        params.split_ranges = ranges as i32;
        params.split_w = w as i32;
        params.split_n = sk.div_ceil(var.bk) as i32;
        params.split_ws = ws;
        params.split_ctr = ctr;
    }
    let grid_dim = if var.persistent {
        // The dynamic counter runs up to total + grid − 1, split pieces' ids up to
        // total + 2 · ranges (at most 8 per CTA, `split_of`).
        if total > i32::MAX as usize - 16 * sms {
            return Err(Error::invalid(
                "shape",
                format!("{total} work tiles"),
                "fewer than 2^31 - 16 x (multiprocessors)",
            ));
        }
        (total.min(sms) as u32, 1, 1)
    } else {
        // Packed: grid y runs over key heads (a CTA takes all the query heads of one).
        (
            m_tiles as u32,
            (problem.heads_q / var.pack) as u32,
            problem.batch as u32,
        )
    };
    let cfg = LaunchConfig {
        grid_dim,
        block_dim: (128 * (var.nc as u32 + 1), 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let stream = gpu.stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&params);
    // SAFETY: the kernel's single parameter is `Fa3Params` by value (layout mirrored above);
    // the tensor maps address q/k/v, which outlive the launch (the stream is synchronized
    // before they can be dropped by callers that download), and out/lse are sized by Problem.
    unsafe { b.launch(cfg) }.map_err(|e| driver_err("launching fa3_fwd", e))?;
    // cu_seqlens and slopes are freed stream-ordered, after the launch (as fa2 does).
    drop((cu, slopes));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn o_staging_and_smem_per_head_dim() {
        for d in HEAD_DIMS {
            for f16 in [false, true] {
                for persistent in [false, true] {
                    let mut v = Variant::base(d, f16, false);
                    v.persistent = persistent;
                    let base = v.base_smem_bytes();
                    let own = o_stage_bytes(v.bq(), d);
                    let want = if persistent && d <= 128 {
                        OStaging::Own
                    } else if persistent && d == 256 {
                        OStaging::Ring
                    } else {
                        OStaging::QSlice
                    };
                    assert_eq!(v.o_staging(), Some(want), "d={d} persistent={persistent}");
                    let extra = if want == OStaging::Own { own } else { 0 };
                    assert_eq!(v.smem_bytes(), base + extra);
                    assert!(v.smem_bytes() <= SMEM_LIMIT, "d={d}: {}", v.smem_bytes());
                    // The Q slice holds exactly the O tile it stages.
                    assert_eq!(own, v.bq() * d.div_ceil(64) * 64 * 2);
                    let off = Variant { otma: false, ..v };
                    assert_eq!((off.o_staging(), off.smem_bytes()), (None, base));
                    assert!(v.spec().label().contains("FA3_OTMA=1"));
                    assert!(off.spec().label().contains("FA3_OTMA=0"));
                }
            }
        }
        // d = 128, persistent: Q 32 KiB + 2 × (K + V 32 KiB) + O 32 KiB + barriers + slack.
        let mut v = Variant::base(128, false, false);
        v.persistent = true;
        assert_eq!(v.smem_bytes(), 32768 + 4 * 32768 + 32768 + 80 + 1024);
    }

    #[test]
    fn tune_strings_parse_trimmed_and_skip_malformed_entries() {
        let knobs: Vec<_> = tune_knobs(" lazy = 0,bk=x,qrs,emu=2 ,").collect();
        assert_eq!(knobs, [("lazy", 0), ("emu", 2)]);
    }

    #[test]
    fn tune_knobs_toggle_otma() {
        let mut v = Variant::base(128, false, false);
        v.apply_tune("otma=0,persist=1");
        assert!(!v.otma && v.persistent);
        v.apply_tune("otma=1");
        assert!(v.otma);
        assert_eq!(v.o_staging(), Some(OStaging::Own));
        // A ring too deep for the O buffer falls back to staging in Q, and still fits.
        v.apply_tune("stages=3");
        assert_eq!(v.stages, 3);
        assert_eq!(v.o_staging(), Some(OStaging::QSlice));
        // d = 256 persistent: O in the last K/V slots, or in Q with `ring=0`.
        let mut v = Variant::base(256, false, false);
        v.apply_tune("persist=2");
        assert_eq!(v.o_staging(), Some(OStaging::Ring));
        v.apply_tune("ring=0");
        assert_eq!(v.o_staging(), Some(OStaging::QSlice));
    }

    /// The variant `for_problem` picks (without `FLASHATTN_FA3_TUNE`) for dense bf16 q
    /// [2, sq, hq, d], k/v [2, sk, hk, d].
    fn pick(d: usize, sq: usize, sk: usize, hq: usize, hk: usize, causal: bool) -> Variant {
        let t = |s: usize, h: usize| crate::Tensor::zeros(DType::BF16, &[2, s, h, d]);
        let (q, k, v) = (t(sq, hq), t(sk, hk), t(sk, hk));
        let opts = AttnOptions::new().causal(causal);
        let p = Problem::new(&crate::Qkv::dense(&q, &k, &v), &opts).unwrap();
        Variant::for_problem(&p, false)
    }

    #[test]
    fn split_tail_cuts_only_a_partly_filled_last_round_that_pays() {
        // Every SPEC shape at d = 128: 2048 tiles of 16 key tiles (2k) on 132 SMs.
        assert_eq!(split_tail(2048, 132, 132, 16), Some((1980, 132, 68 * 16)));
        // 1024 tiles of 26 key tiles: a tail of 100, ranges of 20, +2 < 26.
        assert_eq!(split_tail(1024, 132, 132, 26), Some((924, 132, 2600)));
        // No partly filled round, or a single one.
        assert_eq!(split_tail(264, 132, 132, 16), None);
        assert_eq!(split_tail(100, 132, 132, 16), None);
        // Ranges (3 key tiles) + 2 not shorter than a tile (4): no gain.
        assert_eq!(split_tail(2048, 132, 132, 4), None);
        // W · ranges beyond the kernel's 32-bit arithmetic.
        assert_eq!(split_tail(133, 132, 132, 20_000_000), None);
    }

    #[test]
    fn for_problem_picks_the_measured_defaults_and_they_are_compiled() {
        let compiled: Vec<String> = all_variants("sm_90a").iter().map(|s| s.label()).collect();
        let check = |v: Variant, what: &str| {
            assert!(
                compiled.contains(&v.spec().label()),
                "{what}: {} is not in the compile-all set",
                v.spec().label()
            );
            v
        };
        // Plain d = 128: static persistent up to 1024 keys, dynamic beyond; Q in registers;
        // lazy rescaling everywhere (also what keeps the PV wait below the softmax).
        let v = check(pick(128, 512, 512, 2, 2, false), "plain d128 short");
        assert!(v.persistent && !v.dynamic && v.qrs == 1 && v.lazy == LAZY_RESCALE);
        assert!(v.spec().label().contains("FA3_LAZY=8,"));
        let v = check(pick(128, 2048, 2048, 2, 2, false), "plain d128");
        assert!(v.persistent && v.dynamic && v.qrs == 1);
        let v = check(pick(96, 4096, 4096, 2, 2, false), "plain d96");
        assert!(v.dynamic && v.qrs == 1);
        // d = 192: one CTA per tile, no Q in registers; d = 256: dynamic.
        let v = check(pick(192, 4096, 4096, 2, 2, false), "plain d192");
        assert!(!v.persistent && v.qrs == 0);
        let v = check(pick(256, 4096, 4096, 2, 2, false), "plain d256");
        assert!(v.dynamic && v.qrs == 0);
        // Causal d = 128: two overlapped consumers with Q in registers up to 4k; three
        // consumers without overlap from LONG_CAUSAL_SQ.
        let v = check(pick(128, 4096, 4096, 2, 2, true), "causal d128");
        assert!(v.dynamic && v.nc == 2 && v.qrs == 1 && v.overlap && v.pingpong);
        let v = check(pick(128, 8192, 8192, 2, 2, true), "causal d128 long");
        assert!(v.dynamic && v.nc == 3 && v.qrs == 0 && !v.overlap && !v.pingpong);
        assert_eq!(v.o_staging(), Some(OStaging::Own));
        // Plain d = 64: the static stride at every length.
        let v = check(pick(64, 8192, 8192, 2, 2, false), "plain d64");
        assert!(v.persistent && !v.dynamic && v.nc == 3);
        // Causal d = 64: two consumers with Q in registers up to 1024 queries, three beyond.
        let v = check(pick(64, 1024, 1024, 2, 2, true), "causal d64 short");
        assert!(v.dynamic && v.nc == 2 && v.qrs == 1);
        let v = check(pick(64, 2048, 2048, 2, 2, true), "causal d64");
        assert!(v.dynamic && v.nc == 3 && v.qrs == 0);
        // Consumers skip the key tiles past their own diagonal only on causal tiles taller
        // than a key tile (d = 64 from 2k, d = 128 from LONG_CAUSAL_SQ, d = 256 with 80 keys).
        let labelled = |d, s, causal, define: &str| {
            pick(d, s, s, 2, 2, causal).spec().label().contains(define)
        };
        let skips = |d, s, causal| labelled(d, s, causal, "FA3_SKIP=1,");
        assert!(skips(64, 2048, true) && skips(128, 8192, true));
        assert!(skips(256, 2048, true));
        assert!(!skips(64, 1024, true) && !skips(128, 4096, true));
        assert!(!skips(64, 4096, false) && !skips(128, 8192, false));
        // The warpgroup index is a broadcast everywhere but on the persistent d = 256 causal
        // kernel with skipping when it stages O in Q (NVRTC spills there).
        let broadcasts = |d, s, causal| labelled(d, s, causal, "FA3_WGB=1,");
        assert!(broadcasts(64, 2048, true) && broadcasts(64, 2048, false));
        assert!(broadcasts(128, 8192, true) && broadcasts(256, 4096, false));
        assert!(broadcasts(256, 4096, true));
        let mut v = pick(256, 4096, 4096, 2, 2, true);
        v.apply_tune("ring=0");
        assert!(v.skips() && !v.broadcasts_wg());
        // The split tail: plain dense d = 96 / 128 with the dynamic scheduler, from 32 key tiles.
        let splits = |d, s, causal| labelled(d, s, causal, "FA3_SPLIT=1,");
        assert!(splits(128, 4096, false) && splits(96, 8192, false));
        assert!(!splits(128, 2048, false) && !splits(128, 4096, true));
        assert!(!splits(64, 4096, false) && !splits(256, 4096, false));
        // The sum bound: dense d ≤ 128, plain and causal (long causal d = 128 too); not d = 256,
        // not varlen, and off with the lazy rule or with exp2 emulation.
        let bounded = |d, s, causal| labelled(d, s, causal, "FA3_SUMB=1,");
        assert!(bounded(64, 2048, false) && bounded(96, 4096, true) && bounded(128, 8192, true));
        assert!(
            bounded(128, 512, false) && !bounded(192, 4096, false) && !bounded(256, 4096, false)
        );
        let mut v = pick(128, 2048, 2048, 2, 2, false);
        assert!(v.sums_bounded());
        v.varlen = true;
        assert!(!v.sums_bounded());
        v.varlen = false;
        v.lazy = 0;
        assert!(!v.sums_bounded());
        v.lazy = LAZY_RESCALE;
        v.emu = 2;
        assert!(!v.sums_bounded());
        // Per-consumer Q barriers and K before Q: persistent CTAs whose Q slices stage O.
        let handoff = |d, s, causal| labelled(d, s, causal, "FA3_QSPLIT=1,FA3_KVFIRST=1,");
        assert!(handoff(256, 2048, false) && handoff(256, 4096, true) && handoff(192, 2048, true));
        assert!(handoff(256, 512, false));
        assert!(!handoff(192, 4096, false) && !handoff(128, 4096, false));
        assert!(!handoff(128, 8192, true) && !handoff(64, 4096, false));
        // Decode-shaped GQA: packed, dense and varlen.
        let v = check(pick(128, 4, 4096, 32, 8, true), "decode d128");
        assert!(v.pack == 4 && !v.persistent);
        let q = crate::Tensor::zeros(DType::BF16, &[6, 32, 128]);
        let kv = crate::Tensor::zeros(DType::BF16, &[700, 8, 128]);
        let (cq, ck) = ([0, 1, 4, 6], [0, 300, 500, 700]);
        let opts = AttnOptions::new().causal(true);
        let p = Problem::new(&crate::Qkv::varlen(&q, &kv, &kv, &cq, &ck), &opts).unwrap();
        let v = check(Variant::for_problem(&p, false), "varlen decode d128");
        assert!(v.pack == 4 && v.varlen && !v.persistent);
    }

    #[test]
    fn causal_groups_fit_l2_and_split_the_pairs_evenly() {
        const MIB: usize = 1 << 20;
        // d = 128 causal 4k (Bq 128): two waves want 9 pairs of 64; 8 groups of 8 instead of
        // 7 of 9 and one of 1.
        assert_eq!(sched_group(0, true, 32, 64, 132, 2 * MIB), 8);
        // Long: as many pairs as keep their K/V within 32 MiB (8k: d = 128 on Bq 192, d = 256).
        assert_eq!(sched_group(0, true, 43, 32, 132, 4 * MIB), 8);
        assert_eq!(sched_group(0, true, 64, 16, 132, 8 * MIB), 4);
        assert_eq!(sched_group(0, true, 128, 16, 132, 64 * MIB), 1);
        // Few pairs, a knob, the static stride.
        assert_eq!(sched_group(0, true, 10, 3, 132, MIB), 3);
        assert_eq!(sched_group(5, true, 64, 128, 132, 64 * MIB), 5);
        assert_eq!(sched_group(0, false, 64, 128, 132, 64 * MIB), 128);
    }

    #[test]
    fn every_shipped_variant_stages_o_through_tma() {
        let specs = all_variants("sm_90a");
        assert!(!specs.is_empty());
        assert!(specs.iter().all(|s| s.label().contains("FA3_OTMA=1")));
        assert!(all_variants("sm_80").is_empty());
    }
}
