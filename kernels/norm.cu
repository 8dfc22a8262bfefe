// GroupNorm / InstanceNorm on NDHWC fp16 activations, with the activation fused on either side.
//
// CPU twin: src/engine/cpu/norm.rs::group_norm (InstanceNorm = instance_norm = one channel per
// group, no affine). Semantics: per (sample, group) mean and BIASED variance over cpg * vol values,
// eps = 1e-5, y = post_act((pre_act(x) - mean) * (rstd * gamma[c]) + beta[c]).
//   SegResNet: pre = none, post = relu (norm -> act).
//   DynUNet:   pre = none, post = leaky relu 0.01 (InstanceNorm, no affine).
//   Head stem: pre = silu, post = none (the head's act -> norm order; conv bias already added).
//
// Layout: x is [N, vol, C] fp16 (NDHWC, vol = D*H*W), C even (channels are read as half2 pairs),
// C / 2 <= NORM_THREADS. Statistics are f32 per thread, then f64; all reductions are in a fixed
// order (no atomics), so results do not depend on scheduling:
//   1. norm_stats_partial   grid (nblk, N), block NORM_THREADS: block b sums voxels
//      [b * vox_per_block, (b + 1) * vox_per_block) into per-channel (sum d, sum d^2),
//      d = pre_act(x) - pivot[c], pivot[c] = pre_act(x[n, voxel 0, c]) (shifted data keeps the f32
//      partial sums well conditioned when |mean| >> std).
//   2. norm_finalize        grid (G, N), block NORM_THREADS (C / G <= NORM_MAX_CPG): per channel of
//      the group, a fixed-shape reduction of the nblk partials in f64 gives the channel's mean
//      and M2 (sum of squared deviations); the group's mean is the mean of the channel means and its
//      M2 = sum_c (M2_c + vol * (mean_c - mean)^2), in channel order (Chan et al.); var = M2 / (cpg *
//      vol), rstd = 1 / sqrt(var + eps) in f64; writes params[n][c] = (mean, scale = rstd * gamma,
//      shift = beta) as f32, like the CPU's (mean as f32, (rstd * gamma) as f32, beta).
//   3. norm_apply           grid (any, N), any block size; grid-stride over the vol * C/2 (< 2^31)
//      pairs of one sample; y may alias x.
// With C % 8 == 0 and x (and y) 16-byte aligned (fd_aligned16: every engine buffer), steps 1 and 3
// read 8 channels at a time as one uint4 (4-byte accesses cannot keep enough bytes in flight to
// stream at an H100-class card's rate): norm_stats_partial's thread then sums 8 channels of every
// (256 / (C / 8))-th voxel of its block, and norm_apply computes the same values as the pair path.
// When the convolution that wrote x already reduced it (conv_tc.cu's statistics epilogue: per
// block of `per` voxels, (sum v, sum (v - block mean)^2)), norm_finalize_tiles replaces steps 1
// and 2: per channel, the mean is the f64 fixed-shape sum of the block sums over vol, and M2 the sum
// of (M2_b + per * (mean_b - mean)^2) (Chan et al.); the group step is norm_finalize's. No pre-act
// (the statistics are of x as stored).
// Both finalize kernels reduce min(8, C / G) channels at a time, each on a team of 8 / that many
// warps (a GroupNorm of 8 groups has only 8 blocks per sample on the device: one channel at a time
// would leave it waiting on 32 reductions in a row at 256 channels); within a team each thread
// sums every (team size)-th partial in order, then a butterfly of shuffles in each warp and the
// warps' totals in warp order: a fixed shape, so the result does not depend on scheduling.
#include <cuda_fp16.h>

#define NORM_THREADS 256
// Most channels per group norm_finalize handles (C / groups).
#define NORM_MAX_CPG 512

// fd_act (activation codes) comes from common.cuh, prepended to every kernel source.

// partial: [N][nblk][C][2] f32 = (sum d, sum d^2) over this block's voxels.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
norm_stats_partial(const __half* __restrict__ x, long long vol, int C, int vox_per_block,
                   int pre_act, float pre_p, float* __restrict__ partial) {
    __shared__ float sh[16][NORM_THREADS];
    const int n = blockIdx.y;
    const int blk = blockIdx.x;
    const int nblk = gridDim.x;
    const int t = threadIdx.x;
    const int C2 = C >> 1;
    if (C2 < 1 || C2 > NORM_THREADS) return;  // unsupported shape: the host checks
    if ((C & 7) == 0 && fd_aligned16(x)) {
        // Thread (lane, c8): channels 8 * c8 .. 8 * c8 + 7 of voxels v0 + lane, v0 + lane + lanes, ...
        const int C8 = C >> 3;
        const int lanes = NORM_THREADS / C8;
        const int c8 = t % C8;
        const int lane = t / C8;
        const uint4* xs = reinterpret_cast<const uint4*>(x + (size_t)n * (size_t)vol * (size_t)C);
        float s[8], q[8], piv[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) s[e] = q[e] = 0.0f;
        if (lane < lanes) {
            const uint4 pv = xs[c8];
            const __half* ph = reinterpret_cast<const __half*>(&pv);
#pragma unroll
            for (int e = 0; e < 8; ++e) piv[e] = fd_act(__half2float(ph[e]), pre_act, pre_p);
            const long long v0 = (long long)blk * vox_per_block;
            long long v1 = v0 + vox_per_block;
            if (v1 > vol) v1 = vol;
#pragma unroll 4
            for (long long v = v0 + lane; v < v1; v += lanes) {
                const uint4 raw = xs[(size_t)v * C8 + c8];
                const __half* h = reinterpret_cast<const __half*>(&raw);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const float d = fd_act(__half2float(h[e]), pre_act, pre_p) - piv[e];
                    s[e] += d;
                    q[e] += d * d;
                }
            }
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            sh[2 * e][t] = s[e];
            sh[2 * e + 1][t] = q[e];
        }
        __syncthreads();
        if (t < C8) {
            // Lanes of these 8 channels, in lane order.
            float* out = partial + (((size_t)n * nblk + blk) * C + 8 * t) * 2;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                float a = 0.0f, b = 0.0f;
                for (int l = 0; l < lanes; ++l) {
                    a += sh[2 * e][l * C8 + t];
                    b += sh[2 * e + 1][l * C8 + t];
                }
                out[2 * e] = a;
                out[2 * e + 1] = b;
            }
        }
        return;
    }
    const int lanes = NORM_THREADS / C2;
    const int c2 = t % C2;
    const int lane = t / C2;
    const __half2* xs = reinterpret_cast<const __half2*>(x + (size_t)n * (size_t)vol * (size_t)C);

    float s0 = 0.0f, s1 = 0.0f, q0 = 0.0f, q1 = 0.0f;
    if (lane < lanes) {
        const float2 pv = __half22float2(xs[c2]);
        const float p0 = fd_act(pv.x, pre_act, pre_p);
        const float p1 = fd_act(pv.y, pre_act, pre_p);
        const long long v0 = (long long)blk * vox_per_block;
        long long v1 = v0 + vox_per_block;
        if (v1 > vol) v1 = vol;
        for (long long v = v0 + lane; v < v1; v += lanes) {
            const float2 f = __half22float2(xs[(size_t)v * C2 + c2]);
            const float d0 = fd_act(f.x, pre_act, pre_p) - p0;
            const float d1 = fd_act(f.y, pre_act, pre_p) - p1;
            s0 += d0;
            q0 += d0 * d0;
            s1 += d1;
            q1 += d1 * d1;
        }
    }
    sh[0][t] = s0;
    sh[1][t] = q0;
    sh[2][t] = s1;
    sh[3][t] = q1;
    __syncthreads();
    if (t < C2) {
        // Lanes of this channel pair, in lane order.
        float a0 = 0.0f, b0 = 0.0f, a1 = 0.0f, b1 = 0.0f;
        for (int l = 0; l < lanes; ++l) {
            const int i = l * C2 + t;
            a0 += sh[0][i];
            b0 += sh[1][i];
            a1 += sh[2][i];
            b1 += sh[3][i];
        }
        float* out = partial + (((size_t)n * nblk + blk) * C + 2 * t) * 2;
        out[0] = a0;
        out[1] = b0;
        out[2] = a1;
        out[3] = b1;
    }
}

// A team of `warps` consecutive warps reducing one channel: this thread is `sub` of `size`.
struct NormTeam {
    int sub, size, warps;
    double* red;  // one slot per warp of the block
};

// The sum of `v` over the team, returned to all of its threads: a butterfly of shuffles in each
// warp (lanes i and i ^ w add the same two values, so every lane ends with the same total), then
// with more than one warp the warps' totals in warp order. Every thread of the block calls it at
// the same point (it holds barriers when a team has more than one warp).
__device__ double norm_team_sum(const NormTeam& t, double v) {
#pragma unroll
    for (int w = 16; w > 0; w >>= 1) v += __shfl_xor_sync(0xffffffffu, v, w);
    if (t.warps == 1) return v;
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) t.red[warp] = v;
    __syncthreads();
    const int first = warp - warp % t.warps;
    double total = 0.0;
    for (int i = 0; i < t.warps; ++i) total += t.red[first + i];
    __syncthreads();  // every team has read its slots before they are reused
    return total;
}

// The group's statistics from its channels' (mean, M2) (equal counts cnt), in channel order: the
// mean of the channel means and M2 = sum(m2_c + cnt * (mean_c - mean)^2) (Chan et al.); writes
// params[n][c] = (mean, rstd * gamma, beta) for the group's channels. Every thread computes the
// same group values; the writes are split between them.
__device__ void norm_group_params(const double* ch_mean, const double* ch_m2, int cpg, double cnt, int g, int n, int C,
                                  const float* __restrict__ gamma, const float* __restrict__ beta, float eps,
                                  float* __restrict__ params) {
    double mean = 0.0;
    for (int k = 0; k < cpg; ++k) mean += ch_mean[k];
    mean /= (double)cpg;
    double m2 = 0.0;
    for (int k = 0; k < cpg; ++k) {
        const double d = ch_mean[k] - mean;
        m2 += ch_m2[k] + cnt * d * d;
    }
    const double var = fmax(m2 / cnt / (double)cpg, 0.0);
    const double rstd = 1.0 / sqrt(var + (double)eps);
    for (int k = threadIdx.x; k < cpg; k += blockDim.x) {
        const int c = g * cpg + k;
        const double gm = gamma ? (double)gamma[c] : 1.0;
        const double bt = beta ? (double)beta[c] : 0.0;
        float* o = params + ((size_t)n * C + c) * 3;
        o[0] = (float)mean;
        o[1] = (float)(rstd * gm);
        o[2] = (float)bt;
    }
}

// One channel's mean and M2 (sum of squared deviations from that mean).
struct NormMoments {
    double mean, m2;
};

// What norm_finalize and norm_finalize_tiles share, for block (g, n) = (group, sample): the
// group's channels min(8, cpg) at a time, channel k0 + j on team j (8 / min(8, cpg) warps);
// every thread calls `channel(team, n, c)` (fixed-shape team reductions; teams past the group's
// last channel compute one of its channels again, for the barriers, and are ignored) and the
// answer of each team's thread 0 is kept; then the group's params.
template <class Channel>
__device__ void norm_finalize_group(int C, int groups, double cnt, const float* __restrict__ gamma,
                                    const float* __restrict__ beta, float eps, float* __restrict__ params,
                                    Channel channel) {
    __shared__ double red[NORM_THREADS / 32];
    __shared__ double ch_mean[NORM_MAX_CPG];
    __shared__ double ch_m2[NORM_MAX_CPG];
    const int g = blockIdx.x;
    const int n = blockIdx.y;
    const int cpg = C / groups;
    if (cpg < 1 || cpg > NORM_MAX_CPG) return;  // unsupported shape: the host checks
    // With 8 warps the 8 % teams leftover warps always make whole teams of their own (2 when
    // teams = 3), so their team sums stay within `red`.
    static_assert(NORM_THREADS == 256, "norm_finalize_group's teams assume 8 warps");
    const int nwarps = NORM_THREADS / 32;
    const int teams = min(cpg, nwarps);
    const int warps = nwarps / teams;
    const int warp = threadIdx.x / 32;
    // The 8 % teams leftover warps repeat the last team's channel on their own and are ignored.
    const int team = min(warp / warps, teams - 1);
    const bool member = warp < teams * warps;
    const NormTeam t{(warp % warps) * 32 + (int)(threadIdx.x % 32), warps * 32, warps, red};
    for (int k0 = 0; k0 < cpg; k0 += teams) {
        const int k = k0 + team;
        const NormMoments m = channel(t, n, g * cpg + (k < cpg ? k : k0));
        if (member && k < cpg && t.sub == 0) {
            ch_mean[k] = m.mean;
            ch_m2[k] = m.m2;
        }
    }
    __syncthreads();
    norm_group_params(ch_mean, ch_m2, cpg, cnt, g, n, C, gamma, beta, eps, params);
}

// params: [N][C][3] f32 = (mean, scale, shift); gamma / beta may be null (no affine).
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
norm_finalize(const __half* __restrict__ x, const float* __restrict__ partial, long long vol, int C,
              int groups, int nblk, int pre_act, float pre_p,
              const float* __restrict__ gamma, const float* __restrict__ beta, float eps,
              float* __restrict__ params) {
    const double cnt = (double)vol;
    const double inv_cnt = 1.0 / cnt;
    norm_finalize_group(C, groups, cnt, gamma, beta, eps, params, [&](const NormTeam& t, int n, int c) {
        double s = 0.0, q = 0.0;
        for (int b = t.sub; b < nblk; b += t.size) {
            const float* p = partial + (((size_t)n * nblk + b) * C + c) * 2;
            s += (double)p[0];
            q += (double)p[1];
        }
        const double S1 = norm_team_sum(t, s);
        const double S2 = norm_team_sum(t, q);
        if (t.sub != 0) return NormMoments{0.0, 0.0};
        // The partials are of d = pre_act(x) - pivot (norm_stats_partial).
        const double pivot = (double)fd_act(__half2float(x[(size_t)n * (size_t)vol * (size_t)C + c]), pre_act, pre_p);
        return NormMoments{pivot + S1 * inv_cnt, fmax(S2 - S1 * S1 * inv_cnt, 0.0)};
    });
}

// norm_finalize from a convolution's per-block statistics: partial [N][nblk][C][2] = (sum v,
// sum (v - mean_b)^2) over `per` voxels each, vol = nblk * per. grid (G, N), block NORM_THREADS.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
norm_finalize_tiles(const float* __restrict__ partial, long long vol, int C, int groups, int nblk, int per,
                    const float* __restrict__ gamma, const float* __restrict__ beta, float eps,
                    float* __restrict__ params) {
    const double cnt = (double)vol;
    const double bcnt = (double)per;
    norm_finalize_group(C, groups, cnt, gamma, beta, eps, params, [&](const NormTeam& t, int n, int c) {
        const float* p = partial + ((size_t)n * nblk * C + c) * 2;
        const size_t step = (size_t)C * 2;
        double s = 0.0;
        for (int b = t.sub; b < nblk; b += t.size) s += (double)p[b * step];
        const double mean = norm_team_sum(t, s) / cnt;
        double q = 0.0;
        for (int b = t.sub; b < nblk; b += t.size) {
            const double d = (double)p[b * step] / bcnt - mean;
            q += (double)p[b * step + 1] + bcnt * d * d;
        }
        return NormMoments{mean, norm_team_sum(t, q)};
    });
}

// y = post_act((pre_act(x) - mean) * scale + shift); y may alias x. grid.y = sample.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
norm_apply(const __half* x, __half* y, long long vol, int C, const float* __restrict__ params,
           int pre_act, float pre_p, int post_act, float post_p) {
    const int n = blockIdx.y;
    const int C2 = C >> 1;
    const int pairs = (int)(vol * C2);  // < 2^31 per sample (host checks)
    const float* prm = params + (size_t)n * C * 3;
    if ((C & 7) == 0 && fd_aligned16(x, y)) {
        const int C8 = C >> 3;
        const int units = pairs / 4;
        const uint4* xs = reinterpret_cast<const uint4*>(x) + (size_t)n * (size_t)units;
        uint4* ys = reinterpret_cast<uint4*>(y) + (size_t)n * (size_t)units;
        for (long long li = (long long)blockIdx.x * blockDim.x + threadIdx.x; li < units; li += (long long)gridDim.x * blockDim.x) {
            const int i = (int)li;
            const float* q = prm + 3 * 8 * (i % C8);
            uint4 v = xs[i];
            __half* h = reinterpret_cast<__half*>(&v);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float a = fd_act(__half2float(h[e]), pre_act, pre_p);
                h[e] = __float2half_rn(fd_act(__fadd_rn(__fmul_rn(a - q[3 * e], q[3 * e + 1]), q[3 * e + 2]), post_act, post_p));
            }
            ys[i] = v;
        }
        return;
    }
    const size_t base = (size_t)n * (size_t)pairs;
    const __half2* xs = reinterpret_cast<const __half2*>(x) + base;
    __half2* ys = reinterpret_cast<__half2*>(y) + base;
    // 64-bit steps: the last step of a 32-bit index could wrap past INT_MAX; the index itself fits.
    for (long long li = (long long)blockIdx.x * blockDim.x + threadIdx.x; li < pairs; li += (long long)gridDim.x * blockDim.x) {
        const int i = (int)li;
        const int c = (i % C2) * 2;
        const float2 f = __half22float2(xs[i]);
        const float a = fd_act(f.x, pre_act, pre_p);
        const float b = fd_act(f.y, pre_act, pre_p);
        const float ya = fd_act(__fadd_rn(__fmul_rn(a - prm[3 * c], prm[3 * c + 1]), prm[3 * c + 2]), post_act, post_p);
        const float yb = fd_act(__fadd_rn(__fmul_rn(b - prm[3 * c + 3], prm[3 * c + 4]), prm[3 * c + 5]), post_act, post_p);
        ys[i] = __floats2half2_rn(ya, yb);
    }
}
