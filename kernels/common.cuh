// Prepended to every kernels/*.cu source before NVRTC compiles it (src/engine/cuda/kernels.rs):
// device helpers shared by several op families.
#include <cuda_fp16.h>

// Activation codes, as src/model/graph.rs::Act: 0 none, 1 relu, 2 leaky relu(p), 3 silu,
// 4 sigmoid, 5 tanh(x) * p.
__device__ __forceinline__ float fd_act(float x, int act, float p) {
    switch (act) {
        case 1: return fmaxf(x, 0.0f);
        case 2: return x >= 0.0f ? x : x * p;
        case 3: return x / (1.0f + expf(-x));
        case 4: return 1.0f / (1.0f + expf(-x));
        case 5: return tanhf(x) * p;
        default: return x;
    }
}

// Whether every pointer given is 16-byte aligned, so that 8 halves at a time may be loaded or
// stored as one uint4. The elementwise kernels take 8 halves per thread and step where they can:
// with one 4-byte access in flight per thread, even a full card holds about 1 MB in flight, less
// than an H100-class memory needs to stream at its rate (not yet timed on a GPU).
__device__ __forceinline__ bool fd_aligned16(const void* a, const void* b = nullptr, const void* c = nullptr) {
    return (((size_t)a | (size_t)b | (size_t)c) & 15) == 0;
}

// Asynchronous global -> shared copies of 16 bytes (cp.async, sm_80+): the first src_bytes (0 or 16) from
// src, the rest zero (src_bytes 0: a zero fill, src unread). commit closes the thread's group of
// copies; wait<N> blocks until all but its N most recent groups have landed (its own copies only:
// a __syncthreads after it makes every thread's visible). Below sm_80 the copy is synchronous.
// The host build (kernels/host) defines these itself, landing each copy at its wait in blocks of
// even index and at its issue in odd ones (the two ends of a GPU's window).
#ifndef FDH_HOST_KERNELS
__device__ __forceinline__ void fd_cp_async16(void* dst, const void* src, int src_bytes) {
#if __CUDA_ARCH__ >= 800
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes) : "memory");
#else
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (src_bytes >= 16) v = *reinterpret_cast<const uint4*>(src);
    *reinterpret_cast<uint4*>(dst) = v;
#endif
}
__device__ __forceinline__ void fd_cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void fd_cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#endif
