// Portable kernel: walks the set bits of each row's mask. Always built; the reference the SIMD paths must match.
#include <string.h>

#include "kernel.h"

namespace secateurs {
namespace {

constexpr int kTokens = 8;  // tokens per block: one pass over a row's values feeds all of them

inline float value_of(const void* values, int type, int64_t i) {
    if (type == kF32) return static_cast<const float*>(values)[i];
    if (type == kI8) return static_cast<float>(static_cast<const int8_t*>(values)[i]);
    uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(values)[i]) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

inline float value_at(const Problem& p, int64_t i) { return value_of(p.values, p.values_type, i); }

}  // namespace

void cols_scalar(const ColumnProblem& p) {
    const int64_t bytes = (p.out + 7) / 8;
    for (int64_t k = p.k0; k < p.k1; ++k) {
        const int64_t j = p.active[k];
        const float xj = p.xa[k];
        const uint8_t* m = p.mask + j * p.mask_stride;
        int64_t pos = p.col_offsets[j];
        for (int64_t byte = 0; byte < bytes; ++byte) {
            for (unsigned bits = m[byte]; bits; bits &= bits - 1) {
                const int64_t o = byte * 8 + __builtin_ctz(bits);
                const float w = value_of(p.values, p.values_type, pos++);
                if (o < p.out) p.y[o] += w * xj;
            }
        }
    }
}

void rows_scalar(const Problem& p, int64_t r0, int64_t r1) {
    for (int64_t t0 = 0; t0 < p.m; t0 += kTokens) {
        const int mb = static_cast<int>(p.m - t0 < kTokens ? p.m - t0 : kTokens);
        for (int64_t o = r0; o < r1; ++o) {
            float acc[kTokens] = {0};
            const uint8_t* row = p.mask + o * p.mask_stride;
            int64_t pos = p.row_offsets[o];
            for (int64_t byte = 0; byte < p.mask_stride; ++byte) {
                unsigned bits = row[byte];
                while (bits) {
                    const int64_t col = byte * 8 + __builtin_ctz(bits);
                    bits &= bits - 1;
                    const float w = value_at(p, pos++);
                    for (int t = 0; t < mb; ++t) acc[t] += w * p.x[(t0 + t) * p.x_stride + col];
                }
            }
            const float b = p.bias ? p.bias[o] : 0.0f;
            const float scale = p.scales ? p.scales[o] : 1.0f;
            for (int t = 0; t < mb; ++t) p.y[(t0 + t) * p.y_stride + o] = acc[t] * scale + b;
        }
    }
}

void unpack_scalar(const Problem& p, int64_t r0, int64_t r1, void* dst) {
    for (int64_t o = r0; o < r1; ++o) {
        const uint8_t* row = p.mask + o * p.mask_stride;
        int64_t pos = p.row_offsets[o];
        if (p.values_type == kBF16) {
            uint16_t* out = static_cast<uint16_t*>(dst) + (o - r0) * p.in;
            memset(out, 0, sizeof(uint16_t) * p.in);
            const uint16_t* v = static_cast<const uint16_t*>(p.values);
            for (int64_t byte = 0; byte < p.mask_stride; ++byte)
                for (unsigned bits = row[byte]; bits; bits &= bits - 1) out[byte * 8 + __builtin_ctz(bits)] = v[pos++];
        } else {
            float* out = static_cast<float*>(dst) + (o - r0) * p.in;
            memset(out, 0, sizeof(float) * p.in);
            const float scale = p.scales ? p.scales[o] : 1.0f;
            for (int64_t byte = 0; byte < p.mask_stride; ++byte)
                for (unsigned bits = row[byte]; bits; bits &= bits - 1)
                    out[byte * 8 + __builtin_ctz(bits)] = value_at(p, pos++) * scale;
        }
    }
}

}  // namespace secateurs
