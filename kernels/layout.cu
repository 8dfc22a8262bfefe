// Layout changes between the host's NCDHW f32 arrays and the engine's NDHWC fp16 activations, and
// tile extraction from the normalised volume.
//
// CPU twins: src/pipeline/tiling.rs::extract_tile (zero padding past the volume's end); the CPU
// engine takes and returns NCDHW f32 (src/engine/mod.rs TileEngine::forward / Outputs, e.g. fm2).
//
// ncdhw_f32_to_ndhwc_f16: dst[n, v, c] = fp16(src[n, c, v]) (round to nearest even).
// ndhwc_f16_to_ncdhw_f32: dst[n, c, v] = f32(src[n, v, c]) (exact).
//   Both: 32 x 32 tiles through shared memory; block (32, 8); grid (ceil(vol / 32), ceil(C / 32), N).
// f32_to_f16: dst[i] = fp16(src[i]) (round to nearest even), i < n. Any grid / block size
//   (grid-stride). Stores the normalised volume on the device in fp16 (half the memory), chunk by
//   chunk through an f32 staging buffer.
// extract_tiles_f16: dst[t, z, y, x] = volume[o + (z, y, x)] for the T windows with voxel origins
//   o = origins[t] (z, y, x), 0 where o + (z, y, x) is past the volume's end; the volume is fp16
//   (f32_to_f16 of the normalised f32 volume), so the tiles are exactly fp16 of the f32 tiles.
//   dst is [T, WD, WH, WW] = NDHWC with C = 1. grid (any, T); grid-stride over one window.
// copy_channels_f16: dst[r, c_off + c] = src[r, c] for rows r < `rows` (= N * vol voxels) and
//   c < Cs, dst holding Cd channels per row: one input of the CPU engine's Concat op
//   (src/engine/cpu/mod.rs, OpKind::Concat writes [inputs[0], inputs[1]] per sample) written into
//   its channel slice of the NDHWC concat buffer. Bit-exact copy. Any grid / block size
//   (grid-stride over rows * Cs elements, or rows * Cs / 8 uint4 chunks when Cs, Cd and c_off are
//   multiples of 8 and src, dst 16-byte aligned); src and dst must not overlap.
#include <cuda_fp16.h>

#define LT_TILE 32
#define LT_ROWS 8

extern "C" __global__ void __launch_bounds__(LT_TILE * LT_ROWS)
ncdhw_f32_to_ndhwc_f16(const float* __restrict__ src, __half* __restrict__ dst, int C, long long vol) {
    __shared__ float tile[LT_TILE][LT_TILE + 1];
    const int n = blockIdx.z;
    const long long v0 = (long long)blockIdx.x * LT_TILE;
    const int c0 = blockIdx.y * LT_TILE;
    const float* s = src + (size_t)n * C * (size_t)vol;
    __half* d = dst + (size_t)n * C * (size_t)vol;
    // Read rows c, coalesced along v.
    for (int r = threadIdx.y; r < LT_TILE; r += LT_ROWS) {
        const int c = c0 + r;
        const long long v = v0 + threadIdx.x;
        if (c < C && v < vol) tile[r][threadIdx.x] = s[(size_t)c * vol + v];
    }
    __syncthreads();
    // Write rows v, coalesced along c.
    for (int r = threadIdx.y; r < LT_TILE; r += LT_ROWS) {
        const long long v = v0 + r;
        const int c = c0 + threadIdx.x;
        if (c < C && v < vol) d[(size_t)v * C + c] = __float2half_rn(tile[threadIdx.x][r]);
    }
}

extern "C" __global__ void __launch_bounds__(LT_TILE * LT_ROWS)
ndhwc_f16_to_ncdhw_f32(const __half* __restrict__ src, float* __restrict__ dst, int C, long long vol) {
    __shared__ float tile[LT_TILE][LT_TILE + 1];
    const int n = blockIdx.z;
    const long long v0 = (long long)blockIdx.x * LT_TILE;
    const int c0 = blockIdx.y * LT_TILE;
    const __half* s = src + (size_t)n * C * (size_t)vol;
    float* d = dst + (size_t)n * C * (size_t)vol;
    // Read rows v, coalesced along c.
    for (int r = threadIdx.y; r < LT_TILE; r += LT_ROWS) {
        const long long v = v0 + r;
        const int c = c0 + threadIdx.x;
        if (c < C && v < vol) tile[r][threadIdx.x] = __half2float(s[(size_t)v * C + c]);
    }
    __syncthreads();
    // Write rows c, coalesced along v.
    for (int r = threadIdx.y; r < LT_TILE; r += LT_ROWS) {
        const int c = c0 + r;
        const long long v = v0 + threadIdx.x;
        if (c < C && v < vol) d[(size_t)c * vol + v] = tile[threadIdx.x][r];
    }
}

extern "C" __global__ void f32_to_f16(const float* __restrict__ src, __half* __restrict__ dst, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dst[i] = __float2half_rn(src[i]);
}

extern "C" __global__ void extract_tiles_f16(const __half* __restrict__ volume, int D, int H, int W,
                                             const int* __restrict__ origins, int WD, int WH, int WW,
                                             __half* __restrict__ dst) {
    const int t = blockIdx.y;
    const int oz = origins[3 * t], oy = origins[3 * t + 1], ox = origins[3 * t + 2];
    const long long wvol = (long long)WD * WH * WW;
    __half* d = dst + (size_t)t * (size_t)wvol;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < wvol;
         i += (long long)gridDim.x * blockDim.x) {
        const int x = (int)(i % WW);
        const int y = (int)((i / WW) % WH);
        const int z = (int)(i / ((long long)WW * WH));
        const long long gz = (long long)oz + z, gy = (long long)oy + y, gx = (long long)ox + x;
        __half v = __float2half_rn(0.0f);
        if (gz < D && gy < H && gx < W) v = volume[((size_t)gz * H + gy) * W + gx];
        d[i] = v;
    }
}

extern "C" __global__ void copy_channels_f16(const __half* __restrict__ src, __half* __restrict__ dst, long long rows,
                                             int Cs, int Cd, int c_off) {
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long step = (long long)gridDim.x * blockDim.x;
    if (((Cs | Cd | c_off) & 7) == 0 && fd_aligned16(src, dst)) {
        const int s8 = Cs / 8, d8 = Cd / 8, o8 = c_off / 8;
        const uint4* s = reinterpret_cast<const uint4*>(src);
        uint4* d = reinterpret_cast<uint4*>(dst);
        for (long long i = first; i < rows * (long long)s8; i += step) {
            const long long r = i / s8;
            d[(size_t)r * d8 + o8 + (int)(i - r * s8)] = s[i];
        }
        return;
    }
    const long long total = rows * (long long)Cs;
    for (long long i = first; i < total; i += step) {
        const long long r = i / Cs;
        const int c = (int)(i - r * Cs);
        dst[(size_t)r * Cd + c_off + c] = src[i];
    }
}
