// AVX-512 kernel (F, BW, VL, DQ, VBMI2): 16 columns at a time, the row's 16 mask bits expand the next packed
// values into place (register-form vexpandps), then one FMA per token. Compiled for these
// instructions by the pragma below only, and called only when the CPU reports them.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <string.h>

#include "kernel.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,fma,bmi,bmi2,popcnt"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,fma,bmi,bmi2,popcnt")
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

template <int VT, bool Dense>
void rows_of(const Problem& p, int64_t r0, int64_t r1) {
    if (p.m == 1) {
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
}  // namespace secateurs
#endif
