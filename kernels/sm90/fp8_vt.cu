// fp8_vt.cu — the FP8 forward's V pre-pass (a separate launch before fa3_fwd, FA3_DT = 2):
// V e4m3 [batch, sk, heads_k, d] (row stride `v_row` bytes, head stride d, batch stride
// `v_batch`) -> Vᵀ [batch, heads_k, d, skp] (skp = sk rounded up to 16, contiguous), with the
// keys of every 16-key group permuted as fp8.cuh's fp8_key_of so that the PV wgmma (B must be
// K-major for 8-bit types) can take P straight from the S accumulator. Keys >= sk are written
// as 0 (P is 0 there too; 0·0 keeps padded columns out of O).
// One CTA per (64-key block, 64-wide d block, batch·heads_k): 256 threads, 16 bytes each way.
#include "sm90/util.cuh"
#include "sm90/fp8.cuh"

extern "C" __global__ void __launch_bounds__(256) fa3_fp8_vt(const unsigned char* __restrict__ v,
                                                            unsigned char* __restrict__ vt, int sk,
                                                            int skp, int heads_k, int d,
                                                            long long v_row, long long v_batch) {
  __shared__ __align__(16) unsigned char tile[64][64 + 16];
  const int k0 = blockIdx.x * 64, d0 = blockIdx.y * 64;
  const int bh = blockIdx.z, b = bh / heads_k, h = bh % heads_k;
  const int tid = threadIdx.x;
  {
    const int r = tid / 4, c = (tid % 4) * 16;  // key row r, d columns c..c+15
    const int key = k0 + r;
    uint4 x = make_uint4(0, 0, 0, 0);
    if (key < sk && d0 + c < d)
      x = *(const uint4*)(v + b * v_batch + (long long)key * v_row + (long long)h * d + d0 + c);
    *(uint4*)&tile[r][c] = x;
  }
  __syncthreads();
  {
    const int r = tid / 4, p0 = (tid % 4) * 16;  // output row d0 + r, positions p0..p0+15
    if (d0 + r < d && k0 + p0 < skp) {
      u32 w[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        u32 acc = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) acc |= (u32)tile[p0 + fp8_key_of(4 * q + i)][r] << (8 * i);
        w[q] = acc;
      }
      *(uint4*)(vt + ((long long)bh * d + d0 + r) * skp + k0 + p0) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}
