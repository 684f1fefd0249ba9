// bwd.cu — FlashAttention backward main kernel for Hopper (sm_90a): wgmma + TMA, self-contained.
//
// Math, per (batch b, query head h), P recomputed from the forward's LSE (c = scale·log2 e):
//   Sᵀ = K Qᵀ ;  Pᵀ = 2^(c·Sᵀ − log2e·LSE) (0 where masked) ;  dPᵀ = V dOᵀ
//   dSᵀ = scale · Pᵀ ∘ (dPᵀ − D)   with D = rowsum(dO ∘ O) (per query, from fa2_bwd_pre)
//   dV += Pᵀ dO ;  dK += dSᵀ Q ;  dQ += dS K   (dQ: f32 atomics into dq_accum, converted later)
// Masks align bottom-right: key j is visible from query row i iff j < sk and (causal/window)
// i + sk − sq − wl ≤ j ≤ i + sk − sq + wr.
//
// One CTA per (key block of BK = 128 keys, key head, batch), 3 warpgroups:
//   WG 0, warp 0: producer. Lane 0 loads K and V once, then Q and dO tiles of BQ query rows into
//     a STAGES-deep ring with TMA (128B swizzle, mbarrier transaction counts); all 32 lanes copy
//     the tile's LSE (as log2e·LSE; +inf for rows past sq and for empty rows so that P = 0
//     there) and D into shared memory and arrive on the same "full" barriers.
//   WG 1, 2: consumers, 64 keys each. Per (query head of the GQA group, query tile):
//     Sᵀ and dPᵀ by SS wgmma (both K-major), Pᵀ and dSᵀ in registers, dV += Pᵀ dO and
//     dK += dSᵀ Q by RS wgmma (the accumulators re-packed as A fragments; dO, Q MN-major);
//     dSᵀ also goes to shared memory ([key][query], double-buffered) so that both warpgroups
//     can form dQ = dS K with SS wgmma, both operands MN-major: with BQ = 64 each warpgroup
//     takes half of the head dim, with BQ = 128 half of the query rows. dQ is added into
//     dq_accum after staging in the tile's (now free) dSᵀ/Pᵀ buffer, one L2 request per 128-byte
//     line (dq_red). dK and dV stay in registers (f32) for the whole walk and leave once at the
//     end, as whole rows through the K and V buffers (write_dkdv).
// The Q-tile walk starts at a different tile per key block so that CTAs of one head do not
// add into the same dQ rows at the same time.
//
// Defines: FB_D (64, 128), FB_BQ (query tile: 128 for d = 64, 64 for d = 128), FB_DT (0 bf16,
// 1 f16), FB_STAGES, FB_MASK (causal/window: tile ranges and per-element masks; wl, wr from
// params), FB_VARLEN (packed rows with cu_seqlens). Entry point: fa3_bwd_main, grid
// (key blocks, heads_k, batch), 384 threads.
#include "sm90/util.cuh"
#include "sm90/mbarrier.cuh"
#include "sm90/tma.cuh"
#include "sm90/wgmma.cuh"
#include "common/red.cuh"

#ifndef FB_D
#define FB_D 128
#endif
#ifndef FB_BQ
#define FB_BQ 64
#endif
#ifndef FB_DT
#define FB_DT 0
#endif
#ifndef FB_STAGES
#define FB_STAGES 2
#endif
#ifndef FB_MASK
#define FB_MASK 0
#endif
#ifndef FB_VARLEN
#define FB_VARLEN 0
#endif

constexpr int D = FB_D;
constexpr int BQ = FB_BQ;
// d = 256: dK and dV of 64 keys x 256 do not fit one warpgroup's registers, so the roles split:
// one 64-key block per CTA, warpgroup 0 computes Sᵀ and Pᵀ, warpgroup 1 dPᵀ and dSᵀ (Pᵀ and dSᵀ
// meet in shared memory), and each warpgroup owns one head-dim half of dK, dV and dQ.
constexpr bool SPLIT_ROLES = D == 256;
constexpr int BK = SPLIT_ROLES ? 64 : 128;  // keys per CTA (two warpgroups of 64 otherwise)
constexpr int STAGES = FB_STAGES;
constexpr int NTHREADS = 384;
constexpr int NCH = D / 64;              // 64-column (128 B) swizzle chunks along d
constexpr int QCHUNK = BQ * 128;         // bytes of one d-chunk of a Q or dO tile
constexpr int KCHUNK = BK * 128;         // ... of the K or V block
constexpr int DSCHUNK = BK * 128;        // one 64-query chunk of dSᵀ or Pᵀ ([key][query])
constexpr int Q_BYTES = BQ * D * 2;
constexpr int K_BYTES = BK * D * 2;
constexpr int DS_BYTES = BK * BQ * 2;
constexpr int P_BYTES = SPLIT_ROLES ? DS_BYTES : 0;  // Pᵀ in shared memory (split roles only)
// dQ split between the two consumer warpgroups: by head-dim halves (BQ = 64) or query halves.
constexpr bool DQ_SPLIT_N = BQ == 64;
constexpr int DQ_N = DQ_SPLIT_N ? D / 2 : D;
constexpr int DKV_N = SPLIT_ROLES ? D / 2 : D;  // dK, dV columns per warpgroup
constexpr bool P_FROM_FRAG = BQ == 128;  // see the dS step
constexpr int PRODUCER_REGS = 24;
constexpr int CONSUMER_REGS = 240;
static_assert(D == 64 || D == 128 || D == 256, "head dim");
static_assert(BQ == 64 || BQ == 128, "query tile");
static_assert(!DQ_SPLIT_N || D % 128 == 0, "dQ split by head-dim halves needs whole chunks");
static_assert(!SPLIT_ROLES || BQ == 64, "split roles: 64-query tiles");
// dq_red stages 2 KiB per consumer warp in the tile's dSᵀ buffer (and, split roles, Pᵀ buffer).
static_assert(SPLIT_ROLES ? DS_BYTES >= 4 * 2048 && P_BYTES >= 4 * 2048 : DS_BYTES >= 8 * 2048,
              "dQ staging room");
static_assert(DQ_N % 32 == 0, "dQ staged in 32-column chunks");

constexpr int SMEM_BYTES = 2 * K_BYTES + STAGES * 2 * Q_BYTES + 2 * (DS_BYTES + P_BYTES) +
                           STAGES * 2 * BQ * 4 + 8 * (1 + 3 * STAGES) + 1024;

#define FB_NEG_INF (__int_as_float(0xff800000))
#define FB_POS_INF (__int_as_float(0x7f800000))

struct __align__(64) Fa3BwdParams {
  TmaMap q, k, v, dout;
  u64 lse;       // f32, LSE layout: [b*lse_b + h*lse_h + q_start + i]
  u64 dsum;      // f32, same layout (fa2_bwd_pre)
  u64 dq_accum;  // f32 [rows_q, heads_q, D], zeroed by fa2_bwd_pre
  u64 dk, dv;    // contiguous [rows_k, heads_k, D], input dtype, whole buffers (16-byte aligned)
  u64 cu_q, cu_k;
  i64 lse_b, lse_h;
  int sq, sk, heads_q, heads_k, group, batch;
  int wl, wr;    // window (FB_MASK), clamped to sq + sk
  float scale_log2, scale;
};

struct Seq {
  int sq, sk, qs, ks;  // lengths and packed start rows (0 dense)
  int qrow0, krow0;    // first row of this sequence in dq_accum / dk, dv
  int tb;              // TMA batch coordinate
};

__device__ __forceinline__ Seq seq_of(const Fa3BwdParams& p, int b) {
  Seq s;
#if FB_VARLEN
  const int* cq = (const int*)p.cu_q;
  const int* ck = (const int*)p.cu_k;
  s.qs = cq[b];
  s.sq = cq[b + 1] - s.qs;
  s.ks = ck[b];
  s.sk = ck[b + 1] - s.ks;
  s.qrow0 = s.qs;
  s.krow0 = s.ks;
  s.tb = 0;
#else
  s.qs = s.ks = 0;
  s.sq = p.sq;
  s.sk = p.sk;
  s.qrow0 = b * p.sq;
  s.krow0 = b * p.sk;
  s.tb = b;
#endif
  return s;
}

// The query tiles [m_lo, m_hi) that can see a key of block n.
__device__ __forceinline__ void tile_range(const Fa3BwdParams& p, const Seq& s, int n, int& m_lo,
                                           int& m_hi) {
  m_lo = 0;
  m_hi = (s.sq + BQ - 1) / BQ;
#if FB_MASK
  const int i_min = n * BK - (s.sk - s.sq) - p.wr;  // first row whose window reaches the block
  m_lo = i_min <= 0 ? 0 : min(i_min / BQ, m_hi);
  const int i_max = min(s.sk, (n + 1) * BK) - 1 - (s.sk - s.sq) + p.wl;
  m_hi = i_max < 0 ? 0 : min(m_hi, i_max / BQ + 1);
  if (m_hi < m_lo) m_hi = m_lo;
#endif
}

__device__ __forceinline__ void step_of(int it, int nm, int n, int m_lo, int h0, int& hh, int& m) {
  hh = h0 + it / nm;
  m = m_lo + (it % nm + n) % nm;  // rotated walk: spreads the dQ atomics of one head's CTAs
}

__device__ __forceinline__ void producer(const Fa3BwdParams& p, const Seq& s, int n, int hk,
                                         int n_iter, int nm, int m_lo, u32 sK, u32 sV, u32 sQ,
                                         u32 sdO, float* sLse, float* sDsum, u32 kv_full,
                                         u32 q_full, u32 do_full, u32 empty) {
  const int lane = threadIdx.x % 32;
  if (n_iter == 0) return;  // nothing to load (and no TMA may be in flight when the CTA exits)
  if (lane == 0) {
    mbar_expect_tx(kv_full, 2 * K_BYTES);
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      tma_load_4d(sK + c * KCHUNK, &p.k, kv_full, c * 64, s.ks + n * BK, hk, s.tb);
      tma_load_4d(sV + c * KCHUNK, &p.v, kv_full, c * 64, s.ks + n * BK, hk, s.tb);
    }
  }
  const float* lse = (const float*)p.lse;
  const float* dsum = (const float*)p.dsum;
  for (int it = 0; it < n_iter; ++it) {
    int hh, m;
    step_of(it, nm, n, m_lo, hk * p.group, hh, m);
    const int st = it % STAGES;
    if (it >= STAGES) mbar_wait(empty + 8 * st, ((it / STAGES) + 1) & 1);
    const i64 base = (i64)blockIdx.z * p.lse_b + (i64)hh * p.lse_h + s.qs;
    for (int r = lane; r < BQ; r += 32) {
      const int row = m * BQ + r;
      float l = FB_POS_INF, dd = 0.f;
      if (row < s.sq) {
        l = lse[base + row];
        l = (l == FB_NEG_INF) ? FB_POS_INF : l * 1.4426950408889634f;
        dd = dsum[base + row];
      }
      sLse[st * BQ + r] = l;
      sDsum[st * BQ + r] = dd;
    }
    if (lane == 0) {
      mbar_expect_tx(q_full + 8 * st, Q_BYTES);
#pragma unroll
      for (int c = 0; c < NCH; ++c)
        tma_load_4d(sQ + st * Q_BYTES + c * QCHUNK, &p.q, q_full + 8 * st, c * 64, s.qs + m * BQ, hh, s.tb);
      mbar_expect_tx(do_full + 8 * st, Q_BYTES);
#pragma unroll
      for (int c = 0; c < NCH; ++c)
        tma_load_4d(sdO + st * Q_BYTES + c * QCHUNK, &p.dout, do_full + 8 * st, c * 64, s.qs + m * BQ, hh, s.tb);
    } else {
      mbar_arrive(q_full + 8 * st);
      mbar_arrive(do_full + 8 * st);
    }
  }
}

// acc (m64 x BQ) = X · Yᵀ for 64 rows of X (K or V block, from sX) and the Q or dO tile Y,
// both K-major. Issue only.
__device__ __forceinline__ void issue_xyt(float* acc, u32 sX, u32 sY) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int c = kk / 4, w = (kk % 4) * 32;
    Wgmma<BQ, FB_DT>::ss(acc, make_desc(sX + c * KCHUNK + w, 16, 1024),
                         make_desc(sY + c * QCHUNK + w, 16, 1024), kk > 0);
  }
}
// acc (m64 x DKV_N) += A · Y (BQ x DKV_N columns of the Q or dO tile from sY, MN-major): A from
// registers, or (split roles) A = Pᵀ or dSᵀ from shared memory ([key][query], K-major). Issue only.
__device__ __forceinline__ void issue_ry(float* acc, const u32 (*a)[4], u32 sY) {
#pragma unroll
  for (int kk = 0; kk < BQ / 16; ++kk)
    Wgmma<DKV_N, FB_DT>::rs(acc, a[kk], make_desc(sY + kk * 2048, QCHUNK, 1024), 1);
}
__device__ __forceinline__ void issue_sy(float* acc, u32 sA, u32 sY) {
#pragma unroll
  for (int kk = 0; kk < BQ / 16; ++kk)
    Wgmma<DKV_N, FB_DT>::ss_tb(acc, make_desc(sA + (kk / 4) * DSCHUNK + (kk % 4) * 32, 16, 1024),
                               make_desc(sY + kk * 2048, QCHUNK, 1024), 1);
}
// Warpgroup w's part of dQ = dS (BQ x BK, from dSᵀ in shared memory) · K (BK x D).
__device__ __forceinline__ void issue_dq(float* acc, u32 sdS, u32 sK, int w) {
  const u32 a0 = DQ_SPLIT_N ? sdS : sdS + w * DSCHUNK;
  const u32 b0 = sK + (DQ_SPLIT_N ? w * DQ_N / 64 : 0) * KCHUNK;
#pragma unroll
  for (int kk = 0; kk < BK / 16; ++kk)
    Wgmma<DQ_N, FB_DT>::ss_tt(acc, make_desc(a0 + kk * 2048, DSCHUNK, 1024),
                           make_desc(b0 + kk * 2048, KCHUNK, 1024), kk > 0);
}

// Accumulator (rows g, g+8; columns 8j + 2t + {0,1}) → A fragments of k16 slices.
__device__ __forceinline__ void to_afrag(const float* x, u32 (*a)[4]) {
#pragma unroll
  for (int kk = 0; kk < BQ / 16; ++kk) {
    a[kk][0] = pack2<FB_DT>(x[8 * kk + 0], x[8 * kk + 1]);
    a[kk][1] = pack2<FB_DT>(x[8 * kk + 2], x[8 * kk + 3]);
    a[kk][2] = pack2<FB_DT>(x[8 * kk + 4], x[8 * kk + 5]);
    a[kk][3] = pack2<FB_DT>(x[8 * kk + 6], x[8 * kk + 7]);
  }
}
// One b32 of two 16-bit values → two f32 (`lo` from the low half).
template <int DT> __device__ __forceinline__ void unpack2(u32 v, float& lo, float& hi);
template <> __device__ __forceinline__ void unpack2<0>(u32 v, float& lo, float& hi) {
  lo = __uint_as_float(v << 16);
  hi = __uint_as_float(v & 0xffff0000u);
}
template <> __device__ __forceinline__ void unpack2<1>(u32 v, float& lo, float& hi) {
  asm("{\n.reg .f16 a, b;\nmov.b32 {a, b}, %2;\ncvt.f32.f16 %0, a;\ncvt.f32.f16 %1, b;\n}"
      : "=f"(lo), "=f"(hi)
      : "r"(v));
}
// Address of this thread's pair (key row kl, query columns 8j + 2t, +1) in a [key][query] tile:
// rows of 128 B per 64-query chunk, 16-byte units XOR-swizzled by (kl & 7) (the 128B pattern
// the wgmma descriptors expect).
__device__ __forceinline__ u32 kq_addr(u32 buf, int kl, int j, int tq) {
  return buf + (j / 8) * DSCHUNK + kl * 128 + (((j % 8) ^ (kl & 7)) << 4) + 4 * tq;
}
// A fragments ↔ shared memory; fragment slot (j / 2, (j % 2)·2 + r) holds rows kl + 8r, pair j.
__device__ __forceinline__ void store_frag(const u32 (*a)[4], u32 buf, int kl, int tq) {
#pragma unroll
  for (int j = 0; j < BQ / 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      asm volatile("st.shared.b32 [%0], %1;" ::"r"(kq_addr(buf, kl + 8 * r, j, tq)), "r"(a[j / 2][(j % 2) * 2 + r])
                   : "memory");
}
__device__ __forceinline__ void load_frag(u32 (*a)[4], u32 buf, int kl, int tq) {
#pragma unroll
  for (int j = 0; j < BQ / 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      asm volatile("ld.shared.b32 %0, [%1];" : "=r"(a[j / 2][(j % 2) * 2 + r]) : "r"(kq_addr(buf, kl + 8 * r, j, tq)) : "memory");
}

// Pᵀ = 2^(c·Sᵀ − log2e·LSE) in place, for rows key0, key0 + 8 of the block and query tile m;
// masked entries (keys past sk, outside the window) are 0. `wrow` is the block-local first key
// of this warpgroup's 64 rows (for the tile-level mask test).
__device__ __forceinline__ void p_tile(float* x, const float* lse2, const Fa3BwdParams& p,
                                       const Seq& s, int n, int m, int wrow, int key0, int tq) {
#if FB_MASK
  const int diag = s.sk - s.sq;  // key position of query row 0
  const bool need_mask = (n + 1) * BK > s.sk || n * BK + wrow + 63 > m * BQ + diag + p.wr ||
                         n * BK + wrow < m * BQ + BQ - 1 + diag - p.wl;
#else
  const bool need_mask = (n + 1) * BK > s.sk;
#endif
#pragma unroll
  for (int j = 0; j < BQ / 8; ++j) {
    const float2 l = *(const float2*)(lse2 + 8 * j + 2 * tq);
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = x[4 * j + 2 * r + e] * p.scale_log2 - (e ? l.y : l.x);
        if (need_mask) {
          const int key = key0 + 8 * r, row = m * BQ + 8 * j + 2 * tq + e;
          bool vis = key < s.sk;
#if FB_MASK
          vis = vis && key <= row + diag + p.wr && key >= row + diag - p.wl;
#endif
          if (!vis) v = FB_NEG_INF;
        }
        x[4 * j + 2 * r + e] = fast_exp2(v);
      }
  }
}

// dSᵀ = scale · Pᵀ ∘ (dPᵀ − D) in place of dPᵀ; Pᵀ from f32 `pf` or, if null, from the
// 16-bit fragments `pa` (with 128-query tiles the f32 copy does not fit the register budget
// next to dPᵀ; dS is rounded to 16 bits right after either way).
__device__ __forceinline__ void ds_tile(float* dp, const float* pf, const u32 (*pa)[4],
                                        const float* dsum, float scale, int tq) {
#pragma unroll
  for (int j = 0; j < BQ / 8; ++j) {
    const float2 dd = *(const float2*)(dsum + 8 * j + 2 * tq);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float p0, p1;
      if (pf) {
        p0 = pf[4 * j + 2 * r];
        p1 = pf[4 * j + 2 * r + 1];
      } else {
        unpack2<FB_DT>(pa[j / 2][(j % 2) * 2 + r], p0, p1);
      }
      dp[4 * j + 2 * r] = scale * p0 * (dp[4 * j + 2 * r] - dd.x);
      dp[4 * j + 2 * r + 1] = scale * p1 * (dp[4 * j + 2 * r + 1] - dd.y);
    }
  }
}

// Adds this warp's 16 rows x N columns of dQ (accumulator rows g, g + 8 from the tile's row
// row0; columns col0 + 8j + 2t) into dq_accum, 32 columns at a time through the warp's 2 KiB of
// shared memory (`buf`) with `red_add_staged` (common/red.cuh): straight from the fragments each
// reduction would touch eight rows with 32 bytes each, which made the L2 the bottleneck at
// d = 256. Rows past the sequence's sq are skipped (varlen: they belong to the next one). `buf`
// must be free: the caller has synchronised both consumer warpgroups after their last reads of it.
template <int N>
__device__ __forceinline__ void dq_red(const float* dq, const Fa3BwdParams& p, const Seq& s,
                                       int hh, int row0, int col0, u32 buf, int lane) {
  float* dq_accum = (float*)p.dq_accum;
#pragma unroll
  for (int c = 0; c < N / 32; ++c)
    red_add_staged<4>([&](int nt, int i) { return dq[4 * (4 * c + nt) + i]; },
                      [&](int row) {
                        return dq_accum + ((i64)(s.qrow0 + row0 + row) * p.heads_q + hh) * D + col0 + 32 * c;
                      },
                      row0, s.sq, buf, lane);
}

// Shared-memory buffers and barriers of the consumers.
struct Smem {
  u32 sK, sV, sQ, sdO, sdS, sP;
  const float *sLse, *sDsum;
  u32 kv_full, q_full, do_full, empty;
};

// dK (scale already in dS) and dV: each consumer thread puts its accumulator rows kl, kl + 8
// (block-local keys), columns col0 + 8j + 2t, as 16-bit pairs into the K and V buffers (free once
// both warpgroups are past their last GEMM; same chunked 128B-swizzled layout as the TMA loads),
// then all 256 consumer threads copy whole rows out with 16-byte stores — a quarter of the L2
// requests of storing pairs straight from the fragments. Keys past the sequence's sk are skipped.
__device__ __forceinline__ void stage_dkdv(const float* acc, u32 buf, int kl, int col0, int tq) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = kl + 8 * r;
#pragma unroll
    for (int j = 0; j < DKV_N / 8; ++j) {
      const u32 a = buf + (col0 / 64 + j / 8) * KCHUNK + row * 128 + (((j % 8) ^ (row & 7)) << 4) + 4 * tq;
      asm volatile("st.shared.b32 [%0], %1;" ::"r"(a), "r"(pack2<FB_DT>(acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1]))
                   : "memory");
    }
  }
}
__device__ __forceinline__ void write_dkdv(const float* dk, const float* dv, const Fa3BwdParams& p,
                                           const Seq& s, int n, int hk, int kl, int col0, int tq,
                                           const Smem& sm) {
  named_sync(2, 256);  // every consumer's GEMMs are done with K and V
  stage_dkdv(dk, sm.sK, kl, col0, tq);
  stage_dkdv(dv, sm.sV, kl, col0, tq);
  named_sync(2, 256);
  constexpr int UNITS = D / 8;  // 16-byte units per row
  const int t = threadIdx.x - 128;
#pragma unroll 4
  for (int i = t; i < BK * UNITS; i += 256) {
    const int row = i / UNITS, u = i % UNITS, key = n * BK + row;
    if (key >= s.sk) break;  // rows ascend with i
    const u32 a = (u / 8) * KCHUNK + row * 128 + (((u % 8) ^ (row & 7)) << 4);
    const i64 off = ((i64)(s.krow0 + key) * p.heads_k + hk) * D * 2 + u * 16;
    uint4 k4, v4;
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];" : "=r"(k4.x), "=r"(k4.y), "=r"(k4.z), "=r"(k4.w) : "r"(sm.sK + a) : "memory");
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];" : "=r"(v4.x), "=r"(v4.y), "=r"(v4.z), "=r"(v4.w) : "r"(sm.sV + a) : "memory");
    *(uint4*)((unsigned char*)p.dk + off) = k4;
    *(uint4*)((unsigned char*)p.dv + off) = v4;
  }
}


// Walk position `it` of a consumer: the (query head, query tile) it works on, its ring stage
// and parity, and the addresses of that stage's Q, dO and of the dSᵀ / Pᵀ buffers.
struct Step {
  int hh, m, st;
  u32 ph, sQs, sdOs, sdSb, sPb;
  __device__ __forceinline__ Step(const Smem& sm, int it, int nm, int n, int m_lo, int h0) {
    step_of(it, nm, n, m_lo, h0, hh, m);
    st = it % STAGES;
    ph = (it / STAGES) & 1;
    sQs = sm.sQ + st * Q_BYTES;
    sdOs = sm.sdO + st * Q_BYTES;
    sdSb = sm.sdS + (it & 1) * DS_BYTES;
    sPb = sm.sP + (it & 1) * P_BYTES;
  }
};

// d = 64, 128: each warpgroup owns 64 keys and all of dK, dV for them.
__device__ __forceinline__ void consumer(const Fa3BwdParams& p, const Seq& s, int n, int hk,
                                         int n_iter, int nm, int m_lo, int w, const Smem& sm) {
  const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32, g = lane / 4, tq = lane % 4;
  const int key_l = 64 * w + 16 * warp + g;  // block-local key row of accumulator row g
  const int key0 = n * BK + key_l;           // its key index in the sequence
  float dv[D / 2], dk[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dv[i] = dk[i] = 0.f;
  const u32 sKw = sm.sK + 64 * w * 128, sVw = sm.sV + 64 * w * 128;

  if (n_iter > 0) mbar_wait(sm.kv_full, 0);
  for (int it = 0; it < n_iter; ++it) {
    const Step k(sm, it, nm, n, m_lo, hk * p.group);
    const int hh = k.hh, m = k.m, st = k.st;
    const u32 ph = k.ph, sQs = k.sQs, sdOs = k.sdOs, sdSb = k.sdSb;
    float sc[BQ / 2], dp[BQ / 2];
    u32 pa[BQ / 16][4], da[BQ / 16][4];

    mbar_wait(sm.q_full + 8 * st, ph);
    fence_regs<BQ / 2>(sc);
    wgmma_fence();
    issue_xyt(sc, sKw, sQs);
    wgmma_commit();
    mbar_wait(sm.do_full + 8 * st, ph);
    fence_regs<BQ / 2>(dp);
    issue_xyt(dp, sVw, sdOs);
    wgmma_commit();
    wgmma_wait<1>();
    fence_regs<BQ / 2>(sc);

    p_tile(sc, sm.sLse + st * BQ, p, s, n, m, 64 * w, key0, tq);
    to_afrag(sc, pa);
    fence_regs<D / 2>(dv);
    wgmma_fence();
    issue_ry(dv, pa, sdOs);  // dV += Pᵀ dO
    wgmma_commit();
    wgmma_wait<1>();
    fence_regs<BQ / 2>(dp);

    ds_tile(dp, P_FROM_FRAG ? nullptr : sc, pa, sm.sDsum + st * BQ, p.scale, tq);
    to_afrag(dp, da);
    store_frag(da, sdSb, key_l, tq);
    fence_regs<D / 2>(dk);
    wgmma_fence();
    issue_ry(dk, da, sQs);  // dK += dSᵀ Q
    wgmma_commit();
    fence_async_shared();
    named_sync(1, 256);  // both halves of dSᵀ are in shared memory

    float dq[DQ_N / 2];
    fence_regs<DQ_N / 2>(dq);
    wgmma_fence();
    issue_dq(dq, sdSb, sm.sK, w);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs<DQ_N / 2>(dq);
    fence_regs<D / 2>(dv);
    fence_regs<D / 2>(dk);
    // Every consumer thread arrives (not one per warp): its own reads of the stage's LSE/D
    // are then ordered before the producer's next writes by the barrier alone.
    mbar_arrive(sm.empty + 8 * st);  // Q, dO, LSE, D of this stage are consumed
    named_sync(2, 256);  // both warpgroups' dQ GEMMs have read dSᵀ: its buffer stages dQ
    dq_red<DQ_N>(dq, p, s, hh, m * BQ + (DQ_SPLIT_N ? 0 : 64 * w) + 16 * warp,
                 DQ_SPLIT_N ? w * DQ_N : 0, sdSb + (4 * w + warp) * 2048, lane);
  }
  write_dkdv(dk, dv, p, s, n, hk, key_l, 0, tq, sm);
}

// d = 256 (split roles): warpgroup 0 computes Sᵀ → Pᵀ, warpgroup 1 dPᵀ → dSᵀ, both of the whole
// 64-key block; Pᵀ and dSᵀ go through shared memory, and warpgroup w accumulates columns
// [w·D/2, (w+1)·D/2) of dV = Pᵀ dO, dK = dSᵀ Q and dQ = dS K (SS wgmma).
__device__ __forceinline__ void consumer_split(const Fa3BwdParams& p, const Seq& s, int n, int hk,
                                               int n_iter, int nm, int m_lo, int w, const Smem& sm) {
  const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32, g = lane / 4, tq = lane % 4;
  const int key_l = 16 * warp + g;
  const int key0 = n * BK + key_l;
  constexpr int HALF = D / 2 / 64;  // d-chunks per warpgroup half
  float dv[DKV_N / 2], dk[DKV_N / 2];
#pragma unroll
  for (int i = 0; i < DKV_N / 2; ++i) dv[i] = dk[i] = 0.f;

  if (n_iter > 0) mbar_wait(sm.kv_full, 0);
  for (int it = 0; it < n_iter; ++it) {
    const Step k(sm, it, nm, n, m_lo, hk * p.group);
    const int hh = k.hh, m = k.m, st = k.st;
    const u32 ph = k.ph, sQs = k.sQs, sdOs = k.sdOs, sdSb = k.sdSb, sPb = k.sPb;
    float x[BQ / 2];
    u32 f[BQ / 16][4];

    mbar_wait(sm.q_full + 8 * st, ph);
    mbar_wait(sm.do_full + 8 * st, ph);
    fence_regs<BQ / 2>(x);
    wgmma_fence();
    // Sᵀ = K Qᵀ (warpgroup 0) or dPᵀ = V dOᵀ (1); operands selected, not branched, so that the
    // wgmma stays on a warpgroup-uniform path (ptxas serialises wgmma in divergent code).
    issue_xyt(x, w == 0 ? sm.sK : sm.sV, w == 0 ? sQs : sdOs);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs<BQ / 2>(x);
    if (w == 0) {
      p_tile(x, sm.sLse + st * BQ, p, s, n, m, 0, key0, tq);
      to_afrag(x, f);
      store_frag(f, sPb, key_l, tq);
      fence_async_shared();
    }
    named_sync(1, 256);  // Pᵀ is in shared memory
    if (w == 1) {
      load_frag(f, sPb, key_l, tq);
      ds_tile(x, nullptr, f, sm.sDsum + st * BQ, p.scale, tq);
      to_afrag(x, f);
      store_frag(f, sdSb, key_l, tq);
      fence_async_shared();
    }
    fence_regs<DKV_N / 2>(dv);
    wgmma_fence();
    issue_sy(dv, sPb, sdOs + w * HALF * QCHUNK);  // dV half += Pᵀ dO
    wgmma_commit();
    named_sync(1, 256);  // dSᵀ is in shared memory
    fence_regs<DKV_N / 2>(dk);
    issue_sy(dk, sdSb, sQs + w * HALF * QCHUNK);  // dK half += dSᵀ Q
    wgmma_commit();
    float dq[DQ_N / 2];
    fence_regs<DQ_N / 2>(dq);
    wgmma_fence();
    issue_dq(dq, sdSb, sm.sK, w);  // dQ half = dS K
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs<DQ_N / 2>(dq);
    fence_regs<DKV_N / 2>(dv);
    fence_regs<DKV_N / 2>(dk);
    mbar_arrive(sm.empty + 8 * st);
    named_sync(2, 256);  // both warpgroups' GEMMs have read Pᵀ and dSᵀ: their buffers stage dQ
    dq_red<DQ_N>(dq, p, s, hh, m * BQ + 16 * warp, w * DQ_N, (w == 0 ? sdSb : sPb) + warp * 2048,
                 lane);
  }
  write_dkdv(dk, dv, p, s, n, hk, key_l, w * DKV_N, tq, sm);
}

extern "C" __global__ void __launch_bounds__(NTHREADS, 1) fa3_bwd_main(const __grid_constant__ Fa3BwdParams p) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const int n = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const Seq s = seq_of(p, b);
  if (n * BK >= s.sk) return;  // (varlen) a key block past this sequence's end
  int m_lo, m_hi;
  tile_range(p, s, n, m_lo, m_hi);
  const int nm = m_hi - m_lo, n_iter = nm * p.group;

  const u32 raw = smem_u32(smem_raw);
  const u32 base = (raw + 1023u) & ~1023u;
  Smem sm;
  sm.sK = base;
  sm.sV = sm.sK + K_BYTES;
  sm.sQ = sm.sV + K_BYTES;                    // STAGES tiles
  sm.sdO = sm.sQ + STAGES * Q_BYTES;          // STAGES tiles
  sm.sdS = sm.sdO + STAGES * Q_BYTES;         // 2 buffers
  sm.sP = sm.sdS + 2 * DS_BYTES;              // 2 buffers (split roles)
  const u32 sF = sm.sP + 2 * P_BYTES;         // LSE, D: STAGES x BQ f32 each
  float* sLse = (float*)(smem_raw + (sF - raw));
  float* sDsum = sLse + STAGES * BQ;
  sm.sLse = sLse;
  sm.sDsum = sDsum;
  const u32 bars = sF + STAGES * 2 * BQ * 4;
  sm.kv_full = bars;
  sm.q_full = bars + 8;
  sm.do_full = sm.q_full + 8 * STAGES;
  sm.empty = sm.do_full + 8 * STAGES;

  if (threadIdx.x == 0) {
    mbar_init(sm.kv_full, 1);
    for (int i = 0; i < STAGES; ++i) {
      mbar_init(sm.q_full + 8 * i, 32);   // the producer warp's lanes (lane 0 with the TMA bytes)
      mbar_init(sm.do_full + 8 * i, 32);
      mbar_init(sm.empty + 8 * i, 256);   // every consumer thread
    }
    mbar_fence_init();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    reg_dealloc<PRODUCER_REGS>();
    if (threadIdx.x < 32) {
      if (threadIdx.x == 0) {
        tma_prefetch_map(&p.q);
        tma_prefetch_map(&p.k);
        tma_prefetch_map(&p.v);
        tma_prefetch_map(&p.dout);
      }
      producer(p, s, n, hk, n_iter, nm, m_lo, sm.sK, sm.sV, sm.sQ, sm.sdO, sLse, sDsum,
               sm.kv_full, sm.q_full, sm.do_full, sm.empty);
    }
  } else {
    reg_alloc<CONSUMER_REGS>();
    if constexpr (SPLIT_ROLES) consumer_split(p, s, n, hk, n_iter, nm, m_lo, wg - 1, sm);
    else consumer(p, s, n, hk, n_iter, nm, m_lo, wg - 1, sm);
  }
}

// Host reads this to size the launch (bytes of dynamic shared memory).
extern "C" __global__ void fa3_bwd_smem_bytes(int* out) { *out = SMEM_BYTES; }
