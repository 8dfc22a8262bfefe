// Transposed 3-D convolution, kernel 2, stride 2, no bias (DynUNet's up blocks), written straight
// into the channel slice [c_off, c_off + Cout) of the concat buffer, so `concat([up, skip])` needs
// no copy (the skip is written / copied into the channels after it).
//
// CPU twin: src/engine/cpu/conv.rs::conv_transpose2. Semantics, weight w = [Cin, Cout, 2, 2, 2]
// (PyTorch's ConvTranspose3d layout, used as is):
//   out[n, 2z+a, 2y+b, 2x+c, c_off + co] = sum_ci w[ci, co, a, b, c] * x[n, z, y, x, ci]
// with f32 accumulation over ci in ascending order, rounded once to fp16.
//
// As a GEMM: rows m = input voxels (N*D*H*W), columns j = tap * Cout + co (tap = 4a + 2b + c),
// K = Cin. Tiles of CT_BM x CT_BN in shared memory (f32), CT_BK deep; each of the CT_THREADS threads
// computes 4 x 4 outputs. grid (ceil(M / CT_BM), ceil(8 * Cout / CT_BN)), block CT_THREADS.
//
// Layout: x [N, D, H, W, Cin] fp16; out [N, 2D, 2H, 2W, Ctot] fp16, Ctot >= c_off + Cout.
#include <cuda_fp16.h>

#define CT_BM 64
#define CT_BN 64
#define CT_BK 16
#define CT_THREADS 256

extern "C" __global__ void __launch_bounds__(CT_THREADS)
conv_transpose2_f16(const __half* __restrict__ x, const __half* __restrict__ w, __half* __restrict__ out,
                    int N, int D, int H, int W, int Cin, int Cout, int Ctot, int c_off) {
    // Rows of 68 floats keep every row start 16-byte aligned for the float4 reads.
    __shared__ __align__(16) float As[CT_BK][CT_BM + 4];
    __shared__ __align__(16) float Bs[CT_BK][CT_BN + 4];
    const int t = threadIdx.x;
    const int tx = t % 16;  // column group: columns tx*4 .. tx*4+3
    const int ty = t / 16;  // row group: rows ty*4 .. ty*4+3
    const long long M = (long long)N * D * H * W;
    const int ncols = 8 * Cout;
    const long long m0 = (long long)blockIdx.x * CT_BM;
    const int j0 = blockIdx.y * CT_BN;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    // Loader roles: A (x): row am, k ak..ak+3; B (w): k bk, columns bj..bj+3.
    const int am = t / 4, ak = (t % 4) * 4;
    const int bk = t / 16, bj = (t % 16) * 4;
    const long long arow = m0 + am;

    for (int k0 = 0; k0 < Cin; k0 += CT_BK) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int k = k0 + ak + q;
            float v = 0.0f;
            if (arow < M && k < Cin) v = __half2float(x[(size_t)arow * Cin + k]);
            As[ak + q][am] = v;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int j = j0 + bj + q;
            const int k = k0 + bk;
            float v = 0.0f;
            if (j < ncols && k < Cin) {
                const int tap = j / Cout, co = j - tap * Cout;
                v = __half2float(w[((size_t)k * Cout + co) * 8 + tap]);
            }
            Bs[bk][bj + q] = v;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < CT_BK; ++k) {
            const float4 a = *reinterpret_cast<const float4*>(&As[k][ty * 4]);
            const float4 b = *reinterpret_cast<const float4*>(&Bs[k][tx * 4]);
            const float av[4] = {a.x, a.y, a.z, a.w};
            const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }

    const int OH = 2 * H, OW = 2 * W;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const long long m = m0 + ty * 4 + i;
        if (m >= M) continue;
        long long r = m;
        const int xx = (int)(r % W);
        r /= W;
        const int yy = (int)(r % H);
        r /= H;
        const int zz = (int)(r % D);
        const long long n = r / D;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = j0 + tx * 4 + j;
            if (col >= ncols) continue;
            const int tap = col / Cout, co = col - tap * Cout;
            const int a = tap >> 2, b = (tap >> 1) & 1, c = tap & 1;
            const size_t o = ((((size_t)n * (2 * D) + 2 * zz + a) * OH + 2 * yy + b) * OW + 2 * xx + c) * Ctot + c_off + co;
            out[o] = __float2half_rn(acc[i][j]);
        }
    }
}
