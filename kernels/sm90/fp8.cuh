// fp8.cuh — FP8 (e4m3) helpers for the sm_90a forward (FA3_DT = 2).
//
// P -> e4m3 A fragment. The m64k32 8-bit A fragment gives thread (g = lane/4, t = lane%4) four
// b32: row g / g+8 × k-cols 4t..4t+3 (regs 0/1) and 16+4t..16+4t+3 (regs 2/3), one e4m3 per byte,
// lowest k in the lowest byte. The f32 S accumulator gives the same thread columns
// {2t, 2t+1, 8+2t, 9+2t} (+16) of every 32-column chunk. Rather than shuffling registers, the
// key order of Vᵀ is permuted within every 16-key group so that A position 4t+i holds S column
// fp8_key_of(4t+i) = (i < 2 ? 2t+i : 8+2t+i-2): P's column order and Vᵀ's k order agree, and
// each thread converts its own registers in place.
#pragma once
#include "sm90/util.cuh"

// Four f32 -> four e4m3 (round to nearest even, saturate to ±448) in one b32, a0 in the low byte.
__device__ __forceinline__ u32 pack4_e4m3(float a0, float a1, float a2, float a3) {
  u32 r;
  asm("{\n.reg .b16 lo, hi;\n"
      "cvt.rn.satfinite.e4m3x2.f32 lo, %2, %1;\n"
      "cvt.rn.satfinite.e4m3x2.f32 hi, %4, %3;\n"
      "mov.b32 %0, {lo, hi};\n}\n"
      : "=r"(r)
      : "f"(a0), "f"(a1), "f"(a2), "f"(a3));
  return r;
}

// S accumulator (BK/8 n8-blocks, 4 floats each) -> BK/32 e4m3 A fragments (see the header).
template <int BKT>
__device__ __forceinline__ void to_pfrag_e4m3(const float* sc, u32 (*pf)[4]) {
#pragma unroll
  for (int kk = 0; kk < BKT / 32; ++kk) {
    const float* s = sc + 16 * kk;
    pf[kk][0] = pack4_e4m3(s[0], s[1], s[4], s[5]);
    pf[kk][1] = pack4_e4m3(s[2], s[3], s[6], s[7]);
    pf[kk][2] = pack4_e4m3(s[8], s[9], s[12], s[13]);
    pf[kk][3] = pack4_e4m3(s[10], s[11], s[14], s[15]);
  }
}

// Vᵀ positions 4t..4t+3 of a 16-key group hold keys 2t, 2t+1, 2t+8, 2t+9 (fp8_key_of). Given
// those keys' 32-bit words of four consecutive d bytes (k0, k1, k8, k9), o[r] is d row r's four
// bytes at those positions: a 4×4 byte transpose (the pre-pass; the in-kernel transpose gets the
// same layout from ldmatrix.trans and one PRMT per word, fwd_producer.cuh).
__device__ __forceinline__ void vt_quad(u32 k0, u32 k1, u32 k8, u32 k9, u32* o) {
  const u32 x = prmt(k0, k1, 0x5140), y = prmt(k0, k1, 0x7362);
  const u32 u = prmt(k8, k9, 0x5140), v = prmt(k8, k9, 0x7362);
  o[0] = prmt(x, u, 0x5410);
  o[1] = prmt(x, u, 0x7632);
  o[2] = prmt(y, v, 0x5410);
  o[3] = prmt(y, v, 0x7632);
}

// Key (within its 16-key group) stored at Vᵀ position p of that group.
__device__ __forceinline__ int fp8_key_of(int p) {
  const int t = p >> 2, i = p & 3;
  return i < 2 ? 2 * t + i : 8 + 2 * t + i - 2;
}
