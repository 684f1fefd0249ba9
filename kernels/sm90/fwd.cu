// fwd.cu — FlashAttention-3 style forward for Hopper (sm_90a), self-contained (no CUDA headers).
//
// Math. For one (batch b, query head h, query tile of 64·FA3_NC rows) and key tiles j = 0..n-1:
//   S_j = Q K_jᵀ (raw scores, f32);  m_new = max(m, rowmax S_j);  P_j = 2^(c·S_j − c·m_new)
//   with c = scale·log2(e);  l = l·2^(c·(m − m_new)) + rowsum P_j;  O = O·2^(c·(m − m_new)) + P_j V_j
//   and at the end O /= l, LSE = ln 2 · (c·m + log2 l)  (−inf and O = 0 for rows with no key).
// Masks (bottom-right): key j is visible from row i iff j < sk and (not causal or j ≤ i + sk − sq).
//
// Roles (128·(FA3_NC+1) threads, one CTA per SM): warpgroup 0 is the producer (one thread issues
// TMA loads of Q once and of K/V tiles into an FA3_STAGES-deep ring, completing on mbarriers with
// transaction counts; the warpgroup gives registers away with setmaxnreg.dec). Warpgroups
// 1..NC (NC = FA3_NC, 2 or 3) are consumers, 64 query rows each: S = Q Kᵀ by wgmma with both
// operands from 128B-swizzled shared memory (K-major), online softmax in registers, then O += P V by wgmma with P from
// registers (the S accumulator re-packed as the A fragment) and V from shared memory through an
// MN-major descriptor. Consumers free K and V slots by arriving on per-stage "empty" barriers.
// FA3_OVERLAP=1 issues S_{j+1} = Q K_{j+1}ᵀ before P_j V_j and runs the softmax of tile j+1 while
// P_j V_j is in flight (wgmma.wait_group 1). FA3_PINGPONG=1 (needs overlap) makes the
// consumers take turns, round robin, issuing their GEMMs (named barriers 2..1+NC), so one's
// softmax overlaps the others' GEMMs; the round robin runs on across a persistent CTA's tiles.
//
// FA3_PERSISTENT=1: a grid of (at most) one CTA per SM walks the work tiles (query tile, head,
// batch) with a static stride, longest-first for causal; the K/V ring and its barrier phases
// continue across tiles, and Q is reloaded once consumers release it (q_empty), so the
// producer prefetches the next tile while the consumers run the epilogue. FA3_PERSISTENT=2:
// the same, but each CTA takes its next tile from a global counter when its producer is done
// issuing the current one — dynamic load balance for causal tiles of unequal length (the
// counter p.tile_ctr[0] is zero at launch; the last CTA to finish taking tiles, counted in
// p.tile_ctr[1], zeroes both for the next launch, so the host keeps one buffer per device and
// never clears it); the producer thread hands the tile index to the consumers through
// a two-slot ring in shared memory (tile_full / tile_empty barriers; FP8: four slots, each the
// tile decoded with its descale factors, held by the consumers until their epilogue —
// SLOT_HELD). Causal persistent order:
// longest first within groups of p.sched_group (head, batch) pairs (a smaller leftover group
// first), so that the CTAs running together share the K/V of few heads in L2.
//
// Feature switches (JIT): FA3_WINDOW=1 — sliding window (p.wl, p.wr; bottom-right aligned, see
// SPEC §1), key tiles outside the window are skipped; FA3_SOFTCAP=1 / FA3_ALIBI=1 — scores are
// transformed before the softmax ("prescaled": s' = softcap·log2e·tanh(s·scale/softcap) or
// s·scale·log2e, minus slope·log2e·|i + sk − sq − j|; the softmax then runs with c = 1), each
// switched on at run time by p.sc_out > 0 / p.alibi != 0; FA3_VARLEN=1 — packed q/k/v with
// cu_seqlens (p.cu_q, p.cu_k): the tensor maps are [d, total, heads, 1] and each work tile loads
// at its sequence's start row; key columns past the sequence's end are masked, query rows past
// it are never written (the epilogue clamps to the sequence's sq).
// FA3_DT=2 — FP8 (e4m3) inputs, bf16 output: QKᵀ and PV run as k32 e4m3 wgmma (QGMMA); 8-bit
// operands must both be K-major, so PV needs Vᵀ (keys contiguous, permuted within 16-key groups
// as fp8.cuh describes) and P is converted to e4m3 in registers. FA3_VTK=0: Vᵀ [batch, heads_k, d,
// skp] comes from the separate pre-pass fp8_vt.cu and is loaded by TMA. FA3_VTK=1: in-kernel
// transpose — the producer loads V as stored (like K) into a 2-slot staging ring and the whole
// producer warpgroup transposes it into the Vᵀ slot (ldmatrix.trans, byte permutes, stmatrix,
// both conflict-free on the 128B swizzle; transpose_v_tile), then fences the async proxy and
// signals v_full. Descales: c = scale·log2e·q_descale·k_descale (per tensor or per (batch,
// head): p.qd/p.kd/p.vd with element strides), O ·= v_descale at the end. FP8 takes dense
// inputs, plain or causal, BK = 128 (a Vᵀ row is one 128-byte swizzle row).
// FA3_OTMA=1 — the epilogue stages each consumer's normalised 64 × D tile of O in shared memory
// (stmatrix, 128B swizzle: 64-column boxes of 64 rows × 128 bytes) and one thread stores it with
// TMA through p.om (16-bit O; FP8 writes bf16), instead of 4-byte per-thread global stores that
// touch 8 rows × 16 bytes per warp instruction. Where it is staged (FA3_OBUF): 0 — the warpgroup's
// own 64-row slice of Q (16-bit; Q is dead after its last QKᵀ; a persistent CTA then releases Q
// (q_empty) only once the store has read the slice), 1 — a buffer of its own after the rings, 2 —
// the FA3_VTK staging ring (one tile per CTA: idle once the last v_full has completed), 3 — a
// persistent two-consumer CTA's last K slot of the tile (consumer 0) and last V slot (consumer 1):
// each waits for the other consumer to finish reading its slot (named barriers BAR_K_READ and
// BAR_PV_DONE) and holds it from the producer until its store has read it, so Q is free after the
// main loop as with a buffer of its own (d = 256, where there is no room for one); with
// FA3_RDEFER=1 it waits for that read only after issuing the next tile's first QKᵀ. Where TMA
// may not write the whole box, the warpgroup copies the staged rows out itself (row-checked,
// 128 contiguous bytes per warp store): varlen warpgroup tiles that reach past their sequence's
// end (the map is [d, total, heads, 1], so TMA clips only at the packed total and would
// overwrite the next sequence's first rows), and outputs whose layout TMA cannot address
// (p.o_tma = 0). Tiles without keys write their zeros directly (Q is not theirs to stage in: a
// persistent producer may already be loading the next tile's Q).
// FA3_PACK = G > 1 — GQA packing: a tile's rows are (query, head of the group) pairs, packed row
// r = query r / G of query head w.h + r % G (w.h = the group's first head), so the G heads that
// share a K/V head stream it once per tile instead of once each (short query lengths: decode).
// Q and O go through 5-D maps [d, G, rows, heads_k, batch] whose boxes are exactly these rows
// (varlen: [d, G, total, heads_k, 1], rows from the sequence's start); the masks, tile ranges and
// LSE use r / G. Dense or varlen, plain or causal, one CTA per tile, 16-bit.
// FA3_QRS=1 — S = Q Kᵀ takes Q from registers (A fragments loaded once per tile with ldmatrix)
// instead of shared memory, so the QKᵀ wgmma reads only K there, and the consumers release Q
// right after loading it (a persistent producer loads the next tile's Q early). FA3_QRS=2 or 4:
// the first half or quarter of d only, where all of Q does not fit (benchmarks).
// FA3_EMU = E — E of every 8 n8-blocks of a score row take their exponentials from a polynomial
// on the FMA pipe (exp2_poly) instead of the MUFU: where the MUFU bounds the loop (FP8 d = 64)
// the two pipes share the work; 16-bit loops are issue-bound and lose (bench/RESULTS.md Step 10).
// FA3_LAZY = T — lazy rescaling (softmax.cuh): a row's softmax base moves only when its maximum
// grows by more than 2^T, and O is rescaled only when a row of the warp moved it.
// FA3_SKIP=1 — a consumer skips the key tiles its own 64 rows cannot see (see consumer()).
// FA3_WGB=1 — the warpgroup index is a warp broadcast (see fa3_fwd).
// FA3_SPLIT=1 — the split tail (split.cuh): with FA3_PERSISTENT on plain dense tiles, the
// last, partly filled round's tiles are cut along the keys, one range per CTA, and merged (the
// static stride: range c goes to the CTA that unit t_main + c would, see static_next).
// FA3_SUMB=1 — the sum bound (softmax.cuh at_base): after a tile's first key tile a consumer
// takes the exponentials against its rows' current bases without their maxima (no max, no
// shuffles, no serial dependence of the exponentials on a reduction) and keeps them if every
// thread's partial row sums stay within 2^FA3_LAZY — which bounds each p as the lazy rule does.
// Otherwise (a maximum grew, voted over the warpgroup: rare after the first tiles) the tile's
// scores are computed again from the K slot, which is therefore released only after the vote,
// and go through the full softmax with the bases moved to the maxima (rebase_tile).
// FA3_QSPLIT=1 — every consumer's 64-row slice of Q is loaded (64-row boxes) and released on
// barriers of its own; FA3_KVFIRST=1 — the producer loads a tile's first K before its Q. Both
// shorten the gap between a persistent CTA's tiles where Q holds O (d = 192/256).
// FA3_QEARLY=1 — Q is released after the tile's last QKᵀ rather than its last PV (see Q_EARLY).
// FA3_LINEAR=1 — one CTA per tile in a 1-D grid, in the persistent tile order (see its
// static_assert below).
// Defines: FA3_D (head dim: 64, 96, 128, 192, 256; 96 is padded to 128 in shared memory, the
// TMA zero-fills the pad), FA3_BK (key tile), FA3_STAGES, FA3_DT (0 bf16, 1 f16, 2 e4m3), FA3_CAUSAL,
// FA3_OVERLAP, FA3_PINGPONG, FA3_PERSISTENT, FA3_NC, FA3_OTMA/FA3_OBUF, FA3_SMEM (the host's
// smem_bytes(), checked against this layout). Entry point: fa3_fwd (without
// FA3_PERSISTENT one CTA per query tile: grid (m_tiles, heads_q, batch), longest-first for causal).
// This file: the configuration, the parameter struct and the kernel's roles; the parts, included
// after the configuration: fwd_producer.cuh (TMA loads), fwd_mma.cuh (a consumer's tile
// primitives), fwd_epilogue.cuh (O stores), fwd_consumer.cuh (a consumer's work tile: main loop
// and epilogue), fwd_scheduler.cuh (work tiles and the dynamic scheduler's slot ring).
#include "sm90/util.cuh"
#include "sm90/mbarrier.cuh"
#include "sm90/tma.cuh"
#include "sm90/wgmma.cuh"
#include "sm90/softmax.cuh"
#include "sm90/fp8.cuh"
#include "sm90/split.cuh"

#ifndef FA3_D
#define FA3_D 128
#endif
#ifndef FA3_BK
#define FA3_BK 128
#endif
#ifndef FA3_STAGES
#define FA3_STAGES 2
#endif
#ifndef FA3_DT
#define FA3_DT 0
#endif
#ifndef FA3_CAUSAL
#define FA3_CAUSAL 0
#endif
#ifndef FA3_OVERLAP
#define FA3_OVERLAP 1
#endif
#ifndef FA3_PINGPONG
#define FA3_PINGPONG 1
#endif
#ifndef FA3_PERSISTENT
#define FA3_PERSISTENT 0
#endif
#ifndef FA3_NC
#define FA3_NC 2
#endif
#ifndef FA3_WINDOW
#define FA3_WINDOW 0
#endif
#ifndef FA3_SOFTCAP
#define FA3_SOFTCAP 0
#endif
#ifndef FA3_ALIBI
#define FA3_ALIBI 0
#endif
#ifndef FA3_VARLEN
#define FA3_VARLEN 0
#endif
#ifndef FA3_VTK
#define FA3_VTK 0
#endif
#ifndef FA3_OTMA
#define FA3_OTMA 0
#endif
#ifndef FA3_OBUF
#define FA3_OBUF 0
#endif
#ifndef FA3_PACK
#define FA3_PACK 1
#endif
#ifndef FA3_EMU
#define FA3_EMU 0
#endif
#ifndef FA3_QRS
#define FA3_QRS 0
#endif
#ifndef FA3_LAZY
#define FA3_LAZY 0
#endif
#ifndef FA3_SKIP
#define FA3_SKIP 0
#endif
#ifndef FA3_WGB
#define FA3_WGB 0
#endif
#ifndef FA3_SPLIT
#define FA3_SPLIT 0
#endif
#ifndef FA3_SUMB
#define FA3_SUMB 0
#endif
#ifndef FA3_QSPLIT
#define FA3_QSPLIT 0
#endif
#ifndef FA3_QEARLY
#define FA3_QEARLY 0
#endif
#ifndef FA3_RDEFER
#define FA3_RDEFER 0
#endif
#ifndef FA3_KVFIRST
#define FA3_KVFIRST 0
#endif
#ifndef FA3_LINEAR
#define FA3_LINEAR 0
#endif
static_assert(FA3_EMU >= 0 && FA3_EMU <= 8, "exp2 emulation: n8-blocks of every 8");
constexpr bool HAS_LEFT = FA3_WINDOW;                   // keys left of the window are masked
constexpr bool HAS_RIGHT = FA3_WINDOW || FA3_CAUSAL;    // keys right of the diagonal (+wr) are masked
constexpr bool PRESCALE = FA3_SOFTCAP || FA3_ALIBI;
static_assert(!(FA3_WINDOW && FA3_CAUSAL), "causal is the window (unbounded, 0)");
constexpr bool FP8 = FA3_DT == 2;
static_assert(!FP8 || !(FA3_WINDOW || PRESCALE || FA3_VARLEN), "fp8: dense, plain or causal");
static_assert(!FP8 || FA3_BK == 128, "fp8: one Vᵀ row is one 128-byte swizzle row");
constexpr bool VTK = FP8 && FA3_VTK;  // in-kernel V transpose by the producer warpgroup
constexpr bool QRS = FA3_QRS > 0;     // S = Q Kᵀ with Q's A fragments in registers
static_assert(FA3_QRS == 0 || FA3_QRS == 1 || FA3_QRS == 2 || FA3_QRS == 4,
              "QRS: 0 off, 1 all of Q, 2 / 4 its first half / quarter along d");
constexpr int PACK = FA3_PACK;        // GQA packing: query heads per tile row group
static_assert(PACK == 1 || ((PACK & (PACK - 1)) == 0 && 64 % PACK == 0 && !FP8 && !FA3_WINDOW &&
                            !PRESCALE && !FA3_PERSISTENT && FA3_OTMA),
              "GQA packing: a power of two dividing 64; 16-bit, plain or causal, one CTA per "
              "tile, TMA-store epilogue");
// The query index of (packed) tile row r.
__device__ __forceinline__ int qrow(int r) { return r / PACK; }

constexpr int D = FA3_D;
constexpr int BK = FA3_BK;
constexpr int NC = FA3_NC;                // consumer warpgroups, 64 query rows each
constexpr int BQ = 64 * NC;
constexpr int NTHREADS = 128 * (NC + 1);
static_assert(NC == 2 || NC == 3, "2 or 3 consumer warpgroups");
// Register budgets after setmaxnreg (multiples of 8; total within 64K per SM).
constexpr int PRODUCER_REGS = 24;  // 128·24 + 256·240 = 64512 = 384 · 168 (launch)
constexpr int CONSUMER_REGS = NC == 2 ? 240 : 160;
constexpr int STAGES = FA3_STAGES;
constexpr int ESZ = FP8 ? 1 : 2;           // bytes per input element
constexpr int KSTEP = FP8 ? 32 : 16;       // K of one wgmma (32 bytes either way)
constexpr int CH = 128 / ESZ;              // elements per 128-byte swizzle row
constexpr int DP = (D + CH - 1) / CH * CH; // head dim padded to whole 128-byte chunks
constexpr int NCH = DP / CH;               // swizzle chunks along d
constexpr int Q_BYTES = BQ * DP * ESZ;
constexpr int K_BYTES = BK * DP * ESZ;     // one K stage
constexpr int V_BYTES = FP8 ? D * BK : K_BYTES;  // one V stage (fp8: Vᵀ, D rows of BK bytes)
constexpr int QCHUNK = BQ * 128;           // bytes of one 128-byte-wide chunk of Q
constexpr int KCHUNK = BK * 128;
constexpr int R_BYTES = VTK ? 2 * K_BYTES : 0;  // staging ring of V as stored (FA3_VTK)
// O staging (FA3_OTMA): chunk c (64 columns) of consumer cw's tile is one TMA box of 64 rows ×
// 128 bytes at o_base + (c·NC + cw)·OBOX, which in the Q buffer is exactly cw's slice of Q chunk c.
constexpr int ODT = FP8 ? 0 : FA3_DT;      // O's element type (pack2): FP8 writes bf16
constexpr int OBOX = 64 * 128;
constexpr int ONCH = (D + 63) / 64;        // 64-column chunks of O
constexpr int O_BYTES = NC * ONCH * OBOX;
constexpr bool Q_HOLDS_O = FA3_OTMA && FA3_OBUF == 0;
constexpr bool OWN_O = FA3_OTMA && FA3_OBUF == 1;
constexpr int OWN_BYTES = OWN_O ? O_BYTES : 0;
// FA3_OBUF == 3: consumer 0 stages O in the tile's last K slot, consumer 1 in its last V slot
// (see the epilogue), so Q is free after the main loop as with a buffer of its own.
constexpr bool RING_O = FA3_OTMA && FA3_OBUF == 3;
// FA3_RDEFER: a RING_O consumer does not wait for its O store to read the slot before it leaves
// the tile; it hands the slot back after issuing the next tile's first QKᵀ, so the wait (the
// store drains while every CTA stores at once) overlaps that GEMM instead of preceding it.
constexpr bool RING_DEFER = RING_O && FA3_RDEFER;
// FA3_QEARLY: a consumer releases its Q (slice) as soon as its last QKᵀ has completed (and, with
// the sum bound, after that tile's vote, whose rare path reads Q again) instead of after its
// last PV, so that a persistent producer's load of the next tile's Q goes out a softmax and a
// PV earlier. Only where Q is read from shared memory to the end and holds no O.
constexpr bool Q_EARLY = FA3_QEARLY && !Q_HOLDS_O && FA3_QRS != 1;
// Offset of chunk c of consumer cw's staged O from its staging base: interleaved with the other
// consumers' in Q's layout (each its own slice of every Q chunk), contiguous in a ring slot.
__device__ __forceinline__ int o_chunk(int c, int cw) { return (RING_O ? c : c * NC + cw) * OBOX; }
// RING_O hand-offs (named barriers past the turns and the warpgroup barriers): consumer 1 has
// read the tile's last K slot (all its QKᵀ complete); consumer 0's last PV has read the last V slot.
constexpr int BAR_K_READ = 2 + 2 * NC, BAR_PV_DONE = 3 + 2 * NC;
constexpr bool DYN = FA3_PERSISTENT == 2;  // tiles from a global counter
// FP8 with DYN: the producer thread publishes each tile decoded, with its descale factors
// (c = scale·log2e·q_descale·k_descale and v_descale), and the consumers hold the slot until
// their epilogue: no integer divisions and no dependent global loads on the consumers' path
// between two tiles (a consumer spent ~1400 cycles between its epilogue and its next tile's Q
// wait on them: bench/RESULTS.md "Step 25").
constexpr bool SLOT_HELD = FP8 && DYN;
constexpr int SLOT_BYTES = SLOT_HELD ? 32 : 4;  // one published tile
// SLOT_HELD slot layout: {t, m, h, b, n_lo, n_hi, c, v_descale}; byte offsets of the fields the
// consumers read besides the tile (tile_publish writes them, slot_tile and consumer() read them).
constexpr u32 SLOT_M = 4, SLOT_H = 8, SLOT_B = 12, SLOT_NLO = 16, SLOT_NHI = 20, SLOT_C = 24,
              SLOT_VD = 28;
// Tile slots in the ring: a held slot comes back only after its tile's epilogue, so SLOT_HELD
// keeps four, for the producer to run as far ahead over short (causal) tiles as with two.
constexpr int NSLOT = SLOT_HELD ? 4 : 2;
constexpr bool SPLIT = FA3_SPLIT;          // split tail (split.cuh)
static_assert(!SPLIT || (FA3_PERSISTENT && !FA3_CAUSAL && !FA3_WINDOW && !PRESCALE && !FA3_VARLEN && !FP8 &&
                         PACK == 1 && D <= 128),
              "split tail: plain dense 16-bit persistent tiles, d <= 128");
static_assert(!(DYN && VTK), "dynamic scheduling: not with the in-kernel V transpose");
// FA3_LINEAR: one CTA per tile as without FA3_PERSISTENT, but a 1-D grid whose block index is
// decoded in the persistent order (causal: longest first within L2-sized head groups), so the
// hardware's in-order dispatch balances the tail as the dynamic scheduler does.
static_assert(!FA3_LINEAR || (!FA3_PERSISTENT && PACK == 1 && !FA3_VARLEN),
              "linear tile order: one CTA per tile, unpacked, dense");
// FA3_QSPLIT: every consumer's 64-row slice of Q has its own full/empty barriers.
constexpr bool QSPLIT = FA3_QSPLIT;
constexpr int NQB = QSPLIT ? NC : 1;
static_assert(!QSPLIT || (PACK == 1 && !FP8), "per-consumer Q: 16-bit, unpacked");
constexpr int SMEM_BYTES = Q_BYTES + STAGES * (K_BYTES + V_BYTES) + R_BYTES + OWN_BYTES +
                           8 * (2 * NQB + 4 * STAGES) + (VTK ? 16 : 0) + (DYN ? NSLOT * (16 + SLOT_BYTES) : 0) + 1024;
static_assert(FA3_OBUF >= 0 && FA3_OBUF <= 3, "O staging: Q slice, own buffer, VTK ring, K/V ring");
static_assert(!RING_O || (NC == 2 && STAGES >= 2 && FA3_PERSISTENT && !FP8 && PACK == 1 &&
                          ONCH * OBOX <= K_BYTES && K_BYTES == V_BYTES && !FA3_SUMB && !SPLIT &&
                          FA3_OVERLAP),
              "O in the last K/V slots: two consumers, 16-bit, persistent, a consumer's O per slot");
static_assert((Q_BYTES + STAGES * (K_BYTES + V_BYTES)) % 1024 == 0 && R_BYTES % 1024 == 0,
              "every staging base keeps the 1024-byte alignment of the 128B swizzle");
static_assert(!Q_HOLDS_O || (!FP8 && O_BYTES == Q_BYTES), "a 16-bit Q slice holds its O tile");
static_assert(!(FA3_OTMA && FA3_OBUF == 2) || (VTK && !FA3_PERSISTENT && O_BYTES <= R_BYTES),
              "the V staging ring is idle at the epilogue only with one tile per CTA");
#ifdef FA3_SMEM
static_assert(SMEM_BYTES == FA3_SMEM, "the host's smem_bytes() disagrees with this layout");
#endif
static_assert(D % 16 == 0 && BK % 16 == 0 && BK <= 256 && D <= 256, "tile shape");
static_assert(!FP8 || D % 32 == 0, "fp8: whole k32 steps along d");
static_assert(D % 64 == 0 || D % 64 == 32, "PV wgmma N: whole 64-column swizzle atoms (+ one half)");

struct __align__(64) Fa3Params {
  TmaMap q, k, v;
  TmaMap om;  // O [d, rows, heads, batch], 64 × 64 boxes (FA3_OTMA; valid when o_tma)
  u64 o;      // out, same dtype as q, element strides below
  u64 lse;    // f32 [batch, heads_q, sq]
  i64 o_batch, o_row, o_head;
  int sq, sk, heads_q, group;
  int m_tiles;
  float scale_log2;
  int batch, pad1;
  u64 cu_q, cu_k;     // int32 [batch + 1] packed offsets (FA3_VARLEN)
  u64 alibi;          // f32 slopes (FA3_ALIBI; 0 = none)
  i64 lse_b, lse_h;   // LSE strides (elements) of batch and head; the row index adds q start
  int wl, wr;         // window left/right (FA3_WINDOW), clamped to max_sq + max_sk
  float sc_in, sc_out;  // softcap: scale/softcap and softcap·log2e (sc_out 0 = off)
  int alibi_bs, pad2;   // slopes' batch stride (0 for [heads_q])
  u64 qd, kd, vd;       // FP8 descales (f32), element [b * x_b + h * x_h]; strides 0 = per tensor
  int qd_b, qd_h, kd_b, kd_h, vd_b, vd_h;
  int o_tma;            // 1: om addresses out (FA3_OTMA); 0: out's layout is not TMA-addressable
  int sched_group;      // persistent causal order: (head, batch) pairs per longest-first group
  u64 tile_ctr;         // int[2] {next tile, CTAs done}, zero at launch and left zero (FA3_PERSISTENT == 2)
  // FA3_SPLIT (split.cuh; split_ranges 0 = off): work units are tiles 0..t_main−1, then ranges
  // 0..split_ranges−1 of the split_w key tiles (split_n per tile) of tiles t_main..; a range's
  // pieces have ids t_main + 2c + j. split_ws: the pieces' slots; split_ctr: one int per tail
  // tile and consumer warpgroup, zero at launch and left zero.
  int t_main, split_ranges, split_w, split_n;
  u64 split_ws, split_ctr;
};
static_assert(sizeof(Fa3Params) == 4 * 128 + 256, "mirrored by Fa3Params in src/cuda/fa3/params.rs");

// Which (query tile, head, batch) work item t is, its sequence, and its key-tile range
// [n_lo, n_hi) (visited from n_hi − 1 down to n_lo).
struct WorkTile {
  int m, h, b, n_lo, n_hi;
  int sq, sk, qs, ks;  // this sequence's lengths and packed start rows (0 dense)
  int tb;              // TMA batch coordinate (b dense, 0 varlen)
  __device__ __forceinline__ int count() const { return n_hi - n_lo; }
};

// The end of a persistent CTA's work ids (dynamic scheduler, static stride with the split tail).
enum : int { TILE_END = 0x7fffffff };

#include "sm90/fwd_producer.cuh"
#include "sm90/fwd_mma.cuh"
#include "sm90/fwd_epilogue.cuh"
#include "sm90/fwd_consumer.cuh"
#include "sm90/fwd_scheduler.cuh"

extern "C" __global__ void __launch_bounds__(NTHREADS, 1) fa3_fwd(const __grid_constant__ Fa3Params p) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const u32 base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const u32 sQ = base;
  const u32 sK = sQ + Q_BYTES;
  const u32 sV = sK + STAGES * K_BYTES;
  const u32 sR = sV + STAGES * V_BYTES;  // FA3_VTK staging (R_BYTES, 0 otherwise)
  const u32 sO = sR + R_BYTES;           // O staging of its own (OWN_BYTES), else Q or the ring
  const u32 bars = sO + OWN_BYTES;
  const u32 q_full = bars;  // NQB barriers (FA3_QSPLIT: one per consumer)
  const u32 k_full = bars + 8 * NQB;
  const u32 v_full = k_full + 8 * STAGES;
  const u32 k_empty = v_full + 8 * STAGES;
  const u32 v_empty = k_empty + 8 * STAGES;
  const u32 q_empty = v_empty + 8 * STAGES;  // NQB barriers
  const u32 r_full = q_empty + 8 * NQB;       // 2 barriers (FA3_VTK)
  // DYN: NSLOT + NSLOT barriers, then NSLOT tile slots (SLOT_BYTES each).
  [[maybe_unused]] const u32 t_full = r_full + (VTK ? 16 : 0);
  [[maybe_unused]] const u32 t_empty = t_full + 8 * NSLOT;
  [[maybe_unused]] const u32 t_slots = t_empty + 8 * NSLOT;

  if (threadIdx.x == 0) {
    for (int i = 0; i < NQB; ++i) {
      mbar_init(q_full + 8 * i, 1);
      mbar_init(q_empty + 8 * i, 4 * NC / NQB);  // one arrival per warp of its consumers
    }
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(k_full + 8 * s, 1);
      mbar_init(v_full + 8 * s, 1);
      mbar_init(k_empty + 8 * s, 4 * NC);  // one arrival per consumer warp
      mbar_init(v_empty + 8 * s, 4 * NC);
    }
    if (VTK) {
      mbar_init(r_full, 1);
      mbar_init(r_full + 8, 1);
    }
    if (DYN) {
      for (int s = 0; s < NSLOT; ++s) {
        mbar_init(t_full + 8 * s, 1);
        mbar_init(t_empty + 8 * s, 128 * NC);  // every consumer thread
      }
    }
    mbar_fence_init();
  }
  __syncthreads();

#if FA3_PERSISTENT == 2
  // The producer thread takes work units from the counter and publishes each tile (a split
  // range: its one or two pieces) before loading it, finally TILE_END; the consumers take them
  // in the same order.
  const int total = p.m_tiles * p.heads_q * p.batch;
  const int units = SPLIT && p.split_ranges > 0 ? p.t_main + p.split_ranges : total;
#define FA3_TILE_LOOP for (int k = 0, t; (t = tile_take(t_slots, t_full, t_empty, k)) != TILE_END; ++k)
#elif FA3_PERSISTENT && FA3_SPLIT
  const int total = p.m_tiles * p.heads_q * p.batch;
#define FA3_TILE_LOOP for (int t = static_first(p, total); t != TILE_END; t = static_next(p, t, total))
#elif FA3_PERSISTENT
  const int total = p.m_tiles * p.heads_q * p.batch;
#define FA3_TILE_LOOP for (int t = blockIdx.x; t < total; t += gridDim.x)
#elif FA3_LINEAR
#define FA3_TILE_LOOP for (int t = blockIdx.x, t_end = t + 1; t < t_end; ++t)
#else
#define FA3_TILE_LOOP for (int t = 0; t < 1; ++t)
#endif
  // FA3_WGB: the warpgroup index broadcast from lane 0 — warp-uniform either way, but ptxas
  // knows it only of a broadcast, and then keeps every address derived from it (Q slice, O
  // staging, ring positions) in uniform registers: fewer R2UR moves in the main loops.
  const int wg = FA3_WGB ? __shfl_sync(0xffffffffu, threadIdx.x / 128, 0) : threadIdx.x / 128;
  int g0 = 0, jq = 0;  // ring position and Q-load count, identical in every role
  if (wg == 0) {
    reg_dealloc<PRODUCER_REGS>();
    if constexpr (VTK) {
      if (threadIdx.x == 0) {
        tma_prefetch_map(&p.q);
        tma_prefetch_map(&p.k);
        tma_prefetch_map(&p.v);
        if (FA3_OTMA && p.o_tma) tma_prefetch_map(&p.om);
      }
      FA3_TILE_LOOP {
        const WorkTile w = decode_tile(p, t);
        if (w.count() > 0) {
          producer_vtk(p, sQ, sK, sV, sR, q_full, k_full, v_full, k_empty, v_empty, q_empty, r_full,
                       w, w.h / p.group, g0, jq);
          g0 += w.count();
          ++jq;
        }
      }
    } else if (threadIdx.x == 0) {
      tma_prefetch_map(&p.q);
      tma_prefetch_map(&p.k);
      tma_prefetch_map(&p.v);
      if (FA3_OTMA && p.o_tma) tma_prefetch_map(&p.om);
      auto produce = [&](int t) {
        const WorkTile w = decode_tile(p, t);
        if (w.count() > 0) {
          producer(p, sQ, sK, sV, q_full, k_full, v_full, k_empty, v_empty, q_empty, w,
                   w.h / p.group, g0, jq);
          g0 += w.count();
          ++jq;
        }
      };
#if FA3_PERSISTENT == 2
      int k = 0;
      for (int u = blockIdx.x; u < units; u = gridDim.x + atomicAdd((int*)p.tile_ctr, 1)) {
        if (!SPLIT || p.split_ranges == 0 || u < p.t_main) {
          tile_publish(p, t_slots, t_full, t_empty, k++, u);
          produce(u);
        } else {
          for (int j = 0; j < 2; ++j) {
            int tail, lo, hi;
            const int c = u - p.t_main;
            if (!split_piece(c, j, p.split_w, p.split_ranges, p.split_n, &tail, &lo, &hi)) break;
            tile_publish(p, t_slots, t_full, t_empty, k++, p.t_main + 2 * c + j);
            produce(p.t_main + 2 * c + j);
          }
        }
      }
      tile_publish(p, t_slots, t_full, t_empty, k, TILE_END);
#else
      FA3_TILE_LOOP produce(t);
#endif
#if FA3_PERSISTENT == 2
      // This CTA's last atomicAdd on the tile counter is done (it returned an index past the
      // end). The last CTA to get here resets both counters for the next launch on the stream.
      __threadfence();
      if (atomicAdd((int*)p.tile_ctr + 1, 1) == (int)gridDim.x - 1) {
        __threadfence();
        atomicExch((int*)p.tile_ctr, 0);
        atomicExch((int*)p.tile_ctr + 1, 0);
      }
#endif
    }
  } else {
    reg_alloc<CONSUMER_REGS>();
#if FA3_PINGPONG
    // The GEMM turns run round robin across all of this CTA's tiles (every consumer takes
    // n_end + 1 per tile): the last consumer's opening arrive gives consumer 0 its first turn,
    // and consumer 0's closing sync takes the last consumer's final hand-off. Between tiles the
    // last consumer's final PV hands the turn straight to consumer 0's next QKᵀ, which so need
    // not wait for the other consumers' epilogues.
    if (wg == NC) named_arrive(2, 256);
#endif
    u32 o_pending = 0;  // RING_DEFER: the empty barrier of a slot still held for an O store
    FA3_TILE_LOOP {
#if FA3_PERSISTENT == 2
      const u32 slot = SLOT_HELD ? t_slots + SLOT_BYTES * (k % NSLOT) : 0;
#else
      const u32 slot = 0;
#endif
      const WorkTile w = SLOT_HELD ? slot_tile(p, slot) : decode_tile(p, t);
      const u32 qo = QSPLIT ? 8 * (wg - 1) : 0;  // this consumer's Q barriers
      consumer(p, sQ, sK, sV, FA3_OBUF == 2 ? sR : sO, q_full + qo, k_full, v_full, k_empty,
               v_empty, q_empty + qo, w, t, wg - 1, g0, jq, o_pending, slot);
      if (w.count() > 0) {
        g0 += w.count();
        ++jq;
      }
#if FA3_PERSISTENT == 2
      // SLOT_HELD: the slot goes back once the epilogue has read it (tile_take did not).
      if (SLOT_HELD) mbar_arrive(t_empty + 8 * (k % NSLOT));
#endif
    }
    // No later tile waits on the last slot; handed back anyway so that every held slot is
    // released exactly once (the producer's ring accounting stays symmetric).
    release_pending(o_pending, threadIdx.x % 32);
#if FA3_PINGPONG
    if (wg == 1) named_sync(2, 256);  // the last consumer's final hand-off
#endif
    // Shared memory must outlive the reads of a deferred O store (OWN_O, persistent).
    if (FA3_OTMA && threadIdx.x % 128 == 0) bulk_wait_read<0>();
  }
#undef FA3_TILE_LOOP
}

// Host reads this to size the launch (bytes of dynamic shared memory).
extern "C" __global__ void fa3_fwd_smem_bytes(int* out) { *out = SMEM_BYTES; }
