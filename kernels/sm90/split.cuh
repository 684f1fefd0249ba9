// split.cuh — the split tail of a plain persistent forward (FA3_SPLIT): the work tiles of the
// last, partly filled round are cut along the keys so that every CTA ends at about the same time.
//
// Why: equal plain tiles on G CTAs take ceil(T / G) rounds; with T = q·G + R (0 < R < G) the last
// round keeps R CTAs busy and G − R idle (every SPEC shape at d = 128 has T = 2048 = 15·132 + 68:
// 3% of the time). The R tail tiles hold W = R·n key tiles (n per tile); range c of C ranges is
// the flattened key tiles [a(c), a(c+1)), a(c) = ⌊c·W / C⌋ — about W / C < n of them, so a range
// covers a piece of one tail tile or the end of one and the start of the next (pieces j = 0, 1).
// A piece is a work tile with a key range [lo, hi): its consumers run the usual loop over it.
//
// Merge (per consumer warpgroup, 64 rows): with O_k = Σ_j 2^(c·s_j − c·m_k) v_j, l_k and base m_k of
// each piece k, the tile's result is O = Σ_k 2^(c·m_k − c·M) O_k / Σ_k 2^(c·m_k − c·M) l_k with
// M = max_k m_k. Every piece stores (O_k, m_k, l_k) in its workspace slot, then adds its key-tile
// count to its consumer warpgroup's counter; the piece that brings the counter to n is the last
// one: it resets the counter to zero for the next launch, merges all the slots (its own too, in
// a fixed order) into its registers and runs the ordinary epilogue. No piece ever waits for
// another.
#pragma once
#include "sm90/util.cuh"

// Flattened key-tile indices stay in 32 bits: the host splits only where W · C < 2^31 (64-bit
// divisions would cost the 24-register producer thread a spill).
// The first flattened key tile of range c.
__device__ __forceinline__ int split_start(int c, int w, int nr) { return (int)((u32)(c * w) / (u32)nr); }

// The range that holds flattened key tile x.
__device__ __forceinline__ int split_range_of(int x, int w, int nr) {
  int c = (int)((u32)(x * nr) / (u32)w);
  while (c + 1 < nr && split_start(c + 1, w, nr) <= x) ++c;
  while (c > 0 && split_start(c, w, nr) > x) --c;
  return c;
}

// Piece j of range c: its tail tile and key-tile range; false when the range has no piece j.
__device__ __forceinline__ bool split_piece(int c, int j, int w, int nr, int n, int* tail, int* lo,
                                            int* hi) {
  const int a = split_start(c, w, nr), e = split_start(c + 1, w, nr);
  if (e <= a) return false;
  const int i0 = (u32)a / (u32)n, i1 = (u32)(e - 1) / (u32)n;
  if (j == 1 && i1 == i0) return false;
  const int i = j == 0 ? i0 : i1;
  const int base = i * n;
  *tail = i;
  *lo = max(a, base) - base;
  *hi = min(e, base + n) - base;
  return true;
}

// One warp's slot of the workspace: per lane, ND4 = D/8 float4 of its accumulator, then
// (m0, m1, l0, l1); lane-interleaved so that each warp access is 512 contiguous bytes.
template <int ND4>
__device__ __forceinline__ float4* split_slot(u64 ws, int slot, int warps_per_tile, int wid, int lane) {
  return (float4*)ws + ((i64)(slot * warps_per_tile + wid) * (ND4 + 1)) * 32 + lane;
}

__device__ __forceinline__ void st_cg(float4* p, float4 v) {
  asm volatile("st.global.cg.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z),
               "f"(v.w)
               : "memory");
}
__device__ __forceinline__ float4 ld_cg(const float4* p) {
  float4 v;
  asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

// Release / acquire at GPU scope (the counter's relaxed atomics carry the order): lighter than
// __threadfence(), which is sequentially consistent (MEMBAR.SC).
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// One consumer warpgroup's part of the merge (all its 128 threads; named barrier `bar` is
// theirs) for piece `slot` of tail tile `tail` with `count` key tiles. o: ND4·4 accumulator
// floats, sm: the OnlineSoftmax state of its rows, c: the score scale (log2). The counter is the
// warpgroup's (its epilogue is one TMA store). Returns true, on every thread, when this piece
// completed the tile; o and sm then hold the merged state. (With d = 256's 128-register
// accumulator ptxas spills around this loop, in the main loop too: the split is d ≤ 128.)
template <int ND4, class Softmax>
__device__ __forceinline__ bool split_merge(float* o, Softmax& sm, float c, u64 ws, u64 ctr,
                                            int tail, int slot, int count, int nc, int cw, int bar,
                                            int w, int nr, int n) {
  const int t = threadIdx.x % 128, wid = cw * 4 + t / 32, lane = t % 32;
  float4* mine = split_slot<ND4>(ws, slot, 4 * nc, wid, lane);
#pragma unroll
  for (int i = 0; i < ND4; ++i) st_cg(mine + 32 * i, make_float4(o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]));
  st_cg(mine + 32 * ND4, make_float4(sm.m[0], sm.m[1], sm.l[0], sm.l[1]));
  // The warpgroup's slot, then (thread 0) the count that publishes it: the barrier orders the
  // other threads' stores before thread 0's release fence, which is cumulative (as in CUTLASS's
  // semaphore); on the last piece its acquire fence orders the other pieces' slots before the
  // barrier below, and so before every thread's loads.
  named_sync(bar, 128);
  int* cnt = (int*)ctr + tail * nc + cw;
  bool last = false;
  if (t == 0) {
    fence_acq_rel_gpu();
    last = atomicAdd(cnt, count) + count == n;
    if (last) {
      *cnt = 0;  // the tile is complete: no piece of this launch counts on it again
      fence_acq_rel_gpu();
    }
  }
  if (!warpgroup_any(bar, last)) return false;
  // Every piece, this one's too, in range order from its slot: the result does not depend on
  // which piece came last (bit-reproducible).
#pragma unroll
  for (int i = 0; i < 4 * ND4; ++i) o[i] = 0.f;
  sm.init();
  const int c_lo = split_range_of(tail * n, w, nr);
  const int c_hi = split_range_of(tail * n + n - 1, w, nr);
#pragma unroll 1
  for (int cc = c_lo; cc <= c_hi; ++cc) {
    const int s = 2 * cc + (split_start(cc, w, nr) / n == tail ? 0 : 1);
    const float4* other = split_slot<ND4>(ws, s, 4 * nc, wid, lane);
    const float4 ml = ld_cg(other + 32 * ND4);
    const float mk[2] = {ml.x, ml.y}, lk[2] = {ml.z, ml.w};
    float fo[2], fk[2];
    sm.merge(mk, lk, c, fo, fk);
#pragma unroll
    for (int i = 0; i < ND4; ++i) {
      const float4 v = ld_cg(other + 32 * i);
      o[4 * i + 0] = o[4 * i + 0] * fo[0] + v.x * fk[0];
      o[4 * i + 1] = o[4 * i + 1] * fo[0] + v.y * fk[0];
      o[4 * i + 2] = o[4 * i + 2] * fo[1] + v.z * fk[1];
      o[4 * i + 3] = o[4 * i + 3] * fo[1] + v.w * fk[1];
    }
  }
  return true;
}
