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
// a two-slot ring in shared memory (tile_full / tile_empty barriers). Causal persistent order:
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
// producer warpgroup transposes it into the Vᵀ slot (32-bit shared loads, byte permutes, 32-bit
// stores, both conflict-free on the 128B swizzle), then fences the async proxy and signals v_full. Descales: c = scale·log2e·q_descale·k_descale
// (per tensor or per (batch, head): p.qd/p.kd/p.vd with element strides), O ·= v_descale at the
// end. FP8 takes dense inputs, plain or causal, BK = 128 (a Vᵀ row is one 128-byte swizzle row).
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
// main loop as with a buffer of its own (d = 256, where there is no room for one). Where TMA
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
// FA3_SPLIT=1 — the split tail (split.cuh): with FA3_PERSISTENT=2 on plain dense tiles, the
// last, partly filled round's tiles are cut along the keys, one range per CTA, and merged.
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
// Defines: FA3_D (head dim: 64, 96, 128, 192, 256; 96 is padded to 128 in shared memory, the
// TMA zero-fills the pad), FA3_BK (key tile), FA3_STAGES, FA3_DT (0 bf16, 1 f16, 2 e4m3), FA3_CAUSAL,
// FA3_OVERLAP, FA3_PINGPONG, FA3_PERSISTENT, FA3_NC, FA3_OTMA/FA3_OBUF, FA3_SMEM (the host's
// smem_bytes(), checked against this layout). Entry point: fa3_fwd (without
// FA3_PERSISTENT one CTA per query tile: grid (m_tiles, heads_q, batch), longest-first for causal).
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
#ifndef FA3_KVFIRST
#define FA3_KVFIRST 0
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
// Offset of chunk c of consumer cw's staged O from its staging base: interleaved with the other
// consumers' in Q's layout (each its own slice of every Q chunk), contiguous in a ring slot.
__device__ __forceinline__ int o_chunk(int c, int cw) { return (RING_O ? c : c * NC + cw) * OBOX; }
// RING_O hand-offs (named barriers past the turns and the warpgroup barriers): consumer 1 has
// read the tile's last K slot (all its QKᵀ complete); consumer 0's last PV has read the last V slot.
constexpr int BAR_K_READ = 2 + 2 * NC, BAR_PV_DONE = 3 + 2 * NC;
constexpr bool DYN = FA3_PERSISTENT == 2;  // tiles from a global counter
constexpr bool SPLIT = FA3_SPLIT;          // split tail (split.cuh)
static_assert(!SPLIT || (DYN && !FA3_CAUSAL && !FA3_WINDOW && !PRESCALE && !FA3_VARLEN && !FP8 &&
                         PACK == 1 && D <= 128),
              "split tail: plain dense 16-bit tiles from the dynamic scheduler, d <= 128");
static_assert(!(DYN && VTK), "dynamic scheduling: not with the in-kernel V transpose");
// FA3_QSPLIT: every consumer's 64-row slice of Q has its own full/empty barriers.
constexpr bool QSPLIT = FA3_QSPLIT;
constexpr int NQB = QSPLIT ? NC : 1;
static_assert(!QSPLIT || (PACK == 1 && !FP8), "per-consumer Q: 16-bit, unpacked");
constexpr int SMEM_BYTES = Q_BYTES + STAGES * (K_BYTES + V_BYTES) + R_BYTES + OWN_BYTES +
                           8 * (2 * NQB + 4 * STAGES) + (VTK ? 16 : 0) + (DYN ? 40 : 0) + 1024;
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
static_assert(sizeof(Fa3Params) == 4 * 128 + 256, "mirrored by Fa3Params in fa3.rs");

// Which (query tile, head, batch) work item t is, its sequence, and its key-tile range
// [n_lo, n_hi) (visited from n_hi − 1 down to n_lo).
struct WorkTile {
  int m, h, b, n_lo, n_hi;
  int sq, sk, qs, ks;  // this sequence's lengths and packed start rows (0 dense)
  int tb;              // TMA batch coordinate (b dense, 0 varlen)
  __device__ __forceinline__ int count() const { return n_hi - n_lo; }
};

// Q of work tile w (its Q use number jq), once the consumers have released the previous one.
__device__ __forceinline__ void load_q(const Fa3Params& p, u32 sQ, u32 q_full, u32 q_empty,
                                       const WorkTile& w, int jq) {
  if constexpr (QSPLIT) {
    // Slice by slice, each once its own consumer is done with it: the first consumer to finish
    // its epilogue starts the next tile while the others finish theirs. 64-row boxes.
#pragma unroll
    for (int cw = 0; cw < NC; ++cw) {
      if (jq > 0) mbar_wait(q_empty + 8 * cw, (jq - 1) & 1);
      mbar_expect_tx(q_full + 8 * cw, Q_BYTES / NC);
#pragma unroll
      for (int c = 0; c < NCH; ++c)
        tma_load_4d(sQ + c * QCHUNK + cw * 64 * 128, &p.q, q_full + 8 * cw, c * CH,
                    w.qs + w.m * BQ + cw * 64, w.h, w.tb);
    }
    return;
  }
  if (jq > 0) mbar_wait(q_empty, (jq - 1) & 1);  // consumers done with the previous Q
  mbar_expect_tx(q_full, Q_BYTES);
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
    if (PACK > 1)
      tma_load_5d(sQ + c * QCHUNK, &p.q, q_full, c * CH, 0, w.qs + w.m * (BQ / PACK), w.h / PACK, w.tb);
    else
      tma_load_4d(sQ + c * QCHUNK, &p.q, q_full, c * CH, w.qs + w.m * BQ, w.h, w.tb);
  }
}

// K of key tile `tile` of w into ring position g, once its slot's previous use is released.
__device__ __forceinline__ void load_k(const Fa3Params& p, u32 sK, u32 k_full, u32 k_empty,
                                       const WorkTile& w, int hk, int tile, int g) {
  const int s = g % STAGES;
  if (g >= STAGES) mbar_wait(k_empty + 8 * s, ((g / STAGES) + 1) & 1);
  mbar_expect_tx(k_full + 8 * s, K_BYTES);
#pragma unroll
  for (int c = 0; c < NCH; ++c)
    tma_load_4d(sK + s * K_BYTES + c * KCHUNK, &p.k, k_full + 8 * s, c * CH, w.ks + tile * BK, hk, w.tb);
}

__device__ __forceinline__ void producer(const Fa3Params& p, u32 sQ, u32 sK, u32 sV, u32 q_full,
                                         u32 k_full, u32 v_full, u32 k_empty, u32 v_empty,
                                         u32 q_empty, const WorkTile& w, int hk, int g0, int jq) {
  const int b = w.tb, n_end = w.count();
  // FA3_KVFIRST: the first K/V tile goes out before Q, whose slot a persistent CTA's consumers
  // free only after the previous tile's epilogue; the ring slots free earlier (QKᵀ / PV of the
  // previous tile's second-last key tile). Its V load is the loop's, once Q is out.
  if (FA3_KVFIRST) load_k(p, sK, k_full, k_empty, w, hk, w.n_hi - 1, g0);
  load_q(p, sQ, q_full, q_empty, w, jq);
  for (int it = 0; it < n_end; ++it) {
    const int tile = w.n_hi - 1 - it;
    const int g = g0 + it;  // ring position, continuing across the tiles of a persistent CTA
    const int s = g % STAGES;
    const u32 par = ((g / STAGES) + 1) & 1;  // parity of the previous use of slot s
    if (!FA3_KVFIRST || it > 0) load_k(p, sK, k_full, k_empty, w, hk, tile, g);
    if (g >= STAGES) mbar_wait(v_empty + 8 * s, par);
    mbar_expect_tx(v_full + 8 * s, V_BYTES);
    if constexpr (FP8) {
      // Vᵀ map [skp, d, heads_k, batch]: one box of BK keys × D rows.
      tma_load_4d(sV + s * V_BYTES, &p.v, v_full + 8 * s, tile * BK, 0, hk, b);
    } else {
#pragma unroll
      for (int c = 0; c < NCH; ++c)
        tma_load_4d(sV + s * V_BYTES + c * KCHUNK, &p.v, v_full + 8 * s, c * 64, w.ks + tile * BK, hk, b);
    }
  }
}

// FA3_VTK: V tile as stored (src: BK key rows, NCH 128-byte chunks, 128B swizzle — K's layout)
// -> Vᵀ slot (dst: D rows of BK = 128 bytes, 128B swizzle, keys permuted as fp8_key_of: position
// 4t+i of a 16-key group holds key {2t, 2t+1, 2t+8, 2t+9}[i]). Lane (G = lane/4, t = lane%4)
// gathers the 4 keys of its (group G, t) for 4 consecutive d (one 32-bit word of each key row)
// and writes 4 words, one per d row; word q = (qb + G) mod QW makes the loads and the stores
// hit 32 distinct banks. All 128 producer threads take part.
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}
__device__ __forceinline__ void transpose_v_tile(u32 src, u32 dst) {
  constexpr int QW = (D < 128 ? D : 128) / 4;  // 32-bit words of a key row per chunk
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  const int G = lane >> 2, t = lane & 3;
#pragma unroll 1
  for (int i = warp; i < NCH * QW; i += 4) {
    const int c = i / QW, q = (i % QW + G) % QW;
    u32 wv[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = 16 * G + 2 * t + (j & 1) + 8 * (j >> 1);
      const u32 a = src + c * KCHUNK + row * 128 + ((((q >> 2) ^ (row & 7))) << 4) + (q & 3) * 4;
      asm volatile("ld.shared.u32 %0, [%1];" : "=r"(wv[j]) : "r"(a));
    }
    const u32 x = prmt(wv[0], wv[1], 0x5140), y = prmt(wv[0], wv[1], 0x7362);
    const u32 u = prmt(wv[2], wv[3], 0x5140), v = prmt(wv[2], wv[3], 0x7362);
    const u32 o[4] = {prmt(x, u, 0x5410), prmt(x, u, 0x7632), prmt(y, v, 0x5410), prmt(y, v, 0x7632)};
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int n = c * 128 + 4 * q + r;
      const u32 a = dst + n * 128 + ((G ^ (n & 7)) << 4) + 4 * t;
      asm volatile("st.shared.u32 [%0], %1;" ::"r"(a), "r"(o[r]) : "memory");
    }
  }
}

// FA3_VTK producer: run by all 128 threads of warpgroup 0; thread 0 issues the TMA loads (Q, K,
// and V as stored into staging slot g % 2, one tile ahead), everyone transposes.
__device__ __forceinline__ void producer_vtk(const Fa3Params& p, u32 sQ, u32 sK, u32 sV, u32 sR,
                                             u32 q_full, u32 k_full, u32 v_full, u32 k_empty,
                                             u32 v_empty, u32 q_empty, u32 r_full,
                                             const WorkTile& w, int hk, int g0, int jq) {
  const int b = w.tb, n_end = w.count();
  const bool leader = threadIdx.x == 0;
  auto load_raw = [&](int tile, int g) {
    const int rs = g % 2;
    mbar_expect_tx(r_full + 8 * rs, K_BYTES);
#pragma unroll
    for (int c = 0; c < NCH; ++c)
      tma_load_4d(sR + rs * K_BYTES + c * KCHUNK, &p.v, r_full + 8 * rs, c * CH, w.ks + tile * BK, hk, b);
  };
  if (leader) {
    load_q(p, sQ, q_full, q_empty, w, jq);
    if (n_end > 0) {
      load_k(p, sK, k_full, k_empty, w, hk, w.n_hi - 1, g0);
      load_raw(w.n_hi - 1, g0);
    }
  }
  for (int it = 0; it < n_end; ++it) {
    const int tile = w.n_hi - 1 - it;
    const int g = g0 + it;
    const int s = g % STAGES;
    const u32 par = ((g / STAGES) + 1) & 1;
    // Tile g+1's K and V as stored go out before tile g's transpose, whose wait for the Vᵀ slot
    // (PV of tile g − STAGES) and own time would otherwise delay the K load by a whole tile.
    // K slot (g+1) % STAGES frees with QKᵀ(g+1−STAGES), which completes before that PV; staging
    // slot (g+1) % 2 was last read in iteration it−1, which ended in a barrier.
    if (leader && it + 1 < n_end) {
      load_k(p, sK, k_full, k_empty, w, hk, tile - 1, g + 1);
      load_raw(tile - 1, g + 1);
    }
    mbar_wait(r_full + 8 * (g % 2), (g / 2) & 1);
    if (g >= STAGES) mbar_wait(v_empty + 8 * s, par);
    transpose_v_tile(sR + (g % 2) * K_BYTES, sV + s * V_BYTES);
    fence_async_shared();  // generic writes -> wgmma
    named_sync(1, 128);
    if (leader) mbar_arrive(v_full + 8 * s);
  }
}

// FA3_QRS: this warp's 16 rows of Q as wgmma A fragments, one per 32-byte k-step (ldmatrix.x4
// from the 128B-swizzled tile: matrix i = lane / 8 covers rows 8·(i & 1).., bytes 16·(i >> 1)..,
// which is the A layout for 16-bit k16 and for 8-bit k32 alike).
constexpr int QF = QRS ? D / KSTEP / FA3_QRS : 1;
__device__ __forceinline__ void load_q_frags(u32 (*qf)[4], u32 sQw) {
  const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32, i = lane / 8;
  const int row = 16 * warp + 8 * (i & 1) + lane % 8;
#pragma unroll
  for (int kk = 0; kk < QF; ++kk) {
    const int u = (kk % 4) * 2 + (i >> 1);  // 16-byte unit within the 128-byte row
    const u32 a = sQw + (kk / 4) * QCHUNK + row * 128 + ((u ^ (row & 7)) << 4);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(qf[kk][0]), "=r"(qf[kk][1]), "=r"(qf[kk][2]), "=r"(qf[kk][3])
                 : "r"(a));
  }
}
// S = Q Kᵀ for this consumer's 64 rows against K slot s (issue only; caller commits/waits);
// Q from shared memory, or (FA3_QRS) from the fragments in registers.
__device__ __forceinline__ void issue_qk(float* sc, u32 sQw, const u32 (*qf)[4], u32 sKs) {
#pragma unroll
  for (int kk = 0; kk < D / KSTEP; ++kk) {
    const int c = kk / 4, w = (kk % 4) * 32;  // 32 bytes of K per step
    const u64 db = make_desc(sKs + c * KCHUNK + w, 16, 1024);
    if (QRS && kk < QF) {
      Wgmma<BK, FA3_DT>::rs_kb(sc, qf[kk < QF ? kk : 0], db, kk > 0);
    } else {
      const u64 da = make_desc(sQw + c * QCHUNK + w, 16, 1024);
      Wgmma<BK, FA3_DT>::ss(sc, da, db, kk > 0);
    }
  }
}
// O += P V for V slot s (issue only). N = D in one wgmma when D is whole 64-column atoms;
// otherwise (d = 96) the whole atoms, then the last half atom as an n32 wgmma.
__device__ __forceinline__ void issue_pv(float* o, const u32 (*pf)[4], u32 sVs) {
  if constexpr (FP8) {
    // Vᵀ: D rows of BK = 128 bytes (K-major, 128B swizzle); step kk takes bytes 32kk..32kk+31.
#pragma unroll
    for (int kk = 0; kk < BK / 32; ++kk) Wgmma<D, 2>::rs(o, pf[kk], make_desc(sVs + kk * 32, 16, 1024), 1);
  } else {
    constexpr int DW = D / 64 * 64;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      const u64 db = make_desc(sVs + kk * 2048, KCHUNK, 1024);
      Wgmma<DW, FA3_DT>::rs(o, pf[kk], db, 1);
      if constexpr (DW != D) {
        const u64 db2 = make_desc(sVs + (DW / 64) * KCHUNK + kk * 2048, KCHUNK, 1024);
        Wgmma<D - DW, FA3_DT>::rs(o + DW / 2, pf[kk], db2, 1);
      }
    }
  }
}

// Key j is visible from row i iff j < sk, and (HAS_RIGHT) j <= i + sk - sq + wr, and
// (HAS_LEFT) j >= i + sk - sq - wl.
__device__ __forceinline__ void apply_mask(float* sc, int tile, int row0, int sq, int sk, int tq,
                                           int wl, int wr) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = qrow(row0 + 8 * r);
    int limit = sk;
    if (HAS_RIGHT) limit = min(limit, row + sk - sq + wr + 1);
    const int lim = limit - tile * BK - 2 * tq;  // column index 8j + e must stay below this
    const int liml = row + sk - sq - wl - tile * BK - 2 * tq;  // ... and at or above this
#pragma unroll
    for (int j = 0; j < BK / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (8 * j + e >= lim || (HAS_LEFT && 8 * j + e < liml)) sc[4 * j + 2 * r + e] = FA3_NEG_INF;
  }
}

// tanh through exp2 (as the FA2 kernel): ~1e-7 absolute, what the score needs.
__device__ __forceinline__ float tanh_fast(float x) {
  const float e = fast_exp2(2.8853900817779268f * x);  // 2·log2(e)·x
  return 1.0f - __fdividef(2.0f, e + 1.0f);
}

// Prescaled scores (softcap / ALiBi) in log2 units; the softmax then runs with c = 1.
__device__ __forceinline__ void prescale(float* sc, int tile, int row0, int sq, int sk, int tq,
                                         float c, float sc_in, float sc_out, float slope) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int di = row0 + 8 * r + sk - sq - tile * BK - 2 * tq;  // i + sk - sq - (column base)
#pragma unroll
    for (int j = 0; j < BK / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float x = sc[4 * j + 2 * r + e];
        if (FA3_SOFTCAP && sc_out > 0.f) x = sc_out * tanh_fast(x * sc_in);
        else x *= c;
        if (FA3_ALIBI) x -= slope * fabsf((float)(di - 8 * j - e));
        sc[4 * j + 2 * r + e] = x;
      }
  }
}

__device__ __forceinline__ void to_pfrag(const float* sc, u32 (*pf)[4]) {
  if constexpr (FP8) {
    to_pfrag_e4m3<BK>(sc, pf);
  } else {
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      pf[kk][0] = pack2<FP8 ? 0 : FA3_DT>(sc[8 * kk + 0], sc[8 * kk + 1]);
      pf[kk][1] = pack2<FP8 ? 0 : FA3_DT>(sc[8 * kk + 2], sc[8 * kk + 3]);
      pf[kk][2] = pack2<FP8 ? 0 : FA3_DT>(sc[8 * kk + 4], sc[8 * kk + 5]);
      pf[kk][3] = pack2<FP8 ? 0 : FA3_DT>(sc[8 * kk + 6], sc[8 * kk + 7]);
    }
  }
}

// Ping-pong turns (FA3_PINGPONG): consumer cw waits for its turn on named barrier 2 + cw and,
// once its GEMMs are issued, hands the turn to the next consumer (round robin).
__device__ __forceinline__ void turn_take(int cw) {
#if FA3_PINGPONG
  named_sync(2 + cw, 256);
#endif
}
__device__ __forceinline__ void turn_pass(int cw) {
#if FA3_PINGPONG
  named_arrive(NC == 2 ? 3 - cw : 2 + (cw + 1 == NC ? 0 : cw + 1), 256);
#endif
}
// This warp is done with a ring slot (or Q): one arrival per consumer warp.
__device__ __forceinline__ void warp_release(u32 bar, int lane) {
  __syncwarp();
  if (lane == 0) mbar_arrive(bar);
}

// Normalised O of this thread as packed 16-bit pairs: ob[2j + r] = columns 8j + 2·tq, +1 of
// row row0 + 8r (the n8-block j of the accumulator).
__device__ __forceinline__ void pack_o(const float* o, const float* inv, u32* ob) {
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) ob[2 * j + r] = pack2<ODT>(o[4 * j + 2 * r] * inv[r], o[4 * j + 2 * r + 1] * inv[r]);
}

// Per-thread epilogue: each thread writes its pairs of rows row0 and row0 + 8 (those below the
// sequence's sq) straight to global memory.
__device__ __forceinline__ void store_o_direct(const Fa3Params& p, const u32* ob, const WorkTile& w,
                                               int row0, int tq) {
  unsigned short* out = (unsigned short*)p.o;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = qrow(row0 + 8 * r), h = w.h + (row0 + 8 * r) % PACK;
    if (row < w.sq) {
      unsigned short* orow =
          out + w.b * p.o_batch + (i64)(w.qs + row) * p.o_row + (i64)h * p.o_head + 2 * tq;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) *(u32*)(orow + 8 * j) = ob[2 * j + r];
    }
  }
}

// FA3_OTMA, step 1: consumer cw's normalised 64 × D tile goes to the staging chunks at o_base
// (see OBOX) by stmatrix — lane l addresses row l%8 (+8) of the 8×8 blocks (j, j+1) × (rows
// g, g+8); 16-byte unit u of row r sits at unit u ^ (r & 7) as the 128B swizzle wants, so each
// 8-row matrix hits 8 distinct bank quads — then the async-proxy fence and a warpgroup barrier
// (id 2 + NC + cw; 2..1+NC are the ping-pong turns, 1 the VTK producer's).
__device__ __forceinline__ void stage_o(const u32* ob, u32 o_base, int cw) {
  const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32;
  const int bar = 2 + NC + cw;
  // The slice must be free: every warp's last QKᵀ has read Q (Q_HOLDS_O), every warp's copy
  // (copy_o_rows) of the previous tile is done, and a persistent CTA's previous TMA store from
  // its own buffer has read it (that wait was deferred to here).
  if (OWN_O && FA3_PERSISTENT && t == 0) bulk_wait_read<0>();
  named_sync(bar, 128);
  const int mi = lane >> 3, rr = lane & 7;
  const int row = warp * 16 + rr + 8 * (mi & 1);
#pragma unroll
  for (int j = 0; j < D / 8; j += 2) {
    const int jl = j + (mi >> 1);  // the 8-column block this lane addresses
    const u32 a = o_base + o_chunk(jl >> 3, cw) + row * 128 + (((jl & 7) ^ rr) << 4);
    stmatrix_x4(a, ob[2 * j], ob[2 * j + 1], ob[2 * j + 2], ob[2 * j + 3]);
  }
  fence_async_shared();
  named_sync(bar, 128);
}

// FA3_OTMA, step 2: thread 0 of the warpgroup stores the staged tile (first row wrow) with one
// TMA store per chunk. Rows past a dense sq, and d = 96's pad columns, lie outside the map and
// are not written.
__device__ __forceinline__ void tma_store_o(const Fa3Params& p, u32 o_base, const WorkTile& w, int cw,
                                            int wrow) {
  if (threadIdx.x % 128 != 0) return;
#pragma unroll
  for (int c = 0; c < ONCH; ++c) {
    if (PACK > 1)
      tma_store_5d(&p.om, o_base + o_chunk(c, cw), c * 64, 0, w.qs + wrow / PACK, w.h / PACK, w.tb);
    else
      tma_store_4d(&p.om, o_base + o_chunk(c, cw), c * 64, w.qs + wrow, w.h, w.tb);
  }
  bulk_commit();
  // A persistent CTA's own buffer is next written one tile later: wait there instead.
  if (!(OWN_O && FA3_PERSISTENT)) bulk_wait_read<0>();
}

// FA3_OTMA, step 2 where TMA may not write the whole tile (see the header): the warpgroup
// copies rows wrow.. below sq out of the staging chunks, one row chunk per warp instruction —
// lane l reads 32-bit word l of the (swizzled) 128-byte row, 32 distinct banks, and writes
// columns 2l, 2l+1: 128 contiguous bytes per warp.
__device__ __forceinline__ void copy_o_rows(const Fa3Params& p, u32 o_base, const WorkTile& w, int cw,
                                            int wrow) {
  const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32;
  unsigned short* out = (unsigned short*)p.o + w.b * p.o_batch + 2 * lane;
  const int rows = min(64, w.sq * PACK - wrow);
#pragma unroll
  for (int c = 0; c < ONCH; ++c) {
    if (64 * c + 2 * lane >= D) continue;  // d = 96: the second chunk's pad columns
#pragma unroll 1
    for (int r = warp; r < rows; r += 4) {
      const u32 a = o_base + o_chunk(c, cw) + r * 128 + ((((lane >> 2) ^ (r & 7))) << 4) + 4 * (lane & 3);
      u32 v;
      asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a));
      const int pr = wrow + r;  // packed row: query qrow(pr) of head w.h + pr % PACK
      *(u32*)(out + (i64)(w.qs + qrow(pr)) * p.o_row + (i64)(w.h + pr % PACK) * p.o_head + 64 * c) = v;
    }
  }
}

__device__ __forceinline__ WorkTile decode_tile(const Fa3Params& p, int t);

// FA3_SUMB, the rare path: some row of the warpgroup failed the sum bound (softmax.cuh), so the
// tile's scores — overwritten by the exponentials — are computed again from K slot sKs (held
// until here) and taken through the softmax with its bases moved to the row maxima; O is
// rescaled to match. Nothing may be in flight (PV waited for).
template <class Softmax, class Transform>
__device__ __forceinline__ void rebase_tile(float* sc, float* o, Softmax& sm, float c, u32 sQw,
                                            const u32 (*qf)[4], u32 sKs, int tile,
                                            Transform& transform) {
  fence_regs<BK / 2>(sc);
  wgmma_fence();
  issue_qk(sc, sQw, qf, sKs);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs<BK / 2>(sc);
  transform(sc, tile);
  float alpha[2];
  sm.template step<true>(sc, c, alpha);
  rescale_o<D / 8>(o, alpha);
}

// Key tiles 0.. up to the one holding query `row`'s last visible key (right edge: causal
// diagonal + wr, bottom-right aligned); 0 when the row sees no key.
__device__ __forceinline__ int tiles_through(int row, int sq, int sk, int wr) {
  const int jmax = row + sk - sq + wr;
  return jmax < 0 ? 0 : jmax / BK + 1;
}

// w is work tile wt (its index, for the epilogue's re-derivation).
__device__ __forceinline__ void consumer(const Fa3Params& p, u32 sQ, u32 sK, u32 sV, u32 sO,
                                         u32 q_full, u32 k_full, u32 v_full, u32 k_empty,
                                         u32 v_empty, u32 q_empty, const WorkTile& w, int wt,
                                         int cw, int g0, int jq) {
  const int m = w.m, h = w.h, b = w.b, n_end = w.count();
  const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32, g = lane / 4, tq = lane % 4;
  const int row0 = m * BQ + cw * 64 + warp * 16 + g;
  const int sq = w.sq, sk = w.sk;
  const int wl = FA3_WINDOW ? p.wl : 0, wr = FA3_WINDOW ? p.wr : 0;
  // Prescaled scores are already in log2 units.
  float c = PRESCALE ? 1.0f : p.scale_log2;
  if constexpr (FP8) {
    const int hk = h / p.group;
    c *= ((const float*)p.qd)[b * p.qd_b + h * p.qd_h] * ((const float*)p.kd)[b * p.kd_b + hk * p.kd_h];
  }
  float slope = 0.f;
  if (FA3_ALIBI && p.alibi != 0)
    slope = ((const float*)p.alibi)[b * p.alibi_bs + h] * 1.4426950408889634f;
  // Tiles whose columns can reach past a row's limit need the mask.
  const int first_diag = qrow(m * BQ + cw * 64) + sk - sq;  // smallest visible-limit-1 in this warpgroup
  // Does key tile `tile` hold a masked entry for one of this warpgroup's 64 rows?
  auto need_mask = [&](int tile) {
    return (tile + 1) * BK > sk || (HAS_RIGHT && (tile + 1) * BK - 1 > first_diag + wr) ||
           (HAS_LEFT && tile * BK < first_diag + 63 - wl);
  };
  auto transform = [&](float* sc, int tile) {
    if (PRESCALE) prescale(sc, tile, row0, sq, sk, tq, p.scale_log2, p.sc_in, p.sc_out, slope);
    if (need_mask(tile)) apply_mask(sc, tile, row0, sq, sk, tq, wl, wr);
  };
  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  OnlineSoftmax<BK / 8, FA3_EMU, FA3_LAZY> sm;
  sm.init();
  const u32 sQw = sQ + cw * 64 * 128;

  // FA3_SKIP: key tiles none of this warpgroup's rows can see — the CTA's last tiles (which come
  // first) past its rows' diagonal, or all but one for a warpgroup wholly past the sequence's end
  // (its rows are never written) — are not computed: the warpgroup only takes their GEMM turns
  // and frees their slots. 192-row causal tiles otherwise do 18% extra work at 2k (12% at 4k).
  int skip = 0;
  if (FA3_SKIP && n_end > 1) {
    const int r0 = m * BQ + cw * 64;
    if (r0 >= sq * PACK) {
      skip = n_end - 1;
    } else if (HAS_RIGHT) {
      const int own_hi = tiles_through(qrow(min(sq * PACK, r0 + 64) - 1), sq, sk, wr);
      skip = max(0, min(n_end - 1, w.n_hi - own_hi));
    }
    // Warp-uniform, but ptxas only knows that of a broadcast: the ring positions derived from it
    // then stay in uniform registers (otherwise every stage address is moved over, +R2UR). With
    // FA3_WGB the index is already one; this matters where it is off (d = 256, see the host).
    skip = __shfl_sync(0xffffffffu, skip, 0);
  }
  u32 qf[QF][4];
  if (n_end > 0) {
    mbar_wait(q_full, jq & 1);
    if constexpr (QRS) {
      load_q_frags(qf, sQw);
      // All of Q in registers: its shared memory is dead now unless it stages O (then it is
      // released after the epilogue).
      if (FA3_QRS == 1 && !Q_HOLDS_O) warp_release(q_empty, lane);
    }
    // Skipped tiles: the slots are freed only once filled (the arrival must not count toward
    // the slot's previous use); the turn is passed first so that the others' GEMMs need not wait.
    for (int it = 0; it < skip; ++it) {
      const int s = (g0 + it) % STAGES;
      const u32 ph = ((g0 + it) / STAGES) & 1;
      turn_take(cw);
      turn_pass(cw);
      mbar_wait(k_full + 8 * s, ph);
      warp_release(k_empty + 8 * s, lane);
      mbar_wait(v_full + 8 * s, ph);
      warp_release(v_empty + 8 * s, lane);
    }
    // The rest as if the tile began after the skipped ones (no extra state across the loop).
    const int g1 = g0 + skip, n1 = n_end - skip, hi1 = w.n_hi - skip;
#if FA3_OVERLAP
    u32 pf[BK / KSTEP][4];
    {
      float sc[BK / 2];
      const int s0 = g1 % STAGES;
      mbar_wait(k_full + 8 * s0, (g1 / STAGES) & 1);
      turn_take(cw);
      fence_regs<BK / 2>(sc);
      wgmma_fence();
      issue_qk(sc, sQw, qf, sK + s0 * K_BYTES);
      wgmma_commit();
      turn_pass(cw);
      wgmma_wait<0>();
      fence_regs<BK / 2>(sc);
      // RING_O: consumer 0 keeps the tile's last K slot for its O (released by the epilogue).
      if (!(RING_O && cw == 0 && n1 == 1)) warp_release(k_empty + 8 * s0, lane);
      const int tile = hi1 - 1;
      transform(sc, tile);
      float alpha[2];
      sm.step(sc, c, alpha);
      to_pfrag(sc, pf);
    }
    for (int it = 1; it < n1; ++it) {
      const int tile = hi1 - 1 - it;
      const int g = g1 + it;
      const int s = g % STAGES, sp = (g - 1) % STAGES;
      const u32 ph = (g / STAGES) & 1, php = ((g - 1) / STAGES) & 1;
      float sc[BK / 2];
      mbar_wait(k_full + 8 * s, ph);
      mbar_wait(v_full + 8 * sp, php);
      turn_take(cw);
      fence_regs<BK / 2>(sc);
      fence_regs<D / 2>(o);
      wgmma_fence();
      issue_qk(sc, sQw, qf, sK + s * K_BYTES);
      wgmma_commit();
      issue_pv(o, pf, sV + sp * V_BYTES);
      wgmma_commit();
      turn_pass(cw);
      wgmma_wait<1>();
      fence_regs<BK / 2>(sc);
      if (!FA3_SUMB && !(RING_O && cw == 0 && it == n1 - 1)) warp_release(k_empty + 8 * s, lane);
      transform(sc, tile);
      // PV's wait sits in both arms of a branch on the softmax's vote: ptxas then cannot hoist
      // it above the exponentials (straight-line code gets it right after the QKᵀ wait, and the
      // softmax no longer overlaps PV).
#if FA3_SUMB
      float sum[2];
      const bool fits = sm.at_base(sc, c, sum);
      // Voted over the warpgroup: the rare path's wgmma is collective.
      if (warpgroup_any(2 + NC + cw, !fits)) {
        wgmma_wait<0>();
        fence_regs<D / 2>(o);
        rebase_tile(sc, o, sm, c, sQw, qf, sK + s * K_BYTES, tile, transform);
      } else {
        wgmma_wait<0>();
        fence_regs<D / 2>(o);
        sm.keep(sum);
      }
      warp_release(k_empty + 8 * s, lane);
#else
      float alpha[2];
      const bool rescale = sm.step(sc, c, alpha);
      if (rescale) {
        wgmma_wait<0>();
        fence_regs<D / 2>(o);
        rescale_o<D / 8>(o, alpha);
      } else {
        wgmma_wait<0>();
        fence_regs<D / 2>(o);
      }
#endif
      warp_release(v_empty + 8 * sp, lane);
      to_pfrag(sc, pf);
    }
    if (RING_O && cw == 1) named_arrive(BAR_K_READ, 256);
    {
      const int sp = (g1 + n1 - 1) % STAGES;
      const u32 php = ((g1 + n1 - 1) / STAGES) & 1;
      mbar_wait(v_full + 8 * sp, php);
      turn_take(cw);
      fence_regs<D / 2>(o);
      wgmma_fence();
      issue_pv(o, pf, sV + sp * V_BYTES);
      wgmma_commit();
      turn_pass(cw);
      wgmma_wait<0>();
      fence_regs<D / 2>(o);
      // RING_O: consumer 1 keeps the last V slot for its O (released by the epilogue).
      if (!(RING_O && cw == 1)) warp_release(v_empty + 8 * sp, lane);
    }
#else
    for (int it = 0; it < n1; ++it) {
      const int tile = hi1 - 1 - it;
      const int s = (g1 + it) % STAGES;
      const u32 ph = ((g1 + it) / STAGES) & 1;
      float sc[BK / 2];
      mbar_wait(k_full + 8 * s, ph);
      fence_regs<BK / 2>(sc);
      wgmma_fence();
      issue_qk(sc, sQw, qf, sK + s * K_BYTES);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs<BK / 2>(sc);
#if FA3_SUMB
      transform(sc, tile);
      float sum[2];
      if (warpgroup_any(2 + NC + cw, !sm.at_base(sc, c, sum)))
        rebase_tile(sc, o, sm, c, sQw, qf, sK + s * K_BYTES, tile, transform);
      else
        sm.keep(sum);
      warp_release(k_empty + 8 * s, lane);
#else
      warp_release(k_empty + 8 * s, lane);
      transform(sc, tile);
      float alpha[2];
      if (sm.step(sc, c, alpha)) rescale_o<D / 8>(o, alpha);
#endif
      u32 pf[BK / KSTEP][4];
      to_pfrag(sc, pf);
      mbar_wait(v_full + 8 * s, ph);
      fence_regs<D / 2>(o);
      wgmma_fence();
      issue_pv(o, pf, sV + s * V_BYTES);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs<D / 2>(o);
      warp_release(v_empty + 8 * s, lane);
    }
#endif
    if (RING_O && cw == 0) named_arrive(BAR_PV_DONE, 256);
    // Q may be overwritten (persistent CTAs); when it stages O, only after the epilogue.
    if (!Q_HOLDS_O && FA3_QRS != 1) warp_release(q_empty, lane);
  }

  // Epilogue: normalise, write O (16-bit pairs) and the LSE; rows past the sequence's sq are
  // not written (varlen: they belong to the next sequence). Persistent FP8 CTAs re-derive the
  // tile's coordinates here (a little integer math) instead of keeping them live across the main
  // loop, where the d = 256 consumers would otherwise spill (16-bit kernels: no need, and their
  // SASS stays as it was).
#if FA3_PERSISTENT && FA3_DT == 2
  int wt_opaque = wt;
  asm volatile("" : "+r"(wt_opaque));
  const WorkTile we = decode_tile(p, wt_opaque);
  const int erow0 = we.m * BQ + cw * 64 + warp * 16 + g;
#else
  (void)wt;
  const WorkTile& we = w;
  const int erow0 = row0;
#endif
  // FA3_SPLIT: a piece of a tail tile leaves its partial state to the piece that completes the
  // tile, which merges them and writes O and the LSE. The piece's tail tile is re-derived from
  // its id here rather than kept live across the main loop.
#if FA3_SPLIT
  if (p.split_ranges > 0 && wt >= p.t_main && n_end > 0) {
    int u = wt - p.t_main, tail, lo, hi;
    asm volatile("" : "+r"(u));
    split_piece(u >> 1, u & 1, p.split_w, p.split_ranges, p.split_n, &tail, &lo, &hi);
    if (!split_merge<D / 8>(o, sm, c, p.split_ws, p.split_ctr, tail, u, n_end, NC, cw,
                            2 + NC + cw, p.split_w, p.split_ranges, p.split_n)) {
      if (Q_HOLDS_O) warp_release(q_empty, lane);
      return;
    }
  }
#endif
  float inv[2], lse[2];
  sm.finish(c, inv, lse);
  if constexpr (FP8) {
    // Read here rather than before the main loop: one register less across it.
    const float v_descale = ((const float*)p.vd)[we.b * p.vd_b + (we.h / p.group) * p.vd_h];
    inv[0] *= v_descale, inv[1] *= v_descale;
  }
#if FA3_OTMA
  if (n_end == 0) {
    // No keys: O = 0, written directly (Q is not this tile's to stage in, see the header).
    const u32 zero[D / 4] = {};
    store_o_direct(p, zero, we, erow0, tq);
  } else {
    // RING_O: the tile's last K slot (consumer 0) or V slot (consumer 1), once the other
    // consumer is done reading it; released to the producer once the store has read it.
    const int s_last = (g0 + n_end - 1) % STAGES;
    const u32 ring_slot = cw == 0 ? sK + s_last * K_BYTES : sV + s_last * V_BYTES;
    const u32 o_base = RING_O ? ring_slot : Q_HOLDS_O ? sQ : sO;
    const int wrow = we.m * BQ + cw * 64;
    u32 ob[D / 4];
    pack_o(o, inv, ob);
    if (RING_O) named_sync(cw == 0 ? BAR_K_READ : BAR_PV_DONE, 256);
    stage_o(ob, o_base, cw);
    if (p.o_tma && !(FA3_VARLEN && wrow + 64 > we.sq * PACK))
      tma_store_o(p, o_base, we, cw, wrow);
    else
      copy_o_rows(p, o_base, we, cw, wrow);
    if (RING_O) warp_release((cw == 0 ? k_empty : v_empty) + 8 * s_last, lane);
  }
#else
  {
    u32 ob[D / 4];
    pack_o(o, inv, ob);
    store_o_direct(p, ob, we, erow0, tq);
  }
#endif
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = qrow(erow0 + 8 * r), hr = we.h + (erow0 + 8 * r) % PACK;
    if (row < we.sq && tq == 0) ((float*)p.lse)[(i64)we.b * p.lse_b + (i64)hr * p.lse_h + we.qs + row] = lse[r];
  }
  // Q holds O: thread 0 waited for its TMA store to read the slice (tma_store_o) before its
  // warp's arrival; the other warps' arrivals cannot complete the phase without it.
  if (Q_HOLDS_O && n_end > 0) warp_release(q_empty, lane);
}

__device__ __forceinline__ WorkTile decode_tile(const Fa3Params& p, int t) {
  WorkTile w;
#if FA3_SPLIT
  // A piece of a split range (ids from t_main on): its tail tile, with its key range.
  int tail = -1, piece_lo = 0, piece_hi = 0;
  if (p.split_ranges > 0 && t >= p.t_main) {
    const int u = t - p.t_main;
    split_piece(u >> 1, u & 1, p.split_w, p.split_ranges, p.split_n, &tail, &piece_lo, &piece_hi);
    t = p.t_main + tail;
  }
#endif
#if FA3_PERSISTENT
  // Persistent: the query tiles of one (head, batch) are adjacent, so CTAs running together
  // share K/V in L2. Causal: longest-processing-time order within groups of G = sched_group
  // (head, batch) pairs — the group's last query tiles first, then the second last, ... — so
  // that the CTAs take one tile of every length class (G = all pairs: the static stride's
  // order) while those running together read the K/V of at most about 2·G heads.
#if FA3_CAUSAL
  // A smaller group of the hb mod G leftover pairs comes first: its longest tiles then start
  // with the launch instead of running alone at its end.
  const int hb = p.heads_q * p.batch, G = p.sched_group;
  const int rem = hb % G, head = rem * p.m_tiles;
  int gs = rem, base = 0, t0 = t;
  if (t >= head) {
    const int tt = t - head, gi = tt / (G * p.m_tiles);
    gs = G;
    base = rem + gi * G;
    t0 = tt - gi * G * p.m_tiles;
  }
  const int mi = t0 / gs, r = base + t0 % gs;
  w.m = p.m_tiles - 1 - mi;
#else
  const int mi = t % p.m_tiles, r = t / p.m_tiles;
  w.m = mi;
#endif
  w.h = r % p.heads_q;
  w.b = r / p.heads_q;
#else
  (void)t;
  w.m = FA3_CAUSAL ? (p.m_tiles - 1 - (int)blockIdx.x) : (int)blockIdx.x;
  w.h = blockIdx.y * PACK;  // packed: the group's first query head (grid y runs over key heads)
  w.b = blockIdx.z;
#endif
#if FA3_VARLEN
  const int* cq = (const int*)p.cu_q;
  const int* ck = (const int*)p.cu_k;
  w.qs = cq[w.b];
  w.sq = cq[w.b + 1] - w.qs;
  w.ks = ck[w.b];
  w.sk = ck[w.b + 1] - w.ks;
  w.tb = 0;
#else
  w.qs = w.ks = 0;
  w.sq = p.sq;
  w.sk = p.sk;
  w.tb = w.b;
#endif
  const int sq = w.sq, sk = w.sk;
  w.n_lo = 0;
  w.n_hi = (sk + BK - 1) / BK;
  if (w.m * BQ >= sq * PACK) {
    w.n_hi = 0;  // (varlen) a query tile past this sequence's end: nothing to do
    return w;
  }
  if (HAS_RIGHT) {
    const int last_row = qrow(min(sq * PACK, (w.m + 1) * BQ) - 1);
    w.n_hi = min(w.n_hi, tiles_through(last_row, sq, sk, FA3_WINDOW ? p.wr : 0));
  }
  if (HAS_LEFT) {
    const int jmin = w.m * BQ + sk - sq - p.wl;  // first visible key of the tile's first row
    w.n_lo = jmin <= 0 ? 0 : min(jmin / BK, w.n_hi);
  }
  if (w.n_lo > w.n_hi) w.n_lo = w.n_hi;
#if FA3_SPLIT
  if (tail >= 0) {
    w.n_lo = piece_lo;
    w.n_hi = piece_hi;
  }
#endif
  return w;
}

// Dynamic scheduling (DYN): use k of the two-slot ring holds the k-th tile index of this CTA.
// The producer thread publishes it (after the consumers released use k − 2); every consumer
// thread reads it and arrives on the slot's "empty" barrier (each its own arrival, so that the
// barrier alone orders its read before the next write — also for compute-sanitizer).
__device__ __forceinline__ void tile_publish(u32 slots, u32 full, u32 empty, int k, int t) {
  const int s = k & 1;
  if (k >= 2) mbar_wait(empty + 8 * s, ((k >> 1) + 1) & 1);
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(slots + 4 * s), "r"(t) : "memory");
  mbar_arrive(full + 8 * s);
}
__device__ __forceinline__ int tile_take(u32 slots, u32 full, u32 empty, int k) {
  const int s = k & 1;
  mbar_wait(full + 8 * s, (k >> 1) & 1);
  int t;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(t) : "r"(slots + 4 * s) : "memory");
  mbar_arrive(empty + 8 * s);
  // Warp-uniform, but ptxas only knows that of a broadcast: the split tail branches on t after
  // the main loop, and a branch it takes for divergent moves the next tile's ring positions out of
  // the uniform registers (every wgmma descriptor then needs R2UR moves).
  return __shfl_sync(0xffffffffu, t, 0);
}

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
  // DYN: 2 + 2 barriers, then 2 tile slots.
  [[maybe_unused]] const u32 t_full = r_full + (VTK ? 16 : 0);
  [[maybe_unused]] const u32 t_empty = t_full + 16;
  [[maybe_unused]] const u32 t_slots = t_empty + 16;

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
      for (int s = 0; s < 2; ++s) {
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
  constexpr int TILE_END = 0x7fffffff;
  const int total = p.m_tiles * p.heads_q * p.batch;
  const int units = SPLIT && p.split_ranges > 0 ? p.t_main + p.split_ranges : total;
#define FA3_TILE_LOOP for (int k = 0, t; (t = tile_take(t_slots, t_full, t_empty, k)) != TILE_END; ++k)
#elif FA3_PERSISTENT
  const int total = p.m_tiles * p.heads_q * p.batch;
#define FA3_TILE_LOOP for (int t = blockIdx.x; t < total; t += gridDim.x)
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
          tile_publish(t_slots, t_full, t_empty, k++, u);
          produce(u);
        } else {
          for (int j = 0; j < 2; ++j) {
            int tail, lo, hi;
            const int c = u - p.t_main;
            if (!split_piece(c, j, p.split_w, p.split_ranges, p.split_n, &tail, &lo, &hi)) break;
            tile_publish(t_slots, t_full, t_empty, k++, p.t_main + 2 * c + j);
            produce(p.t_main + 2 * c + j);
          }
        }
      }
      tile_publish(t_slots, t_full, t_empty, k, TILE_END);
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
    FA3_TILE_LOOP {
      const WorkTile w = decode_tile(p, t);
      const u32 qo = QSPLIT ? 8 * (wg - 1) : 0;  // this consumer's Q barriers
      consumer(p, sQ, sK, sV, FA3_OBUF == 2 ? sR : sO, q_full + qo, k_full, v_full, k_empty,
               v_empty, q_empty + qo, w, t, wg - 1, g0, jq);
      if (w.count() > 0) {
        g0 += w.count();
        ++jq;
      }
    }
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
