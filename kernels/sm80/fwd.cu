// FlashAttention-2 forward (Dao 2023), sm80/86/89/90 via mma.sync m16n8k16.
//
// For one (batch b, query head h, query tile of BQ rows), with K/V tiles of BK keys:
//   S   = Q K_j^T                                   (f32 accumulators, in registers)
//   S   = softcap·tanh(scale·S/softcap) | scale·S;  S -= slope·|i+sk−sq−j|;  S = −inf if masked
//   m_i' = max(m_i, rowmax(S));  P = exp(S − m_i');  l_i' = e^{m_i−m_i'}·l_i + rowsum(P)
//   O   = e^{m_i−m_i'}·O + dropout(P) V_j           (P rounded to the input dtype)
//   end: O /= l_i (·1/(1−p) with dropout);  lse = m_i + log l_i  (−inf, O = 0 for empty rows)
// Everything runs in base 2: scale·log2(e) is folded into one FFMA per score (exp2).
//
// Work split: NWARPS warps, each owns MS slabs of 16 query rows (BQ = 16·MS·NWARPS); a warp
// reads only its own Q rows, so the main loop needs no exchange between warps. Q stays in
// shared memory (ldmatrix per k-step); K_j and V_j stream through cp.async. STAGES = 2 (default):
// K_{j+1}, V_{j+1} load into the other buffer during all of iteration j, one barrier per
// iteration. STAGES = 1 (small smem): V_j loads while S = Q K_j^T runs, K_{j+1} while
// O += P V_j runs, two barriers per iteration. Only tiles that touch a mask edge
// (causal/window diagonal or the sequence end) pay for per-element masking.
//
// LEAN = 1 (register-lean main loop, for tiles that would otherwise spill, e.g. 128x64w4 at
// d=128): P is rounded to 16-bit A fragments as soon as its row sums are taken (the f32 scores
// are dead before O += P V starts; dropout clears halves of the packed pairs), the output
// pointers are formed in the epilogue, Q+K_0 and V_0 are separate cp.async groups (S_0 starts
// while V_0 is in flight; one extra barrier in the first iteration), and STAGES may be 3
// (K_{j+2}, V_{j+2} load during iteration j). On the H100 this measured slower for tiles that
// fit without it (d=64/256 non-causal -5..-10%, 2026-11-26), so LEAN = 0 keeps the plain loop.
//
// JIT switches (-D): HEAD_DIM, IS_BF16, BLOCK_Q, BLOCK_K, N_WARPS, MIN_BLOCKS,
//   STAGES, S_UNROLL (k-steps of Q K^T unrolled), LEAN, HAS_MASK (causal / sliding window),
//   HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT.
// Varlen (cu_seqlens) is a run-time branch, once per block.
#include "common/types.cuh"
#include "common/mma.cuh"
#include "common/smem.cuh"
#include "common/softmax.cuh"
#include "common/philox.cuh"
#include "sm80/fwd_params.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef IS_BF16
#define IS_BF16 1
#endif
#ifndef BLOCK_Q
#define BLOCK_Q 128
#endif
#ifndef BLOCK_K
#define BLOCK_K 64
#endif
#ifndef N_WARPS
#define N_WARPS 4
#endif
#ifndef STAGES
#define STAGES 2
#endif
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 1
#endif
#ifndef S_UNROLL
#define S_UNROLL 64
#endif
#ifndef HAS_MASK
#define HAS_MASK 0
#endif
#ifndef HAS_SOFTCAP
#define HAS_SOFTCAP 0
#endif
#ifndef HAS_ALIBI
#define HAS_ALIBI 0
#endif
#ifndef HAS_DROPOUT
#define HAS_DROPOUT 0
#endif
#ifndef LEAN
#define LEAN 0
#endif

namespace {
constexpr int D = HEAD_DIM;
constexpr int BQ = BLOCK_Q;
constexpr int BK = BLOCK_K;
constexpr int NWARPS = N_WARPS;
constexpr int NT = NWARPS * 32;
constexpr int MS = BQ / (16 * NWARPS);  // 16-row slabs per warp
constexpr int W = D / 8;                // 16-byte chunks per row
constexpr int NS = BK / 8;              // n8 tiles of S per slab
constexpr int NO = D / 8;               // n8 tiles of O per slab
constexpr bool BF16 = IS_BF16 != 0;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

static_assert(D % 16 == 0 && BK % 16 == 0, "head dim and key tile must be multiples of 16");
static_assert(STAGES == 1 || STAGES == 2 || (LEAN && STAGES == 3), "1 or 2 K/V stages (3: LEAN)");
static_assert(MS * 16 * NWARPS == BQ, "BQ must be 16 * slabs * warps");

// tanh through exp2: exact to ~1e-7 absolute, which is what the score needs.
FA_DEVICE float tanh_fast(float x) {
  float e = exp2_approx(2.0f * LOG2E * x);
  return 1.0f - __fdividef(2.0f, e + 1.0f);
}

// Online-softmax step for rows (g, g+8) of slab `ms`: the running max and sum, O rescaled, and
// each P pair 2^(sl2·s − sl2·m) handed to emit(n, r, p0, p1) (kept as f32 or packed at once).
template <class Emit>
FA_DEVICE void softmax_step(float (&s)[NS][4], float (&m_i)[2], float (&l_i)[2],
                            float (&acc_o)[NO][4], float sl2, Emit emit) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = m_i[r];
#pragma unroll
    for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
    mx = quad_max(mx);
    const float m_scaled = mx == -FA_INF ? 0.0f : mx * sl2;
    const float alpha = exp2_approx(m_i[r] * sl2 - m_scaled);
    m_i[r] = mx;
    float rowsum = 0.0f;
#pragma unroll
    for (int n = 0; n < NS; ++n) {
      float p0 = exp2_approx(s[n][2 * r] * sl2 - m_scaled);
      float p1 = exp2_approx(s[n][2 * r + 1] * sl2 - m_scaled);
      rowsum += p0 + p1;
      emit(n, r, p0, p1);
    }
    l_i[r] = l_i[r] * alpha + rowsum;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      acc_o[n][2 * r] *= alpha;
      acc_o[n][2 * r + 1] *= alpha;
    }
  }
}

// The dropout words of keys j, j + 1 (j = n0 + 8n + 2t) of query i: one Philox call per 4 keys,
// counter (j / 4, i, h, b ^ offset); thread t takes the upper pair when t is odd. An element is
// dropped when its word is below the threshold.
FA_DEVICE void dropout_words(const FwdParams& p, int i, int j, int h, int b, int t, u32& w0, u32& w1) {
  Philox4 w = philox4x32_10((u32)(j >> 2), (u32)i, (u32)h, (u32)b ^ p.dropout_offset_lo,
                            p.dropout_key0, p.dropout_key1);
  w0 = (t & 1) ? w.z : w.x;
  w1 = (t & 1) ? w.w : w.y;
}
}  // namespace

extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) fa2_fwd(const FwdParams p) {
  extern __shared__ __align__(128) u8 smem_raw[];
  const u32 sQ = smem_u32(smem_raw);
  // Shared memory: Q [BQ][D], then STAGES x (K [BK][D], V [BK][D]).
  constexpr u32 KV_STAGE = 2 * BK * D * 2;
  const u32 sK = sQ + BQ * D * 2;
  const u32 sV = sK + BK * D * 2;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int h = blockIdx.x, b = blockIdx.z;
  // Causal/window: the bottom tiles see the most keys; schedule them first.
  const int m_block = HAS_MASK ? (int)(gridDim.y - 1 - blockIdx.y) : (int)blockIdx.y;

  int q_start = 0, k_start = 0, sq = p.seqlen_q, sk = p.seqlen_k;
  if (p.cu_seqlens_q != nullptr) {
    q_start = p.cu_seqlens_q[b];
    sq = p.cu_seqlens_q[b + 1] - q_start;
    k_start = p.cu_seqlens_k[b];
    sk = p.cu_seqlens_k[b + 1] - k_start;
  }
  const int m0 = m_block * BQ;
  if (m0 >= sq) return;
  const int rows_valid = min(BQ, sq - m0);
  const int hk = h / p.group;

  const u16* gq = (const u16*)p.q + b * p.q_batch_stride + (i64)(q_start + m0) * p.q_row_stride +
                  h * p.q_head_stride;
  const u16* gk = (const u16*)p.k + b * p.k_batch_stride + (i64)k_start * p.k_row_stride +
                  hk * p.k_head_stride;
  const u16* gv = (const u16*)p.v + b * p.v_batch_stride + (i64)k_start * p.v_row_stride +
                  hk * p.v_head_stride;
// Output pointers (LEAN: formed in the epilogue, not held in registers across the main loop).
#define FA_OUT_PTRS                                                                          \
  u16* go = (u16*)p.o + b * p.o_batch_stride + (i64)(q_start + m0) * p.o_row_stride +      \
            h * p.o_head_stride;                                                            \
  float* glse = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + q_start + m0;
#if !LEAN
  FA_OUT_PTRS
#endif

  // Keys visible to the tile: row i sees [i+sk-sq-left, i+sk-sq+right] ∩ [0, sk).
  const int diag0 = m0 + sk - sq;                 // key position of the first row
  const int diag1 = diag0 + rows_valid - 1;       // ... and of the last valid row
  int n_lo = 0, n_hi = sk;
  if (HAS_MASK) {
    n_lo = max(0, diag0 - p.window_left);
    n_hi = min(sk, diag1 + p.window_right + 1);
  }
  if (n_hi <= n_lo) {  // every row of the tile is empty: O = 0, lse = -inf
#if LEAN
    FA_OUT_PTRS
#endif
    for (int idx = tid; idx < rows_valid * W; idx += NT) {
      int r = idx / W, c = idx % W;
      *(uint4*)(go + r * p.o_row_stride + c * 8) = make_uint4(0, 0, 0, 0);
    }
    for (int r = tid; r < rows_valid; r += NT) glse[r] = -FA_INF;
    return;
  }
  const int nb_begin = n_lo / BK, nb_end = (n_hi + BK - 1) / BK;

#if !LEAN
  load_tile<BQ, W, NT>(sQ, gq, p.q_row_stride, rows_valid, tid);
  load_tile<BK, W, NT>(sK, gk + (i64)nb_begin * BK * p.k_row_stride, p.k_row_stride,
                       sk - nb_begin * BK, tid);
  if (STAGES == 2)
    load_tile<BK, W, NT>(sV, gv + (i64)nb_begin * BK * p.v_row_stride, p.v_row_stride,
                         sk - nb_begin * BK, tid);
  cp_async_commit();
#else
  // Groups: [Q, K_0] [V_0] [K_1 V_1] ... [K_{S-2} V_{S-2}] (STAGES >= 2); [Q, K_0] (STAGES = 1).
  load_tile<BQ, W, NT>(sQ, gq, p.q_row_stride, rows_valid, tid);
  load_tile<BK, W, NT>(sK, gk + (i64)nb_begin * BK * p.k_row_stride, p.k_row_stride,
                       sk - nb_begin * BK, tid);
  cp_async_commit();
  if (STAGES >= 2) {
    load_tile<BK, W, NT>(sV, gv + (i64)nb_begin * BK * p.v_row_stride, p.v_row_stride,
                         sk - nb_begin * BK, tid);
    cp_async_commit();
#pragma unroll
    for (int st = 1; st + 1 < STAGES; ++st) {
      const int nb = nb_begin + st;
      if (nb < nb_end) {
        load_tile<BK, W, NT>(sK + st * KV_STAGE, gk + (i64)nb * BK * p.k_row_stride,
                             p.k_row_stride, sk - nb * BK, tid);
        load_tile<BK, W, NT>(sV + st * KV_STAGE, gv + (i64)nb * BK * p.v_row_stride,
                             p.v_row_stride, sk - nb * BK, tid);
      }
      cp_async_commit();  // always: the wait counts below assume one group per tile
    }
  }
#endif

  // Scores are kept in base-2 units after multiplying by sl2. Prescaled paths (softcap,
  // ALiBi, or a non-positive scale, where max(S)·scale != max(S·scale)) multiply first.
  const bool prescale = HAS_SOFTCAP || HAS_ALIBI || !(p.scale_log2 > 0.0f);
  const float sl2 = prescale ? 1.0f : p.scale_log2;
  // The "full" variant compiles every switch; features off at run time cost a uniform branch.
  const bool use_softcap = HAS_SOFTCAP && p.softcap_outer > 0.0f;
  const bool use_dropout = HAS_DROPOUT && p.dropout_threshold > 0u;
  float slope_log2 = 0.0f;
  if (HAS_ALIBI && p.alibi_slopes != nullptr)
    slope_log2 = p.alibi_slopes[b * p.alibi_batch_stride + h] * LOG2E;

  float acc_o[MS][NO][4];
  float m_i[MS][2], l_i[MS][2];
#pragma unroll
  for (int ms = 0; ms < MS; ++ms) {
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[ms][n][e] = 0.0f;
    m_i[ms][0] = m_i[ms][1] = -FA_INF;
    l_i[ms][0] = l_i[ms][1] = 0.0f;
  }
  const int warp_row0 = warp * MS * 16;
  // ldmatrix addressing: a lane's row offset plus a small per-lane chunk table (see smem.cuh).
  const u32 q_lane = sQ + (u32)(warp_row0 + (lane & 15)) * W * 16;
  const ChunkTable<W> q_chunk(lane & 15, lane >> 4);
  const int k_row = (lane & 7) + ((lane >> 4) << 3);
  const u32 k_lane = sK + (u32)k_row * W * 16;
  const ChunkTable<W> k_chunk(k_row, (lane >> 3) & 1);
  const int v_row = (lane & 7) + (((lane >> 3) & 1) << 3);
  const u32 v_lane = sV + (u32)v_row * W * 16;
  const ChunkTable<W> v_chunk(v_row, lane >> 4);

#if LEAN
  u32 stage = 0;  // byte offset of tile j's K/V buffers
#endif
  for (int nb = nb_begin; nb < nb_end; ++nb) {
    const int n0 = nb * BK;
#if !LEAN
    const u32 stage = STAGES == 2 ? (u32)((nb - nb_begin) & 1) * KV_STAGE : 0u;
    cp_async_wait<0>();
    if (STAGES == 2) {
      __syncthreads();  // K_j, V_j (and Q) landed; every warp is done with stage j-1
      if (nb + 1 < nb_end) {
        const int n1 = n0 + BK;
        load_tile<BK, W, NT>(sK + (KV_STAGE - stage), gk + (i64)n1 * p.k_row_stride,
                             p.k_row_stride, sk - n1, tid);
        load_tile<BK, W, NT>(sV + (KV_STAGE - stage), gv + (i64)n1 * p.v_row_stride,
                             p.v_row_stride, sk - n1, tid);
        cp_async_commit();
      }
    } else {
      __syncthreads();  // K_j (and Q) landed; every warp is done with V_{j-1}
      load_tile<BK, W, NT>(sV, gv + (i64)n0 * p.v_row_stride, p.v_row_stride, sk - n0, tid);
      cp_async_commit();
    }
#else
    if (STAGES >= 2) {
      // First tile: only [Q, K_0] must have landed (V_0 may be in flight). Later tiles: all
      // but the STAGES-2 newest groups (K_j, V_j landed).
      if (nb == nb_begin) cp_async_wait<STAGES - 1>();
      else cp_async_wait<STAGES - 2>();
      __syncthreads();  // K_j landed for every thread; every warp is done with tile j-1's stage
      // Tile j+STAGES-1 goes into tile j-1's stage.
      const u32 free_stage = stage == 0 ? (u32)(STAGES - 1) * KV_STAGE : stage - KV_STAGE;
      const int n1 = n0 + (STAGES - 1) * BK;
      if (nb + STAGES - 1 < nb_end) {
        load_tile<BK, W, NT>(sK + free_stage, gk + (i64)n1 * p.k_row_stride, p.k_row_stride,
                             sk - n1, tid);
        load_tile<BK, W, NT>(sV + free_stage, gv + (i64)n1 * p.v_row_stride, p.v_row_stride,
                             sk - n1, tid);
      }
      cp_async_commit();
    } else {
      cp_async_wait<0>();
      __syncthreads();  // K_j (and Q) landed; every warp is done with V_{j-1}
      load_tile<BK, W, NT>(sV, gv + (i64)n0 * p.v_row_stride, p.v_row_stride, sk - n0, tid);
      cp_async_commit();
    }
#endif

    // S = Q K_j^T
    float s[MS][NS][4];
#pragma unroll
    for (int ms = 0; ms < MS; ++ms)
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[ms][n][e] = 0.0f;
#pragma unroll S_UNROLL
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 qa[MS][4];
#pragma unroll
      for (int ms = 0; ms < MS; ++ms)
        ldmatrix_x4(qa[ms], q_lane + ms * 16 * W * 16 + q_chunk(kk));
#pragma unroll
      for (int nn = 0; nn < BK / 16; ++nn) {
        u32 kb[4];
        ldmatrix_x4(kb, k_lane + stage + nn * 16 * W * 16 + k_chunk(kk));
#pragma unroll
        for (int ms = 0; ms < MS; ++ms) {
          mma_16816<BF16>(s[ms][2 * nn], qa[ms], kb[0], kb[1]);
          mma_16816<BF16>(s[ms][2 * nn + 1], qa[ms], kb[2], kb[3]);
        }
      }
    }

    // Score transform and mask. Interior tiles skip the per-element mask entirely.
    bool edge = n0 + BK > sk;
    if (HAS_MASK) edge = edge || n0 < diag1 - p.window_left || n0 + BK > diag0 + p.window_right + 1;
    if (prescale || edge) {
#pragma unroll
      for (int ms = 0; ms < MS; ++ms)
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = m0 + warp_row0 + ms * 16 + g + (e >> 1) * 8;  // query position
            const int j = n0 + n * 8 + 2 * t + (e & 1);                 // key position
            float x = s[ms][n][e];
            if (prescale) {
              if (HAS_SOFTCAP && use_softcap) x = p.softcap_outer * tanh_fast(x * p.softcap_inner);
              else x *= p.scale_log2;
              if (HAS_ALIBI) x -= slope_log2 * fabsf((float)(i + sk - sq - j));
            }
            if (edge) {
              bool keep = j < sk;
              if (HAS_MASK) {
                const int di = i + sk - sq;
                keep = keep && j >= di - p.window_left && j <= di + p.window_right;
              }
              x = keep ? x : -FA_INF;
            }
            s[ms][n][e] = x;
          }
    }

#if !LEAN
    // Online softmax, two rows (g, g+8) per slab per thread; P replaces S in place.
#pragma unroll
    for (int ms = 0; ms < MS; ++ms) {
      auto& sm = s[ms];
      softmax_step(sm, m_i[ms], l_i[ms], acc_o[ms], sl2, [&](int n, int r, float p0, float p1) {
        sm[n][2 * r] = p0;
        sm[n][2 * r + 1] = p1;
      });
    }

    if (HAS_DROPOUT && use_dropout) {  // after the row sums: the LSE is taken before dropout
#pragma unroll
      for (int ms = 0; ms < MS; ++ms)
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            u32 w0, w1;
            dropout_words(p, m0 + warp_row0 + ms * 16 + g + r * 8, n0 + n * 8 + 2 * t, h, b, t, w0, w1);
            if (w0 < p.dropout_threshold) s[ms][n][2 * r] = 0.0f;
            if (w1 < p.dropout_threshold) s[ms][n][2 * r + 1] = 0.0f;
          }
    }

    if (STAGES == 1) {
      cp_async_wait<0>();
      __syncthreads();  // V_j landed; every warp is done with K_j
    }
    if (STAGES == 1 && nb + 1 < nb_end) {
      const int n1 = n0 + BK;
      load_tile<BK, W, NT>(sK, gk + (i64)n1 * p.k_row_stride, p.k_row_stride, sk - n1, tid);
      cp_async_commit();
    }

    // O += P V_j: the S accumulator layout is exactly the A-fragment layout of P.
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      u32 pa[MS][4];
#pragma unroll
      for (int ms = 0; ms < MS; ++ms) {
        pa[ms][0] = pack2<BF16>(s[ms][2 * kk][0], s[ms][2 * kk][1]);
        pa[ms][1] = pack2<BF16>(s[ms][2 * kk][2], s[ms][2 * kk][3]);
        pa[ms][2] = pack2<BF16>(s[ms][2 * kk + 1][0], s[ms][2 * kk + 1][1]);
        pa[ms][3] = pack2<BF16>(s[ms][2 * kk + 1][2], s[ms][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        u32 vb[4];
        ldmatrix_x4_trans(vb, v_lane + stage + kk * 16 * W * 16 + v_chunk(dd));
#pragma unroll
        for (int ms = 0; ms < MS; ++ms) {
          mma_16816<BF16>(acc_o[ms][2 * dd], pa[ms], vb[0], vb[1]);
          mma_16816<BF16>(acc_o[ms][2 * dd + 1], pa[ms], vb[2], vb[3]);
        }
      }
    }
#else
    // Online softmax, two rows (g, g+8) per slab per thread. P leaves as 16-bit pairs:
    // pk[ms][n][r] = (P[row g + 8r][n0 + 8n + 2t], P[..][.. + 1]), the A-fragment layout of P V.
    u32 pk[MS][NS][2];
#pragma unroll
    for (int ms = 0; ms < MS; ++ms) {
      auto& pm = pk[ms];
      softmax_step(s[ms], m_i[ms], l_i[ms], acc_o[ms], sl2,
                   [&](int n, int r, float p0, float p1) { pm[n][r] = pack2<BF16>(p0, p1); });
    }

    if (HAS_DROPOUT && use_dropout) {  // after the row sums: the LSE is taken before dropout
#pragma unroll
      for (int ms = 0; ms < MS; ++ms)
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            u32 w0, w1;
            dropout_words(p, m0 + warp_row0 + ms * 16 + g + r * 8, n0 + n * 8 + 2 * t, h, b, t, w0, w1);
            // A dropped element is +0 in f16 and bf16 alike: clear its half of the pair.
            const u32 keep = (w0 < p.dropout_threshold ? 0u : 0x0000ffffu) |
                             (w1 < p.dropout_threshold ? 0u : 0xffff0000u);
            pk[ms][n][r] &= keep;
          }
    }

    if (STAGES == 1) {
      cp_async_wait<0>();
      __syncthreads();  // V_j landed; every warp is done with K_j
      if (nb + 1 < nb_end) {
        const int n1 = n0 + BK;
        load_tile<BK, W, NT>(sK, gk + (i64)n1 * p.k_row_stride, p.k_row_stride, sk - n1, tid);
        cp_async_commit();
      }
    } else if (nb == nb_begin) {
      cp_async_wait<STAGES - 1>();  // V_0 landed (only tiles 1 .. STAGES-1 may be in flight)
      __syncthreads();
    }

    // O += P V_j
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      u32 pa[MS][4];
#pragma unroll
      for (int ms = 0; ms < MS; ++ms) {
        pa[ms][0] = pk[ms][2 * kk][0];
        pa[ms][1] = pk[ms][2 * kk][1];
        pa[ms][2] = pk[ms][2 * kk + 1][0];
        pa[ms][3] = pk[ms][2 * kk + 1][1];
      }
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        u32 vb[4];
        ldmatrix_x4_trans(vb, v_lane + stage + kk * 16 * W * 16 + v_chunk(dd));
#pragma unroll
        for (int ms = 0; ms < MS; ++ms) {
          mma_16816<BF16>(acc_o[ms][2 * dd], pa[ms], vb[0], vb[1]);
          mma_16816<BF16>(acc_o[ms][2 * dd + 1], pa[ms], vb[2], vb[3]);
        }
      }
    }
    if (STAGES >= 2) {
      stage += KV_STAGE;
      if (stage == (u32)STAGES * KV_STAGE) stage = 0;
    }
#endif
  }

  // Epilogue: normalise, write lse, stage O through this warp's own Q rows, store 16 B per lane.
  __syncwarp();  // every lane of this warp is done reading its Q rows
#if LEAN  // formed here, not held in registers across the main loop
  FA_OUT_PTRS
#endif
#pragma unroll
  for (int ms = 0; ms < MS; ++ms) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(l_i[ms][r]);
      const float inv = l > 0.0f ? p.dropout_scale / l : 0.0f;
      const int row = warp_row0 + ms * 16 + g + r * 8;
      if (t == 0 && row < rows_valid)
        glse[row] = l > 0.0f ? (m_i[ms][r] * sl2 + log2_approx(l)) * LN2 : -FA_INF;
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        u32 packed = pack2<BF16>(acc_o[ms][n][2 * r] * inv, acc_o[ms][n][2 * r + 1] * inv);
        asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(sQ + swz_off<W>(row, n) + 4 * t), "r"(packed));
      }
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < (MS * 16 * W) / 32; ++i) {
    const int idx = i * 32 + lane;
    const int r = warp_row0 + idx / W, c = idx % W;
    if (r < rows_valid) {
      uint4 val;
      asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(val.x), "=r"(val.y), "=r"(val.z), "=r"(val.w)
                   : "r"(sQ + swz_off<W>(r, c)));
      *(uint4*)(go + r * p.o_row_stride + c * 8) = val;
    }
  }
}
