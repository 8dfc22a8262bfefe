// Host stand-in for CUDA's <mma.h> (testing only; see cuda_fp16.h beside it): the WMMA API with
// each lane holding the whole 16x16 matrix, so any kernel that uses fragments only through the API
// (load, fill, mma, store, and element-wise loops over num_elements) computes what the GPU
// computes. Every call is warp-collective here as on the GPU: all 32 lanes must reach it with the
// same pointer and stride, or the launch fails. Products are exact in f32 (fp16 x fp16) and summed
// in k order; the tensor cores' own summation order may differ in the last bits.
#pragma once
#include <cuda_fp16.h>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
    static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
    static constexpr int num_elements = rows * cols;
    T x[num_elements];  // row-major rows x cols, the same in every lane
};

inline float fdh_to_float(float v) { return v; }
inline float fdh_to_float(__half v) { return __half2float(v); }
inline void fdh_from_float(float& d, float v) { d = v; }
inline void fdh_from_float(__half& d, float v) { d = __float2half_rn(v); }

template <class Use, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
    fdh::collective(&f, "fill_fragment", false);
    for (int i = 0; i < f.num_elements; ++i) fdh_from_float(f.x[i], v);
}

// Element (r, c) of a matrix stored row- or column-major with leading dimension ldm.
template <class P>
inline float fdh_at(const P* p, int r, int c, unsigned ldm, bool row_major) {
    return fdh_to_float(row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r]);
}

template <class Use, int M, int N, int K, class T, class L, class P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
    static_assert(!std::is_same<L, void>::value, "load_matrix_sync of an accumulator needs a layout");
    fdh::collective(p, "load_matrix_sync", true);
    fdh::check_wmma_pointer(p, ldm, sizeof(P));
    using F = fragment<Use, M, N, K, T, L>;
    for (int r = 0; r < F::rows; ++r)
        for (int c = 0; c < F::cols; ++c) fdh_from_float(f.x[r * F::cols + c], fdh_at(p, r, c, ldm, std::is_same<L, row_major>::value));
}

template <int M, int N, int K, class T, class P>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const P* p, unsigned ldm, layout_t l) {
    fdh::collective(p, "load_matrix_sync", true);
    fdh::check_wmma_pointer(p, ldm, sizeof(P));
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c) fdh_from_float(f.x[r * N + c], fdh_at(p, r, c, ldm, l == mem_row_major));
}

template <int M, int N, int K, class T, class P>
inline void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t l) {
    fdh::collective(p, "store_matrix_sync", true);
    fdh::check_wmma_pointer(p, ldm, sizeof(P));
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c) {
            P& d = l == mem_row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
            fdh_from_float(d, fdh_to_float(f.x[r * N + c]));
        }
}

template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC, void>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC, void>& c) {
    fdh::collective(&d, "mma_sync", false);
    // Every lane computes the whole product (32 times the work): converted once, then a loop the
    // compiler vectorises, so that the host tests stay quick.
    float fa[M * K], fb[K * N], r[M * N];
    for (int i = 0; i < M * K; ++i) fa[i] = fdh_to_float(a.x[i]);
    for (int i = 0; i < K * N; ++i) fb[i] = fdh_to_float(b.x[i]);
    for (int i = 0; i < M * N; ++i) r[i] = fdh_to_float(c.x[i]);
    for (int i = 0; i < M; ++i)
        for (int q = 0; q < K; ++q) {
            const float av = fa[i * K + q];
            for (int j = 0; j < N; ++j) r[i * N + j] += av * fb[q * N + j];
        }
    for (int i = 0; i < M * N; ++i) fdh_from_float(d.x[i], r[i]);
}

}  // namespace wmma
}  // namespace nvcuda
