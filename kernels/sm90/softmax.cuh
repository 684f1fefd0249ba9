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
// The running output needs rescaling only when some row's base moved: step() says whether any
// row of the warp did (a warp vote), and the caller skips rescale_o otherwise. Where PV is in
// flight the caller widens the vote to the warpgroup and waits for PV in both arms of the
// branch: that keeps ptxas from hoisting the wait above the exponentials (without it the wait
// lands right after the QKᵀ wait and softmax no longer overlaps PV), and the warpgroup-uniform
// branch keeps the four warps on one wgmma.wait_group instruction, as the instruction requires.
// LAZY = 0: the base is the row maximum (it moves whenever the maximum grows; exact skip).
// LAZY = T > 0: a row keeps its old base while the new row maximum exceeds it by at most T in
// log2 units (p ≤ 2^T then: exact in f32, bf16, f16 and e4m3 for T ≤ 8), so after the first
// tiles the D/2 multiplies of rescale_o are almost never needed. m is the base actually used, so
// l, O and the LSE stay consistent with it: the result is the same softmax.
template <int NB, int EMU = 0, int LAZY = 0>
struct OnlineSoftmax {
  static_assert(LAZY >= 0 && LAZY <= 8, "p <= 2^LAZY must stay inside e4m3's range (448)");
  float m[2], l[2];
  __device__ __forceinline__ void init() {
    m[0] = m[1] = FA3_NEG_INF;
    l[0] = l[1] = 0.f;
  }
  // s: 4*NB scores of this thread. On return s holds p (unnormalised), alpha[r] the factor to
  // apply to the running output of row r; the result says whether any row of the warp needs it
  // (warp-uniform). EAGER: a base moves whenever its row's maximum grows (after at_base failed).
  // Row by row (maximum, then exponentials): interleaving the rows costs the d = 256 FP8
  // kernels spills.
  template <bool EAGER = false>
  __device__ __forceinline__ bool step(float* s, float c, float* alpha) {
    bool moved = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float base;
      moved |= rebase<EAGER>(s, r, c, alpha[r], base);
      l[r] = fmaf(l[r], alpha[r], row_exps(s, r, c, base));
    }
    return __any_sync(0xffffffff, moved);
  }
  // Row r's maximum over s and the base it gets (m[r] updated) with the factor alpha for what
  // was accumulated against the old one; whether the base moved.
  template <bool EAGER>
  __device__ __forceinline__ bool rebase(const float* s, int r, float c, float& alpha, float& base) {
    float mx = m[r];
#pragma unroll
    for (int j = 0; j < NB; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
    // Keep the old base (alpha = 1) while the new maximum is within 2^LAZY of it; never while
    // it is −inf (the difference is then +inf or NaN; LAZY = 0 tests that explicitly).
    // Bases, their differences and the tests on them are rounded operations (no FMA
    // contraction, which may differ with the inlining context).
    const float old = __fmul_rn(m[r], c);
    const bool keep = EAGER ? (mx <= m[r] && m[r] != FA3_NEG_INF)
                      : LAZY ? __fsub_rn(__fmul_rn(mx, c), old) <= (float)LAZY
                             : (mx == m[r] && mx != FA3_NEG_INF);
    if (keep) {
      base = old;
      alpha = 1.f;
      return false;
    }
    base = (mx == FA3_NEG_INF) ? 0.f : __fmul_rn(mx, c);
    alpha = fast_exp2(__fsub_rn(old, base));
    m[r] = mx;
    return true;
  }
  // Row r's scores to p = 2^(s·c − base); returns this thread's part of the row sum.
  __device__ __forceinline__ float row_exps(float* s, int r, float c, float base) {
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
    return sum;
  }
  // The sum bound (FA3_SUMB): a key tile's exponentials against the rows' current bases,
  // without their maxima. They may stand if every p ≤ 2^LAZY (as the lazy rule guarantees) —
  // implied by this thread's partial row sum staying within 2^LAZY, since no p is negative; a
  // NaN or infinite sum fails the test — and if a row without a base yet (m = −inf: base 0)
  // got no mass. The caller votes on the answer; where it holds, keep() adds the sums, else it
  // recomputes the scores and runs step<true>() (the bases move to the maxima, so the next
  // tiles' sums stay small until a maximum grows again).
  __device__ __forceinline__ bool at_base(float* s, float c, float* sum) {
    static_assert(LAZY > 0 && EMU == 0, "the sum bound needs the lazy rule and MUFU exponentials");
    float base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      base[r] = m[r] == FA3_NEG_INF ? 0.f : __fmul_rn(m[r], c);
      sum[r] = 0.f;
    }
    // Both rows per n8-block (the order measured in bench/RESULTS.md "Step 17"); each row's
    // sum runs over its elements in the same order as row_exps.
#pragma unroll
    for (int j = 0; j < NB; ++j) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = fast_exp2(fmaf(s[4 * j + 2 * r + e], c, -base[r]));
          s[4 * j + 2 * r + e] = p;
          sum[r] += p;
        }
      }
    }
    constexpr float bound = (float)(1 << LAZY);
    return sum[0] <= bound && sum[1] <= bound && (m[0] != FA3_NEG_INF || sum[0] == 0.f) &&
           (m[1] != FA3_NEG_INF || sum[1] == 0.f);
  }
  __device__ __forceinline__ void keep(const float* sum) {
    l[0] += sum[0];
    l[1] += sum[1];
  }
  // Folds in another partial state of the same rows (base mk, this thread's sums lk — a piece of
  // the key range, split.cuh): the new base is the larger, with the same −inf rule as step();
  // on return fo / fk scale this state's and the other's output rows.
  __device__ __forceinline__ void merge(const float* mk, const float* lk, float c, float* fo,
                                        float* fk) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float mx = fmaxf(m[r], mk[r]);
      const float base = mx == FA3_NEG_INF ? 0.f : __fmul_rn(mx, c);
      fo[r] = fast_exp2(__fsub_rn(__fmul_rn(m[r], c), base));
      fk[r] = fast_exp2(__fsub_rn(__fmul_rn(mk[r], c), base));
      l[r] = fmaf(l[r], fo[r], __fmul_rn(lk[r], fk[r]));
      m[r] = mx;
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
      lse[r] = empty ? FA3_NEG_INF : __fadd_rn(__fmul_rn(m[r], c), fast_log2(t)) * 0.6931471805599453f;
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
