// Philox4x32-10 and the dropout keep test, word for word as crate::math::Dropout:
//   key = [seed_lo, seed_hi ^ offset_hi], counter = [j >> 2, i, head, batch ^ offset_lo],
//   element (i, j) kept iff word[j & 3] >= threshold (= floor(p * 2^32)).
#pragma once
#include "common/types.cuh"

struct Philox4 { u32 x, y, z, w; };

FA_DEVICE Philox4 philox4x32_10(u32 c0, u32 c1, u32 c2, u32 c3, u32 k0, u32 k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
    u32 lo0 = 0xD2511F53u * c0, hi0 = __umulhi(0xD2511F53u, c0);
    u32 lo1 = 0xCD9E8D57u * c2, hi1 = __umulhi(0xCD9E8D57u, c2);
    u32 n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
  }
  Philox4 r = {c0, c1, c2, c3};
  return r;
}
