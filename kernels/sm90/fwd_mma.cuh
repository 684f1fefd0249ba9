// fwd_mma.cuh — a consumer's tile primitives: Q fragments in registers, the QKᵀ and PV wgmma
// issues, masks and the softcap/ALiBi prescale, scores to P fragments, the ping-pong turns, slot
// release.
// Part of fwd.cu: included by it after its configuration (FA3_* defines, constants, Fa3Params,
// WorkTile), in the order fwd.cu lists; not a standalone header.
#pragma once

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

// The wgmma protocol of a consumer's GEMMs: the accumulators' registers are fenced (fence_regs:
// ptxas must not move their reads or writes into the asynchronous window) before wgmma.fence
// and again once the wait returns. start_*: fence, issue, commit (one group per GEMM); the
// caller passes its ping-pong turn, then waits with wait_acc<groups still allowed in flight>.
__device__ __forceinline__ void start_qk(float* sc, u32 sQw, const u32 (*qf)[4], u32 sKs) {
  fence_regs<BK / 2>(sc);
  wgmma_fence();
  issue_qk(sc, sQw, qf, sKs);
  wgmma_commit();
}
__device__ __forceinline__ void start_pv(float* o, const u32 (*pf)[4], u32 sVs) {
  fence_regs<D / 2>(o);
  wgmma_fence();
  issue_pv(o, pf, sVs);
  wgmma_commit();
}
// S_{j+1} = Q K_{j+1}ᵀ, then O += P_j V_j: two groups, so that wait_acc<1> returns with S.
__device__ __forceinline__ void start_qk_pv(float* sc, float* o, u32 sQw, const u32 (*qf)[4],
                                            u32 sKs, const u32 (*pf)[4], u32 sVs) {
  fence_regs<BK / 2>(sc);
  fence_regs<D / 2>(o);
  wgmma_fence();
  issue_qk(sc, sQw, qf, sKs);
  wgmma_commit();
  issue_pv(o, pf, sVs);
  wgmma_commit();
}
template <int N, int R>
__device__ __forceinline__ void wait_acc(float* acc) {
  wgmma_wait<N>();
  fence_regs<R>(acc);
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
