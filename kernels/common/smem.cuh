// Shared-memory tiles: cp.async 16-byte copies with commit/wait groups, ldmatrix (plain and
// transposed), and the XOR swizzle that keeps both conflict-free.
//
// A tile is ROWS x W chunks of 16 bytes (8 half-precision elements), rows packed back to back
// (no padding). ldmatrix reads one 16-byte chunk from each of 8 consecutive rows per phase; the
// swizzle moves chunk c of row r so those 8 chunks land in 8 different 16-byte bank groups:
//   - chunks in a full group of 8 (c|7 < W):   c ^ (r & 7)
//   - a trailing group of 4 (W = 4, or 8..11 of W = 12): c ^ ((r >> 1) & 3) inside the group
// Checked for W = 4, 8, 12, 16, 24, 32 (head dims 32 .. 256): rows r..r+7 hit 8 bank groups.
#pragma once
#include "common/types.cuh"

template <int W>
FA_DEVICE int swz(int r, int c) {
  if ((W % 8) == 0 || (c | 7) < W) return c ^ (r & 7);
  return c ^ ((r >> 1) & 3);
}
// Byte offset of (row r, chunk c) in a W-chunk tile.
template <int W>
FA_DEVICE u32 swz_off(int r, int c) { return (u32)((r * W + swz<W>(r, c)) * 16); }

FA_DEVICE u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// 16-byte global->shared copy; src_bytes = 0 writes zeros (rows past the sequence end).
FA_DEVICE void cp_async_16(u32 dst, const void* src, bool valid) {
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
FA_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
FA_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

FA_DEVICE void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
FA_DEVICE void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Copy a ROWS x (W*8) tile from global (row stride `stride` elements) into a swizzled smem tile,
// NT threads cooperating; rows >= valid_rows are zero-filled. When NT is a multiple of W, a
// thread keeps one chunk column and walks rows NT/W apart: one running pointer, and (NT/W a
// multiple of 8) one swizzled column for all its rows.
template <int ROWS, int W, int NT>
FA_DEVICE void load_tile(u32 smem, const u16* gmem, i64 stride, int valid_rows, int tid) {
  constexpr int CHUNKS = ROWS * W;
  if constexpr (NT % W == 0 && (NT / W) % 8 == 0 && CHUNKS % NT == 0) {
    constexpr int RSTEP = NT / W;
    const int r0 = tid / W, c = tid % W;
    const u32 dst = smem + swz_off<W>(r0, c);
    const u16* src = gmem + r0 * stride + c * 8;
    const i64 step = RSTEP * stride;
#pragma unroll
    for (int i = 0; i < CHUNKS / NT; ++i) {
      const bool ok = r0 + i * RSTEP < valid_rows;
      cp_async_16(dst + i * RSTEP * W * 16, ok ? src : gmem, ok);
      src += step;
    }
  } else {
#pragma unroll
    for (int i = 0; i < (CHUNKS + NT - 1) / NT; ++i) {
      int idx = i * NT + tid;
      if ((CHUNKS % NT) == 0 || idx < CHUNKS) {
        int r = idx / W, c = idx % W;
        bool ok = r < valid_rows;
        const u16* src = ok ? gmem + r * stride + c * 8 : gmem;
        cp_async_16(smem + swz_off<W>(r, c), src, ok);
      }
    }
  }
}

// Per-lane byte offsets of the chunk pairs a fragment loader walks: chunk 2x + c1 of a row
// whose (row & 7) is this lane's. With full groups of 8 chunks (W % 8 == 0) the swizzled chunk
// is (2x + c1) ^ r = 2x ^ (c1 ^ r), so one register y16 = 16 (c1 ^ (r & 7)) gives every offset:
// (x >> 2) * 128 + (y16 ^ 32 (x & 3)). Otherwise (W = 4, 12) a 6-entry table: off[x & 3]
// inside full groups, tail[x & 1] in the trailing group of 4.
template <int W>
struct ChunkTable {
  u32 y16;
  u32 off[4];
  u32 tail[2];
  FA_DEVICE ChunkTable(int r, int c1) {
    y16 = (u32)((c1 ^ (r & 7)) * 16);
    if (W % 8 != 0) {
#pragma unroll
      for (int x = 0; x < 4; ++x) off[x] = (2 * x + c1 < W) ? (u32)swz<W>(r, 2 * x + c1) * 16 : 0u;
#pragma unroll
      for (int y = 0; y < 2; ++y)
        tail[y] = (W > 8) ? (u32)swz<W>(r, (W & ~7) + 2 * y + c1) * 16 : 0u;
    }
  }
  FA_DEVICE u32 operator()(int x) const {
    if (W % 8 == 0) return (u32)(x >> 2) * 128u + (y16 ^ (u32)((x & 3) * 32));
    if (W < 8 || 2 * x < (W & ~7)) return off[x & 3] + (u32)(x >> 2) * 128u;
    return tail[x & 1];
  }
};
