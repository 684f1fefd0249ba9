// Arguments of the FA2 forward kernel; mirrored field for field by `FwdParams` in
// crates/flashattn/src/cuda/fa2.rs (#[repr(C)]). Strides are in elements.
#pragma once
#include "common/types.cuh"

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;
  const i32* cu_seqlens_q;  // null for dense batches
  const i32* cu_seqlens_k;
  const float* alibi_slopes;  // null unless HAS_ALIBI
  i64 q_batch_stride, q_row_stride, q_head_stride;
  i64 k_batch_stride, k_row_stride, k_head_stride;
  i64 v_batch_stride, v_row_stride, v_head_stride;
  i64 o_batch_stride, o_row_stride, o_head_stride;
  i64 lse_batch_stride, lse_head_stride;
  i32 seqlen_q, seqlen_k;  // dense lengths (varlen: from cu_seqlens)
  i32 heads_q, group;      // group = heads_q / heads_k
  i32 window_left, window_right;  // keys i+sk-sq-left ..= i+sk-sq+right; "unbounded" = 1<<29
  i32 alibi_batch_stride;         // 0 for [heads_q] slopes, heads_q for [batch, heads_q]
  u32 dropout_key0, dropout_key1, dropout_offset_lo, dropout_threshold;
  float scale;          // softmax scale
  float scale_log2;     // scale * log2(e)
  float softcap_inner;  // scale / softcap
  float softcap_outer;  // softcap * log2(e)
  float dropout_scale;  // 1 / (1 - p), or 1
};
