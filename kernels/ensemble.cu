// Ensemble (and test-time-augmentation) averaging of per-tile outputs, NCDHW f32.
//
// CPU twin: src/pipeline/runner.rs::Ensemble::infer (and View::inverse). Semantics: the accumulator
// starts at 0, every (view, model) output is added in the CPU's order (views outer, models inner)
// with one f32 add per element, then, when count > 1, every element is divided by count (an f32
// division, not a multiplication by 1/count). Each element is owned by one thread and the adds
// follow launch order, so the result is deterministic and equals the CPU's bit for bit given the
// same model outputs.
//
// ensemble_accumulate_f32: acc[i] += src[i].
// ensemble_accumulate_view_f32: acc += inverse_view(src) for a tile batch [N, C, D, H, W]
//   (runner.rs View::inverse): view 0 plain; 1, 2, 3 = flip of axis 0 (z), 1 (y), 2 (x);
//   4, 5, 6 = rot90 by k = 1, 2, 3 in the (y, x) plane (H == W), undone by (4 - k) % 4 turns of
//   numpy's rot90 (one turn: out[y, x] = a[x, H-1-y]). With `vector` != 0 the 3 channels are the
//   offsets (x, y, z): a flip of axis a negates channel 2 - a; rot k maps (ox, oy) to
//   k=1: (-oy, ox), k=2: (-ox, -oy), k=3: (oy, -ox); z unchanged.
// ensemble_divide_f32: acc[i] /= count.
// ensemble_mean_f32: dst[i] = (sum_k srcs[k][i], k ascending) / count (count > 1), in one pass.
// All: any grid / block size (grid-stride loops).
#include <cuda_fp16.h>

extern "C" __global__ void ensemble_accumulate_f32(float* __restrict__ acc, const float* __restrict__ src, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        acc[i] = __fadd_rn(acc[i], src[i]);
}

extern "C" __global__ void ensemble_accumulate_view_f32(float* __restrict__ acc, const float* __restrict__ src,
                                                        int N, int C, int D, int H, int W, int view, int vector) {
    const long long vol = (long long)D * H * W;
    const long long total = (long long)N * C * vol;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i;
        const int x = (int)(r % W);
        r /= W;
        const int y = (int)(r % H);
        r /= H;
        const int z = (int)(r % D);
        r /= D;
        const int c = (int)(r % C);
        const long long n = r / C;
        int sz = z, sy = y, sx = x, sc = c;
        float sign = 1.0f;
        if (view >= 1 && view <= 3) {
            const int a = view - 1;
            if (a == 0) sz = D - 1 - z;
            else if (a == 1) sy = H - 1 - y;
            else sx = W - 1 - x;
            if (vector && c == 2 - a) sign = -1.0f;
        } else if (view >= 4 && view <= 6) {
            const int k = view - 3;
            const int back = (4 - k) & 3;
            if (back == 1) {
                sy = x;
                sx = W - 1 - y;
            } else if (back == 2) {
                sy = H - 1 - y;
                sx = W - 1 - x;
            } else if (back == 3) {
                sy = H - 1 - x;
                sx = y;
            }
            if (vector && c < 2) {
                // new x / y from the rotated (old) x / y channels.
                if (k == 1) {
                    sc = c == 0 ? 1 : 0;
                    sign = c == 0 ? -1.0f : 1.0f;
                } else if (k == 2) {
                    sign = -1.0f;
                } else {
                    sc = c == 0 ? 1 : 0;
                    sign = c == 0 ? 1.0f : -1.0f;
                }
            }
        }
        const float v = src[(((n * C + sc) * D + sz) * H + sy) * W + sx];
        acc[i] = __fadd_rn(acc[i], sign * v);
    }
}

extern "C" __global__ void ensemble_divide_f32(float* __restrict__ acc, long long n, float count) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        acc[i] = __fdiv_rn(acc[i], count);
}

extern "C" __global__ void ensemble_mean_f32(float* __restrict__ dst, const float* const* __restrict__ srcs, int m,
                                             long long n, float count) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int k = 0; k < m; ++k) s = __fadd_rn(s, srcs[k][i]);
        dst[i] = count > 1.0f ? __fdiv_rn(s, count) : s;
    }
}
