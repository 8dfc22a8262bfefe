// Detection-head outputs: the last 1x1x1 convolutions (bias) with sigmoid (class scores) or
// tanh(x) * 2 (offsets, channels x, y, z), leaving NDHWC fp16 for NCDHW f32, the layout the
// ensemble, blending and detection kernels (and the host) use.
//
// CPU twin: src/engine/cpu/conv.rs::conv3d with k = 1 and the fused epilogue
// `act(v + bias[co])`, act = graph::Act::Sigmoid (1 / (1 + exp(-v))) or Act::TanhScale(2)
// (tanh(v) * 2); the CPU engine's Outputs are `[n, C, d/2, h/2, w/2]` f32 (src/engine/mod.rs).
//
// head_conv1x1_act_f32: out[n, co, v] = act(bias[co] + sum_ci w[co, ci] * x[n, v, ci]), f32
//   accumulation in ci order. x [N, vol, Cin] fp16 (Cin even, <= HEAD_MAX_CIN); w [Cout, Cin] f32;
//   bias [Cout] f32 or null; Cout <= HEAD_MAX_COUT; out [N, Cout, vol] f32.
//   grid (ceil(vol / blockDim.x), N), block HEAD_THREADS (one voxel per thread).
// head_act_f32: out[n, c, v] = act(x[n, v, c]) when the 1x1 conv (with its bias) ran elsewhere.
//   grid (any, N); grid-stride over vol * C (< 2^31) outputs of one sample.
#include <cuda_fp16.h>

#define HEAD_THREADS 256
#define HEAD_MAX_CIN 64
#define HEAD_MAX_COUT 8

// fd_act (activation codes) comes from common.cuh, prepended to every kernel source.

extern "C" __global__ void __launch_bounds__(HEAD_THREADS)
head_conv1x1_act_f32(const __half* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                     float* __restrict__ out, long long vol, int Cin, int Cout, int act, float p) {
    __shared__ float ws[HEAD_MAX_COUT * HEAD_MAX_CIN];
    __shared__ float bs[HEAD_MAX_COUT];
    if (Cin > HEAD_MAX_CIN || (Cin & 1) || Cout > HEAD_MAX_COUT) return;  // unsupported shape: the host checks
    const int n = blockIdx.y;
    for (int i = threadIdx.x; i < Cout * Cin; i += blockDim.x) ws[i] = w[i];
    for (int i = threadIdx.x; i < Cout; i += blockDim.x) bs[i] = bias ? bias[i] : 0.0f;
    __syncthreads();
    const long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= vol) return;
    const int C2 = Cin >> 1;
    const __half2* xs = reinterpret_cast<const __half2*>(x) + ((size_t)n * (size_t)vol + (size_t)v) * C2;
    float acc[HEAD_MAX_COUT];
#pragma unroll
    for (int j = 0; j < HEAD_MAX_COUT; ++j) acc[j] = 0.0f;
    // The voxel's channels 8 at a time (one 16-byte load) where Cin % 8 == 0 and x is aligned; the
    // same multiply-adds in the same order either way.
    int c2 = 0;
    if ((Cin & 7) == 0 && fd_aligned16(x)) {
        const uint4* x8 = reinterpret_cast<const uint4*>(xs);
        for (; c2 < C2; c2 += 4) {
            const uint4 raw = x8[c2 >> 2];
            const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 f = __half22float2(h[e]);
                const int ci = 2 * (c2 + e);
#pragma unroll
                for (int j = 0; j < HEAD_MAX_COUT; ++j) {
                    if (j < Cout) {
                        acc[j] = fmaf(ws[j * Cin + ci], f.x, acc[j]);
                        acc[j] = fmaf(ws[j * Cin + ci + 1], f.y, acc[j]);
                    }
                }
            }
        }
    }
    for (; c2 < C2; ++c2) {
        const float2 f = __half22float2(xs[c2]);
#pragma unroll
        for (int j = 0; j < HEAD_MAX_COUT; ++j) {
            if (j < Cout) {
                acc[j] = fmaf(ws[j * Cin + 2 * c2], f.x, acc[j]);
                acc[j] = fmaf(ws[j * Cin + 2 * c2 + 1], f.y, acc[j]);
            }
        }
    }
    float* o = out + (size_t)n * Cout * (size_t)vol + v;
#pragma unroll
    for (int j = 0; j < HEAD_MAX_COUT; ++j)
        if (j < Cout) o[(size_t)j * vol] = fd_act(__fadd_rn(acc[j], bs[j]), act, p);
}

extern "C" __global__ void head_act_f32(const __half* __restrict__ x, float* __restrict__ out, int vol, int C,
                                        int act, float p) {
    const int n = blockIdx.y;
    const int total = vol * C;
    const __half* xs = x + (size_t)n * (size_t)total;
    float* os = out + (size_t)n * (size_t)total;
    // Output-major order: consecutive threads write consecutive voxels of one channel.
    // 64-bit steps: the last step of a 32-bit index could wrap past INT_MAX; the index itself fits.
    for (long long li = (long long)blockIdx.x * blockDim.x + threadIdx.x; li < total; li += (long long)gridDim.x * blockDim.x) {
        const int i = (int)li;
        const int c = i / vol, v = i - c * vol;
        os[i] = fd_act(__half2float(xs[(size_t)v * C + c]), act, p);
    }
}
