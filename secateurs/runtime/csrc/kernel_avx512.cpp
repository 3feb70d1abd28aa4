// AVX-512 kernel (F, BW, VL, DQ, VBMI2): 16 columns at a time, the row's 16 mask bits expand the next packed
// values into place (register-form vexpandps), then one FMA per token; for many tokens, outer products (below).
// Compiled for these instructions by the pragma below only, and called only when the CPU reports them; the
// outer products' bf16 pair form uses AVX512_BF16 (vdpbf16ps) when the compiler knows it, and is taken only
// on a CPU that reports it (kernel.h: SECATEURS_AVX512_BF16).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include <vector>

#include "kernel.h"

#if defined(__clang__) && SECATEURS_AVX512_BF16
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16,fma,bmi,bmi2,popcnt"))), apply_to = function)
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,fma,bmi,bmi2,popcnt"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#if SECATEURS_AVX512_BF16
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16,fma,bmi,bmi2,popcnt")
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,fma,bmi,bmi2,popcnt")
#endif
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives inside its own _mm512_undefined_*
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace secateurs {
namespace {

inline uint32_t bits16(const uint8_t* p) {
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

// The next popcount(k) packed values, expanded to the lanes whose mask bits are set (others zero), as fp32.
// The empty asm keeps the load a separate instruction: compilers otherwise fold it into the expand, and the
// memory-operand form of vexpandps is many times slower on AMD Zen 4/5. bf16 values are widened to fp32 first:
// vpmovzxwd + shift + vexpandps is twice as fast there as vpexpandw on 16-bit lanes.
template <int VT>
inline __m512 load16(const void* values, int64_t pos) {
    __m512 raw;
    if (VT == kI8) {  // int8 widened to fp32 before the expand; the row's scale multiplies its finished sum
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(values) + pos));
        raw = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
    } else if (VT == kBF16) {
        const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(values) + pos));
        raw = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    } else {
        raw = _mm512_loadu_ps(static_cast<const float*>(values) + pos);
    }
    return raw;
}

template <int VT>
inline __m512 expand16(const void* values, int64_t pos, __mmask16 k) {
    __m512 raw = load16<VT>(values, pos);
    __asm__("" : "+v"(raw));
    return _mm512_maskz_expand_ps(k, raw);
}

// Sum of each of 8 vectors, as the 8 lanes of one ymm (a transposing reduction: cheaper than 8 separate ones).
inline __m256 reduce8(const __m512* v) {
    __m256 h[8];
    for (int i = 0; i < 8; ++i) h[i] = _mm256_add_ps(_mm512_castps512_ps256(v[i]), _mm512_extractf32x8_ps(v[i], 1));
    const __m256 a = _mm256_hadd_ps(h[0], h[1]), b = _mm256_hadd_ps(h[2], h[3]);
    const __m256 c = _mm256_hadd_ps(h[4], h[5]), d = _mm256_hadd_ps(h[6], h[7]);
    const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

// R consecutive rows starting at o, MB consecutive tokens starting at t0. Dense: every weight stored, so the
// next 16 values are the next 16 columns (no mask read, no expand).
template <int MB, int R, int VT, bool Dense>
void block(const Problem& p, int64_t o, int64_t t0) {
    __m512 acc[R * MB];
    for (int i = 0; i < R * MB; ++i) acc[i] = _mm512_setzero_ps();
    int64_t pos[R];
    const uint8_t* mrow[R];
    for (int r = 0; r < R; ++r) {
        pos[r] = p.row_offsets[o + r];
        mrow[r] = p.mask + (o + r) * p.mask_stride;
    }
    const float* x = p.x + t0 * p.x_stride;
    const int64_t xs = p.x_stride;
    const int64_t full = p.in >> 4;
    for (int64_t c = 0; c < full; ++c) {
        __m512 xv[MB];
        for (int t = 0; t < MB; ++t) xv[t] = _mm512_loadu_ps(x + t * xs + c * 16);
        for (int r = 0; r < R; ++r) {
            __m512 w;
            if (Dense) {
                w = load16<VT>(p.values, pos[r]);
                pos[r] += 16;
            } else {
                const uint32_t bits = bits16(mrow[r] + 2 * c);
                w = expand16<VT>(p.values, pos[r], static_cast<__mmask16>(bits));
                pos[r] += __builtin_popcount(bits);
            }
            for (int t = 0; t < MB; ++t) acc[r * MB + t] = _mm512_fmadd_ps(w, xv[t], acc[r * MB + t]);
        }
    }
    const int rem = static_cast<int>(p.in & 15);
    if (rem) {  // the last byte or two of each row; x read with a lane mask so nothing past the row is touched
        const __mmask16 xmask = static_cast<__mmask16>((1u << rem) - 1);
        __m512 xv[MB];
        for (int t = 0; t < MB; ++t) xv[t] = _mm512_maskz_loadu_ps(xmask, x + t * xs + full * 16);
        for (int r = 0; r < R; ++r) {
            uint32_t bits = mrow[r][2 * full];
            if (rem > 8) bits |= static_cast<uint32_t>(mrow[r][2 * full + 1]) << 8;
            const __m512 w = expand16<VT>(p.values, pos[r], static_cast<__mmask16>(bits));
            for (int t = 0; t < MB; ++t) acc[r * MB + t] = _mm512_fmadd_ps(w, xv[t], acc[r * MB + t]);
        }
    }
    // acc[r * MB + t] -> y[t0 + t, o + r]
    constexpr int N = R * MB;
    constexpr int G = (N + 7) / 8;
    alignas(32) float sums[G * 8];
    for (int g = 0; g < G; ++g) {
        __m512 v[8];
        for (int i = 0; i < 8; ++i) v[i] = g * 8 + i < N ? acc[g * 8 + i] : _mm512_setzero_ps();
        _mm256_store_ps(sums + g * 8, reduce8(v));
    }
    for (int r = 0; r < R; ++r) {
        const float b = p.bias ? p.bias[o + r] : 0.0f;
        const float scale = VT == kI8 ? p.scales[o + r] : 1.0f;
        for (int t = 0; t < MB; ++t) p.y[(t0 + t) * p.y_stride + o + r] = sums[r * MB + t] * scale + b;
    }
}

// Blocks of 4 rows x 4 tokens: 16 accumulators, enough independent work to hide the expand latency
// (measured on Zen 5: 0.6 cycles per token and 16 columns, against 0.75 for 8 tokens x 2 rows).
// Rows outer, tokens inner: a block of rows is read from memory once and stays in L1 for every token block.
constexpr int kRows = 4;
constexpr int kTokens = 4;

template <int R, int VT, bool Dense>
void tokens(const Problem& p, int64_t o) {
    int64_t t0 = 0;
    for (; t0 + kTokens <= p.m; t0 += kTokens) block<kTokens, R, VT, Dense>(p, o, t0);
    switch (p.m - t0) {
        case 1: block<1, R, VT, Dense>(p, o, t0); break;
        case 2: block<2, R, VT, Dense>(p, o, t0); break;
        case 3: block<3, R, VT, Dense>(p, o, t0); break;
        default: break;
    }
}

// One token (decode), where the weight streams from memory and the kernel must keep enough of it in flight: each
// row on its own, so the mask and the values are each one forward stream; its 16-column chunks spread over four
// accumulators; and a software prefetch kPrefetchBytes ahead in the values (and the mask), since the next loads'
// addresses depend on the mask bits just read and the core's own look-ahead covers only a few lines of packed
// values (SmolLM2 70%, all 210 linears in turn, 2 threads: 13.5 -> 9.3 ms).
constexpr int64_t kPrefetchBytes = 4096;

template <int VT, bool Dense>
void single_token(const Problem& p, int64_t r0, int64_t r1) {
    constexpr int kElem = VT == kF32 ? 4 : VT == kBF16 ? 2 : 1;
    const char* values = static_cast<const char*>(p.values);
    const float* x = p.x;
    const int64_t full = p.in >> 4;
    const int rem = static_cast<int>(p.in & 15);
    for (int64_t o = r0; o < r1; ++o) {
        const uint8_t* mrow = p.mask + o * p.mask_stride;
        int64_t pos = p.row_offsets[o];
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        int64_t c = 0;
        for (; c + 4 <= full; c += 4) {
            if (!Dense) _mm_prefetch(reinterpret_cast<const char*>(mrow + 2 * c + kPrefetchBytes / 8), _MM_HINT_T0);
            for (int u = 0; u < 4; ++u) {
                _mm_prefetch(values + pos * kElem + kPrefetchBytes, _MM_HINT_T0);  // (never faults past the end)
                __m512 w;
                if (Dense) {
                    w = load16<VT>(p.values, pos);
                    pos += 16;
                } else {
                    const uint32_t bits = bits16(mrow + 2 * (c + u));
                    w = expand16<VT>(p.values, pos, static_cast<__mmask16>(bits));
                    pos += __builtin_popcount(bits);
                }
                acc[u] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + (c + u) * 16), acc[u]);
            }
        }
        for (; c < full; ++c) {
            const uint32_t bits = bits16(mrow + 2 * c);  // (a dense row's mask bits are all set)
            const __m512 w = expand16<VT>(p.values, pos, static_cast<__mmask16>(bits));
            pos += __builtin_popcount(bits);
            acc[0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + c * 16), acc[0]);
        }
        if (rem) {  // the last byte or two of the row; x read with a lane mask so nothing past the row is touched
            const __mmask16 xmask = static_cast<__mmask16>((1u << rem) - 1);
            uint32_t bits = mrow[2 * full];
            if (rem > 8) bits |= static_cast<uint32_t>(mrow[2 * full + 1]) << 8;
            const __m512 w = expand16<VT>(p.values, pos, static_cast<__mmask16>(bits));
            acc[3] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(xmask, x + full * 16), acc[3]);
        }
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        const float scale = VT == kI8 ? p.scales[o] : 1.0f;
        p.y[o] = _mm512_reduce_add_ps(sum) * scale + (p.bias ? p.bias[o] : 0.0f);
    }
}

// ------------------------------------------------------------------------------------ outer product (prefill)
// For many tokens, the row-wise formulation whose work is proportional to the stored weights. x is transposed
// first (transpose_x_avx512: xt[block][j][64 tokens]). A block of rows has its masks decoded once into lists of
// stored columns (vpcompressd of a column-index vector by each 16-bit chunk of the mask: no branch per bit) and
// the matching fp32 values; then, for each block of 64 tokens, every stored weight is broadcast and multiplied
// with the 64 tokens of its input (four zmm loads, four FMAs), the row's weights alternating between two sets of
// four accumulators so that eight FMA chains hide the latency. Sums land in a tile [rows][64 tokens], which is
// transposed 16 x 16 in registers into y, scaled and biased. The inputs are walked in chunks of kOuterChunk
// columns, each chunk of xt (32 KB) reused from L1 by the whole block of rows before the next.
//
// bf16 activations with bf16 or int8 values (where a dense bf16 model multiplies in bf16) take the pair form:
// xt holds pairs of adjacent inputs (2q, 2q + 1) interleaved as bf16 per token, a row's list holds its pairs with
// at least one stored weight (the other one zero), and one vdpbf16ps multiplies a pair with 16 tokens: fewer
// instructions than one FMA per weight wherever stored weights share pairs, and bf16 products (exact in fp32,
// like int8 codes, which bf16 holds exactly) accumulated in fp32.

// acc + a[2i] b[2i] + a[2i + 1] b[2i + 1] in each fp32 lane i, a and b holding 32 bf16 each.
inline __m512 dot_pairs(__m512 acc, __m512 a, __m512 b) {
#if SECATEURS_AVX512_BF16
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else  // (never taken: the dispatcher asks for the instruction) the same products with FMAs
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    const __m512i ai = _mm512_castps_si512(a), bi = _mm512_castps_si512(b);
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(ai, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(bi, 16)), acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(ai, hi)), _mm512_castsi512_ps(_mm512_and_si512(bi, hi)), acc);
#endif
}

// One token of bf16 activations with bf16 values (decode; x16 set): 32 columns at a time, the row's 32 mask bits
// expand the next bf16 values into place (vpexpandw) and one vdpbf16ps multiplies them with the 32 inputs: a third
// of the instructions of widening to fp32 first. The products are exact in fp32 (denormal inputs count as zero,
// as the instruction does), summed in fp32 over four accumulators.
template <bool Dense>
void single_token_pairs(const Problem& p, int64_t r0, int64_t r1) {
    const uint16_t* values = static_cast<const uint16_t*>(p.values);
    const uint16_t* x = p.x16;
    const int64_t full = p.in >> 5;
    const int rem = static_cast<int>(p.in & 31);
    for (int64_t o = r0; o < r1; ++o) {
        const uint8_t* mrow = p.mask + o * p.mask_stride;
        int64_t pos = p.row_offsets[o];
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t c = 0; c < full; ++c) {
            _mm_prefetch(reinterpret_cast<const char*>(values + pos) + kPrefetchBytes, _MM_HINT_T0);
            __m512i w = _mm512_loadu_si512(values + pos);
            if (Dense) {
                pos += 32;
            } else {
                uint32_t bits;
                memcpy(&bits, mrow + 4 * c, 4);
                __asm__("" : "+v"(w));  // the register form of the expand (the memory form is slow on Zen 4)
                w = _mm512_maskz_expand_epi16(bits, w);
                pos += __builtin_popcount(bits);
            }
            acc[c & 3] = dot_pairs(acc[c & 3], _mm512_castsi512_ps(w), _mm512_castsi512_ps(_mm512_loadu_si512(x + 32 * c)));
        }
        if (rem) {  // the row's last columns; x read with a lane mask so nothing past the row is touched
            uint32_t bits = 0;
            memcpy(&bits, mrow + 4 * full, static_cast<size_t>((rem + 7) / 8));
            if (Dense) bits = (1u << rem) - 1;
            __m512i w = _mm512_loadu_si512(values + pos);
            __asm__("" : "+v"(w));
            w = _mm512_maskz_expand_epi16(bits, w);
            const __m512i xv = _mm512_maskz_loadu_epi16((1u << rem) - 1, x + 32 * full);
            acc[3] = dot_pairs(acc[3], _mm512_castsi512_ps(w), _mm512_castsi512_ps(xv));
        }
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        p.y[o] = _mm512_reduce_add_ps(sum) + (p.bias ? p.bias[o] : 0.0f);
    }
}

constexpr int64_t kOuterChunk = 128;  // inputs per chunk: 128 x 64 tokens x 4 bytes = 32 KB of xt
constexpr int kOuterRows = 64;        // rows per block

// 16 vectors of 16 lanes transposed in place: r[i][j] becomes r[j][i].
inline void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // u[4i + c]: rows 4i..4i+3 of the columns c, c + 4, c + 8, c + 12
        u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
        const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);  // columns c, c + 8 of rows 0-7
        const __m512 v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);  // columns c + 4, c + 12 of rows 0-7
        const __m512 w0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
        const __m512 w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
        r[c] = _mm512_shuffle_f32x4(v0, w0, 0x88);
        r[c + 8] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
        r[c + 4] = _mm512_shuffle_f32x4(v1, w1, 0x88);
        r[c + 12] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
    }
}

// out[0..16 NV) (tokens) = (first ? 0 : out) + sum over the n entries w[k] * xb[idx[k] .. + 16 NV): an FMA per
// weight, or in the pair form a vdpbf16ps per pair (w[k] two bf16 weights, xb pairs of bf16 inputs per token).
// S interleaved sets of accumulators, so that S * NV >= 8 chains are in flight.
template <int NV, bool Pairs>
__attribute__((always_inline)) inline void outer_row(const int32_t* idx, const void* wv, int64_t n, const void* xv,
                                                      float* out, bool first) {
    constexpr int S = NV <= 2 ? 4 : 2;
    const float* w = static_cast<const float*>(wv);  // (the pair form reads the same 32 bits as two bf16)
    const float* xb = static_cast<const float*>(xv);
    __m512 a[S][NV];
    for (int v = 0; v < NV; ++v) a[0][v] = first ? _mm512_setzero_ps() : _mm512_load_ps(out + 16 * v);
    for (int s = 1; s < S; ++s)
        for (int v = 0; v < NV; ++v) a[s][v] = _mm512_setzero_ps();
    auto step = [&](__m512* acc, int64_t k) {
        const __m512 ws = _mm512_set1_ps(w[k]);
        const float* xs = xb + idx[k];
        for (int v = 0; v < NV; ++v) {
            if constexpr (Pairs)
                acc[v] = dot_pairs(acc[v], ws, _mm512_load_ps(xs + 16 * v));
            else
                acc[v] = _mm512_fmadd_ps(ws, _mm512_load_ps(xs + 16 * v), acc[v]);
        }
    };
    int64_t k = 0;
    for (; k + S <= n; k += S)
        for (int s = 0; s < S; ++s) step(a[s], k + s);
    for (int s = 1; s < S && k + s - 1 < n; ++s) step(a[s], k + s - 1);  // the last n % S, one to each other set
    for (int v = 0; v < NV; ++v) {
        __m512 sum = a[0][v];
        for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, a[s][v]);
        _mm512_store_ps(out + 16 * v, sum);
    }
}

struct OuterScratch {
    std::vector<int32_t> idx;     // per block of rows: each row's stored columns (or pairs) times kOuterTokens
    std::vector<float> values;    // their fp32 values (or bf16 pairs), unless the packed values serve as they are
    std::vector<int64_t> starts;  // [row][chunk + 1]: where each chunk of each row starts in idx
    std::vector<float> tile;      // [kOuterRows][kOuterTokens] sums (64-byte aligned)
};

thread_local OuterScratch t_outer;

template <typename T>
T* grown(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
}

// 16 floats rounded to bf16 as module.cpp's float_to_bf16 (to nearest even; NaN the canonical quiet NaN).
inline __m256i to_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    h = _mm512_mask_mov_epi32(h, nan, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(h);
}

// The tile's rows [0, rows) and NV * 16 tokens from t0 into y (or y16) transposed 16 x 16, scaled and biased.
template <int VT, int NV>
void write_tile(const Problem& p, int64_t o0, int rows, int64_t t0, const float* tile) {
    for (int g = 0; g < rows; g += 16) {
        const int n = rows - g < 16 ? rows - g : 16;
        const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1);
        const int64_t o = o0 + g;
        const __m512 scale = VT == kI8 ? _mm512_maskz_loadu_ps(lanes, p.scales + o) : _mm512_set1_ps(1.0f);
        const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(lanes, p.bias + o) : _mm512_setzero_ps();
        for (int q = 0; q < NV; ++q) {
            const int64_t t = t0 + 16 * q;
            __m512 r[16];
            for (int i = 0; i < 16; ++i)
                r[i] = i < n ? _mm512_load_ps(tile + (g + i) * kOuterTokens + 16 * q) : _mm512_setzero_ps();
            transpose16(r);
            const int valid = p.m - t < 16 ? static_cast<int>(p.m - t) : 16;
            for (int i = 0; i < valid; ++i) {
                const __m512 v = _mm512_fmadd_ps(r[i], scale, bias);
                if (p.y16)
                    _mm256_mask_storeu_epi16(p.y16 + (t + i) * p.y_stride + o, lanes, to_bf16(v));
                else
                    _mm512_mask_storeu_ps(p.y + (t + i) * p.y_stride + o, lanes, v);
            }
        }
    }
}

template <int VT, bool Pairs, int NV>
void outer_tile(const Problem& p, int64_t o0, int rows, int64_t nk, const int32_t* idx, const float* w,
                const int64_t* starts, const float* xb, int64_t t0, float* tile) {
    for (int64_t kc = 0; kc < nk; ++kc)
        for (int r = 0; r < rows; ++r) {
            const int64_t* s = starts + r * (nk + 1) + kc;
            outer_row<NV, Pairs>(idx + s[0], w + s[0], s[1] - s[0], xb, tile + r * kOuterTokens, kc == 0);
        }
    write_tile<VT, NV>(p, o0, rows, t0, tile);
}

// The mask bits of 16-column group g of a row (the last group's bits past the row cleared).
inline uint32_t group_bits(const uint8_t* mrow, int64_t g, int64_t full, int rem) {
    if (g < full) return bits16(mrow + 2 * g);
    uint32_t bits = mrow[2 * full];
    if (rem > 8) bits |= static_cast<uint32_t>(mrow[2 * full + 1]) << 8;
    return bits & ((1u << rem) - 1);
}

// The pairs of group g that hold a stored weight, compressed to the front: their bf16 weights (the even column's
// in the low half) into w, their pair offsets (times kOuterTokens) into idx; returns how many.
template <int VT>
inline int decode_pairs(const void* values, int64_t pos, uint32_t bits, int64_t g, float* w, int32_t* idx) {
    const __m512i e = _mm512_castps_si512(expand16<VT>(values, pos, static_cast<__mmask16>(bits)));
    // each 64-bit lane holds the fp32 of columns 2i (low) and 2i + 1 (high), exact bf16 values: keep their top halves
    const __m512i d = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi64(e, 16), _mm512_set1_epi64(0xFFFF)),
                                      _mm512_and_si512(_mm512_srli_epi64(e, 32), _mm512_set1_epi64(0xFFFF0000LL)));
    const __m256i pairs = _mm512_cvtepi64_epi32(d);
    const __mmask8 used = static_cast<__mmask8>(_pext_u32(bits | (bits >> 1), 0x5555));
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i cols = _mm256_mullo_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(8 * g))),
                                            _mm256_set1_epi32(static_cast<int>(kOuterTokens)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w), _mm256_maskz_compress_epi32(used, pairs));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx), _mm256_maskz_compress_epi32(used, cols));
    return __builtin_popcount(used);
}

template <int VT, bool Pairs>
void outer_rows(const Problem& p, int64_t r0, int64_t r1) {
    const int64_t full = p.in >> 4;
    const int rem = static_cast<int>(p.in & 15);
    const int64_t groups = full + (rem ? 1 : 0);
    constexpr int64_t per_chunk = (Pairs ? 2 * kOuterChunk : kOuterChunk) / 16;  // xt's bytes per chunk alike
    const int64_t nk = groups ? (groups + per_chunk - 1) / per_chunk : 1;
    const int64_t units = Pairs ? (p.in + 1) / 2 : p.in;  // xt's rows per token block
    const int64_t nb = outer_blocks(p.m);
    OuterScratch& s = t_outer;
    int64_t* starts = grown(s.starts, static_cast<size_t>(kOuterRows * (nk + 1)));
    float* tile = grown(s.tile, static_cast<size_t>(kOuterRows * kOuterTokens + 16));
    tile = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(tile) + 63) & ~uintptr_t{63});
    const __m512i lane = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(kOuterTokens)));
    const __m512i step = _mm512_set1_epi32(static_cast<int>(16 * kOuterTokens));
    for (int64_t o0 = r0; o0 < r1; o0 += kOuterRows) {
        const int rows = static_cast<int>(r1 - o0 < kOuterRows ? r1 - o0 : kOuterRows);
        const int64_t base = p.row_offsets[o0];
        const int64_t count = p.row_offsets[o0 + rows] - base;
        int32_t* idx = grown(s.idx, static_cast<size_t>(count + 16));
        float* wbuf = VT == kF32 && !Pairs ? nullptr : grown(s.values, static_cast<size_t>(count + 16));
        // decode: each row's list (times kOuterTokens, the stride of xt) and where its chunks start
        int64_t n = 0, pos = base;
        for (int r = 0; r < rows; ++r) {
            const uint8_t* mrow = p.mask + (o0 + r) * p.mask_stride;
            int64_t* st = starts + r * (nk + 1);
            __m512i cols = lane;
            for (int64_t g = 0; g < groups; ++g) {
                if (g % per_chunk == 0) st[g / per_chunk] = n;
                const uint32_t bits = group_bits(mrow, g, full, rem);
                if constexpr (Pairs) {
                    n += decode_pairs<VT>(p.values, pos, bits, g, wbuf + n, idx + n);
                } else {
                    _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(static_cast<__mmask16>(bits), cols));
                    n += __builtin_popcount(bits);
                    cols = _mm512_add_epi32(cols, step);
                }
                pos += __builtin_popcount(bits);
            }
            if (groups == 0) st[0] = n;
            st[nk] = n;
        }
        const float* w = wbuf;
        if (!Pairs && VT == kF32) {  // the packed values, in the very order of the lists
            w = static_cast<const float*>(p.values) + base;
        } else if (!Pairs) {  // widened once for all the token blocks (int8 codes unscaled: the scale multiplies sums)
            for (int64_t k = 0; k < count; k += 16) _mm512_storeu_ps(wbuf + k, load16<VT>(p.values, base + k));
        }
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t t0 = b * kOuterTokens;
            const float* xb = p.xt + b * units * kOuterTokens;
            const int64_t left = p.m - t0;
            switch (left >= kOuterTokens ? 4 : static_cast<int>((left + 15) / 16)) {
                case 1: outer_tile<VT, Pairs, 1>(p, o0, rows, nk, idx, w, starts, xb, t0, tile); break;
                case 2: outer_tile<VT, Pairs, 2>(p, o0, rows, nk, idx, w, starts, xb, t0, tile); break;
                case 3: outer_tile<VT, Pairs, 3>(p, o0, rows, nk, idx, w, starts, xb, t0, tile); break;
                default: outer_tile<VT, Pairs, 4>(p, o0, rows, nk, idx, w, starts, xb, t0, tile); break;
            }
        }
    }
}

template <int VT, bool Dense>
void rows_of(const Problem& p, int64_t r0, int64_t r1) {
    if (p.xt) {
        if constexpr (VT != kF32) {
            if (p.x16) {
                outer_rows<VT, true>(p, r0, r1);
                return;
            }
        }
        outer_rows<VT, false>(p, r0, r1);
        return;
    }
    if (p.m == 1) {
        if constexpr (VT == kBF16) {
            if (p.x16) {
                single_token_pairs<Dense>(p, r0, r1);
                return;
            }
        }
        single_token<VT, Dense>(p, r0, r1);
        return;
    }
    int64_t o = r0;
    for (; o + kRows <= r1; o += kRows) tokens<kRows, VT, Dense>(p, o);
    for (; o < r1; ++o) tokens<1, VT, Dense>(p, o);
}

template <int VT>
void all_rows(const Problem& p, int64_t r0, int64_t r1) {
    if (p.dense)
        rows_of<VT, true>(p, r0, r1);
    else
        rows_of<VT, false>(p, r0, r1);
}

template <int VT>
void unpack_rows(const Problem& p, int64_t r0, int64_t r1, void* dst) {
    const int64_t full = p.in >> 4;
    const int rem = static_cast<int>(p.in & 15);
    for (int64_t o = r0; o < r1; ++o) {
        const uint8_t* row = p.mask + o * p.mask_stride;
        int64_t pos = p.row_offsets[o];
        const __m512 scale = _mm512_set1_ps(VT == kI8 ? p.scales[o] : 1.0f);
        for (int64_t c = 0; c <= full; ++c) {
            uint32_t bits;
            __mmask16 lanes = 0xFFFF;
            if (c < full) {
                bits = bits16(row + 2 * c);
            } else {
                if (!rem) break;
                bits = row[2 * full];
                if (rem > 8) bits |= static_cast<uint32_t>(row[2 * full + 1]) << 8;
                lanes = static_cast<__mmask16>((1u << rem) - 1);
            }
            __m512 w = expand16<VT>(p.values, pos, static_cast<__mmask16>(bits));
            pos += __builtin_popcount(bits);
            if (VT == kBF16) {  // back to the exact 16-bit patterns
                const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(w), 16));
                uint16_t* out = static_cast<uint16_t*>(dst) + (o - r0) * p.in + c * 16;
                _mm256_mask_storeu_epi16(out, lanes, h);
            } else {
                if (VT == kI8) w = _mm512_mul_ps(w, scale);
                _mm512_mask_storeu_ps(static_cast<float*>(dst) + (o - r0) * p.in + c * 16, lanes, w);
            }
        }
    }
}

// y += x_j * W[:, j] over the active columns, C columns at a time: for each 16-row chunk of y, each column's mask
// bits expand its next values into place and one FMA adds them, so y is loaded and stored once per C columns and
// the C position chains run side by side. y stays in L1/L2; the columns' masks and values stream in once.
template <int C, int VT>
void column_group(const ColumnProblem& p, int64_t k) {
    const int64_t full = p.out >> 4;
    const int rem = static_cast<int>(p.out & 15);
    __m512 xv[C];
    const uint8_t* m[C];
    int64_t pos[C];
    for (int i = 0; i < C; ++i) {
        const int64_t j = p.active[k + i];
        xv[i] = _mm512_set1_ps(p.xa[k + i]);
        m[i] = p.mask + j * p.mask_stride;
        pos[i] = p.col_offsets[j];
    }
    float* y = p.y;
    for (int64_t c = 0; c < full; ++c) {
        __m512 acc[2] = {_mm512_loadu_ps(y + c * 16), _mm512_setzero_ps()};  // two chains of C / 2 FMAs
        for (int i = 0; i < C; ++i) {
            const uint32_t bits = bits16(m[i] + 2 * c);
            acc[i & 1] = _mm512_fmadd_ps(expand16<VT>(p.values, pos[i], static_cast<__mmask16>(bits)), xv[i], acc[i & 1]);
            pos[i] += __builtin_popcount(bits);
        }
        _mm512_storeu_ps(y + c * 16, _mm512_add_ps(acc[0], acc[1]));
    }
    if (rem) {
        const __mmask16 tail = static_cast<__mmask16>((1u << rem) - 1);
        __m512 acc = _mm512_maskz_loadu_ps(tail, y + full * 16);
        for (int i = 0; i < C; ++i) {
            uint32_t bits = m[i][2 * full];
            if (rem > 8) bits |= static_cast<uint32_t>(m[i][2 * full + 1]) << 8;
            acc = _mm512_fmadd_ps(expand16<VT>(p.values, pos[i], static_cast<__mmask16>(bits) & tail), xv[i], acc);
        }
        _mm512_mask_storeu_ps(y + full * 16, tail, acc);
    }
}

template <int VT>
void active_columns(const ColumnProblem& p) {
    int64_t k = p.k0;
    for (; k + 8 <= p.k1; k += 8) column_group<8, VT>(p, k);
    for (; k + 4 <= p.k1; k += 4) column_group<4, VT>(p, k);
    for (; k < p.k1; ++k) column_group<1, VT>(p, k);
}

}  // namespace

void cols_avx512(const ColumnProblem& p) {
    switch (p.values_type) {
        case kBF16: active_columns<kBF16>(p); break;
        case kI8: active_columns<kI8>(p); break;
        default: active_columns<kF32>(p); break;
    }
}

void unpack_avx512(const Problem& p, int64_t r0, int64_t r1, void* dst) {
    switch (p.values_type) {
        case kBF16: unpack_rows<kBF16>(p, r0, r1, dst); break;
        case kI8: unpack_rows<kI8>(p, r0, r1, dst); break;
        default: unpack_rows<kF32>(p, r0, r1, dst); break;
    }
}

void transpose_x_avx512(const Problem& p, int64_t b0, int64_t b1, float* xt) {
    // 16 tokens x 16 units (fp32 inputs, or pairs of bf16 inputs as 32-bit lanes) at a time, transposed in registers
    const bool pairs = p.x16 != nullptr;
    const int64_t units = pairs ? (p.in + 1) / 2 : p.in;
    for (int64_t b = b0; b < b1; ++b) {
        float* dst = xt + b * units * kOuterTokens;
        for (int q = 0; q < kOuterTokens / 16; ++q) {
            const int64_t t0 = b * kOuterTokens + 16 * q;
            const int valid = p.m - t0 >= 16 ? 16 : p.m - t0 > 0 ? static_cast<int>(p.m - t0) : 0;
            for (int64_t u0 = 0; u0 < units; u0 += 16) {
                const int n = units - u0 < 16 ? static_cast<int>(units - u0) : 16;
                __m512 r[16];
                if (pairs) {  // bf16 inputs 2 u0 .. 2 u0 + 31 of each token, those past the row read as zero
                    const int64_t cols = p.in - 2 * u0 < 32 ? p.in - 2 * u0 : 32;
                    const __mmask32 lanes = static_cast<__mmask32>(cols == 32 ? ~0u : (1u << cols) - 1);
                    for (int i = 0; i < 16; ++i)
                        r[i] = i < valid ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(lanes, p.x16 + (t0 + i) * p.x_stride + 2 * u0))
                                         : _mm512_setzero_ps();
                } else {
                    const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1);
                    for (int i = 0; i < 16; ++i)
                        r[i] = i < valid ? _mm512_maskz_loadu_ps(lanes, p.x + (t0 + i) * p.x_stride + u0) : _mm512_setzero_ps();
                }
                transpose16(r);
                for (int c = 0; c < n; ++c) _mm512_store_ps(dst + (u0 + c) * kOuterTokens + 16 * q, r[c]);
            }
        }
    }
}

void attend_avx512(const AttendProblem& a) {
    const int64_t group = a.heads / a.kv_heads, d = a.d, chunks = d / 16;
    float* scores = a.scores;
    for (int64_t h = 0; h < a.heads; ++h) {
        const float* qh = a.q + h * d;
        const float* kh = a.k + (h / group) * a.head_stride;
        const float* vh = a.v + (h / group) * a.head_stride;
        float top = -INFINITY;
        for (int64_t i = 0; i < a.length; ++i) {
            const float* ki = kh + i * d;
            __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qh), _mm512_loadu_ps(ki));
            for (int64_t c = 1; c < chunks; ++c)
                dot = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), _mm512_loadu_ps(ki + 16 * c), dot);
            scores[i] = _mm512_reduce_add_ps(dot) * a.scale;
            top = scores[i] > top ? scores[i] : top;
        }
        float total = 0.0f;
        for (int64_t i = 0; i < a.length; ++i) total += (scores[i] = expf(scores[i] - top));
        const float inv = 1.0f / total;
        for (int64_t c = 0; c < chunks; ++c) {  // 16 outputs at a time, summed over the keys in order
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < a.length; ++i)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[i]), _mm512_loadu_ps(vh + i * d + 16 * c), acc);
            _mm512_storeu_ps(a.out + h * d + 16 * c, _mm512_mul_ps(acc, _mm512_set1_ps(inv)));
        }
    }
}

void rows_avx512(const Problem& p, int64_t r0, int64_t r1) {
    switch (p.values_type) {
        case kBF16: all_rows<kBF16>(p, r0, r1); break;
        case kI8: all_rows<kI8>(p, r0, r1); break;
        default: all_rows<kF32>(p, r0, r1); break;
    }
}

}  // namespace secateurs

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (the dispatcher reports no AVX-512)
#include "kernel.h"
namespace secateurs {
void rows_avx512(const Problem&, int64_t, int64_t) {}
void cols_avx512(const ColumnProblem&) {}
void unpack_avx512(const Problem&, int64_t, int64_t, void*) {}
void transpose_x_avx512(const Problem&, int64_t, int64_t, float*) {}
void attend_avx512(const AttendProblem&) {}
}  // namespace secateurs
#endif
