// fp8_vt.cu — the FP8 forward's V pre-pass (a separate launch before fa3_fwd, FA3_DT = 2):
// V e4m3 [batch, sk, heads_k, d] (row stride `v_row` bytes, head stride d, batch stride
// `v_batch`) -> Vᵀ [batch, heads_k, d, skp] (skp = sk rounded up to 16, contiguous), with the
// keys of every 16-key group permuted as fp8.cuh's fp8_key_of so that the PV wgmma (B must be
// K-major for 8-bit types) can take P straight from the S accumulator. Keys >= sk are written
// as 0 (P is 0 there too; 0·0 keeps padded columns out of O).
//
// A pure copy, bound by HBM: what matters is bytes in flight and whole 128-byte lines. One CTA
// per (128-key block, 128-wide d block, batch·heads_k), 256 threads. Loads: every thread issues
// four 16-byte loads of key rows before storing any (eight threads read a row's 128 bytes); in
// shared memory a row's 16-byte units are XOR-swizzled by its 16-key group, so that the
// transpose's 32-bit column reads hit 32 distinct banks. Transpose: lane (16-key group kg =
// lane % 8, quad of d rows rq = 4·warp + lane / 8) reads its 16 keys' words of those 4 d bytes
// and byte-permutes them (4×4 byte transposes) into four 16-byte pieces of Vᵀ rows; the eight
// lanes of a d row write its 128 contiguous bytes.
#include "sm90/util.cuh"
#include "sm90/fp8.cuh"

constexpr int VT_KB = 128, VT_DB = 128;  // keys and d columns per CTA

extern "C" __global__ void __launch_bounds__(256) fa3_fp8_vt(const unsigned char* __restrict__ v,
                                                            unsigned char* __restrict__ vt, int sk,
                                                            int skp, int heads_k, int d,
                                                            long long v_row, long long v_batch) {
  __shared__ __align__(16) u32 tile[VT_KB * VT_DB / 4];  // key rows of 32 words, units swizzled
  const int k0 = blockIdx.x * VT_KB, d0 = blockIdx.y * VT_DB;
  const int bh = blockIdx.z, b = bh / heads_k, h = bh % heads_k;
  const int tid = threadIdx.x;
  const unsigned char* src = v + b * v_batch + (long long)h * d + d0;
  uint4 x[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int c = tid + 256 * i, key = c / 8, u = c % 8;  // key row, 16-byte unit
    x[i] = make_uint4(0, 0, 0, 0);
    if (k0 + key < sk && d0 + 16 * u < d)
      x[i] = *(const uint4*)(src + (long long)(k0 + key) * v_row + 16 * u);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int c = tid + 256 * i, key = c / 8, u = c % 8;
    *(uint4*)&tile[key * 32 + 4 * (u ^ (key >> 4))] = x[i];
  }
  __syncthreads();
  const int lane = tid % 32, kg = lane % 8, rq = 4 * (tid / 32) + lane / 8;
  if (k0 + 16 * kg >= skp) return;
  u32 w[16];
#pragma unroll
  for (int k = 0; k < 16; ++k) w[k] = tile[(16 * kg + k) * 32 + 4 * ((rq >> 2) ^ kg) + (rq & 3)];
  // Word t of d row q: positions 4t..4t+3 of the group (fp8.cuh vt_quad).
  uint4 o[4];
  u32* ow = (u32*)o;
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    u32 r[4];
    vt_quad(w[2 * t], w[2 * t + 1], w[2 * t + 8], w[2 * t + 9], r);
#pragma unroll
    for (int q = 0; q < 4; ++q) ow[4 * q + t] = r[q];
  }
  unsigned char* dst = vt + ((long long)bh * d + d0 + 4 * rq) * skp + k0 + 16 * kg;
#pragma unroll
  for (int q = 0; q < 4; ++q)
    if (d0 + 4 * rq + q < d) *(uint4*)(dst + (long long)q * skp) = o[q];
}
