// fwd_scheduler.cuh — work tiles: which (query tile, head, batch) and key range a tile index is
// (decode_tile, with the persistent orders and the split tail's pieces), and the dynamic
// scheduler's slot ring.
// Part of fwd.cu: included by it after its configuration (FA3_* defines, constants, Fa3Params,
// WorkTile), in the order fwd.cu lists; not a standalone header.
#pragma once

// A dense tile's sequence: the whole of q and k, from row 0, batch b in the TMA maps.
__device__ __forceinline__ void dense_sequence(const Fa3Params& p, WorkTile& w) {
  w.qs = w.ks = 0;
  w.sq = p.sq;
  w.sk = p.sk;
  w.tb = w.b;
}

__device__ __forceinline__ WorkTile decode_tile(const Fa3Params& p, int t) {
  WorkTile w;
#if FA3_SPLIT
  // A piece of a split range (ids from t_main on): its tail tile, with its key range.
  int tail = -1, piece_lo = 0, piece_hi = 0;
  if (p.split_ranges > 0 && t >= p.t_main) {
    const int u = t - p.t_main;
    split_piece(u >> 1, u & 1, p.split_w, p.split_ranges, p.split_n, &tail, &piece_lo, &piece_hi);
    t = p.t_main + tail;
  }
#endif
#if FA3_PERSISTENT || FA3_LINEAR
  // Persistent (and FA3_LINEAR's one-CTA tiles, dispatched in blockIdx order): the query
  // tiles of one (head, batch) are adjacent, so CTAs running together share K/V in L2.
  // Causal: longest-processing-time order within groups of G = sched_group (head, batch)
  // pairs — the group's last query tiles first, then the second last, ... — so that the CTAs
  // take one tile of every length class (G = all pairs: the static stride's order) while those
  // running together read the K/V of at most about 2·G heads.
#if FA3_CAUSAL
  // A smaller group of the hb mod G leftover pairs comes first: its longest tiles then start
  // with the launch instead of running alone at its end.
  const int hb = p.heads_q * p.batch, G = p.sched_group;
  const int rem = hb % G, head = rem * p.m_tiles;
  int gs = rem, base = 0, t0 = t;
  if (t >= head) {
    const int tt = t - head, gi = tt / (G * p.m_tiles);
    gs = G;
    base = rem + gi * G;
    t0 = tt - gi * G * p.m_tiles;
  }
  const int mi = t0 / gs, r = base + t0 % gs;
  w.m = p.m_tiles - 1 - mi;
#else
  const int mi = t % p.m_tiles, r = t / p.m_tiles;
  w.m = mi;
#endif
  w.h = r % p.heads_q;
  w.b = r / p.heads_q;
#else
  (void)t;
  w.m = FA3_CAUSAL ? (p.m_tiles - 1 - (int)blockIdx.x) : (int)blockIdx.x;
  w.h = blockIdx.y * PACK;  // packed: the group's first query head (grid y runs over key heads)
  w.b = blockIdx.z;
#endif
#if FA3_VARLEN
  const int* cq = (const int*)p.cu_q;
  const int* ck = (const int*)p.cu_k;
  w.qs = cq[w.b];
  w.sq = cq[w.b + 1] - w.qs;
  w.ks = ck[w.b];
  w.sk = ck[w.b + 1] - w.ks;
  w.tb = 0;
#else
  dense_sequence(p, w);
#endif
  const int sq = w.sq, sk = w.sk;
  w.n_lo = 0;
  w.n_hi = (sk + BK - 1) / BK;
  if (w.m * BQ >= sq * PACK) {
    w.n_hi = 0;  // (varlen) a query tile past this sequence's end: nothing to do
    return w;
  }
  if (HAS_RIGHT) {
    const int last_row = qrow(min(sq * PACK, (w.m + 1) * BQ) - 1);
    w.n_hi = min(w.n_hi, tiles_through(last_row, sq, sk, FA3_WINDOW ? p.wr : 0));
  }
  if (HAS_LEFT) {
    const int jmin = w.m * BQ + sk - sq - p.wl;  // first visible key of the tile's first row
    w.n_lo = jmin <= 0 ? 0 : min(jmin / BK, w.n_hi);
  }
  if (w.n_lo > w.n_hi) w.n_lo = w.n_hi;
#if FA3_SPLIT
  if (tail >= 0) {
    w.n_lo = piece_lo;
    w.n_hi = piece_hi;
  }
#endif
  return w;
}

#if FA3_PERSISTENT == 1 && FA3_SPLIT
// The static stride with the split tail: this CTA's work units are blockIdx.x + k·grid as
// without it — tiles below t_main, then ranges c = unit − t_main, one per CTA as planned —
// and a range's pieces have the ids t_main + 2c + j that the dynamic scheduler publishes.
// Work ids are functions of uniform values only, so ptxas keeps what derives from them uniform.
// The first piece id from range c's piece j on (j = 2: the next range), or TILE_END.
__device__ __forceinline__ int static_piece_from(const Fa3Params& p, int c, int j) {
  for (; c < p.split_ranges; c += gridDim.x, j = 0) {
    for (; j < 2; ++j) {
      int tail, lo, hi;
      if (split_piece(c, j, p.split_w, p.split_ranges, p.split_n, &tail, &lo, &hi))
        return p.t_main + 2 * c + j;
    }
  }
  return TILE_END;
}
// Whole tiles end here: at t_main with a split, else at the last tile.
__device__ __forceinline__ int static_whole_end(const Fa3Params& p, int total) {
  return p.split_ranges > 0 ? p.t_main : total;
}
// The first work id after the whole tiles: this CTA's first range's first piece.
__device__ __forceinline__ int static_tail_start(const Fa3Params& p, int tm) {
  if (p.split_ranges == 0) return TILE_END;
  const int g = gridDim.x;
  return static_piece_from(p, (((int)blockIdx.x - tm) % g + g) % g, 0);
}
__device__ __forceinline__ int static_first(const Fa3Params& p, int total) {
  const int tm = static_whole_end(p, total);
  return (int)blockIdx.x < tm ? (int)blockIdx.x : static_tail_start(p, tm);
}
__device__ __forceinline__ int static_next(const Fa3Params& p, int t, int total) {
  const int tm = static_whole_end(p, total);
  if (t < tm) return t + (int)gridDim.x < tm ? t + (int)gridDim.x : static_tail_start(p, tm);
  const int u = t - p.t_main;
  return static_piece_from(p, u >> 1, (u & 1) + 1);
}
#endif

// Dynamic scheduling (DYN): use k of the NSLOT-slot ring holds the k-th tile index of this CTA.
// The producer thread publishes it (after the consumers released use k − NSLOT); every consumer
// thread reads it and arrives on the slot's "empty" barrier (each its own arrival, so that the
// barrier alone orders its read before the next write — also for compute-sanitizer).
// SLOT_HELD (FP8): a slot is {t, m, h, b, n_lo, n_hi, c, v_descale} (c and v_descale as float
// bits), written by the producer thread, whose global loads of the descales are off every
// consumer's path; the consumers hand it back after their epilogue instead of on taking it.
__device__ __forceinline__ void st_shared_b32(u32 a, u32 v) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(a), "r"(v) : "memory");
}
__device__ __forceinline__ int ld_shared_b32(u32 a) {
  int v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(a) : "memory");
  return v;
}
__device__ __forceinline__ void tile_publish(const Fa3Params& p, u32 slots, u32 full, u32 empty,
                                             int k, int t) {
  const u32 uk = k;  // use k >= 0: unsigned, so the slot and parity are a mask and a shift
  const u32 s = uk % NSLOT;
  const u32 a = slots + SLOT_BYTES * s;
  const bool wait = k >= NSLOT;
  const u32 par = ((uk / NSLOT) + 1) & 1;  // parity of the slot's previous use
  if (SLOT_HELD && t != TILE_END) {
    // Decoded and loaded before the wait: the loads' latency overlaps it.
    const WorkTile w = decode_tile(p, t);
    const int hk = w.h / p.group;
    const float qk = ((const float*)p.qd)[w.b * p.qd_b + w.h * p.qd_h] *
                     ((const float*)p.kd)[w.b * p.kd_b + hk * p.kd_h];
    const float vd = ((const float*)p.vd)[w.b * p.vd_b + hk * p.vd_h];
    if (wait) mbar_wait(empty + 8 * s, par);
    st_shared_b32(a + SLOT_M, w.m);
    st_shared_b32(a + SLOT_H, w.h);
    st_shared_b32(a + SLOT_B, w.b);
    st_shared_b32(a + SLOT_NLO, w.n_lo);
    st_shared_b32(a + SLOT_NHI, w.n_hi);
    st_shared_b32(a + SLOT_C, __float_as_uint(p.scale_log2 * qk));  // as consumer() would compute it
    st_shared_b32(a + SLOT_VD, __float_as_uint(vd));
  } else if (wait) {
    mbar_wait(empty + 8 * s, par);
  }
  st_shared_b32(a, t);
  mbar_arrive(full + 8 * s);
}
// SLOT_HELD: the work tile a slot holds (dense FP8), its fields broadcast from lane 0 so that
// ptxas knows them warp-uniform (as tile_take's index).
__device__ __forceinline__ WorkTile slot_tile(const Fa3Params& p, u32 a) {
  WorkTile w;
  w.m = __shfl_sync(0xffffffffu, ld_shared_b32(a + SLOT_M), 0);
  w.h = __shfl_sync(0xffffffffu, ld_shared_b32(a + SLOT_H), 0);
  w.b = __shfl_sync(0xffffffffu, ld_shared_b32(a + SLOT_B), 0);
  w.n_lo = __shfl_sync(0xffffffffu, ld_shared_b32(a + SLOT_NLO), 0);
  w.n_hi = __shfl_sync(0xffffffffu, ld_shared_b32(a + SLOT_NHI), 0);
  dense_sequence(p, w);
  return w;
}
__device__ __forceinline__ int tile_take(u32 slots, u32 full, u32 empty, int k) {
  const int s = k % NSLOT;
  mbar_wait(full + 8 * s, (k / NSLOT) & 1);
  const int t = ld_shared_b32(slots + SLOT_BYTES * s);
  if (!SLOT_HELD) mbar_arrive(empty + 8 * s);
  // Warp-uniform, but ptxas only knows that of a broadcast: the split tail branches on t after
  // the main loop, and a branch it takes for divergent moves the next tile's ring positions out of
  // the uniform registers (every wgmma descriptor then needs R2UR moves).
  return __shfl_sync(0xffffffffu, t, 0);
}
