// softmax.cuh — online softmax on a wgmma accumulator tile held in registers.
// Each thread holds two rows (g and g+8 of its warp's 16) with NB n8-blocks each; the other
// three lanes of its quad hold the rest of those rows, so row reductions are two xor-shuffles.
// Scores stay unscaled: p = 2^(s·c − m·c) with c = scale·log2(e) folded into one FFMA; a row
// whose maximum is still −inf uses 0 as its base so that masked entries give exactly 0, never NaN.
#pragma once
#include "sm90/util.cuh"

#define FA3_NEG_INF (__int_as_float(0xff800000))

// EMU of every 8 n8-blocks of a row take their exponentials from exp2_poly (FMA pipe), the rest
// from the MUFU: where the MUFU bounds the loop (FP8 d = 64) the two pipes share the work.
template <int NB, int EMU = 0>
struct OnlineSoftmax {
  float m[2], l[2];
  __device__ __forceinline__ void init() {
    m[0] = m[1] = FA3_NEG_INF;
    l[0] = l[1] = 0.f;
  }
  // s: 4*NB scores of this thread. On return s holds p (unnormalised), alpha[r] the factor to
  // apply to the running output of row r.
  __device__ __forceinline__ void step(float* s, float c, float* alpha) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m[r];
#pragma unroll
      for (int j = 0; j < NB; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      const float base = (mx == FA3_NEG_INF) ? 0.f : mx * c;
      alpha[r] = fast_exp2(m[r] * c - base);
      m[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < NB; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float x = fmaf(s[4 * j + 2 * r + e], c, -base);
          const float p = (j % 8 >= 8 - EMU) ? exp2_poly(x) : fast_exp2(x);
          s[4 * j + 2 * r + e] = p;
          sum += p;
        }
      }
      l[r] = l[r] * alpha[r] + sum;
    }
  }
  // Final row sums (quad-reduced) -> 1/l (0 for empty rows) and the natural-log LSE.
  __device__ __forceinline__ void finish(float c, float* inv, float* lse) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float t = l[r];
      t += __shfl_xor_sync(0xffffffff, t, 1);
      t += __shfl_xor_sync(0xffffffff, t, 2);
      // A row that never saw a finite score is empty (its sum may hold exp2_poly's ~1e-38s).
      const bool empty = (EMU > 0 && m[r] == FA3_NEG_INF) || !(t > 0.f);
      inv[r] = empty ? 0.f : 1.f / t;
      lse[r] = empty ? FA3_NEG_INF : (m[r] * c + fast_log2(t)) * 0.6931471805599453f;
    }
  }
};

// Multiply the running output rows by alpha (layout as the accumulator, ND n8-blocks).
template <int ND>
__device__ __forceinline__ void rescale_o(float* o, const float* alpha) {
#pragma unroll
  for (int j = 0; j < ND; ++j) {
    o[4 * j + 0] *= alpha[0];
    o[4 * j + 1] *= alpha[0];
    o[4 * j + 2] *= alpha[1];
    o[4 * j + 3] *= alpha[1];
  }
}
