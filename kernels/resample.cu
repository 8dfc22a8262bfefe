// Trilinear x2 upsampling (align_corners = False) fused with the decoder's skip add.
//
// CPU twin: src/engine/cpu/resample.rs::upsample2x (then the graph's add op with the skip).
// Semantics (PyTorch / MONAI, align_corners = False): output index o on an axis of source length
// len reads source coordinate s = max(0, (o + 0.5) / 2 - 0.5); i0 = floor(s), i1 = min(i0 + 1,
// len - 1), l1 = s - i0, l0 = 1 - l1. So o = 0 -> (0, 0, 0); even o = 2i > 0 -> (i - 1, i, 0.75);
// odd o = 2i + 1 -> (i, min(i + 1, len - 1), 0.25).
// Separable like the CPU: interpolate along x first, then y, then z, each step
// `l0 * a + l1 * b` in f32 with no fused multiply-add (the CPU's rounding), then `+ skip`.
//
// Layout: x [N, D, H, W, C] fp16, skip and out [N, 2D, 2H, 2W, C] fp16, C even. skip may be null
// (plain upsampling); out may alias skip (each element is read then written by one thread), not x.
// grid (any, N); grid-stride over the 2D * 2H * 2W * C/2 output pairs of one sample (< 2^31), or
// over its C/8 chunks of 8 channels (one uint4 per source voxel, skip and output) when C % 8 == 0
// and x, skip and out are 16-byte aligned: the same operations on each element either way.
#include <cuda_fp16.h>

__device__ __forceinline__ void up_src(int o, int len, int& i0, int& i1, float& l1) {
    if (o == 0) {
        i0 = 0;
        i1 = 0;
        l1 = 0.0f;
    } else if ((o & 1) == 0) {
        i0 = (o >> 1) - 1;
        i1 = o >> 1;
        l1 = 0.75f;
    } else {
        i0 = o >> 1;
        i1 = min((o >> 1) + 1, len - 1);
        l1 = 0.25f;
    }
}

// The source corners and weights of output voxel v (x fastest) of a 2D x 2H x 2W output.
struct UpSrc {
    int x0, x1, y0, y1, z0, z1;
    float lx, ly, lz;
};
__device__ __forceinline__ UpSrc up_voxel(int v, int D, int H, int W) {
    UpSrc u;
    const int ox = v % (2 * W);
    v /= 2 * W;
    const int oy = v % (2 * H);
    const int oz = v / (2 * H);
    up_src(ox, W, u.x0, u.x1, u.lx);
    up_src(oy, H, u.y0, u.y1, u.ly);
    up_src(oz, D, u.z0, u.z1, u.lz);
    return u;
}
__device__ __forceinline__ float2 lerp2(float2 a, float2 b, float l0, float l1) {
    return make_float2(__fadd_rn(__fmul_rn(l0, a.x), __fmul_rn(l1, b.x)),
                       __fadd_rn(__fmul_rn(l0, a.y), __fmul_rn(l1, b.y)));
}

// One sample's output, `units` units of E half2 pairs each (V: __half2 for E = 1, uint4 for
// E = 4), CV units to a voxel: one code for both widths, so they do the same operations on each
// element.
template <typename V, int E>
__device__ __forceinline__ void upsample_units(const V* xs, const V* ss, V* os, int units, int CV, int D, int H, int W) {
    // 64-bit steps: the last step of a 32-bit index could wrap past INT_MAX; the index itself fits.
    for (long long li = (long long)blockIdx.x * blockDim.x + threadIdx.x; li < units; li += (long long)gridDim.x * blockDim.x) {
        const int i = (int)li;
        const int cv = i % CV;
        const UpSrc u = up_voxel(i / CV, D, H, W);
        const float mx = 1.0f - u.lx, my = 1.0f - u.ly, mz = 1.0f - u.lz;
        float2 zz[2][E];
#pragma unroll
        for (int a = 0; a < 2; ++a) {
            const int zi = a ? u.z1 : u.z0;
            float2 yy[2][E];
#pragma unroll
            for (int b = 0; b < 2; ++b) {
                const int yi = b ? u.y1 : u.y0;
                const size_t row = ((size_t)zi * H + yi) * W;
                const V pv = xs[(row + u.x0) * CV + cv];
                const V qv = xs[(row + u.x1) * CV + cv];
                const __half2* ph = reinterpret_cast<const __half2*>(&pv);
                const __half2* qh = reinterpret_cast<const __half2*>(&qv);
#pragma unroll
                for (int e = 0; e < E; ++e) yy[b][e] = lerp2(__half22float2(ph[e]), __half22float2(qh[e]), mx, u.lx);
            }
#pragma unroll
            for (int e = 0; e < E; ++e) zz[a][e] = lerp2(yy[0][e], yy[1][e], my, u.ly);
        }
        V sv{}, ov;
        if (ss) sv = ss[i];
        const __half2* sh = reinterpret_cast<const __half2*>(&sv);
        __half2* oh = reinterpret_cast<__half2*>(&ov);
#pragma unroll
        for (int e = 0; e < E; ++e) {
            float2 r = lerp2(zz[0][e], zz[1][e], mz, u.lz);
            if (ss) {
                const float2 f = __half22float2(sh[e]);
                r.x = __fadd_rn(r.x, f.x);
                r.y = __fadd_rn(r.y, f.y);
            }
            oh[e] = __floats2half2_rn(r.x, r.y);
        }
        os[i] = ov;
    }
}

extern "C" __global__ void upsample2x_add_f16(const __half* __restrict__ x, const __half* skip, __half* out,
                                              int D, int H, int W, int C) {
    const int n = blockIdx.y;
    const int C2 = C >> 1;
    const int pairs = 2 * D * 2 * H * 2 * W * C2;
    const size_t in_base = (size_t)n * D * H * W * C2, out_base = (size_t)n * (size_t)pairs;
    if ((C & 7) == 0 && fd_aligned16(x, skip, out)) {
        // 8 channels (one uint4) per unit: the bases in pairs, divided by 4.
        const uint4* xs = reinterpret_cast<const uint4*>(x) + in_base / 4;
        const uint4* ss = skip ? reinterpret_cast<const uint4*>(skip) + out_base / 4 : nullptr;
        upsample_units<uint4, 4>(xs, ss, reinterpret_cast<uint4*>(out) + out_base / 4, pairs / 4, C >> 3, D, H, W);
        return;
    }
    const __half2* xs = reinterpret_cast<const __half2*>(x) + in_base;
    const __half2* ss = skip ? reinterpret_cast<const __half2*>(skip) + out_base : nullptr;
    upsample_units<__half2, 1>(xs, ss, reinterpret_cast<__half2*>(out) + out_base, pairs, C2, D, H, W);
}
