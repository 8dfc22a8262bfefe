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

// The same operation on tensor cores (WMMA 16x16x16, fp16 in, f32 accumulate; sm_70 and newer):
// the f32-FMA kernel above runs DynUNet's up blocks (K = Cin = 64..320) at CUDA-core rates, a
// small share of the network's FLOPs at a tenth of the tensor cores' rate.
//
// GEMM rows m = input voxels, columns j = co * 8 + tap (the weight's own order, so B's rows are
// w's rows: w[ci, co, a, b, c] = B[ci][j], read as 16-byte vectors), K = Cin in steps of CTT_BK.
// Block tile CTT_BM x CTT_BN, 4 warps of 32 x 32 (2 x 2 fragments); A and B staged in shared
// memory as fp16, the f32 tile staged again for the store. A tile's 64 columns are 8 output
// channels x 8 taps: the store writes, per (row, tap), those 8 channels as one 16-byte vector
// when the slice allows (c_off, Ctot multiples of 8, out 16-byte aligned), else element by
// element. The sum over ci is the tensor cores' (order within a 16-deep step is the hardware's),
// rounded once to fp16: equal to the kernel above within f32 rounding, not bit for bit.
// Needs Cin % 16 == 0, Cout % 8 == 0, x and w 16-byte aligned (ops::ConvtKernel::for_shape checks);
// grid (ceil(M / CTT_BM), 8 * Cout / CTT_BN), block CTT_THREADS exactly.
#include <mma.h>

#define CTT_BM 64
#define CTT_BN 64
#define CTT_BK 32
#define CTT_THREADS 128
// Padded shared-memory rows (elements): multiples of 8 halves / 4 floats as WMMA requires, and
// every fragment's first element 32-byte aligned.
#define CTT_LDA (CTT_BK + 8)
#define CTT_LDB (CTT_BN + 8)
#define CTT_LDC (CTT_BN + 4)

extern "C" __global__ void __launch_bounds__(CTT_THREADS)
conv_transpose2_tc_f16(const __half* __restrict__ x, const __half* __restrict__ w, __half* __restrict__ out,
                       int N, int D, int H, int W, int Cin, int Cout, int Ctot, int c_off) {
    using namespace nvcuda;
    __shared__ __align__(32) __half As[CTT_BM * CTT_LDA];
    __shared__ __align__(32) __half Bs[CTT_BK * CTT_LDB];
    __shared__ __align__(32) float Cs[CTT_BM * CTT_LDC];
    const int t = threadIdx.x;
    const int warp = t / 32;
    const long long M = (long long)N * D * H * W;
    const int ncols = 8 * Cout;
    const long long m0 = (long long)blockIdx.x * CTT_BM;
    const int j0 = blockIdx.y * CTT_BN;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (int k0 = 0; k0 < Cin; k0 += CTT_BK) {
        // 16-byte chunks: A has CTT_BM rows of CTT_BK / 8, B CTT_BK rows of CTT_BN / 8.
#pragma unroll
        for (int q = t; q < CTT_BM * (CTT_BK / 8); q += CTT_THREADS) {
            const int r = q / (CTT_BK / 8), kc = (q % (CTT_BK / 8)) * 8;
            const int k = k0 + kc;
            uint4 v = zero;
            if (m0 + r < M && k < Cin) v = *reinterpret_cast<const uint4*>(x + (size_t)(m0 + r) * Cin + k);
            *reinterpret_cast<uint4*>(&As[r * CTT_LDA + kc]) = v;
        }
#pragma unroll
        for (int q = t; q < CTT_BK * (CTT_BN / 8); q += CTT_THREADS) {
            const int kr = q / (CTT_BN / 8), jc = (q % (CTT_BN / 8)) * 8;
            const int k = k0 + kr;
            uint4 v = zero;
            if (k < Cin) v = *reinterpret_cast<const uint4*>(w + (size_t)k * ncols + j0 + jc);
            *reinterpret_cast<uint4*>(&Bs[kr * CTT_LDB + jc]) = v;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < CTT_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> b[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &As[(wm + 16 * i) * CTT_LDA + kk], CTT_LDA);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &Bs[kk * CTT_LDB + wn + 16 * j], CTT_LDB);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(&Cs[(wm + 16 * i) * CTT_LDC + wn + 16 * j], acc[i][j], CTT_LDC, wmma::mem_row_major);
    __syncthreads();

    // One (row, tap) per step: the tile's 8 channels co0 .. co0 + 7 of that output voxel.
    const int co0 = j0 / 8;
    const bool vec = ((Ctot | c_off) & 7) == 0 && ((size_t)out & 15) == 0;
    const int OH = 2 * H, OW = 2 * W;
    for (int q = t; q < CTT_BM * 8; q += CTT_THREADS) {
        const int r = q / 8, tap = q % 8;
        const long long m = m0 + r;
        if (m >= M) continue;
        long long rem = m;
        const int xx = (int)(rem % W);
        rem /= W;
        const int yy = (int)(rem % H);
        rem /= H;
        const int zz = (int)(rem % D);
        const long long n = rem / D;
        const int a = tap >> 2, b = (tap >> 1) & 1, c = tap & 1;
        const size_t o = ((((size_t)n * (2 * D) + 2 * zz + a) * OH + 2 * yy + b) * OW + 2 * xx + c) * Ctot + c_off + co0;
        const float* s = &Cs[r * CTT_LDC + tap];
        if (vec) {
            uint4 v;
            __half* vh = reinterpret_cast<__half*>(&v);
#pragma unroll
            for (int e = 0; e < 8; ++e) vh[e] = __float2half_rn(s[8 * e]);
            *reinterpret_cast<uint4*>(out + o) = v;
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) out[o + e] = __float2half_rn(s[8 * e]);
        }
    }
}
