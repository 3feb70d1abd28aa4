// The sparse matmul problem shared by the scalar, AVX2 and AVX-512 kernels.
//
// A pruned weight W [out, in] is a bitmask (bit j % 8 of byte j / 8 of a row is set iff W[o, j] is stored) and the
// stored values in row-major order, padded so a full SIMD vector may be loaded past the last value. Values are
// float32, bfloat16, or int8 with one float32 scale per row (W[o, j] = scales[o] * q[o, j]; the scale multiplies
// the row's finished sum, so the inner loop only widens int8 to fp32). Each kernel computes
// y[t, o] = sum_j W[o, j] * x[t, j] (+ bias[o]) in fp32 for the rows [r0, r1) and every token t. A weight with
// every entry stored (an LM head on the kernel's threads) is flagged dense: the SIMD kernels then load its values
// in place, without reading the mask or expanding.
#pragma once

#include <stdint.h>

namespace secateurs {

enum ValueType { kF32 = 0, kBF16 = 1, kI8 = 2 };

struct Problem {
    const uint8_t* mask;         // [out, mask_stride]
    int64_t mask_stride;         // ceil(in / 8)
    const void* values;          // float32, bfloat16 or int8 (values_type), padded
    int values_type;             // kF32, kBF16 or kI8
    const float* scales;         // [out] per-row scales of int8 values, else null
    const int64_t* row_offsets;  // [out + 1]
    int64_t out, in;
    const float* x;              // [m, x_stride] fp32
    int64_t x_stride, m;
    const float* bias;           // [out] fp32 or null
    float* y;                    // [m, y_stride] fp32
    int64_t y_stride;
    bool dense = false;          // every weight stored (full mask): the values are the rows themselves
    const float* xt = nullptr;   // AVX-512 outer-product path (prefill): x transposed by transpose_x_avx512
    const uint16_t* x16 = nullptr;  // its bf16 pair form: the bf16 activations [m, x_stride] (x is then unused)
    uint16_t* y16 = nullptr;        // outer products with a bf16 result: y [m, y_stride] rounded to bf16 (y unused)
    // int8 activations (rows_vnni): x quantised by quantize_x_vnni, one scale per group of kI8Group inputs
    const int8_t* xq = nullptr;     // [m, groups * kI8Group] codes, zero past the row; 64-byte aligned
    const float* xs = nullptr;      // [m, groups] scales: x[t, j] ~ xs[t, j / kI8Group] * xq[t, j]
    const int32_t* xc = nullptr;    // [m, groups, 16] accumulator starts: lane l = -128 * sum of codes 4l..4l+3
};

// int8 weights times int8 activations (AVX-512 VNNI, kernel_vnni.cpp; int8 values only). quantize_x_vnni writes
// tokens [t0, t1) of x [*, x_stride] fp32 (finite) as symmetric int8 codes, one scale per group of kI8Group inputs:
// scale = max |x| / 127, code = round-half-even(x * (127 / max |x|)) (all zero for an all-zero group); rows_vnni
// multiplies rows [r0, r1) with them: y[t, o] = scales[o] * sum_g xs[t, g] * (sum_j q[o, j] * xq[t, j]) + bias.
constexpr int64_t kI8Group = 64;
inline int64_t i8_groups(int64_t in) { return (in + kI8Group - 1) / kI8Group; }
void quantize_x_vnni(const float* x, int64_t x_stride, int64_t in, int64_t t0, int64_t t1, int8_t* xq, float* xs,
                     int32_t* xc);
void rows_vnni(const Problem& p, int64_t r0, int64_t r1);

// The outer-product (row-wise) path for many tokens, AVX-512 only: x is first transposed into blocks of
// kOuterTokens tokens, xt[b][j][t] = x[b * kOuterTokens + t][j] (zeros past the last token), so each stored weight
// W[o, j] multiplies the contiguous tokens of input j: y[t, o] += W[o, j] * xt[b][j][t] for t in the block. The work
// is proportional to the stored weights, not to in. With x16 set (bf16 activations, bf16 or int8 values) the pair
// form: xt[b][q][t] holds the bf16 inputs 2q and 2q + 1 of token t side by side (32 bits, the odd one zero past
// the row) and each pair of a row with a stored weight costs one vdpbf16ps per 16 tokens (AVX512_BF16).
// transpose_x_avx512 writes the blocks [b0, b1) of xt (outer_units(p) rows of kOuterTokens 32-bit lanes each).
constexpr int64_t kOuterTokens = 64;
inline int64_t outer_blocks(int64_t m) { return (m + kOuterTokens - 1) / kOuterTokens; }  // token blocks
inline int64_t outer_units(const Problem& p) { return p.x16 ? (p.in + 1) / 2 : p.in; }
void transpose_x_avx512(const Problem& p, int64_t b0, int64_t b1, float* xt);

// Whether this build's AVX-512 kernel has the AVX512_BF16 instruction (vdpbf16ps) for the pair form (a build may
// say 0 with -DSECATEURS_AVX512_BF16=0: bf16 activations then take the fp32 outer products).
#if defined(SECATEURS_AVX512_BF16)
#elif defined(__clang__)
#define SECATEURS_AVX512_BF16 (__clang_major__ >= 9)
#elif defined(__GNUC__)
#define SECATEURS_AVX512_BF16 (__GNUC__ >= 10)
#else
#define SECATEURS_AVX512_BF16 0
#endif

void rows_scalar(const Problem& p, int64_t r0, int64_t r1);
void rows_avx2(const Problem& p, int64_t r0, int64_t r1);
void rows_avx512(const Problem& p, int64_t r0, int64_t r1);

// Decompress rows [r0, r1) of the packed weight into dst, dense and row-major with p.in columns: float32
// (float32 or int8 values, the scale applied) or, for bfloat16 values, bfloat16 (their exact bits). For prefill,
// where a dense matrix multiplication of the decompressed tile beats the bitmask kernel.
void unpack_scalar(const Problem& p, int64_t r0, int64_t r1, void* dst);
void unpack_avx2(const Problem& p, int64_t r0, int64_t r1, void* dst);
void unpack_avx512(const Problem& p, int64_t r0, int64_t r1, void* dst);

// The column layout, for decode with activation sparsity: the packed matrix is W^T (mask [in, ceil(out / 8)], the
// values column by column, col_offsets [in + 1]), so the weights that meet input j are contiguous. Each kernel
// adds x_j * W[:, j] into y [out] (fp32, unscaled, no bias) for the active columns active[k0..k1), whose input
// values are xa[k0..k1): a column whose input was thresholded away is never read.
struct ColumnProblem {
    const uint8_t* mask;         // [in, mask_stride]
    int64_t mask_stride;         // ceil(out / 8)
    const void* values;          // float32, bfloat16 or int8 codes, column by column, padded
    int values_type;
    const int64_t* col_offsets;  // [in + 1]
    int64_t out;
    const int32_t* active;       // column indices
    const float* xa;             // their input values
    int64_t k0, k1;
    float* y;                    // [out], accumulated into
};

// One query token's attention over a float32 KV cache (module.cpp's attend): out[h] = softmax(scale * K q[h]) V over
// the first `length` keys of kv head h / (heads / kv_heads); scores is scratch of `length` floats.
struct AttendProblem {
    const float *q, *k, *v;  // q [heads, d]; k, v [kv_heads, head_stride] (keys d apart)
    float* out;              // [heads, d]
    int64_t heads, kv_heads, length, d, head_stride;
    float scale;
    float* scores;
};
void attend_avx512(const AttendProblem& a);  // d a multiple of 16

void cols_scalar(const ColumnProblem& p);
void cols_avx2(const ColumnProblem& p);
void cols_avx512(const ColumnProblem& p);

}  // namespace secateurs
