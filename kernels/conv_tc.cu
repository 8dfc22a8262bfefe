// 3-D convolution on tensor cores (WMMA 16x16x16, fp16 in, f32 accumulate; sm_70 and newer),
// implicit GEMM with the previous normalisation fused into the loads and bias + residual +
// activation fused into the store: one pass over each activation instead of three.
//
// CPU twin: norm_apply's formula (norm.cu) on the input, then src/engine/cpu/conv.rs::conv3d, then
// the residual add and the activation (selftest "conv3d_tc_f16" rows). Semantics: cubic kernel k,
// stride s, zero padding p, output size o = (l + 2p - k) / s + 1 per axis;
//   xt[n, v, ci] = fp16(post_act((pre_act(x[n, v, ci]) - mean[n, ci]) * scale[n, ci] + shift[n, ci]))
//                  when `norm` is given (params [N][Cin][3] = (mean, scale, shift) from
//                  norm_finalize: exactly what norm_apply would have stored), else x itself;
//   out[n, o, co] = act(sum_{kz,ky,kx,ci} w[co, kz, ky, kx, ci] * xt[n, o*s + k - p, ci]
//                       + bias[co] + residual[n, o, co])
// Padding is zero AFTER the normalisation (the conv pads its normalised input). The sum is f32 on
// the tensor cores (order within a 16-deep step is the hardware's; steps in k order); bias, then
// residual, are added once in f32 and the result is rounded once to fp16.
//
// As a GEMM: rows m = output voxels (N*OD*OH*OW), columns = co, K = k^3 * Cin (index
// ((kz * k + ky) * k + kx) * Cin + ci). Block tile BM x BN (below), TC_BK deep, staged in shared
// memory as fp16 in two stages: the next k-step's chunks are loaded into registers while the
// tensor cores work on the current stage, then stored into the other one (one barrier per
// k-step); 4 warps, each WM x WN outputs = (WM / 16) x (WN / 16) accumulator fragments. When Cin % 8 == 0
// and x, w are 16-byte aligned, 8 channels of one tap load as one 16-byte vector, the tap and
// channel of each thread's chunk advanced step by step (no integer division per load: the loads
// are issue-bound next to the tensor cores); otherwise element by element (any Cin, Cout). A
// norm applied in the loads is applied to every (output voxel, tap) pair, i.e. k^3 times per input
// element: the engine fuses it only before 1x1x1 convs by default. grid (ceil(M / BM), ceil(Cout / BN), splits), block TC_THREADS
// exactly.
//
// Split K (when the grid is too small to fill the device: the deep levels): block z sums k-steps
// [z * kspan, (z + 1) * kspan) and stores its f32 tile in plane z of a buffer; the *_reduce_f16
// kernel adds the planes in split order (fixed, so the result is deterministic for a given split)
// and runs the same store. The split count is the host's choice (ops::conv_tc_splits).
//
// Statistics for the next normalisation (optional): each block also reduces its stored fp16
// outputs per channel, so the norm that reads `out` needs no pass of its own over it. The
// unit is SR rows (the store's pass: BM, or 64 for the wide tile, which stores its 128 rows in
// two passes); the SR rows of a unit must lie in one sample (OD*OH*OW % SR == 0, the host
// checks); per channel a unit writes (sum v, sum (v - mean_b)^2) with mean_b = sum v / SR, both
// f32 in a fixed order (no atomics), which norm.cu::norm_finalize_tiles merges in f64 (Chan et al.).
//
// Layout: x [N, D, H, W, Cin] fp16; w [Cout, k, k, k, Cin] fp16 (the cuDNN / conv3d_igemm_f16
// filter buffer); bias [Cout] f32 or null; residual [N, OD, OH, OW, Cout] fp16 or null (may be
// `out` itself); norm [N][Cin][3] f32 or null; out [N, OD, OH, OW, Cout] fp16; stats
// [N][OD*OH*OW / SR][Cout][2] f32 or null. M < 2^31.
#include <cuda_fp16.h>
#include <mma.h>

// Block tiles (rows x channels) of the three instantiations, each 4 warps:
//   conv3d_tc_f16       64 x 64, warps 2 x 2 of 32 x 32;
//   conv3d_tc_n32_f16  128 x 32, warps 4 x 1 of 32 x 32, for Cout <= 32, where a 64-wide tile
//                      would spend half its tensor-core work and weight loads on padding;
//   conv3d_tc_m128_f16 128 x 64, warps 2 x 2 of 64 x 32 (opt-in, FASTDET_TC_TILES=wide): per
//                      16-deep step a warp loads 6 fragments for 8 MMAs (4 for 4 at 32 x 32) and
//                      a block loads 3 rows of A and B per 128 outputs (4 at 64 x 64), for more
//                      registers (64 accumulators a thread) and half the blocks. It stores in two
//                      64-row passes, so its epilogue tile, statistics unit and split-K reduce
//                      are the 64 x 64 tile's.
// The halo-tile kernels further down (conv3d_tc_halo_f16, conv3d_tc_halo_s64_f16) take the
// 3x3x3 stride-1 convs whose output whole 2 x 4 x 16 bricks tile, with a grid and statistics
// units of their own (see there); same arguments, same store.
#define TC_BK 32
#define TC_THREADS 128
// Shared-memory row padding (halves / floats): keeps WMMA pointers 32-byte aligned and spreads
// rows over banks.
#define TC_APAD 8
#define TC_CPAD 4

using namespace nvcuda;

// fd_act (activation codes) comes from common.cuh, prepended to every kernel source.

// One input element through the fused normalisation (norm_apply's exact operations), as fp16.
__device__ __forceinline__ __half tc_prologue(__half v, const float* prm, int pre_act, float pre_p, int post_act,
                                              float post_p) {
    const float a = fd_act(__half2float(v), pre_act, pre_p);
    return __float2half_rn(fd_act(__fadd_rn(__fmul_rn(a - prm[0], prm[1]), prm[2]), post_act, post_p));
}

// Floats of scratch the statistics epilogue needs besides the output tile.
#define TC_RED_FLOATS (2 * TC_THREADS)

// The store: bias, residual, activation, one fp16 rounding (16-byte loads and stores where the
// channels allow); optionally the block's statistics for the next norm. Cs holds the block's f32
// sums (BM x BN), red is TC_RED_FLOATS of scratch; every thread of the block calls it. Row r of
// Cs is output voxel m0 + r when zstep == 0 (none from M on: e.g. the wide tile's second pass over
// the last rows), else that of a halo brick's row, m0 + (r / 64) zstep + (r / 16 % 4) ystep +
// r % 16; with `stats`, the rows' statistics go to its unit `unit` ([unit][Cout][2]).
template <int BM, int BN>
__device__ __forceinline__ void tc_store_rows(float (*Cs)[BN + TC_CPAD], float* red, int m0, int M, int zstep, int ystep, int j0, int Cout,
                                              const float* __restrict__ bias, const __half* residual, __half* out,
                                              int act, float p, float* __restrict__ stats, int unit) {
    const int t = threadIdx.x;
    // Each thread takes 8 consecutive channels of a row, consecutive threads consecutive chunks
    // (coalesced): two 16-byte reads of Cs, and when Cout % 8 == 0 and the pointers are 16-byte
    // aligned one 16-byte load of the residual and one 16-byte store, else element by element.
    // The same operations on each element either way.
    constexpr int CH = BN / 8;
    const bool vec = (Cout % 8 == 0) && ((((size_t)out) | ((size_t)residual)) % 16 == 0);
    for (int e = t; e < BM * CH; e += TC_THREADS) {
        const int r = e / CH, c0 = (e % CH) * 8;
        const int m = zstep == 0 ? m0 + r : m0 + (r >> 6) * zstep + ((r >> 4) & 3) * ystep + (r & 15);
        const int co0 = j0 + c0;
        if (m >= M || co0 >= Cout) continue;
        const float4 lo = *reinterpret_cast<const float4*>(&Cs[r][c0]);
        const float4 hi = *reinterpret_cast<const float4*>(&Cs[r][c0 + 4]);
        float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        const size_t o = (size_t)m * Cout + co0;
        const int nc = min(8, Cout - co0);
        uint4 rv = make_uint4(0u, 0u, 0u, 0u), yv;
        const __half* rh = reinterpret_cast<const __half*>(&rv);
        __half* yh = reinterpret_cast<__half*>(&yv);
        if (residual && vec) rv = *reinterpret_cast<const uint4*>(residual + o);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            if (i < nc) {
                if (bias) v[i] = __fadd_rn(v[i], bias[co0 + i]);
                if (residual) v[i] = __fadd_rn(v[i], __half2float(vec ? rh[i] : residual[o + i]));
                yh[i] = __float2half_rn(fd_act(v[i], act, p));
                if (!vec) out[o + i] = yh[i];
                v[i] = __half2float(yh[i]);
            }
        }
        if (vec) *reinterpret_cast<uint4*>(out + o) = yv;
        if (stats) {
            *reinterpret_cast<float4*>(&Cs[r][c0]) = make_float4(v[0], v[1], v[2], v[3]);
            *reinterpret_cast<float4*>(&Cs[r][c0 + 4]) = make_float4(v[4], v[5], v[6], v[7]);
        }
    }
    if (stats) {
        // Every thread takes column c = t % BN and rows g, g + G, ... (g = t / BN, G groups): the
        // groups' sums, combined in group order, give the block's mean; then the squared
        // deviations from it likewise (exact IEEE operations in a fixed order, so every device
        // gives the same partials).
        constexpr int G = TC_THREADS / BN;
        const int c = t % BN, g = t / BN;
        __syncthreads();
        float s = 0.0f;
        for (int r = g; r < BM; r += G) s = __fadd_rn(s, Cs[r][c]);
        red[g * BN + c] = s;
        __syncthreads();
        float sum = 0.0f;
        for (int i = 0; i < G; ++i) sum = __fadd_rn(sum, red[i * BN + c]);
        const float mean = __fdiv_rn(sum, (float)BM);
        float q = 0.0f;
        for (int r = g; r < BM; r += G) {
            const float d = __fsub_rn(Cs[r][c], mean);
            q = __fadd_rn(q, __fmul_rn(d, d));
        }
        red[(G + g) * BN + c] = q;
        __syncthreads();
        const int co = j0 + t;
        if (t < BN && co < Cout) {
            float m2 = 0.0f;
            for (int i = 0; i < G; ++i) m2 = __fadd_rn(m2, red[(G + i) * BN + t]);
            float* dst = stats + ((size_t)unit * Cout + co) * 2;
            dst[0] = sum;
            dst[1] = m2;
        }
    }
}

// The store of the BM rows from m0 on (rows past M store nothing), their statistics unit the
// block of BM rows that holds m0 in its sample.
template <int BM, int BN>
__device__ __forceinline__ void tc_epilogue(float (*Cs)[BN + TC_CPAD], float* red, int m0, int j0, int M, int Cout,
                                            const float* __restrict__ bias, const __half* residual, __half* out,
                                            int act, float p, float* __restrict__ stats, int ovol) {
    if (m0 >= M) return;
    const int n = m0 / ovol;
    const int unit = n * (ovol / BM) + (m0 - n * ovol) / BM;
    tc_store_rows<BM, BN>(Cs, red, m0, M, 0, 0, j0, Cout, bias, residual, out, act, p, stats, unit);
}

template <int BM, int BN, int WM, int WN, int SR, bool ASYNC>
__device__ __forceinline__ void conv3d_tc(const __half* __restrict__ x, const __half* __restrict__ w,
                                          const float* __restrict__ bias, const __half* residual,
                                          const float* __restrict__ norm, __half* out, int N, int D, int H, int W,
                                          int Cin, int Cout, int k, int stride, int pad, int OD, int OH, int OW,
                                          int pre_act, float pre_p, int norm_act, float norm_p, int act, float p,
                                          float* __restrict__ stats, float* __restrict__ splitk, int kspan) {
    static_assert(BM * BN == 4 * WM * WN && BM % WM == 0 && BN % WN == 0, "4 warps of WM x WN");
    static_assert(BM % 32 == 0 && BN % 32 == 0 && WM % 16 == 0 && WN % 16 == 0, "whole loader passes and fragments");
    static_assert(BM % SR == 0 && SR % WM == 0, "a store pass holds whole warp tiles");
    constexpr int FM = WM / 16, FN = WN / 16;  // accumulator fragments of a warp
    constexpr int QA = BM / 32, QB = BN / 32;  // 16-byte chunks per thread per k-step, A and B
    constexpr int STAGE_A = BM * (TC_BK + TC_APAD) * 2, STAGE_B = BN * (TC_BK + TC_APAD) * 2;
    constexpr int NST = ASYNC ? 3 : 2;  // stages
    constexpr int STAGES = NST * (STAGE_A + STAGE_B), OUT_TILE = (SR * (BN + TC_CPAD) + TC_RED_FLOATS) * 4;
    // Two (three with ASYNC) stages of A and B tiles; the epilogue's f32 tile (SR rows) reuses
    // the same bytes once the last MMA is done (20 / 25 / 30 KiB; 30 / 37.5 / 45 KiB).
    __shared__ __align__(32) unsigned char smem[STAGES > OUT_TILE ? STAGES : OUT_TILE];
    typedef __half TileRow[TC_BK + TC_APAD];
    typedef float OutRow[BN + TC_CPAD];
    TileRow* As = reinterpret_cast<TileRow*>(smem);                  // [NST * BM]
    TileRow* Bs = reinterpret_cast<TileRow*>(smem + NST * STAGE_A);  // [NST * BN]
    OutRow* Cs = reinterpret_cast<OutRow*>(smem);                  // [SR], after the loop
    float* red = reinterpret_cast<float*>(smem) + SR * (BN + TC_CPAD);  // after the loop
    const int t = threadIdx.x;
    const int warp = t >> 5;
    const int M = N * OD * OH * OW;
    const int K = k * k * k * Cin;
    const int m0 = blockIdx.x * BM;
    const int j0 = blockIdx.y * BN;
    const bool vec = (Cin % 8 == 0) && (((size_t)x | (size_t)w) % 16 == 0);

    // Loader roles: rows x 4 chunks of 8 k per tile; chunk q of thread t is row t / 4 + 32 q,
    // k-chunk kc = t % 4.
    const int kc = t % 4;
    int an[QA], az[QA], ay[QA], ax[QA];
    // Element offset of row q's window corner (tap (0, 0, 0), channel 0; may lie in the padding,
    // so signed): tap (kz, ky, kx), channel ci of the row is at abase[q] + toff below. 32-bit:
    // the input has fewer than 2^31 elements (the host checks), and only offsets inside it are
    // formed into addresses.
    int abase[QA];
    bool arow[QA];
#pragma unroll
    for (int q = 0; q < QA; ++q) {
        const int m = m0 + t / 4 + 32 * q;
        arow[q] = m < M;
        int r = arow[q] ? m : 0;
        const int ox = r % OW;
        r /= OW;
        const int oy = r % OH;
        r /= OH;
        const int oz = r % OD;
        an[q] = r / OD;
        az[q] = oz * stride - pad;
        ay[q] = oy * stride - pad;
        ax[q] = ox * stride - pad;
        abase[q] = (((an[q] * D + az[q]) * H + ay[q]) * W + ax[q]) * Cin;
    }

    // The next k-step's chunks, held in registers while the tensor cores work on the current
    // one. Vector loads stay raw until they are stored (the norm is applied then, off the load's
    // critical path); element loads are normalised as they arrive (the rare Cin % 8 != 0 case).
    uint4 ra[QA], rb[QB];
    int aci[QA];    // channel of the chunk's first element (vector loads)
    bool apro[QA];  // apply the norm when storing (vector load of a voxel inside the volume)
    // The vector path's position in K, kept up to date step by step instead of divided out at
    // every load: this thread's chunk of the next load is channel vci of tap (vkz, vky, vkx).
    // Every load advances by TC_BK, in order (the split's k-steps are consecutive).
    int vci = 0, vkx = 0, vky = 0, vkz = 0;
    {
        const int kk = blockIdx.z * kspan * TC_BK + kc * 8;
        const int tap = kk / Cin;
        vci = kk - tap * Cin;
        vkx = tap % k;
        vky = (tap / k) % k;
        vkz = tap / (k * k);
    }
    // Vector path: whether row q's chunk at the current tap (k-offset kk0) lies inside K and
    // the input volume; its element offset is then abase[q] + the tap's offset.
    auto chunk_inside = [&](int q, int kk0) {
        const int iz = az[q] + vkz, iy = ay[q] + vky, ix = ax[q] + vkx;
        return arow[q] && kk0 < K && iz >= 0 && iz < D && iy >= 0 && iy < H && ix >= 0 && ix < W;
    };
    auto tap_offset = [&]() { return ((vkz * H + vky) * W + vkx) * Cin + vci; };
    // On to the next load's chunk: TC_BK channels further, over as many taps as that takes.
    auto advance = [&]() {
        vci += TC_BK;
        while (vci >= Cin) {
            vci -= Cin;
            if (++vkx == k) {
                vkx = 0;
                if (++vky == k) {
                    vky = 0;
                    ++vkz;
                }
            }
        }
    };
    auto load = [&](int k0) {
        const int kk0 = k0 + kc * 8;
        if (vec) {
            // 8 channels of one tap: Cin % 8 == 0 keeps a chunk inside one tap.
            const int toff = tap_offset();
#pragma unroll
            for (int q = 0; q < QA; ++q) {
                apro[q] = false;
                aci[q] = vci;
                ra[q] = make_uint4(0u, 0u, 0u, 0u);
                if (chunk_inside(q, kk0)) {
                    ra[q] = *reinterpret_cast<const uint4*>(x + (abase[q] + toff));
                    apro[q] = norm != nullptr;
                }
            }
            advance();
        } else {
#pragma unroll
            for (int q = 0; q < QA; ++q) {
                apro[q] = false;
                aci[q] = 0;
                __half* h = reinterpret_cast<__half*>(&ra[q]);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const int kk = kk0 + e;
                    __half v = __float2half_rn(0.0f);
                    if (arow[q] && kk < K) {
                        const int tap = kk / Cin, ci = kk - tap * Cin;
                        const int kx = tap % k, ky = (tap / k) % k, kz = tap / (k * k);
                        const int iz = az[q] + kz, iy = ay[q] + ky, ix = ax[q] + kx;
                        if (iz >= 0 && iz < D && iy >= 0 && iy < H && ix >= 0 && ix < W) {
                            v = x[((((size_t)an[q] * D + iz) * H + iy) * W + ix) * Cin + ci];
                            if (norm) v = tc_prologue(v, norm + ((size_t)an[q] * Cin + ci) * 3, pre_act, pre_p, norm_act, norm_p);
                        }
                    }
                    h[e] = v;
                }
            }
        }
#pragma unroll
        for (int q = 0; q < QB; ++q) {
            const int co = j0 + t / 4 + 32 * q;
            if (vec && co < Cout && kk0 < K) {
                // K = k^3 * Cin is a multiple of 8 here, so the chunk is whole and aligned.
                rb[q] = *reinterpret_cast<const uint4*>(w + (size_t)co * K + kk0);
            } else {
                __half* h = reinterpret_cast<__half*>(&rb[q]);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const int kk = kk0 + e;
                    h[e] = (co < Cout && kk < K) ? w[(size_t)co * K + kk] : __float2half_rn(0.0f);
                }
            }
        }
    };
    auto store = [&](int stage) {
#pragma unroll
        for (int q = 0; q < QA; ++q) {
            if (apro[q]) {
                __half* h = reinterpret_cast<__half*>(&ra[q]);
                const float* prm = norm + ((size_t)an[q] * Cin + aci[q]) * 3;
#pragma unroll
                for (int e = 0; e < 8; ++e) h[e] = tc_prologue(h[e], prm + 3 * e, pre_act, pre_p, norm_act, norm_p);
            }
            *reinterpret_cast<uint4*>(&As[stage * BM + t / 4 + 32 * q][kc * 8]) = ra[q];
        }
#pragma unroll
        for (int q = 0; q < QB; ++q) *reinterpret_cast<uint4*>(&Bs[stage * BN + t / 4 + 32 * q][kc * 8]) = rb[q];
    };

    // ASYNC: the same 16-byte chunks copied straight into shared memory (cp.async, zero-filled
    // outside the input or past K), one commit group per k-step. Only for the vector case without
    // a norm in the loads (the host checks: Cin % 8 == 0, 16-byte aligned x and w, norm null).
    auto issue = [&](int k0, int stage) {
        const int kk0 = k0 + kc * 8;
        const int toff = tap_offset();
#pragma unroll
        for (int q = 0; q < QA; ++q) {
            const bool in = chunk_inside(q, kk0);
            fd_cp_async16(&As[stage * BM + t / 4 + 32 * q][kc * 8], in ? x + (abase[q] + toff) : x, in ? 16 : 0);
        }
        advance();
#pragma unroll
        for (int q = 0; q < QB; ++q) {
            const int co = j0 + t / 4 + 32 * q;
            const bool in = co < Cout && kk0 < K;
            fd_cp_async16(&Bs[stage * BN + t / 4 + 32 * q][kc * 8], in ? w + (size_t)co * K + kk0 : w, in ? 16 : 0);
        }
        fd_cp_async_commit();
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    const int wr = (warp / (BN / WN)) * WM, wc = (warp % (BN / WN)) * WN;

    // Split K: block z takes k-steps [z * kspan, (z + 1) * kspan) (the host keeps every split
    // non-empty).
    const int kt0 = blockIdx.z * kspan;
    const int kt1 = min((K + TC_BK - 1) / TC_BK, kt0 + kspan);
    // The MMAs of one k-step on stage s.
    auto mma = [&](int s) {
#pragma unroll
        for (int ks = 0; ks < TC_BK; ks += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[FM];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b[FN];
#pragma unroll
            for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(a[i], &As[s * BM + wr + 16 * i][ks], TC_BK + TC_APAD);
#pragma unroll
            for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(b[j], &Bs[s * BN + wc + 16 * j][ks], TC_BK + TC_APAD);
#pragma unroll
            for (int i = 0; i < FM; ++i)
#pragma unroll
                for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
    };
    if constexpr (ASYNC) {
        // Three stages, two k-steps in flight: at step kt this thread waits for its copies of
        // step kt (all but the newest group), the barrier makes everyone's visible and tells that
        // every warp is done with step kt - 1's stage, which then takes step kt + 2's copies.
        // Empty groups keep the count when no step is left to load. The host launches these
        // kernels only where the chunks are whole and aligned and no norm is due: anything else
        // is a host bug, stopped here rather than faulting on a misaligned copy.
        if (!vec || norm != nullptr) __trap();
        issue(kt0 * TC_BK, 0);
        if (kt0 + 1 < kt1) issue((kt0 + 1) * TC_BK, 1);
        else fd_cp_async_commit();
        for (int kt = kt0; kt < kt1; ++kt) {
            const int s = (kt - kt0) % 3;
            fd_cp_async_wait<1>();
            __syncthreads();
            if (kt + 2 < kt1) issue((kt + 2) * TC_BK, (s + 2) % 3);
            else fd_cp_async_commit();
            mma(s);
        }
        fd_cp_async_wait<0>();
        __syncthreads();  // every warp's last MMAs are done before the epilogue reuses the bytes
    } else {
        // One barrier per k-step: stage s is read by the MMAs of step kt while step kt + 1's
        // chunks wait in registers, then go into the other stage, which every warp finished
        // reading before the previous barrier.
        load(kt0 * TC_BK);
        store(0);
        __syncthreads();
        for (int kt = kt0; kt < kt1; ++kt) {
            const int s = (kt - kt0) & 1;
            if (kt + 1 < kt1) load((kt + 1) * TC_BK);
            mma(s);
            if (kt + 1 < kt1) store(s ^ 1);
            __syncthreads();
        }
    }
    if (splitk) {
        // This split's f32 sums straight from the fragments into its plane of the padded
        // [splits][gridDim.x * BM][gridDim.y * BN] buffer (every fragment in range);
        // conv3d_tc_reduce adds the planes in split order and finishes as below.
        const int ldc = gridDim.y * BN;
        float* dst = splitk + (size_t)blockIdx.z * gridDim.x * BM * ldc;
#pragma unroll
        for (int i = 0; i < FM; ++i)
#pragma unroll
            for (int j = 0; j < FN; ++j)
                wmma::store_matrix_sync(dst + (size_t)(m0 + wr + 16 * i) * ldc + j0 + wc + 16 * j, acc[i][j], ldc, wmma::mem_row_major);
        return;
    }

    // The store in BM / SR passes of SR rows: the warps whose tile lies in the pass put it in Cs.
#pragma unroll
    for (int pass = 0; pass < BM / SR; ++pass) {
        if (pass > 0) __syncthreads();  // the previous pass has finished reading Cs
        if (wr / SR == pass) {
#pragma unroll
            for (int i = 0; i < FM; ++i)
#pragma unroll
                for (int j = 0; j < FN; ++j)
                    wmma::store_matrix_sync(&Cs[wr - pass * SR + 16 * i][wc + 16 * j], acc[i][j], BN + TC_CPAD, wmma::mem_row_major);
        }
        __syncthreads();
        tc_epilogue<SR, BN>(Cs, red, m0 + pass * SR, j0, M, Cout, bias, residual, out, act, p, stats, OD * OH * OW);
    }
}

// conv3d_tc with split K, second half: the sum of the splits' planes (in split order) for the
// block's BM x BN tile, then the same epilogue. grid (as the conv's x, y), block TC_THREADS.
template <int BM, int BN>
__device__ __forceinline__ void conv3d_tc_reduce(const float* __restrict__ splitk, int splits, const float* __restrict__ bias,
                                                 const __half* residual, __half* out, float* __restrict__ stats, int M,
                                                 int ovol, int Cout, int act, float p) {
    __shared__ __align__(32) float Cs[BM][BN + TC_CPAD];
    __shared__ float red[TC_RED_FLOATS];
    const int m0 = blockIdx.x * BM, j0 = blockIdx.y * BN;
    const int ldc = gridDim.y * BN;
    const size_t plane = (size_t)gridDim.x * BM * ldc;
    for (int e = threadIdx.x; e < BM * BN; e += TC_THREADS) {
        const int r = e / BN, c = e % BN;
        const float* src = splitk + (size_t)(m0 + r) * ldc + j0 + c;
        float v = 0.0f;
        for (int z = 0; z < splits; ++z) v = __fadd_rn(v, src[z * plane]);
        Cs[r][c] = v;
    }
    __syncthreads();
    tc_epilogue<BM, BN>(Cs, red, m0, j0, M, Cout, bias, residual, out, act, p, stats, ovol);
}

// Halo tiles: the 3x3x3, stride 1, padding 1 convolution with the input of a block staged ONCE.
// A block computes a 2 x 4 x 16 (z, y, x) brick of output voxels (128 rows, row r = voxel
// (r / 64, r / 16 % 4, r % 16) of the brick) for 32 output channels. Per 16 input channels it
// stages the brick's 4 x 6 x 18 input halo (zeros outside the volume) and the 27 taps' weights in
// shared memory, applying the previous norm (+ activations) to each halo element once as it is
// stored, where the implicit GEMM above applies it once per (output voxel, tap): per block of
// output channels, 432 / 128 = 3.4 times per input element instead of 27 (the implicit GEMM's
// blocks are 64 channels wide above 32, so there it is 3.4 per 32 channels against 27 per 64).
// Each 16-row WMMA fragment is one 16-voxel x-run, so the A fragment of tap (kz, ky, kx) is a
// plain 16 x 16 block of the halo (rows 32 bytes apart) and the 27 taps run back to back without
// a barrier. The products are conv3d_tc's, summed in another order (16-channel chunk by chunk,
// taps inside each; conv3d_tc goes tap by tap) and stored by the same code, so results agree
// within f32 rounding, not bit for bit; the statistics units are bricks, not runs of rows.
//
// Needs (the host checks; anything else traps): k = 3, stride 1, padding 1, Cin % 16 == 0,
// OD % 2 == 0, OH % 4 == 0, OW % 16 == 0, x and w 16-byte aligned, no split K. grid
// (N * OD/2 * OH/4 * OW/16, ceil(Cout / 32)), block TC_THREADS; block x = brick
// ((n * OD/2 + bz) * OH/4 + by) * OW/16 + bx. Statistics: units of SR rows (SR = 128, the brick;
// or 64, one z-slab of it, stored in two passes), unit b = brick-in-sample * (128 / SR) + pass of
// the [N][OD*OH*OW / SR][Cout][2] buffer: the bricks tile each sample, so every unit is whole.
#define HALO_BN 32
#define HALO_CK 16
#define HALO_VOX (4 * 6 * 18)
template <int SR>
__device__ __forceinline__ void conv3d_tc_halo(const __half* __restrict__ x, const __half* __restrict__ w,
                                               const float* __restrict__ bias, const __half* residual,
                                               const float* __restrict__ norm, __half* out, int N, int D, int H, int W,
                                               int Cin, int Cout, int k, int stride, int pad, int OD, int OH, int OW,
                                               int pre_act, float pre_p, int norm_act, float norm_p, int act, float p,
                                               float* __restrict__ stats, float* __restrict__ splitk) {
    static_assert(SR == 128 || SR == 64, "a unit is the brick or one z-slab of it");
    typedef __half ChunkRow[HALO_CK];  // 16 channels of one voxel (halo) or one output channel (weights)
    constexpr int HALO_BYTES = HALO_VOX * HALO_CK * 2, W_BYTES = 27 * HALO_BN * HALO_CK * 2;
    constexpr int OUT_TILE = (SR * (HALO_BN + TC_CPAD) + TC_RED_FLOATS) * 4;
    // 13.5 KiB of halo + 27 KiB of weights; the epilogue's f32 tile reuses the bytes.
    __shared__ __align__(32) unsigned char smem[HALO_BYTES + W_BYTES > OUT_TILE ? HALO_BYTES + W_BYTES : OUT_TILE];
    ChunkRow* Hs = reinterpret_cast<ChunkRow*>(smem);               // [(hz * 6 + hy) * 18 + hx]
    ChunkRow* Ws = reinterpret_cast<ChunkRow*>(smem + HALO_BYTES);  // [tap * 32 + co]
    typedef float OutRow[HALO_BN + TC_CPAD];
    OutRow* Cs = reinterpret_cast<OutRow*>(smem);
    float* red = reinterpret_cast<float*>(smem) + SR * (HALO_BN + TC_CPAD);
    if (k != 3 || stride != 1 || pad != 1 || Cin % HALO_CK != 0 || OD % 2 != 0 || OH % 4 != 0 || OW % 16 != 0 || OD != D ||
        OH != H || OW != W || splitk != nullptr || ((size_t)x | (size_t)w) % 16 != 0)
        __trap();
    const int t = threadIdx.x, warp = t >> 5;
    const int bricks_x = OW / 16, bricks_y = OH / 4, bricks_z = OD / 2;
    int b = blockIdx.x;
    const int bx = b % bricks_x;
    b /= bricks_x;
    const int by = b % bricks_y;
    b /= bricks_y;
    const int bz = b % bricks_z;
    const int n = b / bricks_z;
    const int oz0 = 2 * bz, oy0 = 4 * by, ox0 = 16 * bx;
    const int j0 = blockIdx.y * HALO_BN;
    const int K = 27 * Cin;
    // Every 16-byte chunk this thread stages holds the same 8 of the 16 channels.
    const int half8 = (t & 1) * 8;

    // Warp w: rows [32 w, 32 w + 32) = the x-runs (z, y) = (w / 2, 2 (w % 2) + i), i = 0, 1; all
    // 32 channels (two fragments).
    const int wz = warp >> 1, wy = 2 * (warp & 1);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    for (int c0 = 0; c0 < Cin; c0 += HALO_CK) {
        if (c0 > 0) __syncthreads();  // every warp is done with the previous chunk's stage
        // The halo: every load of the chunk issued first, then normalised and stored.
        constexpr int HALO_LOADS = (2 * HALO_VOX + TC_THREADS - 1) / TC_THREADS;
        uint4 hv[HALO_LOADS];
        bool hin[HALO_LOADS];
#pragma unroll
        for (int i = 0; i < HALO_LOADS; ++i) {
            const int v = (t + i * TC_THREADS) >> 1;
            const int hx = v % 18, hy = (v / 18) % 6, hz = v / 108;
            const int iz = oz0 - 1 + hz, iy = oy0 - 1 + hy, ix = ox0 - 1 + hx;
            hin[i] = v < HALO_VOX && iz >= 0 && iz < D && iy >= 0 && iy < H && ix >= 0 && ix < W;
            hv[i] = make_uint4(0u, 0u, 0u, 0u);
            if (hin[i]) hv[i] = *reinterpret_cast<const uint4*>(x + ((((size_t)n * D + iz) * H + iy) * W + ix) * Cin + c0 + half8);
        }
        const float* prm = norm ? norm + ((size_t)n * Cin + c0 + half8) * 3 : nullptr;
#pragma unroll
        for (int i = 0; i < HALO_LOADS; ++i) {
            const int v = (t + i * TC_THREADS) >> 1;
            if (hin[i] && prm) {
                __half* h = reinterpret_cast<__half*>(&hv[i]);
#pragma unroll
                for (int q = 0; q < 8; ++q) h[q] = tc_prologue(h[q], prm + 3 * q, pre_act, pre_p, norm_act, norm_p);
            }
            if (v < HALO_VOX) *reinterpret_cast<uint4*>(&Hs[v][half8]) = hv[i];
        }
#pragma unroll 2
        for (int i = 0; i < (2 * 27 * HALO_BN + TC_THREADS - 1) / TC_THREADS; ++i) {
            const int e = t + i * TC_THREADS;
            if (e < 2 * 27 * HALO_BN) {
                const int row = e >> 1;  // tap * 32 + co
                const int tap = row / HALO_BN, co = j0 + row % HALO_BN;
                uint4 val = make_uint4(0u, 0u, 0u, 0u);
                if (co < Cout) val = *reinterpret_cast<const uint4*>(w + (size_t)co * K + tap * Cin + c0 + half8);
                *reinterpret_cast<uint4*>(&Ws[row][half8]) = val;
            }
        }
        __syncthreads();
#pragma unroll 1
        for (int kz = 0; kz < 3; ++kz)
#pragma unroll
            for (int ky = 0; ky < 3; ++ky)
#pragma unroll
                for (int kx = 0; kx < 3; ++kx) {
                    const int tap = (kz * 3 + ky) * 3 + kx;
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[2];
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> bf[2];
#pragma unroll
                    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &Hs[((wz + kz) * 6 + wy + i + ky) * 18 + kx][0], HALO_CK);
#pragma unroll
                    for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(bf[j], &Ws[tap * HALO_BN + 16 * j][0], HALO_CK);
#pragma unroll
                    for (int i = 0; i < 2; ++i)
#pragma unroll
                        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], bf[j], acc[i][j]);
                }
    }
    __syncthreads();  // every warp's last MMAs are done before the epilogue reuses the bytes

    const int ovol = OD * OH * OW;
    const int brick = (bz * bricks_y + by) * bricks_x + bx;
#pragma unroll
    for (int pass = 0; pass < 128 / SR; ++pass) {
        if (pass > 0) __syncthreads();  // the previous pass has finished reading Cs
        if (32 * warp / SR == pass) {
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j)
                    wmma::store_matrix_sync(&Cs[32 * warp - pass * SR + 16 * i][16 * j], acc[i][j], HALO_BN + TC_CPAD, wmma::mem_row_major);
        }
        __syncthreads();
        const int unit = n * (ovol / SR) + brick * (128 / SR) + pass;
        // The pass's first voxel: the brick's corner, one z-slab further per 64-row pass.
        const int m0 = ((n * OD + oz0 + pass * (SR >> 6)) * OH + oy0) * OW + ox0;
        tc_store_rows<SR, HALO_BN>(Cs, red, m0, N * ovol, OH * OW, OW, j0, Cout, bias, residual, out, act, p, stats, unit);
    }
}

// Entry points (parameter lists written out: the host reads them from this source). splitk: null,
// or the [gridDim.z][gridDim.x * BM][gridDim.y * BN] f32 buffer of a split-K launch (grid.z =
// splits, kspan k-steps each), finished by the matching *_reduce_f16 over the same grid x, y.
extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv3d_tc_f16(const __half* __restrict__ x, const __half* __restrict__ w, const float* __restrict__ bias,
    const __half* residual, const float* __restrict__ norm, __half* out, int N, int D, int H, int W, int Cin, int Cout,
    int k, int stride, int pad, int OD, int OH, int OW, int pre_act, float pre_p, int norm_act, float norm_p, int act,
    float p, float* __restrict__ stats, float* __restrict__ splitk, int kspan) {
    conv3d_tc<64, 64, 32, 32, 64, false>(x, w, bias, residual, norm, out, N, D, H, W, Cin, Cout, k, stride, pad, OD, OH, OW, pre_act, pre_p,
        norm_act, norm_p, act, p, stats, splitk, kspan);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv3d_tc_n32_f16(const __half* __restrict__ x, const __half* __restrict__ w, const float* __restrict__ bias,
    const __half* residual, const float* __restrict__ norm, __half* out, int N, int D, int H, int W, int Cin, int Cout,
    int k, int stride, int pad, int OD, int OH, int OW, int pre_act, float pre_p, int norm_act, float norm_p, int act,
    float p, float* __restrict__ stats, float* __restrict__ splitk, int kspan) {
    conv3d_tc<128, 32, 32, 32, 128, false>(x, w, bias, residual, norm, out, N, D, H, W, Cin, Cout, k, stride, pad, OD, OH, OW, pre_act, pre_p,
        norm_act, norm_p, act, p, stats, splitk, kspan);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv3d_tc_m128_f16(const __half* __restrict__ x, const __half* __restrict__ w, const float* __restrict__ bias,
    const __half* residual, const float* __restrict__ norm, __half* out, int N, int D, int H, int W, int Cin, int Cout,
    int k, int stride, int pad, int OD, int OH, int OW, int pre_act, float pre_p, int norm_act, float norm_p, int act,
    float p, float* __restrict__ stats, float* __restrict__ splitk, int kspan) {
    conv3d_tc<128, 64, 64, 32, 64, false>(x, w, bias, residual, norm, out, N, D, H, W, Cin, Cout, k, stride, pad, OD, OH, OW,
        pre_act, pre_p, norm_act, norm_p, act, p, stats, splitk, kspan);
}

// The same three tiles loading through cp.async (sm_80+; synchronous copies below), three stages:
// for Cin % 8 == 0, 16-byte aligned x and w, and no norm in the loads (norm must be null). Same
// arguments, same reduce kernels, same results to the bit.
extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv3d_tc_async_f16(const __half* __restrict__ x, const __half* __restrict__ w, const float* __restrict__ bias,
    const __half* residual, const float* __restrict__ norm, __half* out, int N, int D, int H, int W, int Cin, int Cout,
    int k, int stride, int pad, int OD, int OH, int OW, int pre_act, float pre_p, int norm_act, float norm_p, int act,
    float p, float* __restrict__ stats, float* __restrict__ splitk, int kspan) {
    conv3d_tc<64, 64, 32, 32, 64, true>(x, w, bias, residual, norm, out, N, D, H, W, Cin, Cout, k, stride, pad, OD, OH, OW,
        pre_act, pre_p, norm_act, norm_p, act, p, stats, splitk, kspan);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv3d_tc_n32_async_f16(const __half* __restrict__ x, const __half* __restrict__ w, const float* __restrict__ bias,
    const __half* residual, const float* __restrict__ norm, __half* out, int N, int D, int H, int W, int Cin, int Cout,
    int k, int stride, int pad, int OD, int OH, int OW, int pre_act, float pre_p, int norm_act, float norm_p, int act,
    float p, float* __restrict__ stats, float* __restrict__ splitk, int kspan) {
    conv3d_tc<128, 32, 32, 32, 128, true>(x, w, bias, residual, norm, out, N, D, H, W, Cin, Cout, k, stride, pad, OD, OH, OW,
        pre_act, pre_p, norm_act, norm_p, act, p, stats, splitk, kspan);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv3d_tc_m128_async_f16(const __half* __restrict__ x, const __half* __restrict__ w, const float* __restrict__ bias,
    const __half* residual, const float* __restrict__ norm, __half* out, int N, int D, int H, int W, int Cin, int Cout,
    int k, int stride, int pad, int OD, int OH, int OW, int pre_act, float pre_p, int norm_act, float norm_p, int act,
    float p, float* __restrict__ stats, float* __restrict__ splitk, int kspan) {
    conv3d_tc<128, 64, 64, 32, 64, true>(x, w, bias, residual, norm, out, N, D, H, W, Cin, Cout, k, stride, pad, OD, OH, OW,
        pre_act, pre_p, norm_act, norm_p, act, p, stats, splitk, kspan);
}

// The 64 x 64 reduce also finishes conv3d_tc_m128_f16's splits: the split buffer of a (gx, gy)
// m128 grid is that of a (2 gx, gy) 64 x 64 one.
extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv3d_tc_reduce_f16(const float* __restrict__ splitk, int splits, const float* __restrict__ bias,
    const __half* residual, __half* out, float* __restrict__ stats, int M, int ovol, int Cout, int act, float p) {
    conv3d_tc_reduce<64, 64>(splitk, splits, bias, residual, out, stats, M, ovol, Cout, act, p);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv3d_tc_n32_reduce_f16(const float* __restrict__ splitk, int splits, const float* __restrict__ bias,
    const __half* residual, __half* out, float* __restrict__ stats, int M, int ovol, int Cout, int act, float p) {
    conv3d_tc_reduce<128, 32>(splitk, splits, bias, residual, out, stats, M, ovol, Cout, act, p);
}

// Halo tiles (conv3d_tc_halo above): the statistics in units of the whole 128-voxel brick (the
// unit conv3d_tc_n32_f16 uses, for Cout <= 32) or of 64 voxels (conv3d_tc_f16's, for more). The
// same arguments as conv3d_tc_f16 (kspan unused, splitk null). "At least 2 blocks per
// multiprocessor" lets ptxas take the registers it needs: left to itself for sm_90, it sized
// them for the 5 blocks the shared memory allows and spilled.
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
conv3d_tc_halo_f16(const __half* __restrict__ x, const __half* __restrict__ w, const float* __restrict__ bias,
    const __half* residual, const float* __restrict__ norm, __half* out, int N, int D, int H, int W, int Cin, int Cout,
    int k, int stride, int pad, int OD, int OH, int OW, int pre_act, float pre_p, int norm_act, float norm_p, int act,
    float p, float* __restrict__ stats, float* __restrict__ splitk, int kspan) {
    conv3d_tc_halo<128>(x, w, bias, residual, norm, out, N, D, H, W, Cin, Cout, k, stride, pad, OD, OH, OW, pre_act, pre_p,
        norm_act, norm_p, act, p, stats, splitk);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
conv3d_tc_halo_s64_f16(const __half* __restrict__ x, const __half* __restrict__ w, const float* __restrict__ bias,
    const __half* residual, const float* __restrict__ norm, __half* out, int N, int D, int H, int W, int Cin, int Cout,
    int k, int stride, int pad, int OD, int OH, int OW, int pre_act, float pre_p, int norm_act, float norm_p, int act,
    float p, float* __restrict__ stats, float* __restrict__ splitk, int kspan) {
    conv3d_tc_halo<64>(x, w, bias, residual, norm, out, N, D, H, W, Cin, Cout, k, stride, pad, OD, OH, OW, pre_act, pre_p,
        norm_act, norm_p, act, p, stats, splitk);
}
