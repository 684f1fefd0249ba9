// fwd_producer.cuh — the producer: TMA loads of Q and the K/V ring (load_q, load_k, producer),
// and the FP8 producer warpgroup that transposes V in the kernel (producer_vtk).
// Part of fwd.cu: included by it after its configuration (FA3_* defines, constants, Fa3Params,
// WorkTile), in the order fwd.cu lists; not a standalone header.
#pragma once

// Q of work tile w (its Q use number jq), once the consumers have released the previous one.
__device__ __forceinline__ void load_q(const Fa3Params& p, u32 sQ, u32 q_full, u32 q_empty,
                                       const WorkTile& w, int jq) {
  if constexpr (QSPLIT) {
    // Slice by slice, each once its own consumer is done with it: the first consumer to finish
    // its epilogue starts the next tile while the others finish theirs. 64-row boxes.
#pragma unroll
    for (int cw = 0; cw < NC; ++cw) {
      if (jq > 0) mbar_wait(q_empty + 8 * cw, (jq - 1) & 1);
      mbar_expect_tx(q_full + 8 * cw, Q_BYTES / NC);
#pragma unroll
      for (int c = 0; c < NCH; ++c)
        tma_load_4d(sQ + c * QCHUNK + cw * 64 * 128, &p.q, q_full + 8 * cw, c * CH,
                    w.qs + w.m * BQ + cw * 64, w.h, w.tb);
    }
    return;
  }
  if (jq > 0) mbar_wait(q_empty, (jq - 1) & 1);  // consumers done with the previous Q
  mbar_expect_tx(q_full, Q_BYTES);
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
    if (PACK > 1)
      tma_load_5d(sQ + c * QCHUNK, &p.q, q_full, c * CH, 0, w.qs + w.m * (BQ / PACK), w.h / PACK, w.tb);
    else
      tma_load_4d(sQ + c * QCHUNK, &p.q, q_full, c * CH, w.qs + w.m * BQ, w.h, w.tb);
  }
}

// K of key tile `tile` of w into ring position g, once its slot's previous use is released.
__device__ __forceinline__ void load_k(const Fa3Params& p, u32 sK, u32 k_full, u32 k_empty,
                                       const WorkTile& w, int hk, int tile, int g) {
  const int s = g % STAGES;
  if (g >= STAGES) mbar_wait(k_empty + 8 * s, ((g / STAGES) + 1) & 1);
  mbar_expect_tx(k_full + 8 * s, K_BYTES);
#pragma unroll
  for (int c = 0; c < NCH; ++c)
    tma_load_4d(sK + s * K_BYTES + c * KCHUNK, &p.k, k_full + 8 * s, c * CH, w.ks + tile * BK, hk, w.tb);
}

__device__ __forceinline__ void producer(const Fa3Params& p, u32 sQ, u32 sK, u32 sV, u32 q_full,
                                         u32 k_full, u32 v_full, u32 k_empty, u32 v_empty,
                                         u32 q_empty, const WorkTile& w, int hk, int g0, int jq) {
  const int b = w.tb, n_end = w.count();
  // FA3_KVFIRST: the first K/V tile goes out before Q, whose slot a persistent CTA's consumers
  // free only after the previous tile's epilogue; the ring slots free earlier (QKᵀ / PV of the
  // previous tile's second-last key tile). Its V load is the loop's, once Q is out.
  if (FA3_KVFIRST) load_k(p, sK, k_full, k_empty, w, hk, w.n_hi - 1, g0);
  load_q(p, sQ, q_full, q_empty, w, jq);
  for (int it = 0; it < n_end; ++it) {
    const int tile = w.n_hi - 1 - it;
    const int g = g0 + it;  // ring position, continuing across the tiles of a persistent CTA
    const int s = g % STAGES;
    const u32 par = ((g / STAGES) + 1) & 1;  // parity of the previous use of slot s
    if (!FA3_KVFIRST || it > 0) load_k(p, sK, k_full, k_empty, w, hk, tile, g);
    if (g >= STAGES) mbar_wait(v_empty + 8 * s, par);
    mbar_expect_tx(v_full + 8 * s, V_BYTES);
    if constexpr (FP8) {
      // Vᵀ map [skp, d, heads_k, batch]: one box of BK keys × D rows.
      tma_load_4d(sV + s * V_BYTES, &p.v, v_full + 8 * s, tile * BK, 0, hk, b);
    } else {
#pragma unroll
      for (int c = 0; c < NCH; ++c)
        tma_load_4d(sV + s * V_BYTES + c * KCHUNK, &p.v, v_full + 8 * s, c * 64, w.ks + tile * BK, hk, b);
    }
  }
}

// FA3_VTK: V tile as stored (src: BK key rows, NCH 128-byte chunks, 128B swizzle — K's layout)
// -> Vᵀ slot (dst: D rows of BK = 128 bytes, 128B swizzle, keys permuted as fp8_key_of: position
// 4t+i of a 16-key group holds key {2t, 2t+1, 2t+8, 2t+9}[i]). An 8-bit transpose is a 16-bit
// one plus a byte permute: ldmatrix.trans of the 8 × 8 b16 block (keys 16G+8h.., d bytes of
// 16-byte segment e) gives lane (g = lane/4, t = lane%4) keys 2t, 2t+1 (+8h) × d bytes 2g, 2g+1,
// so with h = 0 and 1 it holds keys {2t, 2t+1, 2t+8, 2t+9} of two d rows: one PRMT each makes
// the word those rows keep at key position 4t of group G, and stmatrix (non-transposed) writes
// lane (g, t)'s word to byte 4t of the row lane 8m+g addresses. A unit is one key group × two
// segments (512 bytes, one ldmatrix.x4 + one stmatrix.x4 per warp; two units in flight, since
// the loop is latency-bound and 24 producer registers hold no more); lanes g ≥ 4 hand out their
// odd row first, so each stmatrix matrix covers rows n with distinct n mod 8 (conflict-free on
// the swizzle, as are the loads: 8 consecutive keys of one segment). All 128 producer threads.
__device__ __forceinline__ void transpose_v_tile(u32 src, u32 dst) {
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  const int m = lane >> 3, i = lane & 7;
  const bool hi = (lane >> 2) >= 4;  // g >= 4
  const u32 sel0 = hi ? 0x7531u : 0x6420u, sel1 = hi ? 0x6420u : 0x7531u;
  // Warp w takes key groups w and w + 4 (units A, B) of every segment pair j: the two loads are
  // 8192 bytes apart and the two stores differ in bit 2 of the swizzled 16-byte slot.
  const int row8 = 2 * i + ((m & 1) ^ (i >= 4));  // the Vᵀ row (mod 16) this lane addresses
  const int slot = warp ^ (row8 & 7);
  const u32 ld_base = src + warp * 2048 + (8 * (m & 1) + i) * 128;
  const u32 st_base = dst + row8 * 128 + (slot << 4);
  const int st_b = (slot & 4) ? -64 : 64;
#pragma unroll 1
  for (int j = 0; j < D / 32; ++j) {
    const int e = 2 * j + (m >> 1);  // this lane's 16-byte segment of d
    const u32 la = ld_base + (e >> 3) * KCHUNK + (((e & 7) ^ i) << 4);
    u32 a0, a1, a2, a3, b0, b1, b2, b3;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(a0), "=r"(a1), "=r"(a2), "=r"(a3)
                 : "r"(la));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                 : "r"(la + 4 * 2048));
    const u32 sa = st_base + e * 2048;
    stmatrix_x4(sa, prmt(a0, a1, sel0), prmt(a0, a1, sel1), prmt(a2, a3, sel0), prmt(a2, a3, sel1));
    stmatrix_x4(sa + st_b, prmt(b0, b1, sel0), prmt(b0, b1, sel1), prmt(b2, b3, sel0),
                prmt(b2, b3, sel1));
  }
}

// FA3_VTK producer: run by all 128 threads of warpgroup 0; thread 0 issues the TMA loads (Q, K,
// and V as stored into staging slot g % 2, one tile ahead), everyone transposes.
__device__ __forceinline__ void producer_vtk(const Fa3Params& p, u32 sQ, u32 sK, u32 sV, u32 sR,
                                             u32 q_full, u32 k_full, u32 v_full, u32 k_empty,
                                             u32 v_empty, u32 q_empty, u32 r_full,
                                             const WorkTile& w, int hk, int g0, int jq) {
  const int b = w.tb, n_end = w.count();
  const bool leader = threadIdx.x == 0;
  auto load_raw = [&](int tile, int g) {
    const int rs = g % 2;
    mbar_expect_tx(r_full + 8 * rs, K_BYTES);
#pragma unroll
    for (int c = 0; c < NCH; ++c)
      tma_load_4d(sR + rs * K_BYTES + c * KCHUNK, &p.v, r_full + 8 * rs, c * CH, w.ks + tile * BK, hk, b);
  };
  if (leader) {
    load_q(p, sQ, q_full, q_empty, w, jq);
    if (n_end > 0) {
      load_k(p, sK, k_full, k_empty, w, hk, w.n_hi - 1, g0);
      load_raw(w.n_hi - 1, g0);
    }
  }
  for (int it = 0; it < n_end; ++it) {
    const int tile = w.n_hi - 1 - it;
    const int g = g0 + it;
    const int s = g % STAGES;
    const u32 par = ((g / STAGES) + 1) & 1;
    // Tile g+1's K and V as stored go out before tile g's transpose, whose wait for the Vᵀ slot
    // (PV of tile g − STAGES) and own time would otherwise delay the K load by a whole tile.
    // K slot (g+1) % STAGES frees with QKᵀ(g+1−STAGES), which completes before that PV; staging
    // slot (g+1) % 2 was last read in iteration it−1, which ended in a barrier.
    if (leader && it + 1 < n_end) {
      load_k(p, sK, k_full, k_empty, w, hk, tile - 1, g + 1);
      load_raw(tile - 1, g + 1);
    }
    mbar_wait(r_full + 8 * (g % 2), (g / 2) & 1);
    if (g >= STAGES) mbar_wait(v_empty + 8 * s, par);
    transpose_v_tile(sR + (g % 2) * K_BYTES, sV + s * V_BYTES);
    fence_async_shared();  // generic writes -> wgmma
    named_sync(1, 128);
    if (leader) mbar_arrive(v_full + 8 * s);
  }
}
