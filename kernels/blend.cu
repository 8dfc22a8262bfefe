// Weighted blending of tile outputs into the whole volume's f32 accumulators (stride-2 grid),
// the final division, and the merge of two accumulator sets.
//
// CPU twin: src/pipeline/blend.rs (Blender::add_tile, Blender::finish). Semantics:
//   a tile whose origin is r (in cells: voxel origin / stride) adds, on every cell it covers inside
//   the grid (the tile is cropped to what fits), `acc[c, cell] += out[c, local] * w[local]` (an f32
//   product, then an f32 add: no fused multiply-add, as numpy) for every score channel and the 3
//   offset channels, and `counter[cell] += w[local]`; finish: `acc / counter` (f32 division) where
//   counter > 0, else 0.
// Determinism: no atomics. One thread owns one cell and walks the batch's tiles in order, so the
// adds on every cell happen in tile order, exactly as the CPU's sequence of add_tile calls.
//
// blend_tiles_f32: grid-stride over the cells of the box [box_lo, box_lo + box_dims) (the union of
//   the batch's tiles, clipped to the grid by the host; cells outside the grid are skipped anyway).
//   acc_s [Cs, G] and acc_o [3, G] f32 with G = GD*GH*GW cells; counter [G];
//   tiles_s [T, Cs, tvol], tiles_o [T, 3, tvol] f32 (tvol = TD*TH*TW), weight [tvol] f32;
//   origins [T, 3] int cells (z, y, x).
// blend_finish_f32: acc[c, i] = counter[i] > 0 ? acc[c, i] / counter[i] : 0, for C channels.
// blend_merge_f32: dst[i] += src[i], for combining accumulators (and counters) filled by different
//   streams or devices; the f32 sum order then differs from one accumulator's, so merged results
//   match the CPU only to rounding.
#include <cuda_fp16.h>

extern "C" __global__ void blend_tiles_f32(float* __restrict__ acc_s, float* __restrict__ acc_o,
                                           float* __restrict__ counter, int Cs, int GD, int GH, int GW,
                                           const float* __restrict__ tiles_s, const float* __restrict__ tiles_o,
                                           const float* __restrict__ weight, const int* __restrict__ origins, int T,
                                           int TD, int TH, int TW, int box_z, int box_y, int box_x, int box_d,
                                           int box_h, int box_w) {
    const long long G = (long long)GD * GH * GW;
    const long long tvol = (long long)TD * TH * TW;
    const long long box = (long long)box_d * box_h * box_w;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < box;
         i += (long long)gridDim.x * blockDim.x) {
        const int bx = (int)(i % box_w);
        const int by = (int)((i / box_w) % box_h);
        const int bz = (int)(i / ((long long)box_w * box_h));
        const int z = box_z + bz, y = box_y + by, x = box_x + bx;
        if (z >= GD || y >= GH || x >= GW) continue;
        const long long cell = ((long long)z * GH + y) * GW + x;
        for (int t = 0; t < T; ++t) {
            const int lz = z - origins[3 * t], ly = y - origins[3 * t + 1], lx = x - origins[3 * t + 2];
            if (lz < 0 || ly < 0 || lx < 0 || lz >= TD || ly >= TH || lx >= TW) continue;
            const long long local = ((long long)lz * TH + ly) * TW + lx;
            const float w = weight[local];
            counter[cell] = __fadd_rn(counter[cell], w);
            const float* ts = tiles_s + (size_t)t * Cs * tvol + local;
            for (int c = 0; c < Cs; ++c)
                acc_s[c * G + cell] = __fadd_rn(acc_s[c * G + cell], __fmul_rn(ts[c * tvol], w));
            const float* to = tiles_o + (size_t)t * 3 * tvol + local;
            for (int c = 0; c < 3; ++c)
                acc_o[c * G + cell] = __fadd_rn(acc_o[c * G + cell], __fmul_rn(to[c * tvol], w));
        }
    }
}

extern "C" __global__ void blend_finish_f32(float* __restrict__ acc, const float* __restrict__ counter, int C,
                                            long long G) {
    const long long total = (long long)C * G;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const float c = counter[i % G];
        acc[i] = c > 0.0f ? __fdiv_rn(acc[i], c) : 0.0f;
    }
}

extern "C" __global__ void blend_merge_f32(float* __restrict__ dst, const float* __restrict__ src, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dst[i] = __fadd_rn(dst[i], src[i]);
}
