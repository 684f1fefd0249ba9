//! The FA3 forward's compiled configurations: [`Variant`] (one kernel build, its `FA3_*`
//! defines), the shipped tuning per problem ([`Variant::for_problem`]), the benchmark knobs
//! (`FLASHATTN_FA3_TUNE`) and the compile-all set ([`all_variants`]).

use super::{ENTRY, HEAD_DIMS, SOURCE};
use crate::cuda::jit::KernelSpec;
use crate::layout::Problem;
use crate::tensor::DType;

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
    /// Persistent CTAs launched (`grid`, a launch parameter): 0 = one per SM, the shipped
    /// choice; 1 = the fewest that take the same number of rounds of tiles (H100: 0.99 at plain
    /// d = 128, bench/RESULTS.md "Step 29"); n > 1 = at most n — so that a small problem walks
    /// many tiles per CTA (the tests and compute-sanitizer runs of the hand-offs between tiles).
    pub grid_cap: usize,
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
    /// With [`OStaging::Ring`], a consumer hands its O slot back after the next tile's first
    /// QKᵀ issue instead of waiting for the store to read it before leaving the tile
    /// (`FA3_RDEFER`; `rdefer=0` for A/B runs). H100, bench/RESULTS.md "Step 20c": d = 256
    /// plain +0.0 / +0.7 / +0.4%, causal +1.7 / +0.9 / +1.6% at 2k / 4k / 8k.
    pub ring_defer: bool,
    /// Q released after the tile's last QKᵀ instead of its last PV (`FA3_QEARLY`; `qearly=0`
    /// for A/B runs): plain problems only. H100, bench/RESULTS.md "Step 21": d = 64 plain
    /// +1.0..1.6% at 2k, d = 256 plain +0.6..0.9% at 2k, −0.3..+0.9% at 4k/8k.
    pub q_early: bool,
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
            grid_cap: 0,
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
            ring_defer: true,
            q_early: !causal,
        }
    }

    /// The variant that runs `problem` (with ALiBi when `alibi`). Plain (unmasked, no softcap
    /// or ALiBi) problems with at most [`PERSIST_MAX_SK`] keys run persistent CTAs: the
    /// prologue and epilogue of one tile hide behind the next (H100, 2026-11-26: +6% d=64,
    /// +16% d=128 and d=256 at 1k non-causal); so do dense plain d = 64 / 96 / 128 / 256 problems
    /// of any length (bench/RESULTS.md "Step 13", "Step 19"). Dense causal problems run
    /// persistent CTAs that take their tiles from a global counter, longest first (H100 against
    /// one CTA per tile: +2..8% at 1k–8k, except −1..2% for d = 128 from 4k and d = 256 at 1k;
    /// "Step 8").
    pub fn for_problem(problem: &Problem, alibi: bool) -> Variant {
        let full = needs_full(problem, alibi);
        let causal = !full && is_causal(problem);
        let mut v = Variant::base(problem.head_dim, problem.dtype == DType::F16, causal);
        // Plain dense problems of any length but d = 192 also run the static stride (H100:
        // d = 64 +2..5% over one CTA per tile at 2k–8k, "Step 13"; d = 96/128 +2..6%, "Step 11";
        // the static stride over the dynamic scheduler +0.3..1.7% at 2k–4k for d = 96/128/256,
        // −1..+1.2% at 8k, "Step 19"; d = 192 0.99 of one CTA per tile there).
        v.persistent = !full
            && !causal
            && (problem.max_sk <= PERSIST_MAX_SK || (!problem.varlen && problem.head_dim != 192));
        // Dense causal: the dynamic scheduler, longest first.
        if !full && !problem.varlen && causal {
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

    /// `FLASHATTN_FA3_TUNE="bk=64,stages=3,overlap=0,pingpong=0,persist=1,grid=2,otma=0,emu=2,qrs=1,lazy=0,skip=0,wgb=0,split=0,splitr=264,sumb=0"`
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
                "grid" => self.grid_cap = n,
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
                "rdefer" => self.ring_defer = n != 0,
                "qearly" => self.q_early = n != 0,
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

    /// The split tail (`FA3_SPLIT`, kernels/sm90/split.cuh): a plain dense persistent launch
    /// (static stride or dynamic scheduler) cuts the tiles of its last, partly filled round along
    /// the keys into one range per CTA and merges the pieces in the kernel (where
    /// [`split_plan`](super::split_plan) finds it pays). 16-bit, d = 96 / 128 (at d = 256 the
    /// merge beside the 128-register accumulator makes ptxas spill in the main loop; the
    /// three-consumer d = 64 tile has not been measured with it), from [`SPLIT_MIN_KEY_TILES`]
    /// key tiles on; FP8 builds its own variants.
    pub fn splits(&self) -> bool {
        self.split != 0
            && matches!(self.d, 96 | 128)
            && self.persistent
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

    /// Whether the kernel hands Q back after the last QKᵀ ([`q_early`](Self::q_early)): only
    /// where Q stays in shared memory to the end (not all in registers) and holds no O, so that
    /// the other kernels keep their labels and cache entries (the kernel gates it likewise).
    fn releases_q_early(&self) -> bool {
        self.q_early && self.qrs != 1 && self.o_staging() != Some(OStaging::QSlice)
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
            .define("FA3_QEARLY", u32::from(self.releases_q_early()))
            .define(
                "FA3_RDEFER",
                u32::from(self.ring_defer && self.o_staging() == Some(OStaging::Ring)),
            )
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
                // plain, causal, full, plain persistent (the static stride: short sequences,
                // and dense ones of any length), causal with the dynamic scheduler (dense), plain
                // dynamic (dense, d = 96/128/256: `persist=2`, the A/B baseline), short causal
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
pub(super) fn needs_full(problem: &Problem, alibi: bool) -> bool {
    !(problem.mask.is_none() || is_causal(problem)) || problem.softcap > 0.0 || alibi
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::AttnOptions;

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
        // Plain dense d = 96 / 128 / 256: the static stride at every length; Q in registers
        // at d ≤ 128; lazy rescaling everywhere (also what keeps the PV wait below the softmax).
        let v = check(pick(128, 512, 512, 2, 2, false), "plain d128 short");
        assert!(v.persistent && !v.dynamic && v.qrs == 1 && v.lazy == LAZY_RESCALE);
        assert!(v.spec().label().contains("FA3_LAZY=8,"));
        let v = check(pick(128, 2048, 2048, 2, 2, false), "plain d128");
        assert!(v.persistent && !v.dynamic && v.qrs == 1);
        let v = check(pick(96, 4096, 4096, 2, 2, false), "plain d96");
        assert!(v.persistent && !v.dynamic && v.qrs == 1);
        // d = 192: one CTA per tile, no Q in registers.
        let v = check(pick(192, 4096, 4096, 2, 2, false), "plain d192");
        assert!(!v.persistent && v.qrs == 0);
        let v = check(pick(256, 4096, 4096, 2, 2, false), "plain d256");
        assert!(v.persistent && !v.dynamic && v.qrs == 0);
        // The A/B baseline `persist=2` (the dynamic scheduler) keeps the split tail.
        let mut v = pick(128, 4096, 4096, 2, 2, false);
        v.apply_tune("persist=2");
        assert!(v.dynamic && v.splits());
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
        // The split tail: plain dense d = 96 / 128, persistent, from 32 key tiles.
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
    fn every_shipped_variant_stages_o_through_tma() {
        let specs = all_variants("sm_90a");
        assert!(!specs.is_empty());
        assert!(specs.iter().all(|s| s.label().contains("FA3_OTMA=1")));
        assert!(all_variants("sm_80").is_empty());
    }
}
