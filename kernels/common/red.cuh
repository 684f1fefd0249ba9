// red.cuh — f32 reductions into global memory without a return value (the backward's dQ
// accumulator), shared by the sm80 and sm90 kernels. Self-contained: no types header.
#pragma once

// Four adjacent f32 adds (16-byte aligned), sm_90+ only: one request per 128-byte line when
// eight lanes cover a line.
__device__ __forceinline__ void red_add_f32x4(float* addr, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(addr), "f"(a), "f"(b), "f"(c),
               "f"(d)
               : "memory");
#else
  atomicAdd(addr, a);
  atomicAdd(addr + 1, b);
  atomicAdd(addr + 2, c);
  atomicAdd(addr + 3, d);
#endif
}
