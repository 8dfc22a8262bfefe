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
