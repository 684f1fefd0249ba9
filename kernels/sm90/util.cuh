// util.cuh — self-contained basics for the sm_90a kernels (no CUDA headers): integer types,
// shared-space addresses, bf16/f16 packing, stmatrix, fast exp2/log2, named barriers, register
// budgets.
#pragma once
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

__device__ __forceinline__ u32 smem_u32(const void* p) {
  return (u32)__cvta_generic_to_shared(p);
}
// Two f32 -> one b32 of two 16-bit values; `lo` lands in the low half (the lower column).
template <int DT> __device__ __forceinline__ u32 pack2(float lo, float hi);
template <> __device__ __forceinline__ u32 pack2<0>(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <> __device__ __forceinline__ u32 pack2<1>(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
// Four 8×8 16-bit matrices to shared memory: lanes 8i..8i+7 give the row addresses (16 bytes
// each) of matrix i, and r_i is each lane's pair of matrix i in the mma accumulator layout
// (row lane/4, columns 2·(lane%4), +1).
__device__ __forceinline__ void stmatrix_x4(u32 addr, u32 r0, u32 r1, u32 r2, u32 r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(r0),
               "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// 2^x for -inf <= x < 128 on the FMA pipe instead of the MUFU (which does 16 exp2 per SM and
// clock against 128 FMAs); the softmax passes x <= 2^FA3_LAZY's exponent (8). x = n + f with
// n = round(x) by the 1.5·2^23 trick (the low bits of the sum hold n, either sign), 2^f on
// [-1/2, 1/2] by a cubic minimax polynomial (relative error 7.5e-5, below 16-bit P's rounding),
// 2^n added to the exponent field. x is clamped at -126 so that the exponent cannot wrap: masked
// scores (-inf) give ~1e-38 instead of 0, which a row with a finite score (its sum is >= 1)
// cannot notice.
__device__ __forceinline__ float exp2_poly(float x) {
  x = fmaxf(x, -126.f);
  const float t = __fadd_rn(x, 12582912.f);
  const float f = __fsub_rn(x, __fsub_rn(t, 12582912.f));
  const float p = fmaf(fmaf(fmaf(0.055171433836221695f, f, 0.24261081218719482f), f, 0.6932609677314758f), f,
                       0.9999281167984009f);
  return __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));
}
__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ void named_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(count) : "memory");
}
// bar.red.or over named barrier `id` (count threads): true on all of them when v is on any.
__device__ __forceinline__ bool named_sync_or(int id, int count, bool v) {
  u32 r;
  asm volatile(
      "{\n\t.reg .pred p, q;\n\tsetp.ne.u32 p, %1, 0;\n\tbar.red.or.pred q, %2, %3, p;\n\t"
      "selp.u32 %0, 1, 0, q;\n\t}"
      : "=r"(r)
      : "r"((u32)v), "r"(id), "r"(count)
      : "memory");
  return r != 0;
}
// Whether v holds on any thread of the consumer warpgroup synchronising on named barrier `id`
// (128 threads). The answer is warpgroup-uniform; the __any_sync makes it warp-uniform to ptxas
// as well: a branch on a value it takes for divergent moves the wgmma descriptors the branch
// surrounds out of the uniform registers (R2UR before every wgmma).
__device__ __forceinline__ bool warpgroup_any(int id, bool v) {
  return __any_sync(0xffffffffu, named_sync_or(id, 128, v));
}
// Bytes of {b:a} picked by the four selector nibbles of sel (0–3: a's bytes, 4–7: b's).
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}
template <int R> __device__ __forceinline__ void reg_alloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R> __device__ __forceinline__ void reg_dealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}
