// FlashAttention-2 backward (sm80+, mma.sync m16n8k16, f16/bf16 in, f32 accumulate).
//
// Per (batch b, query head h), with P recomputed from the forward's log-sum-exp:
//   S  = scale · Q Kᵀ ;  Sc = softcap·tanh(S/softcap) (optional) ;  Sc -= slope·|i+sk−sq−j| (ALiBi)
//   P  = exp(Sc − LSE) (0 where masked) ;  Pd = P ∘ Z / (1−p)  (dropout keep mask Z)
//   dV = Pdᵀ dO ;  dPd = dO Vᵀ ;  dP = dPd ∘ Z / (1−p) ;  D = rowsum(dO ∘ O)
//   dS = P ∘ (dP − D) ∘ (1 − tanh²) (softcap) ;  dQ = scale · dS K ;  dK = scale · dSᵀ Q
// (scale is folded into dS before it is rounded to the input dtype for the tensor cores.)
//
// Kernels:
//   fa2_bwd_pre      D = rowsum(dO ∘ O) (f32, LSE layout); zeroes the f32 dQ accumulator.
//   fa2_bwd_main     grid (kv blocks, heads_k, batch). A CTA owns BC rows of K and V of one key
//                    head, keeps dK and dV (f32) in registers, and walks every (query head of
//                    the GQA group, Q tile of BR rows) that can see its keys. Per tile:
//                      A: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (warp grid WM_A x WN_A) → Pdᵀ, dSᵀ to smem
//                      B: dV += Pdᵀ dO, dK += dSᵀ Q          (warp grid WM_B x WN_B)
//                      C: dQ += dS K, f32 atomics to dq_accum  (warp grid WM_C x WN_C; skipped
//                         in deterministic mode)
//                    Q/dO tiles are double-buffered with cp.async when STAGES = 2.
//   fa2_bwd_dq       deterministic dQ: grid (q blocks, heads_q, batch); a CTA owns BR query rows,
//                    walks the K/V tiles it sees, recomputes P and dS and accumulates dQ in
//                    registers (fixed order: bit-identical run to run). Writes dq directly.
//   fa2_bwd_convert  dq = dtype(dq_accum) (atomic path).
//
// Shared-memory tiles use the XOR swizzle of common/smem.cuh (no padding).
#include "common/types.cuh"
#include "common/mma.cuh"
#include "common/smem.cuh"
#include "common/philox.cuh"
#include "common/bwd_tile.cuh"
#include "sm80/bwd_params.cuh"

#ifndef FA_D
#define FA_D 64
#endif
#ifndef FA_BF16
#define FA_BF16 1
#endif
#ifndef FA_BC
#define FA_BC 64
#endif
#ifndef FA_BR
#define FA_BR 64
#endif
#ifndef FA_NW
#define FA_NW 8
#endif
#ifndef FA_WM_A
#define FA_WM_A 4
#endif
#ifndef FA_WM_B
#define FA_WM_B 4
#endif
#ifndef FA_WM_C
#define FA_WM_C 4
#endif
#ifndef FA_STAGES
#define FA_STAGES 2
#endif
#ifndef FA_MINB
#define FA_MINB 1
#endif
#ifndef FA_MASK
#define FA_MASK 0
#endif
#ifndef FA_SOFTCAP
#define FA_SOFTCAP 0
#endif
#ifndef FA_ALIBI
#define FA_ALIBI 0
#endif
#ifndef FA_DROPOUT
#define FA_DROPOUT 0
#endif
#ifndef FA_DET
#define FA_DET 0
#endif

#define FA_LOG2E 1.4426950408889634f

constexpr bool kBF16 = FA_BF16 != 0;
constexpr int kD = FA_D;
constexpr int kBC = FA_BC;
constexpr int kBR = FA_BR;
constexpr int kNW = FA_NW;
constexpr int kNTH = kNW * 32;
constexpr int kStages = FA_STAGES;

FA_DEVICE void st_shared_u32(u32 addr, u32 v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v));
}


// The per-element part of the backward: from the S and dP accumulators of one warp tile to
// Pd (optional, TRANS only) and dS (scaled by `scale`) in shared memory.
// TRANS: tile rows are keys j and columns queries i (main kernel); else rows i, columns j.
// sL2[il] = LSE of local query row il (read only where the element is valid);
// sDs[il] = D of that row. WP: chunks per row of the sP / sdS tiles.
// CHECK = false: the caller guarantees that every element of the tile is inside the sequence
// bounds and the window (so every row's LSE is finite): no per-element masking.
template <bool TRANS, bool CHECK, int MT, int NT, int WP>
FA_DEVICE void softmax_grad(const BwdParams& p, float (&s)[MT][NT][4], float (&dp)[MT][NT][4],
                            int r0, int c0, int i0, int j0, int sq, int sk, int b, int h,
                            float slope, const float* sL2, const float* sDs, u32 sP, u32 sdS,
                            int lane) {
  const int g = lane >> 2, t = lane & 3;
  const int off = sk - sq;
  const float scale_log2 = p.scale * FA_LOG2E;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float pd[4], ds[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = r0 + mt * 16 + g + (e >> 1) * 8;
        const int c = c0 + nt * 8 + 2 * t + (e & 1);
        const int il = TRANS ? c : r;
        const int jl = TRANS ? r : c;
        const int i = i0 + il, j = j0 + jl;
        bool valid = true;
        if (CHECK) valid = (i < sq) && (j < sk);
        if (CHECK && FA_MASK) {
          if (p.left >= 0) valid = valid && (j >= i + off - p.left);
          if (p.right >= 0) valid = valid && (j <= i + off + p.right);
        }
        // Rows with LSE = -inf see no key, so every element of theirs is masked (valid = false).
        const float lse2 = sL2[il] * FA_LOG2E;
        float x, tt = 0.f;
        if (FA_SOFTCAP || FA_ALIBI) {
          float sc = s[mt][nt][e] * p.scale;
          if (FA_SOFTCAP) {
            tt = tanhf(sc / p.softcap);
            sc = p.softcap * tt;
          }
          if (FA_ALIBI) {
            int dist = i + off - j;
            dist = dist < 0 ? -dist : dist;
            sc -= slope * (float)dist;
          }
          x = sc * FA_LOG2E - lse2;
        } else {
          x = s[mt][nt][e] * scale_log2 - lse2;
        }
        const float pe = valid ? exp2_approx(x) : 0.f;
        float dpe = dp[mt][nt][e];
        float pde = pe;
        if (FA_DROPOUT) {
          Philox4 w = philox4x32_10((u32)(j >> 2), (u32)i, (u32)h, ((u32)b) ^ p.off_lo, p.key0, p.key1);
          const int q = j & 3;
          const u32 word = q == 0 ? w.x : (q == 1 ? w.y : (q == 2 ? w.z : w.w));
          const bool keep = word >= p.drop_thr;
          pde = keep ? pe * p.drop_scale : 0.f;
          dpe = keep ? dpe * p.drop_scale : 0.f;
        }
        float d = pe * (dpe - sDs[il]);
        if (FA_SOFTCAP) d *= (1.f - tt * tt);
        pd[e] = pde;
        ds[e] = valid ? d * p.scale : 0.f;
      }
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = r0 + mt * 16 + g + hh * 8;
        const int c = c0 + nt * 8 + 2 * t;
        const u32 o = swz_off<WP>(r, c >> 3) + (c & 7) * 2;
        if (TRANS) st_shared_u32(sP + o, pack2<kBF16>(pd[2 * hh], pd[2 * hh + 1]));
        st_shared_u32(sdS + o, pack2<kBF16>(ds[2 * hh], ds[2 * hh + 1]));
      }
    }
  }
}

// True when every (i, j) of queries [m0, m0+nr) x keys [n0, n0+nc) is inside the sequence
// bounds and the window (softmax_grad<.., CHECK = false> is then exact).
FA_DEVICE bool tile_full(const BwdParams& p, int m0, int nr, int n0, int nc, int sq, int sk) {
  if (m0 + nr > sq || n0 + nc > sk) return false;
  if (FA_MASK) {
    const int off = sk - sq;
    if (p.left >= 0 && n0 < m0 + nr - 1 + off - p.left) return false;
    if (p.right >= 0 && n0 + nc - 1 > m0 + off + p.right) return false;
  }
  return true;
}

// 4-byte global->shared copy (zero-filled when !valid).
FA_DEVICE void cp_async_4(u32 dst, const void* src, bool valid) {
  int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

// Starts the copy of LSE and D of query rows [m0, m0+BR) into smem (part of the caller's
// cp.async group; rows past sq read as 0 and are masked out by the caller).
FA_DEVICE void load_rowstats(const BwdParams& p, const SeqInfo& si, int b, int h, int m0,
                             float* sLse, float* sDs, int tid) {
  for (int r = tid; r < kBR; r += kNTH) {
    const int i = m0 + r;
    const bool ok = i < si.sq;
    const i64 idx = ok ? (i64)b * p.lse_b + (i64)h * p.lse_h + si.q_start + i : 0;
    cp_async_4(smem_u32(sLse + r), p.lse + idx, ok);
    cp_async_4(smem_u32(sDs + r), p.dsum + idx, ok);
  }
}

// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256) fa2_bwd_pre(const BwdParams p) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const i64 id = (i64)blockIdx.x * 8 + warp;
  if (id >= (i64)p.rows_q * p.heads_q) return;
  const int r = (int)(id / p.heads_q), h = (int)(id % p.heads_q);
  int b = 0, i = r;
  if (!p.cu_q) {
    b = r / p.sq;
    i = r % p.sq;
  }
  const u16* o = p.o + (i64)b * p.o_b + (i64)i * p.o_r + (i64)h * p.o_h;
  const u16* dout = p.dout + (i64)b * p.do_b + (i64)i * p.do_r + (i64)h * p.do_h;
  float acc = 0.f;
  for (int c = lane * 2; c < kD; c += 64) {
    const u32 ov = *reinterpret_cast<const u32*>(o + c);
    const u32 dv = *reinterpret_cast<const u32*>(dout + c);
    acc += half_to_f32<kBF16>((u16)(ov & 0xffff)) * half_to_f32<kBF16>((u16)(dv & 0xffff));
    acc += half_to_f32<kBF16>((u16)(ov >> 16)) * half_to_f32<kBF16>((u16)(dv >> 16));
  }
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
  if (lane == 0) p.dsum[(i64)b * p.lse_b + (i64)h * p.lse_h + i] = acc;
  if (p.dq_accum) {
    float* dq = p.dq_accum + id * kD;
    for (int c = lane; c < kD; c += 32) dq[c] = 0.f;
  }
}

extern "C" __global__ void __launch_bounds__(256) fa2_bwd_convert(const BwdParams p) {
  const i64 stride = (i64)gridDim.x * blockDim.x * 2;
  for (i64 idx = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * 2; idx < p.n_dq; idx += stride) {
    const float a = p.dq_accum[idx], c = p.dq_accum[idx + 1];
    *reinterpret_cast<u32*>(p.dq + idx) = pack2<kBF16>(a, c);
  }
}

// ---------------------------------------------------------------------------------------------
constexpr int kWD = kD / 8;
constexpr int kWBR = kBR / 8;
constexpr int kWBC = kBC / 8;

extern "C" __global__ void __launch_bounds__(kNTH, FA_MINB) fa2_bwd_main(const BwdParams p) {
  constexpr int WM_A = FA_WM_A, WN_A = kNW / WM_A;
  constexpr int MT_A = kBC / WM_A / 16, NT_A = kBR / WN_A / 8;
  constexpr int WM_B = FA_WM_B, WN_B = kNW / WM_B;
  constexpr int MT_B = kBC / WM_B / 16, NT_B = kD / WN_B / 8;
  constexpr int WM_C = FA_WM_C, WN_C = kNW / WM_C;
  constexpr int MT_C = kBR / WM_C / 16, NT_C = kD / WN_C / 8;
  constexpr int CQ = (NT_C % 4 == 0) ? 4 : 2;
  static_assert(MT_A * WM_A * 16 == kBC && NT_A * WN_A * 8 == kBR, "phase A warp grid");
  static_assert(MT_B * WM_B * 16 == kBC && NT_B * WN_B * 8 == kD, "phase B warp grid");
  static_assert(MT_C * WM_C * 16 == kBR && NT_C * WN_C * 8 == kD, "phase C warp grid");

  extern __shared__ __align__(128) unsigned char smem[];
  constexpr u32 KV_BYTES = kBC * kD * 2, QT_BYTES = kBR * kD * 2, PT_BYTES = kBC * kBR * 2;
  const u32 s0 = smem_u32(smem);
  const u32 sK = s0, sV = sK + KV_BYTES;
  const u32 sQ0 = sV + KV_BYTES;                  // kStages tiles
  const u32 sdO0 = sQ0 + kStages * QT_BYTES;      // kStages tiles
  const u32 sP = sdO0 + kStages * QT_BYTES;
  const u32 sdS = sP + PT_BYTES;
  float* sL2 = reinterpret_cast<float*>(smem + (sdS + PT_BYTES - s0));  // [kStages][kBR]
  float* sDs = sL2 + kStages * kBR;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // Grid (kv blocks, heads_k, batch) (flags bit 0: the CTAs that run together share their Q, dO
  // and dQ rows in L2; key block 0, the heaviest under a causal mask, first) or
  // (heads_k, batch, kv blocks).
  const bool kfirst = p.flags & 1;
  const int hk = kfirst ? blockIdx.y : blockIdx.x;
  const int b = kfirst ? blockIdx.z : blockIdx.y;
  const int nb = kfirst ? blockIdx.x : blockIdx.z;
  const SeqInfo si = seq_info(p, b);
  const int n0 = nb * kBC;
  if (n0 >= si.sk) return;
  const int n1 = min(n0 + kBC, si.sk);
  const int off = si.sk - si.sq;
  int i_lo = 0, i_hi = si.sq;
  if (FA_MASK) {
    if (p.right >= 0) i_lo = max(0, n0 - off - p.right);
    if (p.left >= 0) i_hi = min(si.sq, n1 - off + p.left);
  }
  const int n_mt = i_hi > i_lo ? (i_hi - i_lo + kBR - 1) / kBR : 0;
  const int total_it = n_mt * p.group;
  // Q-tile walk starts at tile `rot` (flags bit 1) so that CTAs of neighbouring key blocks do
  // not add into the same dQ rows at the same time.
  const int rot = ((p.flags & 2) && n_mt > 0) ? nb % n_mt : 0;

  load_tile<kBC, kWD, kNTH>(sK, p.k + (i64)b * p.k_b + (i64)(si.k_start + n0) * p.k_r + (i64)hk * p.k_h,
                            p.k_r, n1 - n0, tid);
  load_tile<kBC, kWD, kNTH>(sV, p.v + (i64)b * p.v_b + (i64)(si.k_start + n0) * p.v_r + (i64)hk * p.v_h,
                            p.v_r, n1 - n0, tid);
  cp_async_commit();

  auto q_tile = [&](int it) {
    int mt = it % n_mt + rot;
    mt = mt >= n_mt ? mt - n_mt : mt;
    return i_lo + mt * kBR;
  };
  auto load_q = [&](int it, int st) {
    const int h = hk * p.group + it / n_mt;
    const int m0 = q_tile(it);
    load_tile<kBR, kWD, kNTH>(sQ0 + st * QT_BYTES,
                              p.q + (i64)b * p.q_b + (i64)(si.q_start + m0) * p.q_r + (i64)h * p.q_h,
                              p.q_r, si.sq - m0, tid);
    load_tile<kBR, kWD, kNTH>(sdO0 + st * QT_BYTES,
                              p.dout + (i64)b * p.do_b + (i64)(si.q_start + m0) * p.do_r + (i64)h * p.do_h,
                              p.do_r, si.sq - m0, tid);
    load_rowstats(p, si, b, h, m0, sL2 + st * kBR, sDs + st * kBR, tid);
  };

  float acc_dv[MT_B][NT_B][4], acc_dk[MT_B][NT_B][4];
  zero_acc(acc_dv);
  zero_acc(acc_dk);

  if (total_it > 0) {
    load_q(0, 0);
    cp_async_commit();
  }
  const int wa_m = warp % WM_A, wa_n = warp / WM_A;
  const int wb_m = warp % WM_B, wb_n = warp / WM_B;
  const int wc_m = warp % WM_C, wc_n = warp / WM_C;

  for (int it = 0; it < total_it; ++it) {
    const int st = kStages == 2 ? (it & 1) : 0;
    cp_async_wait<0>();
    __syncthreads();
    if (kStages == 2 && it + 1 < total_it) {
      load_q(it + 1, st ^ 1);
      cp_async_commit();
    }
    const int h = hk * p.group + it / n_mt;
    const int m0 = q_tile(it);
    float slope = 0.f;
    if (FA_ALIBI) slope = p.alibi[(i64)b * p.alibi_b + h];
    const u32 sQ = sQ0 + st * QT_BYTES, sdO = sdO0 + st * QT_BYTES;

    // Phase A: Sᵀ, dPᵀ → Pdᵀ, dSᵀ in smem.
    {
      float acc_s[MT_A][NT_A][4], acc_dp[MT_A][NT_A][4];
      zero_acc(acc_s);
      zero_acc(acc_dp);
      gemm_nt<kBF16, MT_A, NT_A, kD, kWD, kWD>(acc_s, sK, wa_m * MT_A * 16, sQ, wa_n * NT_A * 8, lane);
      gemm_nt<kBF16, MT_A, NT_A, kD, kWD, kWD>(acc_dp, sV, wa_m * MT_A * 16, sdO, wa_n * NT_A * 8, lane);
      if (tile_full(p, m0, kBR, n0, kBC, si.sq, si.sk))
        softmax_grad<true, false, MT_A, NT_A, kWBR>(p, acc_s, acc_dp, wa_m * MT_A * 16, wa_n * NT_A * 8, m0,
                                                    n0, si.sq, si.sk, b, h, slope, sL2 + st * kBR,
                                                    sDs + st * kBR, sP, sdS, lane);
      else
        softmax_grad<true, true, MT_A, NT_A, kWBR>(p, acc_s, acc_dp, wa_m * MT_A * 16, wa_n * NT_A * 8, m0,
                                                   n0, si.sq, si.sk, b, h, slope, sL2 + st * kBR,
                                                   sDs + st * kBR, sP, sdS, lane);
    }
    __syncthreads();
    // Phase B: dV += Pdᵀ dO, dK += dSᵀ Q.
    gemm_nn<kBF16, false, MT_B, NT_B, kBR, kWBR, kWD>(acc_dv, sP, wb_m * MT_B * 16, sdO, wb_n * NT_B * 8, lane);
    gemm_nn<kBF16, false, MT_B, NT_B, kBR, kWBR, kWD>(acc_dk, sdS, wb_m * MT_B * 16, sQ, wb_n * NT_B * 8, lane);
    // Phase C: dQ += dS K (f32 atomics, staged per warp in this tile's Q or dO stage).
    if (!FA_DET) {
      __syncthreads();  // every warp's phase B is done with Q and dO: they stage dQ now
      constexpr u32 STAGE_W = 512 * CQ;  // one warp's m16 x 8·CQ block of f32
      static_assert((kNW / 2) * STAGE_W <= QT_BYTES && kNW % 2 == 0, "dQ staging room");
      const u32 stage = (warp < kNW / 2 ? sQ : sdO) + (warp % (kNW / 2)) * STAGE_W;
      float* dq_head = p.dq_accum + ((i64)si.qrow0 * p.heads_q + h) * kD;
#pragma unroll
      for (int ch = 0; ch < NT_C / CQ; ++ch) {
        float acc[MT_C][CQ][4];
        zero_acc(acc);
        const int nc0 = wc_n * NT_C * 8 + ch * CQ * 8;
        gemm_nn<kBF16, true, MT_C, CQ, kBC, kWBR, kWD>(acc, sdS, wc_m * MT_C * 16, sK, nc0, lane);
#pragma unroll
        for (int mt = 0; mt < MT_C; ++mt) {
          const int row0 = m0 + wc_m * MT_C * 16 + mt * 16;
          const i64 row_stride = (i64)p.heads_q * kD;
          red_add_staged<CQ>([&](int nt, int i) { return acc[mt][nt][i]; },
                             [&](int r) { return dq_head + (row0 + r) * row_stride + nc0; }, row0,
                             si.sq, stage, lane);
        }
      }
    }
    if (kStages == 1) {
      __syncthreads();
      if (it + 1 < total_it) {
        load_q(it + 1, 0);
        cp_async_commit();
      }
    }
  }

  // dK, dV (f32 registers) → input dtype.
  {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT_B; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int j = n0 + wb_m * MT_B * 16 + mt * 16 + g + hh * 8;
        if (j < si.sk) {
          const i64 base = ((i64)(si.krow0 + j) * p.heads_k + hk) * kD + wb_n * NT_B * 8 + 2 * t;
#pragma unroll
          for (int nt = 0; nt < NT_B; ++nt) {
            *reinterpret_cast<u32*>(p.dk + base + nt * 8) =
                pack2<kBF16>(acc_dk[mt][nt][2 * hh], acc_dk[mt][nt][2 * hh + 1]);
            *reinterpret_cast<u32*>(p.dv + base + nt * 8) =
                pack2<kBF16>(acc_dv[mt][nt][2 * hh], acc_dv[mt][nt][2 * hh + 1]);
          }
        }
      }
  }
}

// ---------------------------------------------------------------------------------------------
// Deterministic dQ: a CTA owns kBR query rows of one query head and walks the K/V tiles.
extern "C" __global__ void __launch_bounds__(kNTH, FA_MINB) fa2_bwd_dq(const BwdParams p) {
  // Warps along the query rows: at most one per 16 rows.
  constexpr int WM_A = FA_WM_A <= kBR / 16 ? FA_WM_A : kBR / 16, WN_A = kNW / WM_A;
  constexpr int MT_A = kBR / WM_A / 16, NT_A = kBC / WN_A / 8;
  constexpr int WM_C = FA_WM_C <= kBR / 16 ? FA_WM_C : kBR / 16, WN_C = kNW / WM_C;
  constexpr int MT_C = kBR / WM_C / 16, NT_C = kD / WN_C / 8;
  static_assert(MT_A * WM_A * 16 == kBR && NT_A * WN_A * 8 == kBC, "dq phase A warp grid");
  static_assert(MT_C * WM_C * 16 == kBR && NT_C * WN_C * 8 == kD, "dq phase C warp grid");

  extern __shared__ __align__(128) unsigned char smem[];
  constexpr u32 KV_BYTES = kBC * kD * 2, QT_BYTES = kBR * kD * 2, ST_BYTES = kBR * kBC * 2;
  const u32 s0 = smem_u32(smem);
  const u32 sQ = s0, sdO = sQ + QT_BYTES;
  const u32 sK0 = sdO + QT_BYTES;              // kStages tiles
  const u32 sV0 = sK0 + kStages * KV_BYTES;    // kStages tiles
  const u32 sdS = sV0 + kStages * KV_BYTES;
  float* sL2 = reinterpret_cast<float*>(smem + (sdS + ST_BYTES - s0));
  float* sDs = sL2 + kBR;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // Grid (q blocks, heads_q, batch) with flags bit 0, else (heads_q, batch, q blocks).
  const bool kfirst = p.flags & 1;
  const int h = kfirst ? blockIdx.y : blockIdx.x;
  const int b = kfirst ? blockIdx.z : blockIdx.y, hk = h / p.group;
  const SeqInfo si = seq_info(p, b);
  const int m0 = (kfirst ? blockIdx.x : blockIdx.z) * kBR;
  if (m0 >= si.sq) return;
  const int m1 = min(m0 + kBR, si.sq);
  const int off = si.sk - si.sq;
  int j_lo = 0, j_hi = si.sk;
  if (FA_MASK) {
    if (p.left >= 0) j_lo = max(0, m0 + off - p.left);
    if (p.right >= 0) j_hi = min(si.sk, m1 + off + p.right);
  }
  const int n_nt = j_hi > j_lo ? (j_hi - j_lo + kBC - 1) / kBC : 0;

  load_tile<kBR, kWD, kNTH>(sQ, p.q + (i64)b * p.q_b + (i64)(si.q_start + m0) * p.q_r + (i64)h * p.q_h,
                            p.q_r, si.sq - m0, tid);
  load_tile<kBR, kWD, kNTH>(sdO, p.dout + (i64)b * p.do_b + (i64)(si.q_start + m0) * p.do_r + (i64)h * p.do_h,
                            p.do_r, si.sq - m0, tid);
  load_rowstats(p, si, b, h, m0, sL2, sDs, tid);
  cp_async_commit();

  auto load_kv = [&](int it, int st) {
    const int n0 = j_lo + it * kBC;
    load_tile<kBC, kWD, kNTH>(sK0 + st * KV_BYTES,
                              p.k + (i64)b * p.k_b + (i64)(si.k_start + n0) * p.k_r + (i64)hk * p.k_h,
                              p.k_r, si.sk - n0, tid);
    load_tile<kBC, kWD, kNTH>(sV0 + st * KV_BYTES,
                              p.v + (i64)b * p.v_b + (i64)(si.k_start + n0) * p.v_r + (i64)hk * p.v_h,
                              p.v_r, si.sk - n0, tid);
  };
  if (n_nt > 0) {
    load_kv(0, 0);
    cp_async_commit();
  }
  float slope = 0.f;
  if (FA_ALIBI) slope = p.alibi[(i64)b * p.alibi_b + h];

  float acc_dq[MT_C][NT_C][4];
  zero_acc(acc_dq);
  const int wa_m = warp % WM_A, wa_n = warp / WM_A;
  const int wc_m = warp % WM_C, wc_n = warp / WM_C;

  for (int it = 0; it < n_nt; ++it) {
    const int st = kStages == 2 ? (it & 1) : 0;
    cp_async_wait<0>();
    __syncthreads();
    if (kStages == 2 && it + 1 < n_nt) {
      load_kv(it + 1, st ^ 1);
      cp_async_commit();
    }
    const int n0 = j_lo + it * kBC;
    const u32 sK = sK0 + st * KV_BYTES, sV = sV0 + st * KV_BYTES;
    {
      float acc_s[MT_A][NT_A][4], acc_dp[MT_A][NT_A][4];
      zero_acc(acc_s);
      zero_acc(acc_dp);
      gemm_nt<kBF16, MT_A, NT_A, kD, kWD, kWD>(acc_s, sQ, wa_m * MT_A * 16, sK, wa_n * NT_A * 8, lane);
      gemm_nt<kBF16, MT_A, NT_A, kD, kWD, kWD>(acc_dp, sdO, wa_m * MT_A * 16, sV, wa_n * NT_A * 8, lane);
      if (tile_full(p, m0, kBR, n0, kBC, si.sq, si.sk))
        softmax_grad<false, false, MT_A, NT_A, kWBC>(p, acc_s, acc_dp, wa_m * MT_A * 16, wa_n * NT_A * 8, m0,
                                                     n0, si.sq, si.sk, b, h, slope, sL2, sDs, 0, sdS, lane);
      else
        softmax_grad<false, true, MT_A, NT_A, kWBC>(p, acc_s, acc_dp, wa_m * MT_A * 16, wa_n * NT_A * 8, m0,
                                                    n0, si.sq, si.sk, b, h, slope, sL2, sDs, 0, sdS, lane);
    }
    __syncthreads();
    gemm_nn<kBF16, false, MT_C, NT_C, kBC, kWBC, kWD>(acc_dq, sdS, wc_m * MT_C * 16, sK, wc_n * NT_C * 8, lane);
    if (kStages == 1) {
      __syncthreads();
      if (it + 1 < n_nt) {
        load_kv(it + 1, 0);
        cp_async_commit();
      }
    }
  }

  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT_C; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int i = m0 + wc_m * MT_C * 16 + mt * 16 + g + hh * 8;
      if (i < si.sq) {
        const i64 base = ((i64)(si.qrow0 + i) * p.heads_q + h) * kD + wc_n * NT_C * 8 + 2 * t;
#pragma unroll
        for (int nt = 0; nt < NT_C; ++nt)
          *reinterpret_cast<u32*>(p.dq + base + nt * 8) =
              pack2<kBF16>(acc_dq[mt][nt][2 * hh], acc_dq[mt][nt][2 * hh + 1]);
      }
    }
}
