// red.cuh — f32 reductions into global memory without a return value (the backward's dQ
// accumulator), and the staged form both backward kernels use for a warp's dQ block; shared by
// the sm80 and sm90 kernels. Self-contained: no types header.
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

// Adds one warp's block of 16 rows × 8·NT columns, held as mma/wgmma accumulator fragments
// (frag(nt, i): rows g, g, g + 8, g + 8 for i = 0..3, columns 8nt + 2t, +1), into global rows:
// row r's columns start at row_ptr(r), and rows with row0 + r >= rows are skipped. Reduced straight
// from the fragments, each warp instruction would touch eight rows with 8–32 bytes each (one L2
// request per 8–32 bytes). So the block goes through `buf` (512·NT bytes of free shared memory,
// 16-byte units XOR-swizzled by row: conflict-free both ways) and comes back row-contiguous: on
// sm_90 2·NT lanes cover a row with 16-byte vector reductions, before sm_90 lanes cover
// consecutive floats of a row with scalar atomics — one request per row segment of up to 128
// bytes either way.
template <int NT, class Frag, class RowPtr>
__device__ __forceinline__ void red_add_staged(Frag frag, RowPtr row_ptr, int row0, int rows,
                                               unsigned buf, int lane) {
  constexpr int C = NT * 8, U = C / 4;  // floats and 16-byte units per row
  const int g = lane >> 2, t = lane & 3;
  auto unit_addr = [&](int r, int u) { return buf + r * (C * 4) + ((u ^ (r & (U - 1))) << 4); };
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = g + 8 * h;
      asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(unit_addr(r, 2 * nt + t / 2) + (t % 2) * 8),
                   "f"(frag(nt, 2 * h)), "f"(frag(nt, 2 * h + 1))
                   : "memory");
    }
  __syncwarp();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  static_assert(32 % U == 0, "whole rows per 32 lanes");
#pragma unroll
  for (int k = 0; k < 16 * U / 32; ++k) {
    const int r = lane / U + (32 / U) * k, u = lane % U;
    float v0, v1, v2, v3;
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v0), "=f"(v1), "=f"(v2), "=f"(v3)
                 : "r"(unit_addr(r, u))
                 : "memory");
    if (row0 + r < rows) red_add_f32x4(row_ptr(r) + 4 * u, v0, v1, v2, v3);
  }
#else
#pragma unroll
  for (int k = 0; k < 16 * C / 32; ++k) {
    const int j = lane + 32 * k, r = j / C, c = j % C;
    float v;
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(unit_addr(r, c / 4) + (c % 4) * 4) : "memory");
    if (row0 + r < rows) atomicAdd(row_ptr(r) + c, v);
  }
#endif
  __syncwarp();
}
