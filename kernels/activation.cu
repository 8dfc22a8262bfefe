// Elementwise bias + activation and residual add + activation on NDHWC fp16 activations.
//
// CPU twin: src/model/graph.rs::Act::apply (the activations) and the epilogue of
// src/engine/cpu/conv.rs::conv3d (`act(v + bias[c])`); the residual add of SegResNet's ResBlock
// (`x + conv2(...)`) is the graph's add op. Math in f32, storage fp16 (round to nearest even).
//
// Layout: [N, vol, C] fp16, C even (half2 pairs). `pairs` = N * vol * C / 2. Any grid / block size
// (grid-stride loops); outputs may alias inputs. Both kernels step 8 halves at a time (uint4) when
// pairs % 4 == 0 (bias_act_f16: C % 8 == 0) and every pointer is 16-byte aligned (fd_aligned16),
// else a half2 pair: the same operations on each element either way.
#include <cuda_fp16.h>

// fd_act (activation codes) comes from common.cuh, prepended to every kernel source.

// y[i] = act(x[i] + bias[c]); bias may be null (no bias).
extern "C" __global__ void bias_act_f16(const __half* x, __half* y, const float* __restrict__ bias,
                                        long long pairs, int C, int act, float p) {
    const int C2 = C >> 1;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long step = (long long)gridDim.x * blockDim.x;
    if ((C & 7) == 0 && fd_aligned16(x, y)) {
        const int C8 = C >> 3;
        const uint4* xs = reinterpret_cast<const uint4*>(x);
        uint4* ys = reinterpret_cast<uint4*>(y);
        for (long long i = first; i < pairs / 4; i += step) {
            uint4 v = xs[i];
            __half2* h = reinterpret_cast<__half2*>(&v);
            const int c0 = (int)(i % C8) * 8;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float2 f = __half22float2(h[e]);
                if (bias) {
                    f.x = __fadd_rn(f.x, bias[c0 + 2 * e]);
                    f.y = __fadd_rn(f.y, bias[c0 + 2 * e + 1]);
                }
                h[e] = __floats2half2_rn(fd_act(f.x, act, p), fd_act(f.y, act, p));
            }
            ys[i] = v;
        }
        return;
    }
    const __half2* xs = reinterpret_cast<const __half2*>(x);
    __half2* ys = reinterpret_cast<__half2*>(y);
    for (long long i = first; i < pairs; i += step) {
        float2 f = __half22float2(xs[i]);
        if (bias) {
            const int c = (int)(i % C2) * 2;
            f.x = __fadd_rn(f.x, bias[c]);
            f.y = __fadd_rn(f.y, bias[c + 1]);
        }
        ys[i] = __floats2half2_rn(fd_act(f.x, act, p), fd_act(f.y, act, p));
    }
}

// y[i] = act(a[i] + b[i]) (the residual add, f32 sum of the fp16 inputs).
extern "C" __global__ void add_act_f16(const __half* a, const __half* b, __half* y, long long pairs,
                                       int act, float p) {
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long step = (long long)gridDim.x * blockDim.x;
    if ((pairs & 3) == 0 && fd_aligned16(a, b, y)) {
        const uint4* as = reinterpret_cast<const uint4*>(a);
        const uint4* bs = reinterpret_cast<const uint4*>(b);
        uint4* ys = reinterpret_cast<uint4*>(y);
        for (long long i = first; i < pairs / 4; i += step) {
            const uint4 va = as[i], vb = bs[i];
            uint4 vy;
            const __half2* ha = reinterpret_cast<const __half2*>(&va);
            const __half2* hb = reinterpret_cast<const __half2*>(&vb);
            __half2* hy = reinterpret_cast<__half2*>(&vy);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 fa = __half22float2(ha[e]);
                const float2 fb = __half22float2(hb[e]);
                hy[e] = __floats2half2_rn(fd_act(__fadd_rn(fa.x, fb.x), act, p), fd_act(__fadd_rn(fa.y, fb.y), act, p));
            }
            ys[i] = vy;
        }
        return;
    }
    const __half2* as = reinterpret_cast<const __half2*>(a);
    const __half2* bs = reinterpret_cast<const __half2*>(b);
    __half2* ys = reinterpret_cast<__half2*>(y);
    for (long long i = first; i < pairs; i += step) {
        const float2 fa = __half22float2(as[i]);
        const float2 fb = __half22float2(bs[i]);
        ys[i] = __floats2half2_rn(fd_act(__fadd_rn(fa.x, fb.x), act, p), fd_act(__fadd_rn(fa.y, fb.y), act, p));
    }
}
