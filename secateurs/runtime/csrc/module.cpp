// secateurs._sparse_kernel: the CPython entry point of the sparse matmul, its ISA dispatch and its thread pool.
//
// Arguments are plain integers (data pointers, sizes, dtype codes) so the extension needs no torch headers; the
// Python side (secateurs/runtime/kernels.py) checks the tensors and keeps them alive during the call.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include "kernel.h"

namespace secateurs {
namespace {

enum Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kMaxThreads = 256;
constexpr int kChunksPerThread = 4;  // work is handed out in chunks, so a thread that lost its core delays no one

// ------------------------------------------------------------------------------------------- CPU features
int cpu_features_bits() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    int bits = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) bits |= 1;
    if ((bits & 1) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vbmi2"))
        bits |= 2;
#if SECATEURS_AVX512_BF16
    if ((bits & 2) && __builtin_cpu_supports("avx512bf16")) bits |= 4;
#endif
    if ((bits & 2) && __builtin_cpu_supports("avx512vnni")) bits |= 8;
    return bits;
#else
    return 0;
#endif
}

const int kFeatures = cpu_features_bits();

// ------------------------------------------------------------------------------------------- bf16 <-> fp32
inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does; NaN -> the canonical quiet NaN
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// ------------------------------------------------------------------------------------------- one call
struct Job {
    Problem problem;
    Isa isa;
    uint16_t* y_bf16;  // final output when it is bfloat16 (problem.y is then fp32 scratch)
    char* unpack_dst = nullptr;  // an unpack job: rows written dense here (row r at r * in * unpack_elem bytes)
    int unpack_elem = 4;
    const ColumnProblem* columns = nullptr;  // a column-layout job: part i adds its active columns into y_parts[i]
    float* y_parts = nullptr;
    int64_t y_stride = 0;
    float* xt_dst = nullptr;  // a transposition job: token blocks [bounds[i], bounds[i + 1]) of x written here
    int64_t bounds[kMaxThreads * kChunksPerThread + 1];
};

void run_columns(const Job& job, int part) {
    ColumnProblem q = *job.columns;
    q.k0 = job.bounds[part];
    q.k1 = job.bounds[part + 1];
    q.y = job.y_parts + part * job.y_stride;
    std::memset(q.y, 0, sizeof(float) * q.out);
    switch (job.isa) {
        case kAvx512: cols_avx512(q); break;
        case kAvx2: cols_avx2(q); break;
        default: cols_scalar(q); break;
    }
}

void run_part(const Job& job, int part) {
    if (job.columns) {
        run_columns(job, part);
        return;
    }
    const int64_t r0 = job.bounds[part], r1 = job.bounds[part + 1];
    if (r0 >= r1) return;
    const Problem& p = job.problem;
    if (job.xt_dst) {
        transpose_x_avx512(p, r0, r1, job.xt_dst);
        return;
    }
    if (job.unpack_dst) {
        void* dst = job.unpack_dst + r0 * p.in * job.unpack_elem;
        switch (job.isa) {
            case kAvx512: unpack_avx512(p, r0, r1, dst); break;
            case kAvx2: unpack_avx2(p, r0, r1, dst); break;
            default: unpack_scalar(p, r0, r1, dst); break;
        }
        return;
    }
    switch (job.isa) {
        case kAvx512:
            if (p.xq)
                rows_vnni(p, r0, r1);
            else
                rows_avx512(p, r0, r1);
            break;
        case kAvx2: rows_avx2(p, r0, r1); break;
        default: rows_scalar(p, r0, r1); break;
    }
    if (job.y_bf16) {
        for (int64_t t = 0; t < p.m; ++t)
            for (int64_t o = r0; o < r1; ++o) job.y_bf16[t * p.out + o] = float_to_bf16(p.y[t * p.y_stride + o]);
    }
}

// Split the rows into `parts` ranges of about equal cost (stored values plus a per-row cost for the mask walk).
void balance(const Problem& p, int parts, int64_t* bounds) {
    const int64_t row_cost = p.in / 8 + 8;
    const int64_t base = p.row_offsets[0];  // non-zero for a range of rows that does not start at row 0
    const int64_t total = p.row_offsets[p.out] - base + p.out * row_cost;
    bounds[0] = 0;
    int64_t lo = 0;
    for (int i = 1; i < parts; ++i) {
        const int64_t target = total * i / parts;
        int64_t hi = p.out;  // first row o with cost(o) >= target
        while (lo < hi) {
            const int64_t mid = lo + (hi - lo) / 2;
            if (p.row_offsets[mid] - base + mid * row_cost < target)
                lo = mid + 1;
            else
                hi = mid;
        }
        bounds[i] = lo;
    }
    bounds[parts] = p.out;
}

// ------------------------------------------------------------------------------------------- thread pool
// Persistent workers (not OpenMP: a second OpenMP runtime beside PyTorch's would fight it for the cores). After a
// job a worker spins briefly (SECATEURS_KERNEL_SPIN_US, default 200), so the next call of a decode step finds it
// awake, then sleeps on a condition variable so it does not take the core from PyTorch's own work between our
// calls. The calling thread works too.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

class Pool {
   public:
    explicit Pool(int64_t spin_us) : spin_us_(spin_us) {}

    // Runs the chunks 0..chunks-1 of job on the calling thread and up to threads-1 workers; returns when all are
    // done. Chunks are claimed from a shared counter, so a worker that is late (descheduled on a busy machine)
    // finds nothing left and the caller never waits for it to start: it only waits for chunks already claimed.
    void run(const Job& job, int threads, int chunks) {
        grow(threads - 1);
        job_.store(&job, std::memory_order_relaxed);
        chunks_.store(chunks, std::memory_order_relaxed);
        threads_.store(threads, std::memory_order_relaxed);
        next_.store(0, std::memory_order_relaxed);
        closed_.store(false, std::memory_order_release);
        generation_.fetch_add(1, std::memory_order_seq_cst);
        if (sleepers_.load(std::memory_order_seq_cst) > 0) {
            std::lock_guard<std::mutex> lock(mutex_);
            wake_.notify_all();
        }
        run_chunks(job, chunks);
        // Dekker-style handshake with join(): a worker that entered before this store is waited for; one that
        // enters after it sees closed_ and leaves without touching the job.
        closed_.store(true, std::memory_order_seq_cst);
        for (unsigned spins = 0; active_.load(std::memory_order_seq_cst) != 0; ++spins) {
            if (spins < (1u << 14))
                cpu_relax();
            else
                std::this_thread::yield();
        }
    }

    void set_spin_us(int64_t us) { spin_us_.store(us, std::memory_order_relaxed); }
    int64_t spin_us() const { return spin_us_.load(std::memory_order_relaxed); }

   private:
    void run_chunks(const Job& job, int chunks) {
        for (int c; (c = next_.fetch_add(1, std::memory_order_relaxed)) < chunks;) run_part(job, c);
    }

    void grow(int n) {
        while (count_ < n) {
            const int index = count_ + 1;
            const uint64_t seen = generation_.load(std::memory_order_relaxed);  // before the job is posted
            std::thread([this, index, seen] { loop(index, seen); }).detach();  // lives as long as the process
            ++count_;
        }
    }

    void loop(int index, uint64_t seen) {
        for (;;) {
            seen = wait_for_change(seen);
            active_.fetch_add(1, std::memory_order_seq_cst);
            if (!closed_.load(std::memory_order_seq_cst) && index < threads_.load(std::memory_order_relaxed))
                run_chunks(*job_.load(std::memory_order_relaxed), chunks_.load(std::memory_order_relaxed));
            active_.fetch_sub(1, std::memory_order_seq_cst);
        }
    }

    uint64_t wait_for_change(uint64_t seen) {
        using clock = std::chrono::steady_clock;
        const auto until = clock::now() + std::chrono::microseconds(spin_us());
        for (unsigned i = 1;; ++i) {
            const uint64_t now = generation_.load(std::memory_order_acquire);
            if (now != seen) return now;
            cpu_relax();
            if ((i & 63) == 0 && clock::now() >= until) break;
        }
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        uint64_t now;
        while ((now = generation_.load(std::memory_order_seq_cst)) == seen) wake_.wait(lock);
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        return now;
    }

    std::atomic<int64_t> spin_us_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<const Job*> job_{nullptr};
    std::atomic<int> chunks_{0}, threads_{0}, next_{0}, active_{0}, sleepers_{0};
    std::atomic<bool> closed_{true};
    std::mutex mutex_;
    std::condition_variable wake_;
    int count_ = 0;  // workers started (touched by the caller holding g_pool_mutex only)
};

int64_t default_spin_us() {
    const char* env = std::getenv("SECATEURS_KERNEL_SPIN_US");
    return env && *env ? std::max<int64_t>(0, std::atoll(env)) : 200;
}

Pool* g_pool = nullptr;        // created on first multi-threaded call; never destroyed (workers are detached)
std::mutex g_pool_mutex;       // one multi-threaded call at a time; a concurrent caller runs on its own thread
int64_t g_spin_us = default_spin_us();

#if defined(__unix__) || defined(__APPLE__)
void forget_pool_after_fork() {  // the child has none of the parent's threads: start afresh if it needs some
    g_pool = nullptr;
    new (&g_pool_mutex) std::mutex();
}
#endif

// Below this many multiply-adds a call stays on one thread: waking a worker would cost more than it saves.
constexpr int64_t kParallelWork = 1 << 15;

void compute(Job& job, int threads) {
    const Problem& p = job.problem;
    const int64_t work = (p.row_offsets[p.out] - p.row_offsets[0] + p.out * (p.in / 8)) * p.m;
    int parts = static_cast<int>(std::min<int64_t>({threads, kMaxThreads, p.out, std::max<int64_t>(1, work / kParallelWork)}));
    std::unique_lock<std::mutex> lock(g_pool_mutex, std::defer_lock);
    if (parts > 1 && !lock.try_lock()) parts = 1;
    if (parts <= 1) {
        job.bounds[0] = 0;
        job.bounds[1] = p.out;
        run_part(job, 0);
        return;
    }
    const int chunks = static_cast<int>(std::min<int64_t>(int64_t{parts} * kChunksPerThread, p.out));
    balance(p, chunks, job.bounds);
    if (!g_pool) g_pool = new Pool(g_spin_us);
    g_pool->run(job, parts, chunks);
}

// Scratch kept per calling thread: fp32 copies of bf16 activations / bias, fp32 output before rounding to bf16,
// x transposed for the outer-product path; for the column layout the active columns, their inputs and each
// part's partial output.
struct Scratch {
    std::vector<float> x, bias, y, xa, y_parts, xt, xq, xs, xc;
    std::vector<int32_t> active;
};
thread_local Scratch t_scratch;

// n floats of v, starting on a 64-byte boundary: the kernels load x in whole 64-byte vectors, and one that
// straddles two cache lines costs two accesses (a bf16 model's widened activations were almost all such loads).
float* scratch(std::vector<float>& v, size_t n) {
    constexpr size_t kAlign = 64 / sizeof(float);
    if (v.size() < n + kAlign) v.resize(n + kAlign);
    const auto address = reinterpret_cast<uintptr_t>(v.data());
    return v.data() + ((64 - address % 64) % 64) / sizeof(float);
}

// x transposed into token blocks for the outer-product path, the blocks split over the pool.
const float* transposed_x(const Job& job, int threads, Scratch& s) {
    const Problem& p = job.problem;
    const int64_t blocks = outer_blocks(p.m);
    float* xt = scratch(s.xt, static_cast<size_t>(blocks * outer_units(p) * kOuterTokens));
    Job t;
    t.problem = p;
    t.isa = job.isa;
    t.y_bf16 = nullptr;
    t.xt_dst = xt;
    int parts = static_cast<int>(std::min<int64_t>({threads, kMaxThreads, blocks}));
    std::unique_lock<std::mutex> lock(g_pool_mutex, std::defer_lock);
    if (parts > 1 && !lock.try_lock()) parts = 1;
    for (int i = 0; i <= parts; ++i) t.bounds[i] = blocks * i / parts;
    if (parts <= 1) {
        run_part(t, 0);
    } else {
        if (!g_pool) g_pool = new Pool(g_spin_us);
        g_pool->run(t, parts, parts);
    }
    return xt;
}

// ------------------------------------------------------------------------------------------- Python
template <typename T>
bool arg(PyObject* o, T* out) {
    const long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return false;
    *out = static_cast<T>(v);
    return true;
}

bool ptr_arg(PyObject* o, const void** out) {
    *out = PyLong_AsVoidPtr(o);
    return !PyErr_Occurred();
}

// The 16 arguments spmm and spmm_columns share, read and checked once: false with a Python error set.
struct SpmmArgs {
    const void *mask, *values, *offsets, *x, *bias, *y, *scales;
    int values_dtype, x_dtype, bias_dtype, isa, threads;
    int64_t out, in, x_stride, m;
};

bool spmm_args(PyObject* const* args, SpmmArgs& a) {
    if (!ptr_arg(args[0], &a.mask) || !ptr_arg(args[1], &a.values) || !arg(args[2], &a.values_dtype) ||
        !ptr_arg(args[3], &a.offsets) || !arg(args[4], &a.out) || !arg(args[5], &a.in) || !ptr_arg(args[6], &a.x) ||
        !arg(args[7], &a.x_stride) || !arg(args[8], &a.m) || !arg(args[9], &a.x_dtype) ||
        !ptr_arg(args[10], &a.bias) || !arg(args[11], &a.bias_dtype) || !ptr_arg(args[12], &a.y) ||
        !arg(args[13], &a.isa) || !arg(args[14], &a.threads) || !ptr_arg(args[15], &a.scales))
        return false;
    if (a.x_dtype & ~1 || a.bias_dtype < -1 || a.bias_dtype > 1 || a.values_dtype < kF32 || a.values_dtype > kI8) {
        PyErr_SetString(PyExc_ValueError,
                        "dtype codes must be 0 (float32) or 1 (bfloat16); values may also be 2 (int8)");
        return false;
    }
    if ((a.values_dtype == kI8) != (a.scales != nullptr)) {
        PyErr_SetString(PyExc_ValueError, "int8 values need per-row scales, other values none");
        return false;
    }
    const int isa = a.isa;
    if (isa < kScalar || isa > kAvx512 || (isa == kAvx2 && !(kFeatures & 1)) || (isa == kAvx512 && !(kFeatures & 2))) {
        PyErr_Format(PyExc_ValueError, "ISA code %d is not supported by this CPU", isa);
        return false;
    }
    if (a.out < 0 || a.in < 0 || a.m < 0 || a.x_stride < a.in || a.threads < 1) {
        PyErr_SetString(PyExc_ValueError, "bad sizes");
        return false;
    }
    return true;
}

// The bias as fp32: itself, a widened copy in the thread's scratch (bfloat16), or null (none).
const float* fp32_bias(const SpmmArgs& a, Scratch& s) {
    if (a.bias_dtype == 1) {
        float* b = scratch(s.bias, static_cast<size_t>(a.out));
        for (int64_t o = 0; o < a.out; ++o) b[o] = bf16_to_float(static_cast<const uint16_t*>(a.bias)[o]);
        return b;
    }
    return a.bias_dtype == 0 ? static_cast<const float*>(a.bias) : nullptr;
}

PyObject* py_spmm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    // mask, values, values_dtype, row_offsets, out, in, x, x_stride, m, x_dtype, bias, bias_dtype, y, isa, threads,
    // scales, path (0: rows, 1: outer products, 2: int8 activations)
    if (nargs != 17) {
        PyErr_Format(PyExc_TypeError, "spmm takes 17 integer arguments, got %zd", nargs);
        return nullptr;
    }
    SpmmArgs a;
    int outer_arg;
    if (!spmm_args(args, a) || !arg(args[16], &outer_arg)) return nullptr;
    if (outer_arg == 2 && (a.values_dtype != kI8 || a.isa != kAvx512 || !(kFeatures & 8))) {
        PyErr_SetString(PyExc_ValueError, "int8 activations need int8 values and the AVX-512 VNNI kernel");
        return nullptr;
    }
    const void *mask = a.mask, *values = a.values, *offsets = a.offsets, *x = a.x, *y = a.y, *scales = a.scales;
    const int values_dtype = a.values_dtype, x_dtype = a.x_dtype, isa = a.isa, threads = a.threads;
    const int64_t out = a.out, in = a.in, x_stride = a.x_stride, m = a.m;
    if (out == 0 || m == 0) Py_RETURN_NONE;

    Job job;
    Problem& p = job.problem;
    p.mask = static_cast<const uint8_t*>(mask);
    p.mask_stride = (in + 7) / 8;
    p.values = values;
    p.values_type = values_dtype;
    p.scales = static_cast<const float*>(scales);
    p.row_offsets = static_cast<const int64_t*>(offsets);
    p.out = out;
    p.in = in;
    p.m = m;
    p.dense = p.row_offsets[out] - p.row_offsets[0] == out * in;
    job.isa = static_cast<Isa>(isa);

    bool no_memory = false;
    Py_BEGIN_ALLOW_THREADS
    try {
    Scratch& s = t_scratch;
    const bool outer = outer_arg == 1 && isa == kAvx512;
    // one token of bf16 x with bf16 values: the AVX-512 pair form reads x as it is (single_token_pairs)
    const bool pairs_decode = m == 1 && !outer && outer_arg != 2 && x_dtype == 1 && values_dtype == kBF16 &&
                              isa == kAvx512 && (kFeatures & 4);
    if ((outer && x_dtype == 1 && values_dtype != kF32 && (kFeatures & 4)) || pairs_decode) {
        p.x = nullptr;  // the bf16 pair forms read x as it is
        p.x16 = static_cast<const uint16_t*>(x);
        p.x_stride = x_stride;
    } else if (x_dtype == 1) {  // bf16 activations: widen once per call, not once per row
        float* xf = scratch(s.x, static_cast<size_t>(m * in));
        const uint16_t* xh = static_cast<const uint16_t*>(x);
        for (int64_t t = 0; t < m; ++t)
            for (int64_t j = 0; j < in; ++j) xf[t * in + j] = bf16_to_float(xh[t * x_stride + j]);
        p.x = xf;
        p.x_stride = in;
    } else {
        p.x = static_cast<const float*>(x);
        p.x_stride = x_stride;
    }
    p.bias = fp32_bias(a, s);
    if (x_dtype == 1 && outer) {  // outer products round their sums to bf16 as they write them
        p.y16 = static_cast<uint16_t*>(const_cast<void*>(y));
        job.y_bf16 = nullptr;
    } else if (x_dtype == 1) {
        p.y = scratch(s.y, static_cast<size_t>(m * out));
        job.y_bf16 = static_cast<uint16_t*>(const_cast<void*>(y));
    } else {
        p.y = static_cast<float*>(const_cast<void*>(y));
        job.y_bf16 = nullptr;
    }
    p.y_stride = out;
    if (outer) p.xt = transposed_x(job, threads, s);
    if (outer_arg == 2) {  // x quantised to int8 groups once, on this thread (m * in values: little beside the product)
        const int64_t groups = i8_groups(in);
        int8_t* xq = reinterpret_cast<int8_t*>(scratch(s.xq, static_cast<size_t>(m * groups * kI8Group / 4)));
        float* xs = scratch(s.xs, static_cast<size_t>(m * groups));
        int32_t* xc = reinterpret_cast<int32_t*>(scratch(s.xc, static_cast<size_t>(m * groups * 16)));
        quantize_x_vnni(p.x, p.x_stride, in, 0, m, xq, xs, xc);
        p.xq = xq;
        p.xs = xs;
        p.xc = xc;
    }
    compute(job, threads);
    } catch (const std::bad_alloc&) {
        no_memory = true;
    }
    Py_END_ALLOW_THREADS
    if (no_memory) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

// One token of a column-layout product: the columns whose input survives the threshold, split over the pool by
// the bytes they hold, each part summed into its own buffer; then y = (sum of parts) * scale + bias.
void columns_token(ColumnProblem& q, Isa isa, int threads, const int64_t* col_offsets, int64_t in, const float* x,
                   float tau, const float* scales, const float* bias, float* y_f32, uint16_t* y_bf16, Scratch& s) {
    int32_t* active = s.active.data();
    float* xa = s.xa.data();
    int64_t n = 0, work = 0;
    for (int64_t j = 0; j < in; ++j) {
        const float v = x[j];
        if (!(std::fabs(v) <= tau)) {  // kept: |x| > tau (and NaN, so it propagates as in the reference)
            active[n] = static_cast<int32_t>(j);
            xa[n++] = v;
            work += col_offsets[j + 1] - col_offsets[j];
        }
    }
    const int64_t out = q.out;
    work += n * (out / 8);
    q.active = active;
    q.xa = xa;
    Job job;
    job.isa = isa;
    job.columns = &q;
    int parts = static_cast<int>(std::min<int64_t>({threads, kMaxThreads, std::max<int64_t>(n, 1),
                                                    std::max<int64_t>(1, work / kParallelWork)}));
    std::unique_lock<std::mutex> lock(g_pool_mutex, std::defer_lock);
    if (parts > 1 && !lock.try_lock()) parts = 1;
    // each part's buffer 64-byte aligned: a full-vector store that straddles two cache lines costs twice
    const int64_t stride = (out + 15) & ~int64_t{15};
    float* base = scratch(s.y_parts, static_cast<size_t>(parts * stride + 16));
    job.y_parts = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(base) + 63) & ~uintptr_t{63});
    job.y_stride = stride;
    job.bounds[0] = 0;
    if (parts > 1) {  // part boundaries at equal shares of the stored values (plus each column's mask walk)
        int64_t done = 0, k = 0;
        for (int i = 1; i < parts; ++i) {
            const int64_t target = work * i / parts;
            while (k < n && done < target) {
                const int64_t j = active[k++];
                done += col_offsets[j + 1] - col_offsets[j] + out / 8;
            }
            job.bounds[i] = k;
        }
        job.bounds[parts] = n;
        if (!g_pool) g_pool = new Pool(g_spin_us);
        g_pool->run(job, parts, parts);
    } else {
        job.bounds[1] = n;
        run_part(job, 0);
    }
    const float* yp = job.y_parts;
    for (int64_t o = 0; o < out; ++o) {
        float sum = yp[o];
        for (int i = 1; i < parts; ++i) sum += yp[i * stride + o];
        if (scales) sum *= scales[o];
        if (bias) sum += bias[o];
        if (y_bf16)
            y_bf16[o] = float_to_bf16(sum);
        else
            y_f32[o] = sum;
    }
}

PyObject* py_spmm_columns(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    // mask, values, values_dtype, col_offsets, out, in, x, x_stride, m, x_dtype, bias, bias_dtype, y, isa, threads,
    // scales, threshold
    if (nargs != 17) {
        PyErr_Format(PyExc_TypeError, "spmm_columns takes 17 arguments, got %zd", nargs);
        return nullptr;
    }
    SpmmArgs a;
    if (!spmm_args(args, a)) return nullptr;
    const void *mask = a.mask, *values = a.values, *offsets = a.offsets, *x = a.x, *y = a.y, *scales = a.scales;
    const int values_dtype = a.values_dtype, x_dtype = a.x_dtype, isa = a.isa, threads = a.threads;
    const int64_t out = a.out, in = a.in, x_stride = a.x_stride, m = a.m;
    const double tau = PyFloat_AsDouble(args[16]);
    if (tau == -1.0 && PyErr_Occurred()) return nullptr;
    if (in > INT32_MAX) {  // column indices are int32
        PyErr_SetString(PyExc_ValueError, "bad sizes");
        return nullptr;
    }
    if (out == 0 || m == 0) Py_RETURN_NONE;
    ColumnProblem q;
    q.mask = static_cast<const uint8_t*>(mask);
    q.mask_stride = (out + 7) / 8;
    q.values = values;
    q.values_type = values_dtype;
    q.col_offsets = static_cast<const int64_t*>(offsets);
    q.out = out;
    bool no_memory = false;
    Py_BEGIN_ALLOW_THREADS
    try {
        Scratch& s = t_scratch;
        if (s.active.size() < static_cast<size_t>(in)) s.active.resize(in);
        scratch(s.xa, static_cast<size_t>(in));
        float* xrow = x_dtype == 1 ? scratch(s.x, static_cast<size_t>(in)) : nullptr;
        const float* bf = fp32_bias(a, s);
        for (int64_t t = 0; t < m; ++t) {
            const float* xt;
            if (x_dtype == 1) {
                const uint16_t* xh = static_cast<const uint16_t*>(x) + t * x_stride;
                for (int64_t j = 0; j < in; ++j) xrow[j] = bf16_to_float(xh[j]);
                xt = xrow;
            } else {
                xt = static_cast<const float*>(x) + t * x_stride;
            }
            float* yf = x_dtype == 1 ? nullptr : static_cast<float*>(const_cast<void*>(y)) + t * out;
            uint16_t* yh = x_dtype == 1 ? static_cast<uint16_t*>(const_cast<void*>(y)) + t * out : nullptr;
            columns_token(q, static_cast<Isa>(isa), threads, q.col_offsets, in, xt, static_cast<float>(tau),
                          static_cast<const float*>(scales), bf, yf, yh, s);
        }
    } catch (const std::bad_alloc&) {
        no_memory = true;
    }
    Py_END_ALLOW_THREADS
    if (no_memory) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyObject* py_unpack(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    // mask, values, values_dtype, row_offsets, out, in, scales, r0, r1, dst, isa, threads
    if (nargs != 12) {
        PyErr_Format(PyExc_TypeError, "unpack takes 12 integer arguments, got %zd", nargs);
        return nullptr;
    }
    const void *mask, *values, *offsets, *scales, *dst;
    int values_dtype, isa, threads;
    int64_t out, in, r0, r1;
    if (!ptr_arg(args[0], &mask) || !ptr_arg(args[1], &values) || !arg(args[2], &values_dtype) ||
        !ptr_arg(args[3], &offsets) || !arg(args[4], &out) || !arg(args[5], &in) || !ptr_arg(args[6], &scales) ||
        !arg(args[7], &r0) || !arg(args[8], &r1) || !ptr_arg(args[9], &dst) || !arg(args[10], &isa) ||
        !arg(args[11], &threads))
        return nullptr;
    if (threads < 1) {
        PyErr_SetString(PyExc_ValueError, "threads must be >= 1");
        return nullptr;
    }
    if (values_dtype < kF32 || values_dtype > kI8 || (values_dtype == kI8) != (scales != nullptr)) {
        PyErr_SetString(PyExc_ValueError, "bad values dtype code or scales");
        return nullptr;
    }
    if (isa < kScalar || isa > kAvx512 || (isa == kAvx2 && !(kFeatures & 1)) || (isa == kAvx512 && !(kFeatures & 2))) {
        PyErr_Format(PyExc_ValueError, "ISA code %d is not supported by this CPU", isa);
        return nullptr;
    }
    if (out < 0 || in < 0 || r0 < 0 || r1 < r0 || r1 > out) {
        PyErr_SetString(PyExc_ValueError, "bad sizes");
        return nullptr;
    }
    // rows [r0, r1) as a problem of their own (row_offsets and mask from r0 on), split over the pool like spmm
    Job job;
    Problem& p = job.problem;
    p.mask_stride = (in + 7) / 8;
    p.mask = static_cast<const uint8_t*>(mask) + r0 * p.mask_stride;
    p.values = values;
    p.values_type = values_dtype;
    p.scales = scales ? static_cast<const float*>(scales) + r0 : nullptr;
    p.row_offsets = static_cast<const int64_t*>(offsets) + r0;
    p.out = r1 - r0;
    p.in = in;
    p.m = 1;
    job.isa = static_cast<Isa>(isa);
    job.y_bf16 = nullptr;
    job.unpack_dst = static_cast<char*>(const_cast<void*>(dst));
    job.unpack_elem = values_dtype == kBF16 ? 2 : 4;
    if (p.out == 0 || in == 0) Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    compute(job, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// RMS norm of rows of x (transformers' Llama norm): r = 1 / sqrt(mean(x^2) + eps) (computed in double, rounded to
// float32), y = w * (x * r); for bfloat16 x and w the normed x is rounded to bfloat16 before the weight multiplies
// it (as x.float() ... .to(bfloat16) * w does), and so is y. One call instead of a handful of small torch ops.
PyObject* py_rms_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    // x, w, y, rows, n, eps_bits (float32 bits), dtype (0 float32, 1 bfloat16; x, w and y alike)
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "rms_norm takes 7 integer arguments, got %zd", nargs);
        return nullptr;
    }
    const void *x, *w, *y;
    int64_t rows, n;
    uint32_t eps_bits;
    int dtype;
    if (!ptr_arg(args[0], &x) || !ptr_arg(args[1], &w) || !ptr_arg(args[2], &y) || !arg(args[3], &rows) ||
        !arg(args[4], &n) || !arg(args[5], &eps_bits) || !arg(args[6], &dtype))
        return nullptr;
    if (rows < 0 || n < 1 || (dtype != 0 && dtype != 1)) {
        PyErr_SetString(PyExc_ValueError, "bad sizes or dtype code");
        return nullptr;
    }
    float eps;
    std::memcpy(&eps, &eps_bits, sizeof eps);
    for (int64_t r = 0; r < rows; ++r) {
        if (dtype == 0) {
            const float* xr = static_cast<const float*>(x) + r * n;
            const float* wr = static_cast<const float*>(w);
            float* yr = static_cast<float*>(const_cast<void*>(y)) + r * n;
            double sum = 0.0;
            for (int64_t j = 0; j < n; ++j) sum += static_cast<double>(xr[j]) * xr[j];
            const float inv = static_cast<float>(1.0 / std::sqrt(sum / n + eps));
            for (int64_t j = 0; j < n; ++j) yr[j] = wr[j] * (xr[j] * inv);
        } else {
            const uint16_t* xr = static_cast<const uint16_t*>(x) + r * n;
            const uint16_t* wr = static_cast<const uint16_t*>(w);
            uint16_t* yr = static_cast<uint16_t*>(const_cast<void*>(y)) + r * n;
            double sum = 0.0;
            for (int64_t j = 0; j < n; ++j) {
                const double v = bf16_to_float(xr[j]);
                sum += v * v;
            }
            const float inv = static_cast<float>(1.0 / std::sqrt(sum / n + eps));
            for (int64_t j = 0; j < n; ++j) {
                const float normed = bf16_to_float(float_to_bf16(bf16_to_float(xr[j]) * inv));
                yr[j] = float_to_bf16(bf16_to_float(wr[j]) * normed);
            }
        }
    }
    Py_RETURN_NONE;
}

void attend_generic(const AttendProblem& a) {
    const int64_t group = a.heads / a.kv_heads, d = a.d;
    float* scores = a.scores;
    for (int64_t h = 0; h < a.heads; ++h) {
        const float* qh = a.q + h * d;
        const float* kh = a.k + (h / group) * a.head_stride;
        const float* vh = a.v + (h / group) * a.head_stride;
        float* oh = a.out + h * d;
        float top = -INFINITY;
        for (int64_t i = 0; i < a.length; ++i) {
            const float* ki = kh + i * d;
            float dot = 0.0f;
            for (int64_t j = 0; j < d; ++j) dot += qh[j] * ki[j];
            scores[i] = dot * a.scale;
            top = std::max(top, scores[i]);
        }
        float total = 0.0f;
        for (int64_t i = 0; i < a.length; ++i) total += (scores[i] = std::exp(scores[i] - top));
        for (int64_t j = 0; j < d; ++j) oh[j] = 0.0f;
        for (int64_t i = 0; i < a.length; ++i) {
            const float* vi = vh + i * d;
            const float p = scores[i];
            for (int64_t j = 0; j < d; ++j) oh[j] += p * vi[j];
        }
        const float inv = 1.0f / total;
        for (int64_t j = 0; j < d; ++j) oh[j] *= inv;
    }
}

// Attention of one query token over a float32 KV cache (decode): for each query head h, kv head h / (heads /
// kv_heads) as transformers' repeat_kv pairs them, out[h] = softmax(scale * K q[h]) V over the first `length` keys
// (no mask: the query is the newest token). q [heads, d] and out [heads, d] contiguous; the cache [kv_heads, *, d]
// with head_stride floats between kv heads. Scores and softmax in float32 (the max subtracted), summed in order.
PyObject* py_attend(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    // q, k, v, out, heads, kv_heads, length, d, head_stride, scale_bits (float32 bits)
    if (nargs != 10) {
        PyErr_Format(PyExc_TypeError, "attend takes 10 integer arguments, got %zd", nargs);
        return nullptr;
    }
    const void *q, *k, *v, *out;
    int64_t heads, kv_heads, length, d, head_stride;
    uint32_t scale_bits;
    if (!ptr_arg(args[0], &q) || !ptr_arg(args[1], &k) || !ptr_arg(args[2], &v) || !ptr_arg(args[3], &out) ||
        !arg(args[4], &heads) || !arg(args[5], &kv_heads) || !arg(args[6], &length) || !arg(args[7], &d) ||
        !arg(args[8], &head_stride) || !arg(args[9], &scale_bits))
        return nullptr;
    if (heads < 1 || kv_heads < 1 || heads % kv_heads || length < 1 || d < 1 || head_stride < length * d) {
        PyErr_SetString(PyExc_ValueError, "bad sizes");
        return nullptr;
    }
    float scale;
    std::memcpy(&scale, &scale_bits, sizeof scale);
    bool no_memory = false;
    Py_BEGIN_ALLOW_THREADS
    try {
        std::vector<float>& scores = t_scratch.xa;
        if (scores.size() < static_cast<size_t>(length)) scores.resize(static_cast<size_t>(length));
        AttendProblem a{static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v),
                        static_cast<float*>(const_cast<void*>(out)), heads, kv_heads, length, d, head_stride, scale,
                        scores.data()};
        if ((kFeatures & 2) && d % 16 == 0)
            attend_avx512(a);
        else
            attend_generic(a);
    } catch (const std::bad_alloc&) {
        no_memory = true;
    }
    Py_END_ALLOW_THREADS
    if (no_memory) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyObject* py_cpu_features(PyObject*, PyObject*) { return PyLong_FromLong(kFeatures); }

PyObject* py_set_spin_us(PyObject*, PyObject* arg) {
    const long long us = PyLong_AsLongLong(arg);
    if (us == -1 && PyErr_Occurred()) return nullptr;
    if (us < 0) {
        PyErr_SetString(PyExc_ValueError, "spin time must be >= 0 microseconds");
        return nullptr;
    }
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    g_spin_us = us;
    if (g_pool) g_pool->set_spin_us(us);
    Py_RETURN_NONE;
}

PyObject* py_spin_us(PyObject*, PyObject*) { return PyLong_FromLongLong(g_spin_us); }

PyMethodDef kMethods[] = {
    {"spmm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_spmm)), METH_FASTCALL,
     "spmm(mask, values, values_dtype, row_offsets, out, in, x, x_stride, m, x_dtype, bias, bias_dtype, y, isa, "
     "threads, scales, path): y = x @ W.T (+ bias) for a packed weight; every argument an int (pointers, sizes, "
     "codes); values_dtype 2 (int8) takes per-row float32 scales, else scales is 0; path 1: the AVX-512 kernel "
     "multiplies by outer products (many tokens; ignored by the other ISAs); path 2: x quantised to int8 per group "
     "of 64 inputs and multiplied by VNNI dot products (int8 values, AVX-512 with VNNI only)."},
    {"spmm_columns", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_spmm_columns)), METH_FASTCALL,
     "spmm_columns(mask, values, values_dtype, col_offsets, out, in, x, x_stride, m, x_dtype, bias, bias_dtype, y, "
     "isa, threads, scales, threshold): y = x' @ W.T (+ bias) for a weight packed column by column (W^T's rows), "
     "where x' keeps the inputs with |x| > threshold; the columns of the others are never read."},
    {"unpack", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_unpack)), METH_FASTCALL,
     "unpack(mask, values, values_dtype, row_offsets, out, in, scales, r0, r1, dst, isa, threads): rows [r0, r1) of "
     "a packed weight written dense into dst (float32; bfloat16 for bfloat16 values), on the kernel's threads."},
    {"rms_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_rms_norm)), METH_FASTCALL,
     "rms_norm(x, w, y, rows, n, eps_bits, dtype): y = w * x / sqrt(mean(x^2) + eps) row by row, as transformers' "
     "Llama norm computes it (dtype 0: float32, 1: bfloat16 for x, w and y; eps as the bits of a float32)."},
    {"attend", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_attend)), METH_FASTCALL,
     "attend(q, k, v, out, heads, kv_heads, length, d, head_stride, scale_bits): one query token's attention over a "
     "float32 KV cache, grouped query heads as transformers pairs them (scale as the bits of a float32)."},
    {"cpu_features", py_cpu_features, METH_NOARGS,
     "Bit 0: AVX2+FMA; bit 1: AVX-512 F/BW/VL/DQ/VBMI2; bit 2: AVX512_BF16 too (and this build uses it); bit 3: "
     "AVX-512 VNNI."},
    {"set_spin_us", py_set_spin_us, METH_O, "How long idle workers spin (microseconds) before they sleep."},
    {"spin_us", py_spin_us, METH_NOARGS, "How long idle workers spin (microseconds) before they sleep."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_sparse_kernel",
                       "Sparse (bitmask + packed values) matmul kernels for CPU: AVX-512, AVX2, scalar.", -1, kMethods};

}  // namespace
}  // namespace secateurs

PyMODINIT_FUNC PyInit__sparse_kernel(void) {
#if defined(__unix__) || defined(__APPLE__)
    static bool registered = false;
    if (!registered) {
        pthread_atfork(nullptr, nullptr, secateurs::forget_pool_after_fork);
        registered = true;
    }
#endif
    return PyModule_Create(&secateurs::kModule);
}
