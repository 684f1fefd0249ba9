// fwd_epilogue.cuh — the epilogue's stores: normalised O packed to 16-bit pairs, written per
// thread or staged in shared memory and stored with TMA (or copied out row by row where TMA
// cannot address it).
// Part of fwd.cu: included by it after its configuration (FA3_* defines, constants, Fa3Params,
// WorkTile), in the order fwd.cu lists; not a standalone header.
#pragma once

// Normalised O of this thread as packed 16-bit pairs: ob[2j + r] = columns 8j + 2·tq, +1 of
// row row0 + 8r (the n8-block j of the accumulator).
__device__ __forceinline__ void pack_o(const float* o, const float* inv, u32* ob) {
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) ob[2 * j + r] = pack2<ODT>(o[4 * j + 2 * r] * inv[r], o[4 * j + 2 * r + 1] * inv[r]);
}

// Per-thread epilogue: each thread writes its pairs of rows row0 and row0 + 8 (those below the
// sequence's sq) straight to global memory.
__device__ __forceinline__ void store_o_direct(const Fa3Params& p, const u32* ob, const WorkTile& w,
                                               int row0, int tq) {
  unsigned short* out = (unsigned short*)p.o;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = qrow(row0 + 8 * r), h = w.h + (row0 + 8 * r) % PACK;
    if (row < w.sq) {
      unsigned short* orow =
          out + w.b * p.o_batch + (i64)(w.qs + row) * p.o_row + (i64)h * p.o_head + 2 * tq;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) *(u32*)(orow + 8 * j) = ob[2 * j + r];
    }
  }
}

// FA3_OTMA, step 1: consumer cw's normalised 64 × D tile goes to the staging chunks at o_base
// (see OBOX) by stmatrix — lane l addresses row l%8 (+8) of the 8×8 blocks (j, j+1) × (rows
// g, g+8); 16-byte unit u of row r sits at unit u ^ (r & 7) as the 128B swizzle wants, so each
// 8-row matrix hits 8 distinct bank quads — then the async-proxy fence and a warpgroup barrier
// (id 2 + NC + cw; 2..1+NC are the ping-pong turns, 1 the VTK producer's).
__device__ __forceinline__ void stage_o(const u32* ob, u32 o_base, int cw) {
  const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32;
  const int bar = 2 + NC + cw;
  // The slice must be free: every warp's last QKᵀ has read Q (Q_HOLDS_O), every warp's copy
  // (copy_o_rows) of the previous tile is done, and a persistent CTA's previous TMA store from
  // its own buffer has read it (that wait was deferred to here).
  if (OWN_O && FA3_PERSISTENT && t == 0) bulk_wait_read<0>();
  named_sync(bar, 128);
  const int mi = lane >> 3, rr = lane & 7;
  const int row = warp * 16 + rr + 8 * (mi & 1);
#pragma unroll
  for (int j = 0; j < D / 8; j += 2) {
    const int jl = j + (mi >> 1);  // the 8-column block this lane addresses
    const u32 a = o_base + o_chunk(jl >> 3, cw) + row * 128 + (((jl & 7) ^ rr) << 4);
    stmatrix_x4(a, ob[2 * j], ob[2 * j + 1], ob[2 * j + 2], ob[2 * j + 3]);
  }
  fence_async_shared();
  named_sync(bar, 128);
}

// FA3_OTMA, step 2: thread 0 of the warpgroup stores the staged tile (first row wrow) with one
// TMA store per chunk. Rows past a dense sq, and d = 96's pad columns, lie outside the map and
// are not written.
__device__ __forceinline__ void tma_store_o(const Fa3Params& p, u32 o_base, const WorkTile& w, int cw,
                                            int wrow) {
  if (threadIdx.x % 128 != 0) return;
#pragma unroll
  for (int c = 0; c < ONCH; ++c) {
    if (PACK > 1)
      tma_store_5d(&p.om, o_base + o_chunk(c, cw), c * 64, 0, w.qs + wrow / PACK, w.h / PACK, w.tb);
    else
      tma_store_4d(&p.om, o_base + o_chunk(c, cw), c * 64, w.qs + wrow, w.h, w.tb);
  }
  bulk_commit();
  // A persistent CTA's own buffer is next written one tile later: wait there instead
  // (RING_DEFER: before the slot is handed back, see release_pending).
  if (!(OWN_O && FA3_PERSISTENT) && !RING_DEFER) bulk_wait_read<0>();
}

// FA3_OTMA, step 2 where TMA may not write the whole tile (see the header): the warpgroup
// copies rows wrow.. below sq out of the staging chunks, one row chunk per warp instruction —
// lane l reads 32-bit word l of the (swizzled) 128-byte row, 32 distinct banks, and writes
// columns 2l, 2l+1: 128 contiguous bytes per warp.
__device__ __forceinline__ void copy_o_rows(const Fa3Params& p, u32 o_base, const WorkTile& w, int cw,
                                            int wrow) {
  const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32;
  unsigned short* out = (unsigned short*)p.o + w.b * p.o_batch + 2 * lane;
  const int rows = min(64, w.sq * PACK - wrow);
#pragma unroll
  for (int c = 0; c < ONCH; ++c) {
    if (64 * c + 2 * lane >= D) continue;  // d = 96: the second chunk's pad columns
#pragma unroll 1
    for (int r = warp; r < rows; r += 4) {
      const u32 a = o_base + o_chunk(c, cw) + r * 128 + ((((lane >> 2) ^ (r & 7))) << 4) + 4 * (lane & 3);
      u32 v;
      asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a));
      const int pr = wrow + r;  // packed row: query qrow(pr) of head w.h + pr % PACK
      *(u32*)(out + (i64)(w.qs + qrow(pr)) * p.o_row + (i64)(w.h + pr % PACK) * p.o_head + 64 * c) = v;
    }
  }
}
