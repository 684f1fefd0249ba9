// Warp-level GEMM helpers of the backward kernels, on swizzled shared-memory tiles
// (common/smem.cuh layout: ROWS x W chunks of 8 half-precision elements).
//
//   gemm_nt : acc[MT][NT] += A[m][k] * B[n][k]^T    (A, B row-major with k contiguous; e.g. S = Q K^T)
//   gemm_nn : acc[MT][NT] += A * B[k][n]             (B row-major with n contiguous, read through
//                                                     ldmatrix.trans; A stored [m][k] or, with
//                                                     A_T, transposed as [k][m])
// Warp tile: MT x 16 rows starting at tile row m0, NT x 8 columns starting at column n0; NT even.
#pragma once
#include "common/types.cuh"
#include "common/mma.cuh"
#include "common/smem.cuh"
#include "common/red.cuh"

template <bool BF16>
FA_DEVICE float half_to_f32(u16 x) {
  if (BF16) return __uint_as_float(((u32)x) << 16);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
  return f;
}

template <int MT, int NT>
FA_DEVICE void zero_acc(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int b = 0; b < NT; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.f;
}

// KD: contraction length (multiple of 16). WA/WB: chunks per row of the A/B tiles.
template <bool BF16, int MT, int NT, int KD, int WA, int WB>
FA_DEVICE void gemm_nt(float (&acc)[MT][NT][4], u32 sA, int m0, u32 sB, int n0, int lane) {
  static_assert(NT % 2 == 0, "NT must be even");
#pragma unroll
  for (int kk = 0; kk < KD / 16; ++kk) {
    u32 a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      int r = m0 + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      int c = kk * 2 + (lane >> 4);
      ldmatrix_x4(a[mt], sA + swz_off<WA>(r, c));
    }
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      u32 b[4];
      int r = n0 + np * 16 + (lane & 7) + (lane >> 4) * 8;
      int c = kk * 2 + ((lane >> 3) & 1);
      ldmatrix_x4(b, sB + swz_off<WB>(r, c));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<BF16>(acc[mt][2 * np], a[mt], b[0], b[1]);
        mma_16816<BF16>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// KD: contraction length. A: rows m (A_T: rows k); B: rows k, columns n.
template <bool BF16, bool A_T, int MT, int NT, int KD, int WA, int WB>
FA_DEVICE void gemm_nn(float (&acc)[MT][NT][4], u32 sA, int m0, u32 sB, int n0, int lane) {
  static_assert(NT % 2 == 0, "NT must be even");
#pragma unroll
  for (int kk = 0; kk < KD / 16; ++kk) {
    u32 a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (A_T) {
        int r = kk * 16 + (lane & 7) + (lane >> 4) * 8;
        int c = (m0 + mt * 16) / 8 + ((lane >> 3) & 1);
        ldmatrix_x4_trans(a[mt], sA + swz_off<WA>(r, c));
      } else {
        int r = m0 + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        int c = kk * 2 + (lane >> 4);
        ldmatrix_x4(a[mt], sA + swz_off<WA>(r, c));
      }
    }
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      u32 b[4];
      int r = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      int c = (n0 + np * 16) / 8 + (lane >> 4);
      ldmatrix_x4_trans(b, sB + swz_off<WB>(r, c));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<BF16>(acc[mt][2 * np], a[mt], b[0], b[1]);
        mma_16816<BF16>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

