// Self-contained scalar types for NVRTC (no CUDA headers, no <cstdint>).
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef int i32;
typedef long long i64;

#define FA_DEVICE __device__ __forceinline__

// Pack two floats into one 32-bit register of two f16 / bf16 (lo = a, hi = b), rounding to nearest.
FA_DEVICE u32 pack_f16x2(float a, float b) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
  return r;
}
FA_DEVICE u32 pack_bf16x2(float a, float b) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
  return r;
}
template <bool BF16> FA_DEVICE u32 pack2(float a, float b) {
  return BF16 ? pack_bf16x2(a, b) : pack_f16x2(a, b);
}

FA_DEVICE float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
FA_DEVICE float log2_approx(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
FA_DEVICE float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

#define FA_INF __int_as_float(0x7f800000)
