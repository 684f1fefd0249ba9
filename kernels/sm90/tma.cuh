// tma.cuh — the bulk tensor copy engine (sm_90). Tensor maps are encoded on the host
// (cuTensorMapEncodeTiled, 128B swizzle, zero fill out of bounds) and reach the kernel inside a
// `__grid_constant__` parameter struct; a load lands a whole box in shared memory and pays its
// bytes to an mbarrier's transaction count (out-of-bounds parts are zero-filled and count too).
// A store reads a whole box from shared memory (after a fence.proxy.async of the generic writes
// that filled it), writes only its in-bounds part, and completes through bulk async-groups.
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
// 4-D box store from shared memory (the box's layout is the map's, 128B swizzle here), tracked
// in this thread's bulk async-group: out-of-bounds parts of the box are not written.
__device__ __forceinline__ void tma_store_4d(const TmaMap* m, u32 src, int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.bulk_group"
      " [%0, {%1, %2, %3, %4}], [%5];" ::"l"((u64)m),
      "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(src)
      : "memory");
}
// 5-D variants (the packed-GQA Q and O maps: d, head in group, row, key head, batch).
__device__ __forceinline__ void tma_load_5d(u32 dst, const TmaMap* m, u32 bar, int c0, int c1, int c2, int c3,
                                            int c4) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5, %6}], [%7];" ::"r"(dst),
      "l"((u64)m), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_store_5d(const TmaMap* m, u32 src, int c0, int c1, int c2, int c3, int c4) {
  asm volatile(
      "cp.async.bulk.tensor.5d.global.shared::cta.bulk_group"
      " [%0, {%1, %2, %3, %4, %5}], [%6];" ::"l"((u64)m),
      "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(src)
      : "memory");
}
__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
// Until at most N of this thread's bulk groups are still reading their shared-memory source
// (the source may then be overwritten; the global writes finish on their own, by kernel end).
template <int N> __device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
// Generic-proxy shared-memory writes -> visible to the async proxy (TMA, wgmma).
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
