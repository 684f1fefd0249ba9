// Row reductions for the online softmax: each row of an m16n8 accumulator lives in one quad
// (4 consecutive lanes), so a row max / sum is two xor-shuffles.
#pragma once
#include "common/types.cuh"

FA_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}
FA_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}
