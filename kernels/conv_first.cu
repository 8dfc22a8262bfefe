// The first convolution of both networks: 1 input channel, 3x3x3, stride 1, zero padding 1
// (SegResNet convInit, no bias; DynUNet's input block conv1, no bias). cuDNN's tensor-core paths want
// channel counts divisible by 8, so this one is ours.
//
// CPU twin: src/engine/cpu/conv.rs::conv3d with cin = 1, k = 3, stride = 1, pad = 1 (and
// conv3d_naive): out[n, z, y, x, co] = act(bias[co] + sum_{kz,ky,kx} w[co, 0, kz, ky, kx] *
// x[n, z+kz-1, y+ky-1, x+kx-1]), out-of-range inputs are 0. f32 accumulation in tap order
// (kz, ky, kx ascending), rounded once to fp16.
//
// Layout: x [N, D, H, W] fp16 (NDHWC with C = 1); w [Cout, 27] f32; bias [Cout] f32 or null;
// out [N, D, H, W, Cout] fp16, Cout even and <= CF_MAX_COUT; stored 8 channels (16 bytes) at a
// time when Cout % 8 == 0 and out is 16-byte aligned.
// Block CF_TX x CF_TY x CF_TZ threads = one output voxel each; grid (ceil(W / CF_TX),
// ceil(H / CF_TY), N * ceil(D / CF_TZ)).
#include <cuda_fp16.h>

#define CF_TX 32
#define CF_TY 4
#define CF_TZ 2
#define CF_MAX_COUT 64
#define CF_CHUNK 8

// fd_act (activation codes) comes from common.cuh, prepended to every kernel source.

extern "C" __global__ void __launch_bounds__(CF_TX * CF_TY * CF_TZ)
conv3d_c1_k3_f16(const __half* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                 __half* __restrict__ out, int D, int H, int W, int Cout, int act, float p) {
    __shared__ float tile[CF_TZ + 2][CF_TY + 2][CF_TX + 2];
    __shared__ float ws[CF_MAX_COUT * 27];
    __shared__ float bs[CF_MAX_COUT];
    if (Cout < 1 || Cout > CF_MAX_COUT || (Cout & 1)) return;  // unsupported shape: the host checks
    const int zblocks = (D + CF_TZ - 1) / CF_TZ;
    const int n = blockIdx.z / zblocks;
    const int z0 = (blockIdx.z % zblocks) * CF_TZ;
    const int y0 = blockIdx.y * CF_TY;
    const int x0 = blockIdx.x * CF_TX;
    const int tid = (threadIdx.z * CF_TY + threadIdx.y) * CF_TX + threadIdx.x;
    const int nthreads = CF_TX * CF_TY * CF_TZ;
    const __half* xs = x + (size_t)n * D * H * W;

    for (int i = tid; i < Cout * 27; i += nthreads) ws[i] = w[i];
    for (int i = tid; i < Cout; i += nthreads) bs[i] = bias ? bias[i] : 0.0f;
    const int tsize = (CF_TZ + 2) * (CF_TY + 2) * (CF_TX + 2);
    for (int i = tid; i < tsize; i += nthreads) {
        const int tx = i % (CF_TX + 2);
        const int ty = (i / (CF_TX + 2)) % (CF_TY + 2);
        const int tz = i / ((CF_TX + 2) * (CF_TY + 2));
        const int gz = z0 + tz - 1, gy = y0 + ty - 1, gx = x0 + tx - 1;
        float v = 0.0f;
        if (gz >= 0 && gz < D && gy >= 0 && gy < H && gx >= 0 && gx < W)
            v = __half2float(xs[((size_t)gz * H + gy) * W + gx]);
        tile[tz][ty][tx] = v;
    }
    __syncthreads();

    const int ox = x0 + threadIdx.x, oy = y0 + threadIdx.y, oz = z0 + threadIdx.z;
    if (ox >= W || oy >= H || oz >= D) return;
    float nb[27];
#pragma unroll
    for (int kz = 0; kz < 3; ++kz)
#pragma unroll
        for (int ky = 0; ky < 3; ++ky)
#pragma unroll
            for (int kx = 0; kx < 3; ++kx)
                nb[(kz * 3 + ky) * 3 + kx] = tile[threadIdx.z + kz][threadIdx.y + ky][threadIdx.x + kx];

    __half2* o = reinterpret_cast<__half2*>(out + ((((size_t)n * D + oz) * H + oy) * W + ox) * Cout);
    // Whole chunks of 8 channels go out as one 16-byte store (a voxel's channels are contiguous;
    // pairs would leave each store instruction writing 4 bytes into 32 scattered sectors).
    const bool vec = (Cout & 7) == 0 && fd_aligned16(out);
    for (int c0 = 0; c0 < Cout; c0 += CF_CHUNK) {
        float acc[CF_CHUNK];
#pragma unroll
        for (int j = 0; j < CF_CHUNK; ++j) {
            const int co = min(c0 + j, Cout - 1);
            float s = 0.0f;
#pragma unroll
            for (int k = 0; k < 27; ++k) s = fmaf(ws[co * 27 + k], nb[k], s);
            acc[j] = fd_act(__fadd_rn(s, bs[co]), act, p);
        }
        if (vec) {
            uint4 v;
            __half2* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
            for (int j = 0; j < CF_CHUNK; j += 2) h[j >> 1] = __floats2half2_rn(acc[j], acc[j + 1]);
            reinterpret_cast<uint4*>(o)[c0 >> 3] = v;
            continue;
        }
#pragma unroll
        for (int j = 0; j < CF_CHUNK; j += 2)
            if (c0 + j < Cout) o[(c0 + j) >> 1] = __floats2half2_rn(acc[j], acc[j + 1]);
    }
}
