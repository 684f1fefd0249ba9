// tma.cuh — the bulk tensor copy engine (sm_90). Tensor maps are encoded on the host
// (cuTensorMapEncodeTiled, 128B swizzle, zero fill out of bounds) and reach the kernel inside a
// `__grid_constant__` parameter struct; a load lands a whole box in shared memory and pays its
// bytes to an mbarrier's transaction count (out-of-bounds parts are zero-filled and count too).
#pragma once
#include "sm90/util.cuh"

// Host-encoded CUtensorMap: 128 opaque bytes, 64-byte aligned.
struct __align__(64) TmaMap {
  u64 opaque[16];
};

__device__ __forceinline__ void tma_prefetch_map(const TmaMap* m) {
  asm volatile("prefetch.tensormap [%0];" ::"l"((u64)m) : "memory");
}
// 4-D box load: coordinates innermost first (d, row, head, batch).
__device__ __forceinline__ void tma_load_4d(u32 dst, const TmaMap* m, u32 bar, int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];" ::"r"(dst),
      "l"((u64)m), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}
