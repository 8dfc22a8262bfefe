// Host execution of kernels/*.cu (testing only): lets the system C++ compiler build the kernels'
// own source into a shared library that runs them on the CPU, so that their index arithmetic,
// shared-memory staging, barriers, warp exchanges and reduction orders are tested against the CPU
// twins without a GPU (src/engine/cuda/host_kernels.rs builds and loads it).
//
// It is written in place of <cuda_fp16.h>, which kernels/common.cuh includes. What it models:
// - every thread of a block is a fiber with its own stack (a register-only switch on x86-64,
//   ucontext elsewhere); a block runs one warp at a time, its lanes round-robin, until every lane
//   of it reaches a barrier or exits, then the next warp (ascending in even blocks, descending in
//   odd ones): a missing __syncthreads shows up as a wrong result rather than being hidden by
//   lock-step execution; blocks run one after another;
// - __shared__ variables are function statics (one copy, shared by the block's fibers);
// - warp operations (__shfl_*_sync, __ballot_sync, __syncwarp) wait for every lane of their mask;
//   a lane that exits or waits elsewhere instead is reported as a deadlock;
// - fp16 storage rounds to nearest even; float arithmetic is IEEE without FMA contraction.
// What it does not model: the GPU's FMA contraction and fast-math intrinsics' last bits, memory
// ordering between blocks, timing. Launches are serialised by one process-wide lock.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <csignal>
#include <ucontext.h>
#include <unistd.h>

// Marks the host build: common.cuh takes the asynchronous-copy helpers from here.
#define FDH_HOST_KERNELS 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

using std::max;
using std::min;

// ---------------------------------------------------------------- vector types

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---------------------------------------------------------------- fp16

inline uint16_t fdh_f2h_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
    if (ax < 0x38800000u) {                         // below 2^-14: a subnormal (or zero) half
        float v;
        std::memcpy(&v, &ax, 4);
        return sign | (uint16_t)std::nearbyint(v * 16777216.0f);  // exact scaling, ties to even
    }
    ax += 0xfffu + ((ax >> 13) & 1u);  // round to nearest even on the 13 dropped bits
    return sign | (uint16_t)((ax - 0x38000000u) >> 13);
}

inline float fdh_h2f_bits(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t bits;
    if (e == 0) {
        const float v = (float)m * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    bits = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

struct __half {
    uint16_t bits_;
};
struct alignas(4) __half2 {
    __half x, y;
};
inline __half __float2half_rn(float f) { return __half{fdh_f2h_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return fdh_h2f_bits(h.bits_); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }

// ---------------------------------------------------------------- float intrinsics

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline void __threadfence() {}
inline void __threadfence_block() {}
#define warpSize 32

// Atomics: launches are serialised and fibers switch only at barriers, so plain updates are atomic.
inline int atomicAdd(int* p, int v) { int o = *p; *p = o + v; return o; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned o = *p; *p = o + v; return o; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { auto o = *p; *p = o + v; return o; }
inline int atomicMax(int* p, int v) { int o = *p; *p = o > v ? o : v; return o; }
inline unsigned atomicMax(unsigned* p, unsigned v) { unsigned o = *p; *p = o > v ? o : v; return o; }

// ---------------------------------------------------------------- fibers

namespace fdh {

#if defined(__x86_64__)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *save and resumes the stack at `load` (made by this function or by
// fiber_stack). Unlike swapcontext it makes no system call (no signal mask), which matters when a
// conv kernel switches fibers millions of times. Local to each translation unit.
extern "C" void fdh_switch(void** save, void* load) __attribute__((visibility("hidden")));
asm(R"(
    .text
    .p2align 4
    .type fdh_switch,@function
fdh_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fdh_switch,.-fdh_switch
)");

// A fresh stack whose first switch "returns" into `start` with the current MXCSR / x87 control.
inline void* fiber_stack(char* base, size_t size, void (*start)()) {
    uintptr_t top = ((uintptr_t)base + size) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)(top - 72);  // the return slot at sp + 56 is 16-byte aligned
    uint32_t mx;
    uint16_t cw;
    asm volatile("stmxcsr %0" : "=m"(mx));
    asm volatile("fnstcw %0" : "=m"(cw));
    std::memset(sp, 0, 72);
    std::memcpy(sp, &mx, 4);
    std::memcpy((char*)sp + 4, &cw, 2);
    sp[7] = (uint64_t)(uintptr_t)start;
    return sp;
}
struct Context {
    void* sp = nullptr;
};
inline void switch_to(Context& save, Context& load) { fdh_switch(&save.sp, load.sp); }
#else
struct Context {
    ucontext_t uc;
};
inline void switch_to(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
#endif

enum class Wait { Ready, Block, Warp, Done };

// One 16-byte asynchronous copy (fd_cp_async16) not yet landed.
struct AsyncCopy {
    void* dst;
    const void* src;
    int src_bytes;
};

struct Fiber {
    Context ctx;
    uint3 tid;
    // Asynchronous copies not landed yet (fd_cp_async16): the open group, then the committed
    // groups, oldest first.
    std::vector<AsyncCopy> copies_open;
    std::vector<std::vector<AsyncCopy>> copy_groups;
    Wait wait = Wait::Ready;
    unsigned mask = 0;      // warp operation: lanes taking part
    int op = 0;             // warp operation kind (so lanes in different operations never pair)
    uint64_t value = 0;     // what this lane contributes
    int src_lane = 0;       // shuffles: the lane to read from (or its own on no source)
    uint64_t result = 0;    // what the barrier hands back
};

struct Block {
    std::vector<Fiber> fibers;
    Context sched;
    int current = 0;
    const std::function<void()>* body = nullptr;
    std::string error;
};

inline thread_local Block* g_block = nullptr;
inline thread_local uint3 g_blockIdx{0, 0, 0};
inline thread_local dim3 g_blockDim;
inline thread_local dim3 g_gridDim;
inline thread_local std::vector<std::vector<char>> g_stacks;
constexpr size_t kStack = 256 * 1024;

inline Fiber& me() { return g_block->fibers[g_block->current]; }
inline int lane() { return g_block->current % 32; }

inline void park(Wait w) {
    Fiber& f = me();
    f.wait = w;
    switch_to(f.ctx, g_block->sched);
}

inline void entry() {
    (*g_block->body)();
    me().wait = Wait::Done;
    switch_to(me().ctx, g_block->sched);  // never resumed
}

inline uint64_t warp_exchange(int op, unsigned mask, uint64_t value, int src_lane) {
    Fiber& f = me();
    f.op = op;
    f.mask = mask;
    f.value = value;
    f.src_lane = src_lane;
    park(Wait::Warp);
    return me().result;
}

enum Op { OpSyncwarp = 1, OpShfl, OpBallot, OpAny, OpAll, OpCollective };

inline void fail(const std::string& what) {
    if (g_block->error.empty()) g_block->error = what;
}

// A warp-collective call (the WMMA API): every lane of the warp must arrive; with `same`, all with
// the same pointer (a per-lane pointer is a different operation on the GPU).
inline void collective(const void* p, const char* what, bool same) {
    const uint64_t mine = (uint64_t)(uintptr_t)p;
    const uint64_t first = warp_exchange(OpCollective, 0xffffffffu, mine, 0);
    if (same && first != mine) fail(std::string(what) + ": lanes of one warp passed different pointers");
}

inline void check_wmma_pointer(const void* p, unsigned ldm, size_t elem) {
    if ((uintptr_t)p % 32 != 0) fail("WMMA pointer not 32-byte aligned");
    if ((ldm * elem) % 16 != 0) fail("WMMA leading dimension not a multiple of 16 bytes");
}

// Releases a warp's lanes waiting in the same operation once every lane of the mask is there.
inline bool try_release_warp(Block& b, int warp0, int nlanes) {
    for (int l = 0; l < nlanes; ++l) {
        Fiber& f = b.fibers[warp0 + l];
        if (f.wait != Wait::Warp) continue;
        bool all = true;
        for (int k = 0; k < 32; ++k) {
            if (!(f.mask >> k & 1u)) continue;
            if (k >= nlanes) { all = false; break; }
            const Fiber& g = b.fibers[warp0 + k];
            if (g.wait != Wait::Warp || g.op != f.op || g.mask != f.mask) { all = false; break; }
        }
        if (!all) continue;
        uint64_t ballot = 0;
        for (int k = 0; k < 32; ++k)
            if ((f.mask >> k & 1u) && b.fibers[warp0 + k].value) ballot |= 1ull << k;
        const int op = f.op;
        const unsigned mask = f.mask;
        for (int k = 0; k < 32; ++k) {
            if (!(mask >> k & 1u)) continue;
            Fiber& g = b.fibers[warp0 + k];
            switch (op) {
                case OpShfl:
                case OpCollective: {
                    const int s = g.src_lane;
                    if (s >= 0 && s < nlanes && (mask >> s & 1u)) g.result = b.fibers[warp0 + s].value;
                    else g.result = g.value;
                    break;
                }
                case OpBallot: g.result = ballot; break;
                case OpAny: g.result = ballot != 0; break;
                case OpAll: g.result = ballot == (uint64_t)mask; break;
                default: g.result = 0;
            }
            g.wait = Wait::Ready;
        }
        return true;
    }
    return false;
}

inline std::string run_block(Block& b, int threads) {
    b.fibers.assign(threads, Fiber{});
    while ((int)g_stacks.size() < threads) g_stacks.emplace_back(kStack);
    for (int t = 0; t < threads; ++t) {
        Fiber& f = b.fibers[t];
        f.tid = uint3{t % g_blockDim.x, (t / g_blockDim.x) % g_blockDim.y, t / (g_blockDim.x * g_blockDim.y)};
#if defined(__x86_64__)
        f.ctx.sp = fiber_stack(g_stacks[t].data(), kStack, entry);
#else
        getcontext(&f.ctx.uc);
        f.ctx.uc.uc_stack.ss_sp = g_stacks[t].data();
        f.ctx.uc.uc_stack.ss_size = kStack;
        f.ctx.uc.uc_link = &b.sched.uc;
        makecontext(&f.ctx.uc, (void (*)())entry, 0);
#endif
    }
    for (;;) {
        // One warp at a time, as far as it goes (its lanes round-robin, its warp operations
        // released as they complete) before the next warp starts: the most skew between warps,
        // so a barrier missing between them shows even where warp operations would otherwise
        // keep the warps in step. Even blocks take the warps in ascending order, odd blocks in
        // descending order, so a read of a lower warp's writes is caught as well as the reverse.
        bool ran = false, released = false;
        const int nwarps = (threads + 31) / 32;
        const bool descending = (g_blockIdx.x + g_blockIdx.y + g_blockIdx.z) % 2 == 1;
        for (int wi = 0; wi < nwarps; ++wi) {
            const int w0 = 32 * (descending ? nwarps - 1 - wi : wi);
            const int nlanes = std::min(32, threads - w0);
            for (;;) {
                bool r = false;
                for (int t = w0; t < w0 + nlanes; ++t) {
                    if (b.fibers[t].wait != Wait::Ready) continue;
                    b.current = t;
                    switch_to(b.sched, b.fibers[t].ctx);
                    r = true;
                }
                if (!b.error.empty()) return b.error;
                const bool rel = try_release_warp(b, w0, nlanes);
                ran |= r;
                released |= rel;
                if (!r && !rel) break;
            }
        }
        int done = 0, at_block = 0;
        for (const Fiber& f : b.fibers) {
            done += f.wait == Wait::Done;
            at_block += f.wait == Wait::Block;
        }
        if (!b.error.empty()) return b.error;
        if (done == threads) return "";
        if (at_block > 0 && at_block + done == threads) {
            if (done > 0) return "__syncthreads reached by " + std::to_string(at_block) + " threads after " + std::to_string(done) + " had exited";
            uint64_t count = 0;
            for (const Fiber& f : b.fibers) count += f.value != 0;
            for (Fiber& f : b.fibers) {
                f.result = count;
                f.wait = Wait::Ready;
            }
            continue;
        }
        if (!ran && !released) {
            char msg[160];
            std::snprintf(msg, sizeof msg, "deadlock: %d threads at __syncthreads, %d exited, %d waiting in warp operations", at_block, done,
                          threads - at_block - done);
            return msg;
        }
    }
}

inline std::mutex& launch_lock() {
    static std::mutex m;
    return m;
}

inline const char* g_kernel = "?";

// A wild access kills the process (as it would the GPU context); say which kernel and thread first.
inline void on_fault(int sig) {
    char msg[256];
    const uint3 t = g_block ? me().tid : uint3{0, 0, 0};
    const int n = std::snprintf(msg, sizeof msg, "\nfatal: kernel %s (run on the host) made an invalid memory access in block (%u, %u, %u), thread (%u, %u, %u)\n",
                                g_kernel, g_blockIdx.x, g_blockIdx.y, g_blockIdx.z, t.x, t.y, t.z);
    if (n > 0) (void)!write(2, msg, (size_t)n);
    std::signal(sig, SIG_DFL);  // returning re-runs the access, which now ends the process
}

// Runs `body` as kernel `name` over `grid` x `block`; returns "" or what went wrong.
inline std::string launch(const char* name, dim3 grid, dim3 block, const std::function<void()>& body) {
    std::lock_guard<std::mutex> guard(launch_lock());
    const int threads = (int)(block.x * block.y * block.z);
    if (threads <= 0 || threads > 1024) return "invalid block size";
    g_kernel = name;
    struct sigaction fault {}, saved_segv {}, saved_bus {};
    fault.sa_handler = on_fault;
    sigaction(SIGSEGV, &fault, &saved_segv);
    sigaction(SIGBUS, &fault, &saved_bus);
    Block b;
    b.body = &body;
    Block* saved = g_block;
    g_block = &b;
    g_blockDim = block;
    g_gridDim = grid;
    std::string err;
    // Blocks in a scrambled order that changes from launch to launch (a GPU runs them in any
    // order, at once): a kernel whose block reads what another block of the same launch writes
    // gets a different result here from one launch to the next, instead of the one that
    // ascending order would always give. Block k of the order is (k * step + start) mod n, step
    // prime to n.
    static unsigned long long launches = 0;
    const unsigned long long n = (unsigned long long)grid.x * grid.y * grid.z, c = launches++;
    unsigned long long step = 1;
    for (unsigned long long p : {7919ull, 104729ull, 1299709ull})
        if (n % p != 0) {
            step = p % (n ? n : 1);
            break;
        }
    if (step == 0) step = 1;
    const unsigned long long start = n ? (c * 2654435761ull) % n : 0;
    for (unsigned long long k = 0; k < n && err.empty(); ++k) {
        const unsigned long long i = (k * step + start) % n;
        const unsigned x = (unsigned)(i % grid.x), y = (unsigned)((i / grid.x) % grid.y), z = (unsigned)(i / ((unsigned long long)grid.x * grid.y));
        g_blockIdx = uint3{x, y, z};
        err = run_block(b, threads);
        if (!err.empty()) err = "block (" + std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) + "): " + err;
    }
    g_block = saved;
    sigaction(SIGSEGV, &saved_segv, nullptr);
    sigaction(SIGBUS, &saved_bus, nullptr);
    return err;
}

template <class... A, size_t... I>
void invoke(void (*k)(A...), void** params, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(params[I])...);
}

// The exported entry point of one kernel: dims = grid x, y, z, block x, y, z.
template <class... A>
int launch_exported(const char* name, void (*k)(A...), const unsigned* dims, void** params, char* err, size_t errlen) {
    const std::function<void()> body = [&] { invoke(k, params, std::index_sequence_for<A...>{}); };
    const std::string e = launch(name, dim3{dims[0], dims[1], dims[2]}, dim3{dims[3], dims[4], dims[5]}, body);
    if (e.empty()) return 0;
    std::snprintf(err, errlen, "%s", e.c_str());
    return 1;
}

}  // namespace fdh

// Asynchronous global -> shared copies (cp.async on sm_80+): 16 bytes, the first src_bytes of
// them from src and the rest zero; commit closes a group; wait<N> lands every group but the N
// most recent. A GPU may land a copy any time between its issue and its wait: blocks of even
// index land each copy at its wait (shared memory read too early shows old bytes), blocks of odd
// index at its issue (a copy into a buffer other warps still read shows up in their reads).
namespace fdh {
inline void land(const AsyncCopy& c) {
    unsigned char* d = static_cast<unsigned char*>(c.dst);
    std::memset(d, 0, 16);
    if (c.src_bytes > 0) std::memcpy(d, c.src, (size_t)std::min(c.src_bytes, 16));
}
}  // namespace fdh
inline void fd_cp_async16(void* dst, const void* src, int src_bytes) {
    // cp.async.cg moves 16 aligned bytes: a misaligned address faults on a GPU.
    if ((uintptr_t)dst % 16 != 0 || (uintptr_t)src % 16 != 0) fdh::fail("cp.async: address not 16-byte aligned");
    const fdh::AsyncCopy c{dst, src, src_bytes};
    if ((fdh::g_blockIdx.x + fdh::g_blockIdx.y + fdh::g_blockIdx.z) % 2 == 1) fdh::land(c);
    else fdh::me().copies_open.push_back(c);
}
inline void fd_cp_async_commit() {
    fdh::Fiber& f = fdh::me();
    f.copy_groups.push_back(std::move(f.copies_open));
    f.copies_open.clear();
}
template <int N>
inline void fd_cp_async_wait() {
    fdh::Fiber& f = fdh::me();
    while (f.copy_groups.size() > (size_t)N) {
        for (const fdh::AsyncCopy& c : f.copy_groups.front()) fdh::land(c);
        f.copy_groups.erase(f.copy_groups.begin());
    }
}

#define threadIdx (fdh::me().tid)
#define blockIdx (fdh::g_blockIdx)
#define blockDim (fdh::g_blockDim)
#define gridDim (fdh::g_gridDim)

// Ends the kernel with an error (a GPU aborts the launch): the thread stops here.
inline void __trap() {
    fdh::fail("__trap() called");
    fdh::me().wait = fdh::Wait::Done;
    fdh::switch_to(fdh::me().ctx, fdh::g_block->sched);  // never resumed
}

// Misaligned accesses: a GPU faults on a vector load or store (uint4, float4, __half2...) whose
// address is not a multiple of its size; x86 does not. The kernels are built for the host with
// -fsanitize=alignment (src/engine/cuda/host_kernels.rs), whose checks call this handler (weak:
// one definition per library, whichever translation units include this header), and the launch
// fails naming the access, as it would on the device.
struct FdhUbsanLocation {
    const char* file;
    unsigned line, column;
};
struct FdhUbsanTypeMismatch {
    FdhUbsanLocation loc;
    const void* type;
    unsigned char log_alignment, check_kind;  // layout of the sanitizer's record; kind unused
};
extern "C" __attribute__((weak)) void __ubsan_handle_type_mismatch_v1(FdhUbsanTypeMismatch* d, uintptr_t p) {
    const char* f = d->loc.file ? d->loc.file : "?";
    for (const char* c = f; *c; ++c)
        if (*c == '/') f = c + 1;
    char msg[256];
    // The translation unit is common.cuh followed by the kernel file (SOURCES in kernels.rs).
    std::snprintf(msg, sizeof msg, "misaligned access at 0x%llx: needs %u-byte alignment (%s line %u)", (unsigned long long)p,
                  1u << d->log_alignment, f, d->loc.line);
    if (fdh::g_block) {
        fdh::fail(msg);
    } else {
        std::fprintf(stderr, "%s\n", msg);
        std::abort();
    }
}
extern "C" __attribute__((weak)) void __ubsan_handle_type_mismatch_v1_abort(FdhUbsanTypeMismatch* d, uintptr_t p) {
    __ubsan_handle_type_mismatch_v1(d, p);
}

inline void __syncthreads() {
    fdh::me().value = 0;
    fdh::park(fdh::Wait::Block);
}
inline int __syncthreads_count(int pred) {
    fdh::me().value = pred != 0;
    fdh::park(fdh::Wait::Block);
    return (int)fdh::me().result;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { fdh::warp_exchange(fdh::OpSyncwarp, mask, 0, 0); }
inline unsigned __ballot_sync(unsigned mask, int pred) { return (unsigned)fdh::warp_exchange(fdh::OpBallot, mask, pred != 0, 0); }
inline int __any_sync(unsigned mask, int pred) { return (int)fdh::warp_exchange(fdh::OpAny, mask, pred != 0, 0); }
inline int __all_sync(unsigned mask, int pred) { return (int)fdh::warp_exchange(fdh::OpAll, mask, pred != 0, 0); }

template <class T>
inline uint64_t fdh_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a type over 8 bytes");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T>
inline T fdh_from_bits(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}
// Shuffles within segments of `width` lanes, as CUDA defines them.
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    const int l = fdh::lane(), base = l - l % width;
    return fdh_from_bits<T>(fdh::warp_exchange(fdh::OpShfl, mask, fdh_bits(v), base + ((src % width) + width) % width));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int l = fdh::lane(), s = l - (int)delta;
    return fdh_from_bits<T>(fdh::warp_exchange(fdh::OpShfl, mask, fdh_bits(v), s >= l - l % width ? s : l));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int l = fdh::lane(), s = l + (int)delta;
    return fdh_from_bits<T>(fdh::warp_exchange(fdh::OpShfl, mask, fdh_bits(v), s < l - l % width + width ? s : l));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const int l = fdh::lane(), s = l ^ lane_mask;
    return fdh_from_bits<T>(fdh::warp_exchange(fdh::OpShfl, mask, fdh_bits(v), s < l - l % width + width ? s : l));
}

#define FDH_EXPORT(kernel)                                                                                   \
    extern "C" int fdh_launch_##kernel(const unsigned* dims, void** params, char* err, size_t errlen) {       \
        return fdh::launch_exported(#kernel, kernel, dims, params, err, errlen);                                      \
    }
