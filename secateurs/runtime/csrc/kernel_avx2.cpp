// AVX2 + FMA kernel: 8 columns at a time. A 256-entry table turns the row's mask byte into a lane permutation
// that moves the next packed values into place (vpermps); lanes whose bit is clear are zeroed. Compiled for
// these instructions by the pragma below only, and called only when the CPU reports them.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <string.h>

#include "kernel.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,bmi,bmi2,popcnt"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
#endif

namespace secateurs {
namespace {

// kPermutation[byte]: nibble j = index among the packed values of lane j (popcount of the lower bits).
struct PermutationTable {
    uint32_t entry[256];
    constexpr PermutationTable() : entry() {
        for (int byte = 0; byte < 256; ++byte) {
            uint32_t packed = 0;
            int next = 0;
            for (int lane = 0; lane < 8; ++lane) {
                if (byte & (1 << lane)) packed |= static_cast<uint32_t>(next++) << (4 * lane);
            }
            entry[byte] = packed;
        }
    }
};
constexpr PermutationTable kPermutation;

template <int VT>
inline __m256 load8(const void* values, int64_t pos) {
    if (VT == kI8) {
        const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(values) + pos));
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
    }
    if (VT == kBF16) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + pos));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    }
    return _mm256_loadu_ps(static_cast<const float*>(values) + pos);
}

// The next popcount(byte) packed values, moved to the lanes whose mask bits are set (others zero), as fp32.
template <int VT>
inline __m256 expand8(const void* values, int64_t pos, uint32_t byte) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    // vpermps reads only the low 3 bits of each index: no need to mask the nibbles
    const __m256i index = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(kPermutation.entry[byte])), shifts);
    const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), lane_bit), lane_bit);
    return _mm256_and_ps(_mm256_permutevar8x32_ps(load8<VT>(values, pos), index), _mm256_castsi256_ps(keep));
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// R consecutive rows starting at o, MB consecutive tokens starting at t0. Dense: every weight stored, so the
// next 8 values are the next 8 columns (no mask read, no permutation).
template <int MB, int R, int VT, bool Dense>
void block(const Problem& p, int64_t o, int64_t t0) {
    __m256 acc[R * MB];
    for (int i = 0; i < R * MB; ++i) acc[i] = _mm256_setzero_ps();
    int64_t pos[R];
    const uint8_t* mrow[R];
    for (int r = 0; r < R; ++r) {
        pos[r] = p.row_offsets[o + r];
        mrow[r] = p.mask + (o + r) * p.mask_stride;
    }
    const float* x = p.x + t0 * p.x_stride;
    const int64_t xs = p.x_stride;
    const int64_t full = p.in >> 3;
    for (int64_t c = 0; c < full; ++c) {
        for (int r = 0; r < R; ++r) {
            __m256 w;
            if (Dense) {
                w = load8<VT>(p.values, pos[r]);
                pos[r] += 8;
            } else {
                const uint32_t byte = mrow[r][c];
                w = expand8<VT>(p.values, pos[r], byte);
                pos[r] += __builtin_popcount(byte);
            }
            for (int t = 0; t < MB; ++t)
                acc[r * MB + t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * xs + c * 8), acc[r * MB + t]);
        }
    }
    const int rem = static_cast<int>(p.in & 7);
    if (rem) {  // x read with a lane mask (vmaskmovps does not touch masked-off memory)
        const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i xmask = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), lanes);
        for (int r = 0; r < R; ++r) {
            const __m256 w = expand8<VT>(p.values, pos[r], mrow[r][full]);
            for (int t = 0; t < MB; ++t)
                acc[r * MB + t] = _mm256_fmadd_ps(w, _mm256_maskload_ps(x + t * xs + full * 8, xmask), acc[r * MB + t]);
        }
    }
    for (int r = 0; r < R; ++r) {
        const float b = p.bias ? p.bias[o + r] : 0.0f;
        const float scale = VT == kI8 ? p.scales[o + r] : 1.0f;
        for (int t = 0; t < MB; ++t) p.y[(t0 + t) * p.y_stride + o + r] = hsum(acc[r * MB + t]) * scale + b;
    }
}

// Blocks of 2 rows x 4 tokens: 8 accumulators, half of the 16 ymm registers.
// Rows outer, tokens inner: a block of rows is read from memory once and stays in L1 for every token block.
constexpr int kRows = 2;
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

// One token (decode): each row on its own, its 8-column chunks spread over four accumulators, with a software
// prefetch kPrefetchBytes ahead in the values and the mask (see the AVX-512 kernel's single_token).
constexpr int64_t kPrefetchBytes = 4096;

template <int VT, bool Dense>
void single_token(const Problem& p, int64_t r0, int64_t r1) {
    constexpr int kElem = VT == kF32 ? 4 : VT == kBF16 ? 2 : 1;
    const char* values = static_cast<const char*>(p.values);
    const float* x = p.x;
    const int64_t full = p.in >> 3;
    const int rem = static_cast<int>(p.in & 7);
    for (int64_t o = r0; o < r1; ++o) {
        const uint8_t* mrow = p.mask + o * p.mask_stride;
        int64_t pos = p.row_offsets[o];
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int64_t c = 0;
        for (; c + 4 <= full; c += 4) {
            if (!Dense) _mm_prefetch(reinterpret_cast<const char*>(mrow + c + kPrefetchBytes / 8), _MM_HINT_T0);
            _mm_prefetch(values + pos * kElem + kPrefetchBytes, _MM_HINT_T0);  // (never faults past the end)
            for (int u = 0; u < 4; ++u) {
                __m256 w;
                if (Dense) {
                    w = load8<VT>(p.values, pos);
                    pos += 8;
                } else {
                    const uint32_t byte = mrow[c + u];
                    w = expand8<VT>(p.values, pos, byte);
                    pos += __builtin_popcount(byte);
                }
                acc[u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (c + u) * 8), acc[u]);
            }
        }
        for (; c < full; ++c) {
            const uint32_t byte = mrow[c];  // (a dense row's mask bits are all set)
            const __m256 w = expand8<VT>(p.values, pos, byte);
            pos += __builtin_popcount(byte);
            acc[0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + c * 8), acc[0]);
        }
        if (rem) {  // x read with a lane mask (vmaskmovps does not touch masked-off memory)
            const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            const __m256i xmask = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), lanes);
            const __m256 w = expand8<VT>(p.values, pos, mrow[full]);
            acc[3] = _mm256_fmadd_ps(w, _mm256_maskload_ps(x + full * 8, xmask), acc[3]);
        }
        const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        const float scale = VT == kI8 ? p.scales[o] : 1.0f;
        p.y[o] = hsum(sum) * scale + (p.bias ? p.bias[o] : 0.0f);
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
    const int64_t full = p.in >> 3;
    const int rem = static_cast<int>(p.in & 7);
    for (int64_t o = r0; o < r1; ++o) {
        const uint8_t* row = p.mask + o * p.mask_stride;
        int64_t pos = p.row_offsets[o];
        const __m256 scale = _mm256_set1_ps(VT == kI8 ? p.scales[o] : 1.0f);
        for (int64_t c = 0; c < full; ++c) {
            const uint32_t byte = row[c];
            __m256 w = expand8<VT>(p.values, pos, byte);
            pos += __builtin_popcount(byte);
            if (VT == kBF16) {  // the exact 16-bit patterns: the high halves of the widened lanes
                const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(w), 16);
                const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(dst) + (o - r0) * p.in + c * 8), packed);
            } else {
                if (VT == kI8) w = _mm256_mul_ps(w, scale);
                _mm256_storeu_ps(static_cast<float*>(dst) + (o - r0) * p.in + c * 8, w);
            }
        }
        if (rem) {  // the last few columns, one at a time
            alignas(32) float lanes[8];
            _mm256_store_ps(lanes, expand8<VT>(p.values, pos, row[full]));
            for (int j = 0; j < rem; ++j) {
                float v = lanes[j];
                if (VT == kBF16) {
                    uint32_t u;
                    memcpy(&u, &v, sizeof u);
                    static_cast<uint16_t*>(dst)[(o - r0) * p.in + full * 8 + j] = static_cast<uint16_t>(u >> 16);
                } else {
                    static_cast<float*>(dst)[(o - r0) * p.in + full * 8 + j] = VT == kI8 ? v * p.scales[o] : v;
                }
            }
        }
    }
}

// y += x_j * W[:, j] over the active columns, C columns at a time, 8 rows (one mask byte) per step: y is loaded
// and stored once per C columns, two FMA chains, C position chains side by side.
template <int C, int VT>
void column_group(const ColumnProblem& p, int64_t k) {
    const int64_t full = p.out >> 3;
    const int rem = static_cast<int>(p.out & 7);
    __m256 xv[C];
    const uint8_t* m[C];
    int64_t pos[C];
    for (int i = 0; i < C; ++i) {
        const int64_t j = p.active[k + i];
        xv[i] = _mm256_set1_ps(p.xa[k + i]);
        m[i] = p.mask + j * p.mask_stride;
        pos[i] = p.col_offsets[j];
    }
    float* y = p.y;
    for (int64_t c = 0; c < full; ++c) {
        __m256 acc[2] = {_mm256_loadu_ps(y + c * 8), _mm256_setzero_ps()};
        for (int i = 0; i < C; ++i) {
            const uint32_t byte = m[i][c];
            acc[i & 1] = _mm256_fmadd_ps(expand8<VT>(p.values, pos[i], byte), xv[i], acc[i & 1]);
            pos[i] += __builtin_popcount(byte);
        }
        _mm256_storeu_ps(y + c * 8, _mm256_add_ps(acc[0], acc[1]));
    }
    if (rem) {  // the last few rows, one at a time
        for (int i = 0; i < C; ++i) {
            alignas(32) float lanes[8];
            _mm256_store_ps(lanes, expand8<VT>(p.values, pos[i], m[i][full] & ((1u << rem) - 1)));
            for (int r = 0; r < rem; ++r) y[full * 8 + r] += lanes[r] * p.xa[k + i];
        }
    }
}

template <int VT>
void active_columns(const ColumnProblem& p) {
    int64_t k = p.k0;
    for (; k + 4 <= p.k1; k += 4) column_group<4, VT>(p, k);
    for (; k < p.k1; ++k) column_group<1, VT>(p, k);
}

}  // namespace

void cols_avx2(const ColumnProblem& p) {
    switch (p.values_type) {
        case kBF16: active_columns<kBF16>(p); break;
        case kI8: active_columns<kI8>(p); break;
        default: active_columns<kF32>(p); break;
    }
}

void unpack_avx2(const Problem& p, int64_t r0, int64_t r1, void* dst) {
    switch (p.values_type) {
        case kBF16: unpack_rows<kBF16>(p, r0, r1, dst); break;
        case kI8: unpack_rows<kI8>(p, r0, r1, dst); break;
        default: unpack_rows<kF32>(p, r0, r1, dst); break;
    }
}

void rows_avx2(const Problem& p, int64_t r0, int64_t r1) {
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

#else  // not x86-64: never called (the dispatcher reports no AVX2)
#include "kernel.h"
namespace secateurs {
void rows_avx2(const Problem&, int64_t, int64_t) {}
void cols_avx2(const ColumnProblem&) {}
void unpack_avx2(const Problem&, int64_t, int64_t, void*) {}
}  // namespace secateurs
#endif
