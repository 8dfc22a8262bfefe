// CenterNet peak extraction: 3x3x3 max-pool NMS + per-class threshold + deterministic compaction
// of the candidates, so only candidates go back to the host (which sorts them, keeps the top K and
// runs the greedy distance NMS).
//
// CPU twin: src/pipeline/detect.rs (peaks, and the candidate filter of detect_class). Semantics,
// per class c and cell i of scores [C, D, H, W] f32:
//   m = max of s over the in-bounds 3x3x3 neighbourhood of i (out-of-bounds cells are ignored,
//       i.e. padding with -inf); NaN propagates through the max as in PyTorch / detect.rs::pmax;
//   peak = s if s == m else s * 0 (0, or -0 for negative s, NaN for NaN);
//   candidate when peak >= threshold[c] (f32 comparison; NaN never passes). A non-peak is a
//   candidate only when threshold[c] <= 0, exactly as on the CPU.
// Candidates are written in ascending flat cell index per class: out_index[c * capacity + k],
// out_score[c * capacity + k] = (i, peak), k = rank among the class's candidates; those with
// k >= capacity are counted but not written (totals[c] tells the host to retry with more room).
//
// Three launches find the candidates, with integer counts only (deterministic); a fourth gathers
// their offsets:
//   nms_count  grid (nblk, C), block NMS_THREADS: block b covers cells [b * NMS_CELLS,
//              (b + 1) * NMS_CELLS) of class blockIdx.y; writes block_counts[c * nblk + b].
//   nms_scan   grid (C), block NMS_SCAN_THREADS: exclusive scan of the class's block counts in
//              block order -> block_offsets[c * nblk + b], totals[c].
//   nms_write  grid (nblk, C), block NMS_THREADS: recomputes the flags and writes each candidate
//              at block_offsets + its rank within the block (rounds of NMS_THREADS cells, ranks from
//              warp ballots, warps in order).
// nms_gather_offsets, grid (ceil(capacity / 256), C), block 256: the offsets [3, D, H, W] at each
// written candidate, out_offsets[(c * capacity + k) * 3 + a] = offsets[a * cells + out_index[..]]
// for k < min(totals[c], capacity), so the host reads back candidates only.
#include <cuda_fp16.h>

#define NMS_THREADS 256
#define NMS_ITEMS 8
#define NMS_CELLS (NMS_THREADS * NMS_ITEMS)
#define NMS_SCAN_THREADS 1024

// detect.rs::pmax: NaN-propagating max (a NaN in a stays, a NaN in b wins over a number).
__device__ __forceinline__ float pmax(float a, float b) {
    if (a != a) return a;
    return (b <= a) ? a : b;
}

__device__ __forceinline__ bool nms_candidate(const float* __restrict__ s, int D, int H, int W, unsigned i,
                                              float thr, float& peak) {
    const int x = (int)(i % (unsigned)W);
    const int y = (int)((i / (unsigned)W) % (unsigned)H);
    const int z = (int)(i / ((unsigned)W * (unsigned)H));
    const float v = s[i];
    float m = v;
    for (int dz = -1; dz <= 1; ++dz) {
        const int zz = z + dz;
        if (zz < 0 || zz >= D) continue;
        for (int dy = -1; dy <= 1; ++dy) {
            const int yy = y + dy;
            if (yy < 0 || yy >= H) continue;
            const float* row = s + ((size_t)zz * H + yy) * W;
#pragma unroll
            for (int dx = -1; dx <= 1; ++dx) {
                const int xx = x + dx;
                if (xx < 0 || xx >= W) continue;
                m = pmax(m, row[xx]);
            }
        }
    }
    peak = (v == m) ? v : v * 0.0f;
    return peak >= thr;
}

extern "C" __global__ void __launch_bounds__(NMS_THREADS)
nms_count(const float* __restrict__ scores, int D, int H, int W, const float* __restrict__ thresholds,
          unsigned* __restrict__ block_counts) {
    const int c = blockIdx.y;
    const unsigned cells = (unsigned)D * H * W;
    const float* s = scores + (size_t)c * cells;
    const float thr = thresholds[c];
    const unsigned start = blockIdx.x * (unsigned)NMS_CELLS;
    int count = 0;
    for (int r = 0; r < NMS_ITEMS; ++r) {
        const unsigned i = start + r * NMS_THREADS + threadIdx.x;
        float peak;
        const bool keep = i < cells && nms_candidate(s, D, H, W, i, thr, peak);
        count += __syncthreads_count(keep);
    }
    if (threadIdx.x == 0) block_counts[(size_t)c * gridDim.x + blockIdx.x] = (unsigned)count;
}

extern "C" __global__ void __launch_bounds__(NMS_SCAN_THREADS)
nms_scan(const unsigned* __restrict__ block_counts, unsigned* __restrict__ block_offsets,
         unsigned* __restrict__ totals, int nblk) {
    __shared__ unsigned warp_sums[NMS_SCAN_THREADS / 32];
    __shared__ unsigned carry;
    const int c = blockIdx.x;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const unsigned* in = block_counts + (size_t)c * nblk;
    unsigned* out = block_offsets + (size_t)c * nblk;
    if (t == 0) carry = 0;
    __syncthreads();
    for (int base = 0; base < nblk; base += NMS_SCAN_THREADS) {
        const int i = base + t;
        const unsigned v = i < nblk ? in[i] : 0u;
        // Inclusive warp scan.
        unsigned inc = v;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned u = __shfl_up_sync(0xffffffffu, inc, o);
            if (lane >= o) inc += u;
        }
        if (lane == 31) warp_sums[warp] = inc;
        __syncthreads();
        unsigned before = 0, round = 0;
        for (int k = 0; k < NMS_SCAN_THREADS / 32; ++k) {
            if (k < warp) before += warp_sums[k];
            round += warp_sums[k];
        }
        const unsigned cbase = carry;
        if (i < nblk) out[i] = cbase + before + inc - v;
        __syncthreads();
        if (t == 0) carry = cbase + round;
        __syncthreads();
    }
    if (t == 0) totals[c] = carry;
}

extern "C" __global__ void __launch_bounds__(NMS_THREADS)
nms_write(const float* __restrict__ scores, int D, int H, int W, const float* __restrict__ thresholds,
          const unsigned* __restrict__ block_offsets, unsigned capacity, unsigned* __restrict__ out_index,
          float* __restrict__ out_score) {
    __shared__ unsigned warp_counts[NMS_THREADS / 32];
    const int c = blockIdx.y;
    const unsigned cells = (unsigned)D * H * W;
    const float* s = scores + (size_t)c * cells;
    const float thr = thresholds[c];
    const unsigned start = blockIdx.x * (unsigned)NMS_CELLS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned pos = block_offsets[(size_t)c * gridDim.x + blockIdx.x];
    for (int r = 0; r < NMS_ITEMS; ++r) {
        const unsigned i = start + r * NMS_THREADS + threadIdx.x;
        float peak = 0.0f;
        const bool keep = i < cells && nms_candidate(s, D, H, W, i, thr, peak);
        const unsigned ballot = __ballot_sync(0xffffffffu, keep);
        if (lane == 0) warp_counts[warp] = __popc(ballot);
        __syncthreads();
        unsigned before = 0, round = 0;
#pragma unroll
        for (int k = 0; k < NMS_THREADS / 32; ++k) {
            if (k < warp) before += warp_counts[k];
            round += warp_counts[k];
        }
        if (keep) {
            const unsigned k = pos + before + __popc(ballot & ((1u << lane) - 1u));
            if (k < capacity) {
                out_index[(size_t)c * capacity + k] = i;
                out_score[(size_t)c * capacity + k] = peak;
            }
        }
        pos += round;
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(256)
nms_gather_offsets(const float* __restrict__ offsets, unsigned cells, const unsigned* __restrict__ totals,
                   const unsigned* __restrict__ out_index, unsigned capacity, float* __restrict__ out_offsets) {
    const int c = blockIdx.y;
    const unsigned k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= capacity || k >= totals[c]) return;
    const size_t slot = (size_t)c * capacity + k;
    const unsigned i = out_index[slot];
    float* o = out_offsets + slot * 3;
    o[0] = offsets[i];
    o[1] = offsets[(size_t)cells + i];
    o[2] = offsets[2 * (size_t)cells + i];
}
