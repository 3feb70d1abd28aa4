// int8 weights times int8 activations (AVX-512 VNNI): the product of int8-valued packed weights with inputs
// quantised on the fly to int8, one scale per group of 64 inputs (kI8Group), as llama.cpp multiplies Q8_0 weights
// with Q8_0 activations. Per group of 64 columns of a row: its 64 mask bits expand the next stored codes into place
// (vpexpandb), the codes are offset to unsigned (w + 128, so the pruned lanes read 128) and one vpdpbusd
// multiplies them with the group's 64 signed input codes into 16 int32 lanes. The offset contributes 128 times the
// sum of the lane's four input codes to every row alike; each lane starts at minus that (xc), so every lane holds
// exactly its share of the integer product. It is widened to fp32 and multiplied by the group's input scale; the
// row's weight scale multiplies the finished sum. Compiled for these instructions by the pragma below only, and
// called only when the CPU reports them (module.cpp: kFeatures bit 3).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <string.h>

#include <vector>

#include "kernel.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512vnni,fma,bmi,bmi2,popcnt"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512vnni,fma,bmi,bmi2,popcnt")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace secateurs {
namespace {

static_assert(kI8Group == 64, "one zmm of int8 codes per group");

// The 64 mask bits of group g of a row (its bits past the row are zero: the mask's last byte is padded with
// zeros, and the bytes past the row's are not read).
inline uint64_t group_bits(const uint8_t* mrow, int64_t g, int64_t mask_bytes) {
    uint64_t v = 0;
    const int64_t left = mask_bytes - g * 8;
    memcpy(&v, mrow + g * 8, static_cast<size_t>(left >= 8 ? 8 : left));
    return v;
}

// Codes of group g of a row, as unsigned bytes w + 128 (zero for a pruned weight becomes 128). Dense: the row's
// values themselves (lanes past the row read the next row's, which meet zero input codes). The empty asm keeps
// the load a separate instruction, as kernel_avx512.cpp's expand16 does: the memory form of the expand is slow
// on AMD Zen 4.
template <bool Dense>
inline __m512i unsigned_codes(const int8_t* values, int64_t& pos, uint64_t bits) {
    __m512i raw = _mm512_loadu_si512(values + pos);
    const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
    if (Dense) {
        pos += 64;
        return _mm512_xor_si512(raw, offset);
    }
    __asm__("" : "+v"(raw));
    pos += __builtin_popcountll(bits);
    return _mm512_xor_si512(_mm512_maskz_expand_epi8(bits, raw), offset);
}

constexpr int64_t kPrefetchBytes = 2048;

// One token: rows in pairs, so each group's input codes, lane starts and scale are loaded once for two rows; each
// row streams its mask and codes once, with a software prefetch ahead in its codes (their addresses depend on the
// mask bits just read, which the core's own look-ahead does not follow far).
template <bool Dense>
inline __m512i row_codes(const int8_t* values, int64_t& pos, const uint8_t* mrow, int64_t g, int64_t whole,
                         int64_t mask_bytes) {
    uint64_t bits = ~uint64_t{0};
    if (!Dense) {
        if (g < whole)
            memcpy(&bits, mrow + g * 8, 8);
        else
            bits = group_bits(mrow, g, mask_bytes);
    }
    return unsigned_codes<Dense>(values, pos, bits);
}

template <bool Dense, int R>
void token_rows(const Problem& p, int64_t o) {
    const int8_t* values = static_cast<const int8_t*>(p.values);
    const int64_t groups = i8_groups(p.in);
    const int64_t whole = p.mask_stride / 8;  // groups whose 8 mask bytes are all the row's
    const __m512i* xc = reinterpret_cast<const __m512i*>(p.xc);
    const uint8_t* mrow[R];
    int64_t pos[R];
    __m512 acc[R];
    for (int r = 0; r < R; ++r) {
        mrow[r] = p.mask + (o + r) * p.mask_stride;
        pos[r] = p.row_offsets[o + r];
        acc[r] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < groups; ++g) {
        const __m512i x = _mm512_load_si512(p.xq + g * kI8Group);
        const __m512i c = _mm512_load_si512(xc + g);
        const __m512 s = _mm512_set1_ps(p.xs[g]);
        for (int r = 0; r < R; ++r) {
            _mm_prefetch(reinterpret_cast<const char*>(values + pos[r] + kPrefetchBytes), _MM_HINT_T0);
            const __m512i w = row_codes<Dense>(values, pos[r], mrow[r], g, whole, p.mask_stride);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c, w, x)), s, acc[r]);
        }
    }
    for (int r = 0; r < R; ++r)
        p.y[o + r] = _mm512_reduce_add_ps(acc[r]) * p.scales[o + r] + (p.bias ? p.bias[o + r] : 0.0f);
}

template <bool Dense>
void single_token(const Problem& p, int64_t r0, int64_t r1) {
    int64_t o = r0;
    for (; o + 2 <= r1; o += 2) token_rows<Dense, 2>(p, o);
    if (o < r1) token_rows<Dense, 1>(p, o);
}

// Many tokens: kRowBlock rows have their groups expanded once into a buffer, then multiplied with kTokens tokens
// at a time, each token's input codes, lane starts and scales loaded once for the block of rows (rows x tokens
// accumulators in registers).
constexpr int kTokens = 4;
constexpr int kRowBlock = 4;

template <int R, int MB>
inline void block_tokens(const Problem& p, const __m512i* w, int64_t groups, int64_t o, int64_t t0) {
    __m512 acc[R][MB];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < MB; ++t) acc[r][t] = _mm512_setzero_ps();
    const int64_t xq_stride = groups * kI8Group;
    const __m512i* xc = reinterpret_cast<const __m512i*>(p.xc);
    for (int64_t g = 0; g < groups; ++g) {
        __m512i wg[R];
        for (int r = 0; r < R; ++r) wg[r] = _mm512_load_si512(w + r * groups + g);
        for (int t = 0; t < MB; ++t) {
            const int64_t tok = t0 + t;
            const __m512i x = _mm512_load_si512(p.xq + tok * xq_stride + g * kI8Group);
            const __m512i c = _mm512_load_si512(xc + tok * groups + g);
            const __m512 s = _mm512_set1_ps(p.xs[tok * groups + g]);
            for (int r = 0; r < R; ++r)
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c, wg[r], x)), s, acc[r][t]);
        }
    }
    for (int r = 0; r < R; ++r) {
        const float scale = p.scales[o + r];
        const float b = p.bias ? p.bias[o + r] : 0.0f;
        for (int t = 0; t < MB; ++t) p.y[(t0 + t) * p.y_stride + o + r] = _mm512_reduce_add_ps(acc[r][t]) * scale + b;
    }
}

template <int R>
inline void rows_tokens(const Problem& p, const __m512i* w, int64_t groups, int64_t o) {
    int64_t t0 = 0;
    for (; t0 + kTokens <= p.m; t0 += kTokens) block_tokens<R, kTokens>(p, w, groups, o, t0);
    switch (p.m - t0) {
        case 1: block_tokens<R, 1>(p, w, groups, o, t0); break;
        case 2: block_tokens<R, 2>(p, w, groups, o, t0); break;
        case 3: block_tokens<R, 3>(p, w, groups, o, t0); break;
        default: break;
    }
}

template <bool Dense>
void many_tokens(const Problem& p, int64_t r0, int64_t r1) {
    const int8_t* values = static_cast<const int8_t*>(p.values);
    const int64_t groups = i8_groups(p.in);
    const int64_t whole = p.mask_stride / 8;
    thread_local std::vector<uint8_t> buffer;  // the block's rows of codes, 64-byte aligned
    const size_t need = static_cast<size_t>((kRowBlock * groups + 1) * kI8Group);
    if (buffer.size() < need) buffer.resize(need);
    __m512i* w = reinterpret_cast<__m512i*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t{63});
    for (int64_t o = r0; o < r1; o += kRowBlock) {
        const int rows = static_cast<int>(r1 - o < kRowBlock ? r1 - o : kRowBlock);
        for (int r = 0; r < rows; ++r) {
            const uint8_t* mrow = p.mask + (o + r) * p.mask_stride;
            int64_t pos = p.row_offsets[o + r];
            for (int64_t g = 0; g < groups; ++g)
                _mm512_store_si512(w + r * groups + g, row_codes<Dense>(values, pos, mrow, g, whole, p.mask_stride));
        }
        switch (rows) {
            case 1: rows_tokens<1>(p, w, groups, o); break;
            case 2: rows_tokens<2>(p, w, groups, o); break;
            case 3: rows_tokens<3>(p, w, groups, o); break;
            default: rows_tokens<4>(p, w, groups, o); break;
        }
    }
}

}  // namespace

void quantize_x_vnni(const float* x, int64_t x_stride, int64_t in, int64_t t0, int64_t t1, int8_t* xq, float* xs,
                     int32_t* xc) {
    const int64_t groups = (in + kI8Group - 1) / kI8Group;
    for (int64_t t = t0; t < t1; ++t) {
        const float* xr = x + t * x_stride;
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t j0 = g * kI8Group;
            const int64_t n = in - j0 < kI8Group ? in - j0 : kI8Group;
            __m512 v[4];
            __m512 amax = _mm512_setzero_ps();
            for (int i = 0; i < 4; ++i) {
                const int64_t left = n - i * 16;
                const __mmask16 k = left >= 16 ? 0xffff : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
                v[i] = _mm512_maskz_loadu_ps(k, xr + j0 + i * 16);
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
            }
            const float a = _mm512_reduce_max_ps(amax);
            const float inv = a > 0.0f ? 127.0f / a : 0.0f;
            const __m512 vinv = _mm512_set1_ps(inv);
            int8_t* q = xq + t * groups * kI8Group + j0;
            for (int i = 0; i < 4; ++i) {
                const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], vinv));  // round to nearest even
                _mm_store_si128(reinterpret_cast<__m128i*>(q + i * 16), _mm512_cvtepi32_epi8(c));
            }
            xs[t * groups + g] = a / 127.0f;
            // lane l of a product meets codes 4l..4l+3: it starts at minus 128 times their sum
            const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(static_cast<char>(0x80)),
                                                     _mm512_load_si512(q));
            _mm512_store_si512(xc + (t * groups + g) * 16, _mm512_sub_epi32(_mm512_setzero_si512(), sums));
        }
    }
}

void rows_vnni(const Problem& p, int64_t r0, int64_t r1) {
    if (p.m == 1) {
        if (p.dense)
            single_token<true>(p, r0, r1);
        else
            single_token<false>(p, r0, r1);
    } else if (p.dense) {
        many_tokens<true>(p, r0, r1);
    } else {
        many_tokens<false>(p, r0, r1);
    }
}

}  // namespace secateurs

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (the dispatcher reports no VNNI)
#include "kernel.h"
namespace secateurs {
void quantize_x_vnni(const float*, int64_t, int64_t, int64_t, int64_t, int8_t*, float*, int32_t*) {}
void rows_vnni(const Problem&, int64_t, int64_t) {}
}  // namespace secateurs
#endif
