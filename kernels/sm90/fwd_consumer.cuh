// fwd_consumer.cuh — a consumer warpgroup's work tile: the main loop (online softmax overlapping
// the PV wgmma, the sum bound's rare path, diagonal skipping) and its epilogue.
// Part of fwd.cu: included by it after its configuration (FA3_* defines, constants, Fa3Params,
// WorkTile), in the order fwd.cu lists; not a standalone header.
#pragma once

// Defined in fwd_scheduler.cuh (persistent FP8 epilogues re-derive their tile with them).
__device__ __forceinline__ WorkTile decode_tile(const Fa3Params& p, int t);
__device__ __forceinline__ int ld_shared_b32(u32 a);
__device__ __forceinline__ WorkTile slot_tile(const Fa3Params& p, u32 a);

// FA3_SUMB, the rare path: some row of the warpgroup failed the sum bound (softmax.cuh), so the
// tile's scores — overwritten by the exponentials — are computed again from K slot sKs (held
// until here) and taken through the softmax with its bases moved to the row maxima; O is
// rescaled to match. Nothing may be in flight (PV waited for).
template <class Softmax, class Transform>
__device__ __forceinline__ void rebase_tile(float* sc, float* o, Softmax& sm, float c, u32 sQw,
                                            const u32 (*qf)[4], u32 sKs, int tile,
                                            Transform& transform) {
  start_qk(sc, sQw, qf, sKs);
  wait_acc<0, BK / 2>(sc);
  transform(sc, tile);
  float alpha[2];
  sm.template step<true>(sc, c, alpha);
  rescale_o<D / 8>(o, alpha);
}

// Key tiles 0.. up to the one holding query `row`'s last visible key (right edge: causal
// diagonal + wr, bottom-right aligned); 0 when the row sees no key.
__device__ __forceinline__ int tiles_through(int row, int sq, int sk, int wr) {
  const int jmax = row + sk - sq + wr;
  return jmax < 0 ? 0 : jmax / BK + 1;
}

// RING_DEFER: hands back the ring slot of the previous tile's O store (`pending`: its empty
// barrier, 0 for none) once the store has read it — thread 0, which issued the store, waits;
// the other warps arrive at once.
__device__ __forceinline__ void release_pending(u32& pending, int lane) {
  if (RING_DEFER && pending != 0) {
    if (threadIdx.x % 128 == 0) bulk_wait_read<0>();
    warp_release(pending, lane);
    pending = 0;
  }
}

// w is work tile wt (its index, for the epilogue's re-derivation); o_pending: release_pending's.
__device__ __forceinline__ void consumer(const Fa3Params& p, u32 sQ, u32 sK, u32 sV, u32 sO,
                                         u32 q_full, u32 k_full, u32 v_full, u32 k_empty,
                                         u32 v_empty, u32 q_empty, const WorkTile& w, int wt,
                                         int cw, int g0, int jq, u32& o_pending, u32 slot) {
  const int m = w.m, h = w.h, b = w.b, n_end = w.count();
  const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32, g = lane / 4, tq = lane % 4;
  const int row0 = m * BQ + cw * 64 + warp * 16 + g;
  const int sq = w.sq, sk = w.sk;
  const int wl = FA3_WINDOW ? p.wl : 0, wr = FA3_WINDOW ? p.wr : 0;
  // Prescaled scores are already in log2 units.
  float c = PRESCALE ? 1.0f : p.scale_log2;
  if constexpr (SLOT_HELD) {
    c = __int_as_float(ld_shared_b32(slot + SLOT_C));  // published with the tile
  } else if constexpr (FP8) {
    const int hk = h / p.group;
    c *= ((const float*)p.qd)[b * p.qd_b + h * p.qd_h] * ((const float*)p.kd)[b * p.kd_b + hk * p.kd_h];
  }
  float slope = 0.f;
  if (FA3_ALIBI && p.alibi != 0)
    slope = ((const float*)p.alibi)[b * p.alibi_bs + h] * 1.4426950408889634f;
  // Tiles whose columns can reach past a row's limit need the mask.
  const int first_diag = qrow(m * BQ + cw * 64) + sk - sq;  // smallest visible-limit-1 in this warpgroup
  // Does key tile `tile` hold a masked entry for one of this warpgroup's 64 rows?
  auto need_mask = [&](int tile) {
    return (tile + 1) * BK > sk || (HAS_RIGHT && (tile + 1) * BK - 1 > first_diag + wr) ||
           (HAS_LEFT && tile * BK < first_diag + 63 - wl);
  };
  auto transform = [&](float* sc, int tile) {
    if (PRESCALE) prescale(sc, tile, row0, sq, sk, tq, p.scale_log2, p.sc_in, p.sc_out, slope);
    if (need_mask(tile)) apply_mask(sc, tile, row0, sq, sk, tq, wl, wr);
  };
  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  OnlineSoftmax<BK / 8, FA3_EMU, FA3_LAZY> sm;
  sm.init();
  const u32 sQw = sQ + cw * 64 * 128;

  // FA3_SKIP: key tiles none of this warpgroup's rows can see — the CTA's last tiles (which come
  // first) past its rows' diagonal, or all but one for a warpgroup wholly past the sequence's end
  // (its rows are never written) — are not computed: the warpgroup only takes their GEMM turns
  // and frees their slots. 192-row causal tiles otherwise do 18% extra work at 2k (12% at 4k).
  int skip = 0;
  if (FA3_SKIP && n_end > 1) {
    const int r0 = m * BQ + cw * 64;
    if (r0 >= sq * PACK) {
      skip = n_end - 1;
    } else if (HAS_RIGHT) {
      const int own_hi = tiles_through(qrow(min(sq * PACK, r0 + 64) - 1), sq, sk, wr);
      skip = max(0, min(n_end - 1, w.n_hi - own_hi));
    }
    // Warp-uniform, but ptxas only knows that of a broadcast: the ring positions derived from it
    // then stay in uniform registers (otherwise every stage address is moved over, +R2UR). With
    // FA3_WGB the index is already one; this matters where it is off (d = 256, see the host).
    skip = __shfl_sync(0xffffffffu, skip, 0);
  }
  u32 qf[QF][4];
  // The first QKᵀ's slot is never the pending one (the ring has moved on by one); a skipped
  // tile's or an empty tile's wait could be.
  if (n_end == 0 || skip > 0) release_pending(o_pending, lane);
  if (n_end > 0) {
    mbar_wait(q_full, jq & 1);
    if constexpr (QRS) {
      load_q_frags(qf, sQw);
      // All of Q in registers: its shared memory is dead now unless it stages O (then it is
      // released after the epilogue).
      if (FA3_QRS == 1 && !Q_HOLDS_O) warp_release(q_empty, lane);
    }
    // Skipped tiles: the slots are freed only once filled (the arrival must not count toward
    // the slot's previous use); the turn is passed first so that the others' GEMMs need not wait.
    for (int it = 0; it < skip; ++it) {
      const int s = (g0 + it) % STAGES;
      const u32 ph = ((g0 + it) / STAGES) & 1;
      turn_take(cw);
      turn_pass(cw);
      mbar_wait(k_full + 8 * s, ph);
      warp_release(k_empty + 8 * s, lane);
      mbar_wait(v_full + 8 * s, ph);
      warp_release(v_empty + 8 * s, lane);
    }
    // The rest as if the tile began after the skipped ones (no extra state across the loop).
    const int g1 = g0 + skip, n1 = n_end - skip, hi1 = w.n_hi - skip;
#if FA3_OVERLAP
    u32 pf[BK / KSTEP][4];
    {
      float sc[BK / 2];
      const int s0 = g1 % STAGES;
      mbar_wait(k_full + 8 * s0, (g1 / STAGES) & 1);
      turn_take(cw);
      start_qk(sc, sQw, qf, sK + s0 * K_BYTES);
      turn_pass(cw);
      release_pending(o_pending, lane);
      wait_acc<0, BK / 2>(sc);
      // RING_O: consumer 0 keeps the tile's last K slot for its O (released by the epilogue).
      if (!(RING_O && cw == 0 && n1 == 1)) warp_release(k_empty + 8 * s0, lane);
      if (Q_EARLY && n1 == 1) warp_release(q_empty, lane);
      const int tile = hi1 - 1;
      transform(sc, tile);
      float alpha[2];
      sm.step(sc, c, alpha);
      to_pfrag(sc, pf);
    }
    for (int it = 1; it < n1; ++it) {
      const int tile = hi1 - 1 - it;
      const int g = g1 + it;
      const int s = g % STAGES, sp = (g - 1) % STAGES;
      const u32 ph = (g / STAGES) & 1, php = ((g - 1) / STAGES) & 1;
      float sc[BK / 2];
      mbar_wait(k_full + 8 * s, ph);
      mbar_wait(v_full + 8 * sp, php);
      turn_take(cw);
      start_qk_pv(sc, o, sQw, qf, sK + s * K_BYTES, pf, sV + sp * V_BYTES);
      turn_pass(cw);
      wait_acc<1, BK / 2>(sc);
      if (!FA3_SUMB && !(RING_O && cw == 0 && it == n1 - 1)) warp_release(k_empty + 8 * s, lane);
      if (!FA3_SUMB && Q_EARLY && it == n1 - 1) warp_release(q_empty, lane);
      transform(sc, tile);
      // PV's wait sits in both arms of a branch on the softmax's vote: ptxas then cannot hoist
      // it above the exponentials (straight-line code gets it right after the QKᵀ wait, and the
      // softmax no longer overlaps PV). The vote spans the warpgroup, as wgmma.wait_group is
      // warpgroup-collective: all four warps must execute the same one (compute-sanitizer's
      // synccheck stops a kernel whose warps wait in different arms).
#if FA3_SUMB
      float sum[2];
      const bool fits = sm.at_base(sc, c, sum);
      // Voted over the warpgroup: the rare path's wgmma is collective.
      if (warpgroup_any(2 + NC + cw, !fits)) {
        wait_acc<0, D / 2>(o);
        rebase_tile(sc, o, sm, c, sQw, qf, sK + s * K_BYTES, tile, transform);
      } else {
        wait_acc<0, D / 2>(o);
        sm.keep(sum);
      }
      warp_release(k_empty + 8 * s, lane);
      if (Q_EARLY && it == n1 - 1) warp_release(q_empty, lane);  // after the rare path's QKᵀ
#else
      float alpha[2];
      const bool rescale = warpgroup_any(2 + NC + cw, sm.step(sc, c, alpha));
      if (rescale) {
        wait_acc<0, D / 2>(o);
        rescale_o<D / 8>(o, alpha);
      } else {
        wait_acc<0, D / 2>(o);
      }
#endif
      warp_release(v_empty + 8 * sp, lane);
      to_pfrag(sc, pf);
    }
    if (RING_O && cw == 1) named_arrive(BAR_K_READ, 256);
    {
      const int sp = (g1 + n1 - 1) % STAGES;
      const u32 php = ((g1 + n1 - 1) / STAGES) & 1;
      mbar_wait(v_full + 8 * sp, php);
      turn_take(cw);
      start_pv(o, pf, sV + sp * V_BYTES);
      turn_pass(cw);
      wait_acc<0, D / 2>(o);
      // RING_O: consumer 1 keeps the last V slot for its O (released by the epilogue).
      if (!(RING_O && cw == 1)) warp_release(v_empty + 8 * sp, lane);
    }
#else
    for (int it = 0; it < n1; ++it) {
      const int tile = hi1 - 1 - it;
      const int s = (g1 + it) % STAGES;
      const u32 ph = ((g1 + it) / STAGES) & 1;
      float sc[BK / 2];
      mbar_wait(k_full + 8 * s, ph);
      start_qk(sc, sQw, qf, sK + s * K_BYTES);
      wait_acc<0, BK / 2>(sc);
#if FA3_SUMB
      transform(sc, tile);
      float sum[2];
      if (warpgroup_any(2 + NC + cw, !sm.at_base(sc, c, sum)))
        rebase_tile(sc, o, sm, c, sQw, qf, sK + s * K_BYTES, tile, transform);
      else
        sm.keep(sum);
      warp_release(k_empty + 8 * s, lane);
#else
      warp_release(k_empty + 8 * s, lane);
      transform(sc, tile);
      float alpha[2];
      if (sm.step(sc, c, alpha)) rescale_o<D / 8>(o, alpha);
#endif
      if (Q_EARLY && it == n1 - 1) warp_release(q_empty, lane);  // after the sum bound's QKᵀ
      u32 pf[BK / KSTEP][4];
      to_pfrag(sc, pf);
      mbar_wait(v_full + 8 * s, ph);
      start_pv(o, pf, sV + s * V_BYTES);
      wait_acc<0, D / 2>(o);
      warp_release(v_empty + 8 * s, lane);
    }
#endif
    if (RING_O && cw == 0) named_arrive(BAR_PV_DONE, 256);
    // Q may be overwritten (persistent CTAs); when it stages O, only after the epilogue.
    if (!Q_HOLDS_O && FA3_QRS != 1 && !Q_EARLY) warp_release(q_empty, lane);
  }

  // Epilogue: normalise, write O (16-bit pairs) and the LSE; rows past the sequence's sq are
  // not written (varlen: they belong to the next sequence). Persistent FP8 CTAs (always the
  // dynamic scheduler: SLOT_HELD) read the tile's coordinates again from its slot, still held,
  // instead of keeping them live across the main loop, where the d = 256 consumers would
  // otherwise spill (16-bit kernels: no need, and their SASS stays as it was).
#if FA3_PERSISTENT && FA3_DT == 2
  static_assert(SLOT_HELD, "persistent FP8 kernels take their tiles from the dynamic scheduler");
  (void)wt;
  const WorkTile we = slot_tile(p, slot);
  const int erow0 = we.m * BQ + cw * 64 + warp * 16 + g;
#else
  (void)wt;
  const WorkTile& we = w;
  const int erow0 = row0;
#endif
  // FA3_SPLIT: a piece of a tail tile leaves its partial state to the piece that completes the
  // tile, which merges them and writes O and the LSE. The piece's tail tile is re-derived from
  // its id here rather than kept live across the main loop.
#if FA3_SPLIT
  if (p.split_ranges > 0 && wt >= p.t_main && n_end > 0) {
    int u = wt - p.t_main, tail, lo, hi;
    asm volatile("" : "+r"(u));
    split_piece(u >> 1, u & 1, p.split_w, p.split_ranges, p.split_n, &tail, &lo, &hi);
    if (!split_merge<D / 8>(o, sm, c, p.split_ws, p.split_ctr, tail, u, n_end, NC, cw,
                            2 + NC + cw, p.split_w, p.split_ranges, p.split_n)) {
      if (Q_HOLDS_O) warp_release(q_empty, lane);
      return;
    }
  }
#endif
  float inv[2], lse[2];
  sm.finish(c, inv, lse);
  if constexpr (FP8) {
    // Read here rather than before the main loop: one register less across it.
    const float v_descale = SLOT_HELD ? __int_as_float(ld_shared_b32(slot + SLOT_VD))
                                      : ((const float*)p.vd)[we.b * p.vd_b + (we.h / p.group) * p.vd_h];
    inv[0] *= v_descale, inv[1] *= v_descale;
  }
#if FA3_OTMA
  if (n_end == 0) {
    // No keys: O = 0, written directly (Q is not this tile's to stage in, see the header).
    const u32 zero[D / 4] = {};
    store_o_direct(p, zero, we, erow0, tq);
  } else {
    // RING_O: the tile's last K slot (consumer 0) or V slot (consumer 1), once the other
    // consumer is done reading it; released to the producer once the store has read it.
    const int s_last = (g0 + n_end - 1) % STAGES;
    const u32 ring_slot = cw == 0 ? sK + s_last * K_BYTES : sV + s_last * V_BYTES;
    const u32 o_base = RING_O ? ring_slot : Q_HOLDS_O ? sQ : sO;
    const int wrow = we.m * BQ + cw * 64;
    u32 ob[D / 4];
    pack_o(o, inv, ob);
    if (RING_O) named_sync(cw == 0 ? BAR_K_READ : BAR_PV_DONE, 256);
    stage_o(ob, o_base, cw);
    if (p.o_tma && !(FA3_VARLEN && wrow + 64 > we.sq * PACK))
      tma_store_o(p, o_base, we, cw, wrow);
    else
      copy_o_rows(p, o_base, we, cw, wrow);
    if (RING_DEFER) o_pending = (cw == 0 ? k_empty : v_empty) + 8 * s_last;
    else if (RING_O) warp_release((cw == 0 ? k_empty : v_empty) + 8 * s_last, lane);
  }
#else
  {
    u32 ob[D / 4];
    pack_o(o, inv, ob);
    store_o_direct(p, ob, we, erow0, tq);
  }
#endif
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = qrow(erow0 + 8 * r), hr = we.h + (erow0 + 8 * r) % PACK;
    if (row < we.sq && tq == 0) ((float*)p.lse)[(i64)we.b * p.lse_b + (i64)hr * p.lse_h + we.qs + row] = lse[r];
  }
  // Q holds O: thread 0 waited for its TMA store to read the slice (tma_store_o) before its
  // warp's arrival; the other warps' arrivals cannot complete the phase without it.
  if (Q_HOLDS_O && n_end > 0) warp_release(q_empty, lane);
}
