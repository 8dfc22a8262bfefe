// Generic 3-D convolution on NDHWC fp16 activations (implicit GEMM, f32 SIMT math): the CUDA
// engine's fallback for every convolution cuDNN is not available for (no libcudnn, or no cuDNN
// algorithm that runs the shape), and a second, independent implementation the self-test checks.
//
// CPU twin: src/engine/cpu/conv.rs::conv3d (and conv3d_naive). Semantics: cubic kernel k, stride s,
// zero padding p, output size o = (l + 2p - k) / s + 1 per axis;
//   out[n, oz, oy, ox, co] = act(bias[co] + sum_{kz,ky,kx,ci} w[co, kz, ky, kx, ci] *
//                                 x[n, oz*s + kz - p, oy*s + ky - p, ox*s + kx - p, ci])
// out-of-range inputs are 0; f32 accumulation in (kz, ky, kx, ci) order per thread, the bias added
// once after the sum, rounded once to fp16.
//
// As a GEMM: rows m = output voxels (N*OD*OH*OW), columns = co, K = k^3 * Cin (index
// ((kz * k + ky) * k + kx) * Cin + ci). Tiles of CV_BM x CV_BN in shared memory (f32), CV_BK deep;
// each of the CV_THREADS threads computes 4 x 4 outputs. grid (ceil(M / CV_BM), ceil(Cout / CV_BN)),
// block CV_THREADS (exactly).
//
// Layout: x [N, D, H, W, Cin] fp16; w [Cout, k, k, k, Cin] fp16 (cuDNN's NHWC filter layout, KTRSC,
// the same buffer the cuDNN path uses); bias [Cout] f32 or null; out [N, OD, OH, OW, Cout] fp16.
// Any Cin / Cout (no multiple-of-8 or even requirement). M < 2^31 (host checks).
#include <cuda_fp16.h>

#define CV_BM 64
#define CV_BN 64
#define CV_BK 16
#define CV_THREADS 256

// fd_act (activation codes) comes from common.cuh, prepended to every kernel source.

extern "C" __global__ void __launch_bounds__(CV_THREADS)
conv3d_igemm_f16(const __half* __restrict__ x, const __half* __restrict__ w, const float* __restrict__ bias,
                 __half* __restrict__ out, int N, int D, int H, int W, int Cin, int Cout, int k, int stride,
                 int pad, int OD, int OH, int OW, int act, float p) {
    __shared__ __align__(16) float As[CV_BK][CV_BM + 4];
    __shared__ __align__(16) float Bs[CV_BK][CV_BN + 4];
    const int t = threadIdx.x;
    const int tx = t % 16;  // column group: columns tx*4 .. tx*4+3
    const int ty = t / 16;  // row group: rows ty*4 .. ty*4+3
    const int M = N * OD * OH * OW;
    const int K = k * k * k * Cin;
    const int m0 = blockIdx.x * CV_BM;
    const int j0 = blockIdx.y * CV_BN;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    // Loader roles: A (im2col of x): row am, k ak..ak+3; B (w): k bk, columns bj..bj+3.
    const int am = t / 4, ak = (t % 4) * 4;
    const int bk = t / 16, bj = (t % 16) * 4;
    // The output voxel of this thread's A row, decoded once.
    const int arow = m0 + am;
    const bool arow_ok = arow < M;
    int an = 0, iz0 = 0, iy0 = 0, ix0 = 0;
    if (arow_ok) {
        int r = arow;
        const int ox = r % OW;
        r /= OW;
        const int oy = r % OH;
        r /= OH;
        const int oz = r % OD;
        an = r / OD;
        iz0 = oz * stride - pad;
        iy0 = oy * stride - pad;
        ix0 = ox * stride - pad;
    }
    const __half* xn = x + (size_t)an * D * H * W * Cin;

    for (int k0 = 0; k0 < K; k0 += CV_BK) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int kk = k0 + ak + q;
            float v = 0.0f;
            if (arow_ok && kk < K) {
                const int tap = kk / Cin, ci = kk - tap * Cin;
                const int kx = tap % k, ky = (tap / k) % k, kz = tap / (k * k);
                const int iz = iz0 + kz, iy = iy0 + ky, ix = ix0 + kx;
                if (iz >= 0 && iz < D && iy >= 0 && iy < H && ix >= 0 && ix < W)
                    v = __half2float(xn[(((size_t)iz * H + iy) * W + ix) * Cin + ci]);
            }
            As[ak + q][am] = v;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int co = j0 + bj + q;
            const int kk = k0 + bk;
            float v = 0.0f;
            if (co < Cout && kk < K) v = __half2float(w[(size_t)co * K + kk]);
            Bs[bk][bj + q] = v;
        }
        __syncthreads();
#pragma unroll
        for (int kq = 0; kq < CV_BK; ++kq) {
            const float4 a = *reinterpret_cast<const float4*>(&As[kq][ty * 4]);
            const float4 b = *reinterpret_cast<const float4*>(&Bs[kq][tx * 4]);
            const float av[4] = {a.x, a.y, a.z, a.w};
            const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty * 4 + i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int co = j0 + tx * 4 + j;
            if (co >= Cout) continue;
            const float b = bias ? bias[co] : 0.0f;
            out[(size_t)m * Cout + co] = __float2half_rn(fd_act(__fadd_rn(acc[i][j], b), act, p));
        }
    }
}
