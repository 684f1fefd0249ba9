// Parameters of the FlashAttention-2 backward kernels (kernels/sm80/bwd.cu), mirrored field for
// field by `BwdParams` in crates/flashattn/src/cuda/fa2_bwd.rs (#[repr(C)]: 8-byte fields first,
// then 4-byte fields, so both sides agree without padding rules).
//
// Index conventions (elements, not bytes):
//   q/k/v/o/dout  element [b, row, head, 0] = ptr + b*X_b + (X_start + row)*X_r + head*X_h
//                 (dense: X_start = 0; varlen: X_b = 0 and X_start = cu_seqlens[b])
//   lse, dsum     [b*lse_b + h*lse_h + q_start + i]   (dense [batch, heads_q, sq]; varlen [heads_q, total_q])
//   dq, dq_accum  contiguous [rows_q, heads_q, D], row = (dense ? b*sq : q_start) + i
//   dk, dv        contiguous [rows_k, heads_k, D], row = (dense ? b*sk : k_start) + j
#pragma once
#include "common/types.cuh"

struct BwdParams {
  const u16* q;
  const u16* k;
  const u16* v;
  const u16* o;
  const u16* dout;
  const float* lse;
  float* dsum;      // [lse layout] rowsum(dout * o), written by the preprocess kernel
  float* dq_accum;  // [rows_q, heads_q, D] f32 (atomic path)
  u16* dq;
  u16* dk;
  u16* dv;
  const i32* cu_q;  // null for dense
  const i32* cu_k;
  const float* alibi;  // null without ALiBi; slope = alibi[b*alibi_b + h]
  i64 q_b, q_r, q_h;
  i64 k_b, k_r, k_h;
  i64 v_b, v_r, v_h;
  i64 o_b, o_r, o_h;
  i64 do_b, do_r, do_h;
  i64 lse_b, lse_h;
  i64 n_dq;  // rows_q * heads_q * D (convert kernel)
  i32 batch, heads_q, heads_k, group;
  i32 sq, sk;        // dense sequence lengths (unused for varlen)
  i32 rows_q;        // rows of q in all (dense batch*sq, varlen total_q)
  i32 left, right;   // window, -1 = unbounded
  i32 alibi_b;       // 0 or heads_q
  u32 drop_thr, key0, key1, off_lo;
  float scale, softcap, drop_scale;
  i32 flags;  // bit 0: grid (blocks, heads, batch) instead of (heads, batch, blocks); bit 1: rotate
              // the main kernel's Q-tile walk by its key block (spreads the dQ atomics)
};

struct SeqInfo {
  int q_start, sq, k_start, sk;  // packed start rows (0 for dense) and lengths
  int qrow0, krow0;              // first row in the contiguous dq / dk layouts
};

FA_DEVICE SeqInfo seq_info(const BwdParams& p, int b) {
  SeqInfo s;
  if (p.cu_q) {
    s.q_start = p.cu_q[b];
    s.sq = p.cu_q[b + 1] - s.q_start;
    s.k_start = p.cu_k[b];
    s.sk = p.cu_k[b + 1] - s.k_start;
    s.qrow0 = s.q_start;
    s.krow0 = s.k_start;
  } else {
    s.q_start = 0;
    s.sq = p.sq;
    s.k_start = 0;
    s.sk = p.sk;
    s.qrow0 = b * p.sq;
    s.krow0 = b * p.sk;
  }
  return s;
}
