/* gptlab's native CPU kernels: weight-only int4 and int8 matrix products, y = x · Wᵀ (+ bias).
 *
 * Built on first use by gptlab/inference/native.py with the machine's own compiler
 * (cc -O3 -march=native -fopenmp) and cached; PyTorch's kernels are used wherever
 * this file cannot be built or has no vector code for the CPU (see gptlab_kernels_isa).
 *
 * Why: decoding one token multiplies a handful of activation rows by every weight
 * once, so its speed is set by how fast the weights stream from memory. These loops
 * read each weight once per call (a block of 16 output rows stays in L1 while every
 * activation row uses it), widen 4- or 8-bit codes to float in registers, and
 * accumulate in float32.
 *
 * Layouts (those of gptlab.inference.quantize):
 *   int4: codes (N, K/2) uint8, input k = 2i in the low nibble of byte i, 2i+1 in the
 *         high one; scale, minimum (N, K/32) bf16; W[n, k] = minimum[n, g] + scale[n, g] · code,
 *         g = k / 32 (a GGUF Q4_1 block; Q4_0 is minimum = -8 · scale).
 *   int8: q (N, K) int8, scale (N) bf16; W[n, k] = scale[n] · q[n, k].
 * x is (M, K) float32, row-major; y is (M, N) float32; bias is (N) float32 or NULL.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GPTLAB_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GPTLAB_AVX2 1
#endif

#define ROWS_OUT 16 /* output rows per block: their weights stay in L1 while each x row passes */
#define ROWS_IN 8 /* activation rows per pass: their accumulators stay in registers (AVX2: 8 of its 16) */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* 3 with AVX-512 VNNI, 1 with AVX-512, 2 with AVX2 (int4 on the integer path with VNNI or AVX2), 0 with none of them
 * (the caller then uses PyTorch's kernels). */
int gptlab_kernels_isa(void) {
#if defined(GPTLAB_AVX512) && defined(__AVX512VNNI__)
    return 3;
#elif defined(GPTLAB_AVX512)
    return 1;
#elif defined(GPTLAB_AVX2)
    return 2;
#else
    return 0;
#endif
}

#if defined(GPTLAB_AVX512)
#define I8_ROWS ROWS_IN

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

/* x rows m0 .. m0+mb-1 times W rows n0 .. n1-1 (int4). mb is a constant after inlining. */
static inline __attribute__((always_inline)) void q4_rows(const int mb, int K, int N, const float *x, int m0,
                                                            const uint8_t *codes, const uint16_t *scale,
                                                            const uint16_t *minimum, const float *bias,
                                                            int n0, int n1, float *y) {
    const int G = K / 32;
    const __m128i low4 = _mm_set1_epi8(15);
    for (int n = n0; n < n1; n++) {
        __m512 acc[ROWS_IN];
        for (int r = 0; r < mb; r++) acc[r] = _mm512_setzero_ps();
        const uint8_t *c = codes + (size_t)n * (K / 2);
        const uint16_t *s = scale + (size_t)n * G, *mn = minimum + (size_t)n * G;
        for (int g = 0; g < G; g++) {
            __m128i b = _mm_loadu_si128((const __m128i *)(c + 16 * g));
            __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
            __m512i c0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)); /* k = 0 .. 15 of the group */
            __m512i c1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)); /* k = 16 .. 31 */
            __m512 sv = _mm512_set1_ps(bf16_to_f32(s[g])), mv = _mm512_set1_ps(bf16_to_f32(mn[g]));
            __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c0), sv, mv);
            __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c1), sv, mv);
            for (int r = 0; r < mb; r++) {
                const float *xr = x + (size_t)(m0 + r) * K + 32 * g;
                acc[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[r]);
                acc[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[r]);
            }
        }
        for (int r = 0; r < mb; r++) y[(size_t)(m0 + r) * N + n] = hsum(acc[r]) + (bias ? bias[n] : 0.0f);
    }
}

static inline __attribute__((always_inline)) void i8_rows(const int mb, int K, int N, const float *x, int m0,
                                                            const int8_t *q, const uint16_t *scale,
                                                            const float *bias, int n0, int n1, float *y) {
    for (int n = n0; n < n1; n++) {
        __m512 acc[ROWS_IN];
        for (int r = 0; r < mb; r++) acc[r] = _mm512_setzero_ps();
        const int8_t *w = q + (size_t)n * K;
        int k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
            for (int r = 0; r < mb; r++)
                acc[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (size_t)(m0 + r) * K + k), acc[r]);
        }
        const float sn = bf16_to_f32(scale[n]);
        for (int r = 0; r < mb; r++) {
            float t = hsum(acc[r]);
            for (int kk = k; kk < K; kk++) t += (float)w[kk] * x[(size_t)(m0 + r) * K + kk];
            y[(size_t)(m0 + r) * N + n] = t * sn + (bias ? bias[n] : 0.0f);
        }
    }
}

#elif defined(GPTLAB_AVX2)

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) void q4_rows(const int mb, int K, int N, const float *x, int m0,
                                                            const uint8_t *codes, const uint16_t *scale,
                                                            const uint16_t *minimum, const float *bias,
                                                            int n0, int n1, float *y) {
    const int G = K / 32;
    const __m128i low4 = _mm_set1_epi8(15);
    for (int n = n0; n < n1; n++) {
        __m256 acc[ROWS_IN];
        for (int r = 0; r < mb; r++) acc[r] = _mm256_setzero_ps();
        const uint8_t *c = codes + (size_t)n * (K / 2);
        const uint16_t *s = scale + (size_t)n * G, *mn = minimum + (size_t)n * G;
        for (int g = 0; g < G; g++) {
            __m128i b = _mm_loadu_si128((const __m128i *)(c + 16 * g));
            __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
            __m128i p0 = _mm_unpacklo_epi8(lo, hi), p1 = _mm_unpackhi_epi8(lo, hi);
            __m256 sv = _mm256_set1_ps(bf16_to_f32(s[g])), mv = _mm256_set1_ps(bf16_to_f32(mn[g]));
            __m256 w[4];
            w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(p0)), sv, mv);
            w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(p0, 8))), sv, mv);
            w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(p1)), sv, mv);
            w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(p1, 8))), sv, mv);
            for (int r = 0; r < mb; r++) {
                const float *xr = x + (size_t)(m0 + r) * K + 32 * g;
                for (int j = 0; j < 4; j++) acc[r] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xr + 8 * j), acc[r]);
            }
        }
        for (int r = 0; r < mb; r++) y[(size_t)(m0 + r) * N + n] = hsum(acc[r]) + (bias ? bias[n] : 0.0f);
    }
}

/* One accumulator per (row, output) would make every FMA wait for the one before it (4 cycles):
 * each output's sum runs in I8_CHAINS interleaved partial sums instead, the same number whatever
 * the rows in the call (a row's result must not depend on the rows that share its call: the
 * engine's batch invariance), so a pass takes at most I8_ROWS rows (their accumulators fill the
 * 16 registers). */
#define I8_CHAINS 4
#define I8_ROWS 3

static inline __attribute__((always_inline)) void i8_rows(const int mb, int K, int N, const float *x, int m0,
                                                            const int8_t *q, const uint16_t *scale,
                                                            const float *bias, int n0, int n1, float *y) {
    for (int n = n0; n < n1; n++) {
        __m256 acc[I8_ROWS][I8_CHAINS];
        for (int r = 0; r < mb; r++)
            for (int j = 0; j < I8_CHAINS; j++) acc[r][j] = _mm256_setzero_ps();
        const int8_t *w = q + (size_t)n * K;
        int k = 0;
        for (; k + 8 * I8_CHAINS <= K; k += 8 * I8_CHAINS)
            for (int j = 0; j < I8_CHAINS; j++) {
                const int kj = k + 8 * j;
                const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + kj))));
                for (int r = 0; r < mb; r++)
                    acc[r][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (size_t)(m0 + r) * K + kj), acc[r][j]);
            }
        for (; k + 8 <= K; k += 8) {
            const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k))));
            for (int r = 0; r < mb; r++)
                acc[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (size_t)(m0 + r) * K + k), acc[r][0]);
        }
        const float sn = bf16_to_f32(scale[n]);
        for (int r = 0; r < mb; r++) {
            const __m256 t4 = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]));
            float t = hsum(t4);
            for (int kk = k; kk < K; kk++) t += (float)w[kk] * x[(size_t)(m0 + r) * K + kk];
            y[(size_t)(m0 + r) * N + n] = t * sn + (bias ? bias[n] : 0.0f);
        }
    }
}

#endif


#if defined(GPTLAB_AVX512) && defined(__AVX512VNNI__)
#define GPTLAB_VNNI 1

/* The integer path (llama.cpp's idea for Q4_1 x Q8_1): each 32-input group of an x row is
 * quantized to int8 with its own scale dx, so a group's dot product is one VNNI instruction
 * per two groups (64 code x activation byte products); W·x = Σ_g (s·dx·Σ c·xq) + Σ_g m·Σx.
 * xq is stored per pair of groups (g, g+1) as [g even k, g+1 even k, g odd k, g+1 odd k], the
 * order the codes' low and high nibbles come out in. */
static void quantize_rows(int M, int K, const float *x, int8_t *xq, float *dxv, float *xsum) {
    const int G = K / 32;
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            const float *v = x + (size_t)m * K + 32 * g;
            __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
            const __m512 idv = _mm512_set1_ps(id);
            int8_t *out = xq + (size_t)m * K + 64 * (g / 2) + 16 * (g % 2);
            __m512 e = _mm512_mul_ps(_mm512_permutex2var_ps(v0, even, v1), idv);
            __m512 o = _mm512_mul_ps(_mm512_permutex2var_ps(v0, odd, v1), idv);
            _mm_storeu_si128((__m128i *)out, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(e)));        /* even k */
            _mm_storeu_si128((__m128i *)(out + 32), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(o))); /* odd k */
            /* dx laid out as the dot product's lanes: 4 x group g, 4 x g+1, 4 x g, 4 x g+1 */
            float *dl = dxv + ((size_t)m * (G / 2) + g / 2) * 16 + 4 * (g % 2);
            for (int i = 0; i < 4; i++) dl[i] = dl[8 + i] = d;
            xsum[(size_t)m * G + g] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
        }
}

static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __attribute__((always_inline)) void q4_rows_vnni(const int mb, int K, int N, int m0, const int8_t *xq,
                                                                 const float *dxv, const float *xsum,
                                                                 const uint8_t *codes, const uint16_t *scale,
                                                                 const uint16_t *minimum, const float *bias,
                                                                 int n0, int n1, float *y) {
    const int G = K / 32;
    const __m256i low4 = _mm256_set1_epi8(15);
    const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    for (int n = n0; n < n1; n++) {
        __m512 acc[ROWS_IN];
        float mins[ROWS_IN];
        for (int r = 0; r < mb; r++) acc[r] = _mm512_setzero_ps();
        const uint8_t *c = codes + (size_t)n * (K / 2);
        const uint16_t *s = scale + (size_t)n * G, *mn = minimum + (size_t)n * G;
        for (int g = 0; g < G; g += 2) {
            __m256i b = _mm256_loadu_si256((const __m256i *)(c + 16 * g));
            __m256i lo = _mm256_and_si256(b, low4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
            __m512i cw = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            uint32_t s2;
            memcpy(&s2, s + g, 4); /* the two groups' bf16 scales */
            __m128 sw = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_cvtsi32_si128((int)s2)), 16));
            __m512 sw16 = _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(sw)); /* the dot's lane order */
            for (int r = 0; r < mb; r++) {
                const size_t row = (size_t)(m0 + r);
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), cw,
                                                  _mm512_loadu_si512((const void *)(xq + row * K + 32 * g)));
                __m512 sc = _mm512_mul_ps(sw16, _mm512_loadu_ps(dxv + (row * (G / 2) + g / 2) * 16));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc[r]);
            }
        }
        for (int r = 0; r < mb; r++) { /* the minimums: Σ_g m · Σx, 16 groups at a time */
            const float *xs = xsum + (size_t)(m0 + r) * G;
            __m512 t = _mm512_setzero_ps();
            int g = 0;
            for (; g + 16 <= G; g += 16) t = _mm512_fmadd_ps(bf16x16(mn + g), _mm512_loadu_ps(xs + g), t);
            float tail = 0.0f;
            for (; g < G; g++) tail += bf16_to_f32(mn[g]) * xs[g];
            mins[r] = _mm512_reduce_add_ps(t) + tail;
        }
        for (int r = 0; r < mb; r++)
            y[(size_t)(m0 + r) * N + n] = _mm512_reduce_add_ps(acc[r]) + mins[r] + (bias ? bias[n] : 0.0f);
    }
}
#endif

#if defined(GPTLAB_VNNI)

/* Packed int4 (VNNI): the outer-product form. A block of 16 output rows is stored group by group,
 * 256 bytes a group: byte 64c + 4l + b holds, for output row n0 + l, code k = 32g + 4c + b in its low
 * nibble and k + 16 in its high one (c = 0 .. 3). One 64-byte load thus gives, after a mask and a
 * shift, two vectors of 16 rows x 4 codes, and one dpbusd with 4 bytes of x broadcast adds 4 inputs
 * to 16 outputs at once: per row and group 8 dpbusd, a convert and two FMAs land 16 outputs in
 * their lanes (no horizontal sums), against 4 operations per 64 inputs of each output above. Scale
 * and minimum are float32, 16 a group, in the same order. gptlab_q4_pack makes this layout from
 * the plain one; x comes in k order, rounded per 32-group (d, and Σx for the minimums). */
static void quantize_plain_rows(int M, int K, const float *x, int8_t *xq, float *d, float *xsum) {
    const int G = K / 32;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            const float *v = x + (size_t)m * K + 32 * g;
            const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            const float dd = amax / 127.0f, id = dd > 0.0f ? 1.0f / dd : 0.0f;
            const __m512 idv = _mm512_set1_ps(id);
            int8_t *out = xq + (size_t)m * K + 32 * g;
            _mm_storeu_si128((__m128i *)out, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, idv))));
            _mm_storeu_si128((__m128i *)(out + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, idv))));
            d[(size_t)m * G + g] = dd;
            xsum[(size_t)m * G + g] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
        }
}

static inline __attribute__((always_inline)) void q4_rows_packed(const int mb, int K, int N, int m0, const int8_t *xq,
                                                                   const float *d, const float *xsum,
                                                                   const uint8_t *packed, const float *pscale,
                                                                   const float *pmin, const float *bias, int n0,
                                                                   float *y) {
    const int G = K / 32, nb = n0 / 16;
    const __m512i low4 = _mm512_set1_epi8(15);
    __m512 acc[ROWS_IN];
    for (int r = 0; r < mb; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        const size_t at = (size_t)nb * G + g;
        const uint8_t *w = packed + at * 256;
        __m512i wc[8];
        for (int c = 0; c < 4; c++) {
            const __m512i b = _mm512_loadu_si512((const void *)(w + 64 * c));
            wc[c] = _mm512_and_si512(b, low4);
            wc[c + 4] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
        }
        const __m512 sv = _mm512_loadu_ps(pscale + at * 16), mv = _mm512_loadu_ps(pmin + at * 16);
        for (int r = 0; r < mb; r++) {
            const int8_t *xr = xq + (size_t)(m0 + r) * K + 32 * g;
            __m512i dot = _mm512_setzero_si512();
            for (int j = 0; j < 8; j++) {
                int32_t x4;
                memcpy(&x4, xr + 4 * j, 4);
                dot = _mm512_dpbusd_epi32(dot, wc[j], _mm512_set1_epi32(x4));
            }
            const size_t i = (size_t)(m0 + r) * G + g;
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sv, _mm512_set1_ps(d[i])), acc[r]);
            acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[i]), acc[r]);
        }
    }
    const __m512 bv = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < mb; r++) _mm512_storeu_ps(y + (size_t)(m0 + r) * N + n0, _mm512_add_ps(acc[r], bv));
}

#endif

#if defined(GPTLAB_AVX2)

/* The integer path on AVX2 (no VNNI): the same idea, one group at a time. A group's 32 codes,
 * low nibbles (even k) then high nibbles (odd k), meet its 32 int8 activations, stored in that
 * order, in one maddubs (unsigned code x signed activation, pairs summed to int16: at most
 * 2 x 15 x 127, no saturation) and one madd with ones (to 8 int32). */

/* One 32-input group of x rounded to int8 with its scale d = max|v| / 127; *sum gets Σv. split: the
 * 16 even k in the low half of the result, the 16 odd k in the high half, each in order (as the int4
 * codes' nibbles come apart); else the 32 in order (the int8 head's). */
static inline __attribute__((always_inline)) __m256i quantize_group_avx2(const float *v, const int split,
                                                                          float *d_out, float *sum_out) {
    const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
    const __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                    _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
    *d_out = d;
    *sum_out = hsum(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
    const __m256 idv = _mm256_set1_ps(id);
    /* even and odd k of each 16 (within 128-bit lanes, then the 64-bit quarters put in order) */
#define GPTLAB_SPLIT(a, b, sel) \
    _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, sel)), _MM_SHUFFLE(3, 1, 2, 0)))
    const __m256 a = split ? GPTLAB_SPLIT(v0, v1, _MM_SHUFFLE(2, 0, 2, 0)) : v0;
    const __m256 b = split ? GPTLAB_SPLIT(v2, v3, _MM_SHUFFLE(2, 0, 2, 0)) : v1;
    const __m256 c = split ? GPTLAB_SPLIT(v0, v1, _MM_SHUFFLE(3, 1, 3, 1)) : v2;
    const __m256 e = split ? GPTLAB_SPLIT(v2, v3, _MM_SHUFFLE(3, 1, 3, 1)) : v3;
#undef GPTLAB_SPLIT
    const __m256i ea = _mm256_cvtps_epi32(_mm256_mul_ps(a, idv)), eb = _mm256_cvtps_epi32(_mm256_mul_ps(b, idv));
    const __m256i oa = _mm256_cvtps_epi32(_mm256_mul_ps(c, idv)), ob = _mm256_cvtps_epi32(_mm256_mul_ps(e, idv));
    /* the packs work within 128-bit lanes; dwords come out as [a0-3, b0-3, c0-3, e0-3 | a4-7, ...] */
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(ea, eb), _mm256_packs_epi32(oa, ob));
    return _mm256_permutevar8x32_epi32(bytes, _mm256_set_epi32(7, 3, 6, 2, 5, 1, 4, 0));
}

static void quantize_rows_avx2(int M, int K, const float *x, int8_t *xq, float *dxv, float *xsum) {
    const int G = K / 32;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            const size_t i = (size_t)m * G + g;
            const __m256i q = quantize_group_avx2(x + (size_t)m * K + 32 * g, 1, dxv + i, xsum + i);
            _mm256_storeu_si256((__m256i *)(xq + (size_t)m * K + 32 * g), q); /* even k, then odd k */
        }
}

/* With an even number of groups, two at a time (as the VNNI path): xq per pair of groups (g, g+1)
 * is [g even k, g+1 even k | g odd k, g+1 odd k], which is how one 32-byte load of the pair's codes
 * comes apart into low and high nibbles. The two maddubs are summed in int16 (at most 4 x 15 x 127),
 * one madd gives 8 int32 lanes: 0-3 group g, 4-7 group g+1; dx per pair is [4 x dx_g, 4 x dx_g+1]. */
static void quantize_pairs_avx2(int M, int K, const float *x, int8_t *xq, float *dxv, float *xsum) {
    const int G = K / 32;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            float d;
            const __m256i q = quantize_group_avx2(x + (size_t)m * K + 32 * g, 1, &d, xsum + (size_t)m * G + g);
            int8_t *out = xq + (size_t)m * K + 64 * (g / 2) + 16 * (g % 2);
            _mm_storeu_si128((__m128i *)out, _mm256_castsi256_si128(q));             /* even k */
            _mm_storeu_si128((__m128i *)(out + 32), _mm256_extracti128_si256(q, 1)); /* odd k */
            _mm_storeu_ps(dxv + ((size_t)m * (G / 2) + g / 2) * 8 + 4 * (g % 2), _mm_set1_ps(d));
        }
}

static inline __attribute__((always_inline)) void q4_rows_avx2_pairs(const int mb, int K, int N, int m0,
                                                                       const int8_t *xq, const float *dxv,
                                                                       const float *xsum, const uint8_t *codes,
                                                                       const uint16_t *scale, const uint16_t *minimum,
                                                                       const float *bias, int n0, int n1, float *y) {
    const int G = K / 32;
    const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const __m256i pair = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
    for (int n = n0; n < n1; n++) {
        __m256 acc[ROWS_IN];
        for (int r = 0; r < mb; r++) acc[r] = _mm256_setzero_ps();
        const uint8_t *c = codes + (size_t)n * (K / 2);
        const uint16_t *s = scale + (size_t)n * G, *mn = minimum + (size_t)n * G;
        for (int g = 0; g < G; g += 2) {
            const __m256i b = _mm256_loadu_si256((const __m256i *)(c + 16 * g));
            const __m256i lo = _mm256_and_si256(b, low4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
            uint32_t s2;
            memcpy(&s2, s + g, 4); /* the two groups' bf16 scales */
            const __m128i sw = _mm_slli_epi32(_mm_cvtepu16_epi32(_mm_cvtsi32_si128((int)s2)), 16);
            const __m256 sv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castsi128_ps(sw)), pair);
            for (int r = 0; r < mb; r++) {
                const size_t row = (size_t)(m0 + r);
                const int8_t *xr = xq + row * K + 32 * g;
                const __m256i p = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xr)),
                    _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xr + 32))));
                const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sv, _mm256_loadu_ps(dxv + (row * (G / 2) + g / 2) * 8)),
                                         acc[r]);
            }
        }
        for (int r = 0; r < mb; r++) { /* the minimums: Σ_g m · Σx, 8 groups at a time */
            const float *xs = xsum + (size_t)(m0 + r) * G;
            __m256 t = _mm256_setzero_ps();
            int g = 0;
            for (; g + 8 <= G; g += 8) {
                const __m256i m32 = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(mn + g))), 16);
                t = _mm256_fmadd_ps(_mm256_castsi256_ps(m32), _mm256_loadu_ps(xs + g), t);
            }
            float tail = 0.0f;
            for (; g < G; g++) tail += bf16_to_f32(mn[g]) * xs[g];
            y[(size_t)(m0 + r) * N + n] = hsum(acc[r]) + hsum(t) + tail + (bias ? bias[n] : 0.0f);
        }
    }
}

static inline __attribute__((always_inline)) void q4_rows_avx2_int(const int mb, int K, int N, int m0,
                                                                     const int8_t *xq, const float *dxv,
                                                                     const float *xsum, const uint8_t *codes,
                                                                     const uint16_t *scale, const uint16_t *minimum,
                                                                     const float *bias, int n0, int n1, float *y) {
    const int G = K / 32;
    const __m128i low4 = _mm_set1_epi8(15);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int n = n0; n < n1; n++) {
        __m256 acc[ROWS_IN];
        for (int r = 0; r < mb; r++) acc[r] = _mm256_setzero_ps();
        const uint8_t *c = codes + (size_t)n * (K / 2);
        const uint16_t *s = scale + (size_t)n * G, *mn = minimum + (size_t)n * G;
        for (int g = 0; g < G; g++) {
            const __m128i b = _mm_loadu_si128((const __m128i *)(c + 16 * g));
            const __m256i cw = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(b, low4)),
                                                        _mm_and_si128(_mm_srli_epi16(b, 4), low4), 1);
            const __m256 sv = _mm256_set1_ps(bf16_to_f32(s[g]));
            for (int r = 0; r < mb; r++) {
                const size_t row = (size_t)(m0 + r);
                const __m256i p = _mm256_maddubs_epi16(cw, _mm256_loadu_si256((const __m256i *)(xq + row * K + 32 * g)));
                const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sv, _mm256_broadcast_ss(dxv + row * G + g)), acc[r]);
            }
        }
        for (int r = 0; r < mb; r++) { /* the minimums: Σ_g m · Σx, 8 groups at a time */
            const float *xs = xsum + (size_t)(m0 + r) * G;
            __m256 t = _mm256_setzero_ps();
            int g = 0;
            for (; g + 8 <= G; g += 8) {
                const __m256i m32 = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(mn + g))), 16);
                t = _mm256_fmadd_ps(_mm256_castsi256_ps(m32), _mm256_loadu_ps(xs + g), t);
            }
            float tail = 0.0f;
            for (; g < G; g++) tail += bf16_to_f32(mn[g]) * xs[g];
            y[(size_t)(m0 + r) * N + n] = hsum(acc[r]) + hsum(t) + tail + (bias ? bias[n] : 0.0f);
        }
    }
}
/* The int8 head of an int4 model on the integer path too: x rounded per 32-group (in order), and per
 * group one maddubs of |w| with x carrying w's sign (at most 2 x 127 x 127 per int16: no saturation),
 * one madd with ones, one float multiply-add by the group's dx; the row scale at the end. */
static void quantize_plain_avx2(int M, int K, const float *x, int8_t *xq, float *dxv) {
    const int G = K / 32;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            float sum;
            const __m256i q = quantize_group_avx2(x + (size_t)m * K + 32 * g, 0, dxv + (size_t)m * G + g, &sum);
            _mm256_storeu_si256((__m256i *)(xq + (size_t)m * K + 32 * g), q);
        }
}

static inline __attribute__((always_inline)) void i8_rows_int(const int mb, int K, int N, int m0, const int8_t *xq,
                                                                const float *dxv, const int8_t *q,
                                                                const uint16_t *scale, const float *bias, int n0,
                                                                int n1, float *y) {
    const int G = K / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int n = n0; n < n1; n++) {
        __m256 acc[ROWS_IN];
        for (int r = 0; r < mb; r++) acc[r] = _mm256_setzero_ps();
        const int8_t *w = q + (size_t)n * K;
        for (int g = 0; g < G; g++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 32 * g));
            const __m256i aw = _mm256_sign_epi8(wv, wv); /* |w| (at most 127: the codes are in -127 .. 127) */
            for (int r = 0; r < mb; r++) {
                const size_t row = (size_t)(m0 + r);
                const __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq + row * K + 32 * g)), wv);
                const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(dxv + row * G + g), acc[r]);
            }
        }
        const float sn = bf16_to_f32(scale[n]);
        for (int r = 0; r < mb; r++) y[(size_t)(m0 + r) * N + n] = hsum(acc[r]) * sn + (bias ? bias[n] : 0.0f);
    }
}

#endif

#if defined(GPTLAB_AVX512) || defined(GPTLAB_AVX2)

static int int4_integer_path = 1;

/* 1: int4 products round x to int8 per 32-group (VNNI: fastest, ~+1% perplexity on SmolLM2);
 * 0: x stays float32 (exact). Returns the previous setting. */
int gptlab_int4_integer_path(int on) {
    const int was = int4_integer_path;
    int4_integer_path = on;
    return was;
}

/* 1 when an int4 product over K inputs rounds x to int8 (the integer path), 0 when x stays float32. */
int gptlab_int4_integer_for(int K) {
#if defined(GPTLAB_VNNI)
    return int4_integer_path && (K / 32) % 2 == 0;
#elif defined(GPTLAB_AVX2)
    (void)K;
    return int4_integer_path;
#else
    (void)K;
    return 0;
#endif
}

/* Every pass of the matmuls: the blocks of ROWS_OUT output rows in parallel, and in each block the
 * x rows in passes of up to ROWS_IN. PASS(mb, m0, n0, n1) is a macro the caller defines; each case
 * gives it a constant mb, so the pass's accumulators stay in registers. */
#define ROW_PASSES(M, RIN, PASS)                                                                      \
    for (int m0 = 0; m0 < (M); m0 += (RIN)) {                                                         \
        switch ((M) - m0 < (RIN) ? (M) - m0 : (RIN)) {                                                \
            case 1: PASS(1, m0, n0, n1); break;                                                       \
            case 2: PASS(2, m0, n0, n1); break;                                                       \
            case 3: PASS(3, m0, n0, n1); break;                                                       \
            /* (with RIN < 8 these cases are never taken: they compile as the RIN case) */            \
            case 4: PASS((RIN) > 4 ? 4 : (RIN), m0, n0, n1); break;                                   \
            case 5: PASS((RIN) > 5 ? 5 : (RIN), m0, n0, n1); break;                                   \
            case 6: PASS((RIN) > 6 ? 6 : (RIN), m0, n0, n1); break;                                   \
            case 7: PASS((RIN) > 7 ? 7 : (RIN), m0, n0, n1); break;                                   \
            default: PASS((RIN), m0, n0, n1); break;                                                  \
        }                                                                                             \
    }
#define EVERY_PASS(M, N, threads, RIN, PASS)                                                             \
    do {                                                                                              \
        const int blocks_ = ((N) + ROWS_OUT - 1) / ROWS_OUT;                                          \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks_ > 1)") \
        for (int blk = 0; blk < blocks_; blk++) {                                                     \
            const int n0 = blk * ROWS_OUT, n1 = n0 + ROWS_OUT < (N) ? n0 + ROWS_OUT : (N);            \
            ROW_PASSES(M, RIN, PASS)                                                                  \
        }                                                                                             \
    } while (0)

/* x rows ready for int4 products over K inputs: as they are (path 0), or rounded to int8 per
 * 32-group (the integer path: 1 AVX2 a group at a time, 2 AVX2 pairs of groups, 3 VNNI). One
 * preparation serves every product that reads the same x (a layer's q, k and v; gate and up). */
typedef struct {
    int M, K, path;
    const float *x;
    int8_t *xq, *xp; /* xp, dp, sp: x in k order for packed weights (VNNI), when a job has them */
    float *dx, *xsum, *dp, *sp;
} q4_input;

static void q4_release(q4_input *in) {
    free(in->xq), free(in->dx), free(in->xsum), free(in->xp), free(in->dp), free(in->sp);
    in->xq = in->xp = NULL, in->dx = in->xsum = in->dp = in->sp = NULL;
}

/* Returns 0, or -2 when out of memory. plain: 0 no job has packed weights (gptlab_q4_pack), 1 every job
 * has, 2 some have (VNNI: x is rounded into the layouts the jobs read). */
static int q4_prepare(q4_input *in, int M, int K, const float *x, int plain) {
    *in = (q4_input){M, K, 0, x, NULL, NULL, NULL, NULL, NULL, NULL};
    if (!gptlab_int4_integer_for(K)) return 0;
    const int G = K / 32;
#if defined(GPTLAB_VNNI)
    const int pairs = plain != 1; /* a job reads the pair layout */
#else
    const int pairs = 1;
    (void)plain;
#endif
    if (pairs) {
        in->xq = malloc((size_t)M * K);
        in->dx = malloc(sizeof(float) * (size_t)M * G * 8); /* VNNI: 8 lanes per group, AVX2: 4 or 1 */
        in->xsum = malloc(sizeof(float) * (size_t)M * G);
        if (!in->xq || !in->dx || !in->xsum) {
            q4_release(in);
            return -2;
        }
    }
#if defined(GPTLAB_VNNI)
    if (plain) {
        in->xp = malloc((size_t)M * K);
        in->dp = malloc(sizeof(float) * (size_t)M * G);
        in->sp = malloc(sizeof(float) * (size_t)M * G);
        if (!in->xp || !in->dp || !in->sp) {
            q4_release(in);
            return -2;
        }
        quantize_plain_rows(M, K, x, in->xp, in->dp, in->sp);
    }
    if (pairs) quantize_rows(M, K, x, in->xq, in->dx, in->xsum);
    in->path = 3;
#elif defined(GPTLAB_AVX2)
    if (G % 2 == 0) {
        quantize_pairs_avx2(M, K, x, in->xq, in->dx, in->xsum);
        in->path = 2;
    } else {
        quantize_rows_avx2(M, K, x, in->xq, in->dx, in->xsum);
        in->path = 1;
    }
#endif
    return 0;
}

/* One int4 product y (M, N) = x · Wᵀ + bias over a prepared x. */
typedef struct {
    int N;
    const uint8_t *codes;
    const uint16_t *scale, *minimum;
    const float *bias;
    float *y;
    const uint8_t *packed; /* NULL, or the same weights packed (gptlab_q4_pack: VNNI) */
    const float *pscale, *pmin;
} q4_job;

static inline __attribute__((always_inline)) void q4_pass(const int mb, const q4_input *in, int m0, const q4_job *j,
                                                            int n0, int n1) {
    switch (in->path) {
#if defined(GPTLAB_VNNI)
        case 3:
            if (j->packed && in->xp) {
                q4_rows_packed(mb, in->K, j->N, m0, in->xp, in->dp, in->sp, j->packed, j->pscale, j->pmin, j->bias,
                               n0, j->y);
                return;
            }
            q4_rows_vnni(mb, in->K, j->N, m0, in->xq, in->dx, in->xsum, j->codes, j->scale, j->minimum, j->bias, n0,
                         n1, j->y);
            return;
#elif defined(GPTLAB_AVX2)
        case 2:
            q4_rows_avx2_pairs(mb, in->K, j->N, m0, in->xq, in->dx, in->xsum, j->codes, j->scale, j->minimum,
                               j->bias, n0, n1, j->y);
            return;
        case 1:
            q4_rows_avx2_int(mb, in->K, j->N, m0, in->xq, in->dx, in->xsum, j->codes, j->scale, j->minimum, j->bias,
                             n0, n1, j->y);
            return;
#endif
        default:
            q4_rows(mb, in->K, j->N, in->x, m0, j->codes, j->scale, j->minimum, j->bias, n0, n1, j->y);
    }
}

#define Q4_MAX_JOBS 3

/* Every job over one prepared x in one parallel loop: the jobs' blocks of output rows, one after
 * another (one fork and join for a layer's q, k and v instead of three). */
static void q4_run(const q4_input *in, const q4_job *jobs, int n_jobs, int threads) {
    int first[Q4_MAX_JOBS], blocks = 0;
    for (int j = 0; j < n_jobs; j++) {
        first[j] = blocks;
        blocks += (jobs[j].N + ROWS_OUT - 1) / ROWS_OUT;
    }
    const int M = in->M;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 1)
    for (int blk = 0; blk < blocks; blk++) {
        int j = n_jobs - 1;
        while (first[j] > blk) j--;
        const q4_job *job = jobs + j;
        const int n0 = (blk - first[j]) * ROWS_OUT, n1 = n0 + ROWS_OUT < job->N ? n0 + ROWS_OUT : job->N;
#define JOB_PASS(mb, m0, n0, n1) q4_pass(mb, in, m0, job, n0, n1)
        ROW_PASSES(M, ROWS_IN, JOB_PASS)
#undef JOB_PASS
    }
}

/* 1 when int4 weights (N, K) take the packed layout here (gptlab_q4_pack): VNNI with the integer path
 * on, N a multiple of 16; else 0. */
int gptlab_q4_packs(int N, int K) {
#if defined(GPTLAB_VNNI)
    return N > 0 && N % 16 == 0 && K > 0 && K % 32 == 0 && gptlab_int4_integer_for(K);
#else
    (void)N, (void)K;
    return 0;
#endif
}

/* The packed layout of int4 weights (see q4_rows_packed): packed (N·K/2 bytes), pscale and pmin
 * (N·K/32 float32 each). Returns 0, or -1 where gptlab_q4_packs(N, K) is 0. */
int gptlab_q4_pack(int N, int K, const uint8_t *codes, const uint16_t *scale, const uint16_t *minimum,
                   uint8_t *packed, float *pscale, float *pmin) {
    if (!gptlab_q4_packs(N, K)) return -1;
    const int G = K / 32;
    for (int nb = 0; nb < N / 16; nb++)
        for (int g = 0; g < G; g++) {
            const size_t at = (size_t)nb * G + g;
            uint8_t *out = packed + at * 256;
            for (int l = 0; l < 16; l++) {
                const size_t n = (size_t)nb * 16 + l;
                const uint8_t *c = codes + n * (K / 2) + 16 * g; /* the group's 32 codes, two a byte */
                for (int k = 0; k < 16; k++) {
                    const uint8_t lo = (c[k / 2] >> (4 * (k & 1))) & 15;           /* code 32g + k */
                    const uint8_t hi = (c[(k + 16) / 2] >> (4 * (k & 1))) & 15;    /* code 32g + k + 16 */
                    out[64 * (k / 4) + 4 * l + k % 4] = (uint8_t)(lo | (hi << 4));
                }
                pscale[at * 16 + l] = bf16_to_f32(scale[n * G + g]);
                pmin[at * 16 + l] = bf16_to_f32(minimum[n * G + g]);
            }
        }
    return 0;
}

/* y (M, N) = x (M, K) · Wᵀ + bias for int4 W; K a multiple of 32; packed, pscale, pmin: NULL or the same
 * weights in gptlab_q4_pack's layout (then used). Returns 0, -1 for a bad shape, or -2 when out of memory. */
int gptlab_q4_matmul(int M, int N, int K, const float *x, const uint8_t *codes, const uint16_t *scale,
                     const uint16_t *minimum, const float *bias, float *y, int threads, const uint8_t *packed,
                     const float *pscale, const float *pmin) {
    if (M <= 0 || N <= 0 || K <= 0 || K % 32) return -1;
    if (packed && !gptlab_q4_packs(N, K)) packed = NULL;
    q4_input in;
    if (q4_prepare(&in, M, K, x, packed != NULL)) return -2;
    const q4_job job = {N, codes, scale, minimum, bias, y, packed, pscale, pmin};
    q4_run(&in, &job, 1, threads);
    q4_release(&in);
    return 0;
}

/* y (M, N) = x (M, K) · Wᵀ + bias for int8 W with one scale per row. */
int gptlab_i8_matmul(int M, int N, int K, const float *x, const int8_t *q, const uint16_t *scale,
                     const float *bias, float *y, int threads) {
    if (M <= 0 || N <= 0 || K <= 0) return -1;
#define I8_PASS(mb, m0, n0, n1) i8_rows(mb, K, N, x, m0, q, scale, bias, n0, n1, y)
    EVERY_PASS(M, N, threads, I8_ROWS, I8_PASS);
#undef I8_PASS
    return 0;
}

/* Packed int8 (VNNI), an int4 model's head: the outer-product form of q4_rows_packed for int8 weights
 * with one scale per output row. A block of 16 rows holds, for every 4 inputs, 64 bytes: byte 4l + b
 * is w[n0 + l][4j + b] + 128 (its sign bit flipped: dpbusd multiplies unsigned by signed bytes), and
 * each group's sum starts at -128 · Σ of its x bytes, which takes the 128s back out exactly. x is
 * rounded per 32-group, as the int4 layers round theirs. */
int gptlab_i8_packs(int N, int K) {
#if defined(GPTLAB_VNNI)
    return N > 0 && N % 16 == 0 && K > 0 && K % 32 == 0 && int4_integer_path;
#else
    (void)N, (void)K;
    return 0;
#endif
}

/* packed: N·K bytes. Returns 0, or -1 where gptlab_i8_packs(N, K) is 0. */
int gptlab_i8_pack(int N, int K, const int8_t *q, uint8_t *packed) {
    if (!gptlab_i8_packs(N, K)) return -1;
    for (int nb = 0; nb < N / 16; nb++)
        for (int j = 0; j < K / 4; j++)
            for (int l = 0; l < 16; l++)
                for (int b = 0; b < 4; b++)
                    packed[((size_t)nb * (K / 4) + j) * 64 + 4 * l + b] =
                        (uint8_t)(q[((size_t)nb * 16 + l) * K + 4 * j + b]) ^ 0x80;
    return 0;
}

#if defined(GPTLAB_VNNI)
static inline __attribute__((always_inline)) void i8_rows_packed(const int mb, int K, int N, int m0, const int8_t *xq,
                                                                   const float *d, const int32_t *neg,
                                                                   const uint8_t *packed, const uint16_t *scale,
                                                                   const float *bias, int n0, float *y) {
    const int G = K / 32, nb = n0 / 16;
    __m512 acc[ROWS_IN];
    for (int r = 0; r < mb; r++) acc[r] = _mm512_setzero_ps();
    const uint8_t *w = packed + (size_t)nb * 16 * K;
    for (int g = 0; g < G; g++) {
        __m512i dot[ROWS_IN];
        for (int r = 0; r < mb; r++) dot[r] = _mm512_set1_epi32(neg[(size_t)(m0 + r) * G + g]);
        for (int j = 0; j < 8; j++) {
            const __m512i wv = _mm512_loadu_si512((const void *)(w + ((size_t)8 * g + j) * 64));
            for (int r = 0; r < mb; r++) {
                int32_t x4;
                memcpy(&x4, xq + (size_t)(m0 + r) * K + 32 * g + 4 * j, 4);
                dot[r] = _mm512_dpbusd_epi32(dot[r], wv, _mm512_set1_epi32(x4));
            }
        }
        for (int r = 0; r < mb; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(d[(size_t)(m0 + r) * G + g]), acc[r]);
    }
    const __m512 sv = bf16x16(scale + n0), bv = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < mb; r++) _mm512_storeu_ps(y + (size_t)(m0 + r) * N + n0, _mm512_fmadd_ps(acc[r], sv, bv));
}
#endif

/* y (M, N) = x (M, K) · Wᵀ + bias for int8 W in gptlab_i8_pack's layout, x rounded to int8 per 32-group.
 * Returns 0, -1 where gptlab_i8_packs(N, K) is 0 or M <= 0, or -2 when out of memory. */
int gptlab_i8_matmul_packed(int M, int N, int K, const float *x, const uint8_t *packed, const uint16_t *scale,
                            const float *bias, float *y, int threads) {
    if (M <= 0 || !gptlab_i8_packs(N, K)) return -1;
#if defined(GPTLAB_VNNI)
    const int G = K / 32;
    int8_t *xq = malloc((size_t)M * K);
    float *d = malloc(sizeof(float) * (size_t)M * G), *xsum = malloc(sizeof(float) * (size_t)M * G);
    int32_t *neg = malloc(sizeof(int32_t) * (size_t)M * G);
    if (!xq || !d || !xsum || !neg) {
        free(xq), free(d), free(xsum), free(neg);
        return -2;
    }
    quantize_plain_rows(M, K, x, xq, d, xsum);
    for (int i = 0; i < M * G; i++) {
        if (!isfinite(xsum[i])) d[i] = NAN; /* a NaN or inf in x: NaN out, as the float head gives (the rounding drops it) */
        int32_t t = 0;
        for (int k = 0; k < 32; k++) t += xq[(size_t)i * 32 + k];
        neg[i] = -128 * t;
    }
#define I8_PACKED_PASS(mb, m0, n0, n1) ((void)(n1), i8_rows_packed(mb, K, N, m0, xq, d, neg, packed, scale, bias, n0, y))
    EVERY_PASS(M, N, threads, ROWS_IN, I8_PACKED_PASS);
#undef I8_PACKED_PASS
    free(xq), free(d), free(xsum), free(neg);
    return 0;
#else
    (void)x, (void)packed, (void)scale, (void)bias, (void)y, (void)threads;
    return -1;
#endif
}

/* 1 when gptlab_i8_matmul_rounded over K inputs rounds x to int8 (AVX2 with the integer path on, K a
 * multiple of 32), 0 when it is gptlab_i8_matmul. */
int gptlab_i8_rounds_for(int K) {
#if defined(GPTLAB_AVX2)
    return int4_integer_path && K % 32 == 0;
#else
    (void)K;
    return 0;
#endif
}

/* An int4 model's int8 head: x rounded to int8 per 32-group where gptlab_i8_rounds_for(K), as the
 * int4 layers round theirs (1.7-2x faster at 8 rows on AVX2, where int8 x float is conversion-bound);
 * otherwise gptlab_i8_matmul. Returns 0, -1 for a bad shape, -2 when out of memory. */
int gptlab_i8_matmul_rounded(int M, int N, int K, const float *x, const int8_t *q, const uint16_t *scale,
                             const float *bias, float *y, int threads) {
    if (M <= 0 || N <= 0 || K <= 0) return -1;
#if defined(GPTLAB_AVX2)
    if (gptlab_i8_rounds_for(K)) {
        int8_t *xq = malloc((size_t)M * K);
        float *dx = malloc(sizeof(float) * (size_t)M * (K / 32));
        if (!xq || !dx) {
            free(xq), free(dx);
            return -2;
        }
        quantize_plain_avx2(M, K, x, xq, dx);
#define I8_INT_PASS(mb, m0, n0, n1) i8_rows_int(mb, K, N, m0, xq, dx, q, scale, bias, n0, n1, y)
        EVERY_PASS(M, N, threads, ROWS_IN, I8_INT_PASS);
#undef I8_INT_PASS
        free(xq), free(dx);
        return 0;
    }
#endif
    return gptlab_i8_matmul(M, N, K, x, q, scale, bias, y, threads);
}

#endif

/* y (M, D) = weight · x / sqrt(mean(x²) + eps), row by row (the Llama RMSNorm in float32). */
void gptlab_rms_norm(int M, int D, const float *x, const float *weight, float eps, float *y) {
    for (int m = 0; m < M; m++) {
        const float *v = x + (size_t)m * D;
        float *out = y + (size_t)m * D;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < D; i++) ss += v[i] * v[i];
        const float r = 1.0f / sqrtf(ss / (float)D + eps);
#pragma omp simd
        for (int i = 0; i < D; i++) out[i] = weight[i] * (v[i] * r);
    }
}

#if defined(GPTLAB_AVX512) || defined(GPTLAB_AVX2)

/* ---- one Llama decoder layer for one new token per row (the engine's decode step) ----
 * The same computation as gptlab.models.llama.DecoderLayer with int4/int8 projections:
 *   x += o(attend(rope(q(n1)), cache ∪ rope(k(n1)), cache ∪ v(n1))),  n1 = rms_norm(x)
 *   x += down(act(gate(n2)) · up(n2)),                                 n2 = rms_norm(x)
 * in one call instead of ~40 PyTorch operations. Row b is cache slot slots[b], its token at
 * position pos[b]; it attends to that slot's keys 0 .. pos[b] (its own included). The cache of
 * one layer is (slots, n_kv_heads, max_len, head_dim) float32. */
typedef struct {
    int kind; /* 4: int4 codes (n, k/2) with bf16 scale and minimum (n, k/32); 8: int8 (n, k), bf16 scale (n) */
    int n, k;
    const void *w;
    const uint16_t *scale, *minimum;
    const float *bias; /* NULL: none */
    const uint8_t *packed; /* int4: NULL, or the weights in gptlab_q4_pack's layout, with pscale, pmin */
    const float *pscale, *pmin;
} gptlab_linear;

typedef struct {
    int d, n_heads, n_kv_heads, head_dim, hidden, act; /* act 0: SiLU, 1: GELU (tanh) */
    float eps;
    const float *in_norm, *post_norm;
    gptlab_linear q, k, v, o, gate, up, down;
} gptlab_layer;

void gptlab_rms_norm(int M, int D, const float *x, const float *weight, float eps, float *y);

static int linear(const gptlab_linear *l, int M, const float *x, float *y, int threads) {
    if (l->kind == 4)
        return gptlab_q4_matmul(M, l->n, l->k, x, (const uint8_t *)l->w, l->scale, l->minimum, l->bias, y, threads,
                                l->packed, l->pscale, l->pmin);
    return gptlab_i8_matmul(M, l->n, l->k, x, (const int8_t *)l->w, l->scale, l->bias, y, threads);
}

/* Products that read the same x (n <= Q4_MAX_JOBS): when all are int4 over the same inputs, x is
 * prepared once and they run in one parallel loop. */
static int linears(const gptlab_linear *const *ls, int n, int M, const float *x, float *const *ys, int threads) {
    int shared = 1;
    for (int i = 0; i < n; i++) shared &= ls[i]->kind == 4 && ls[i]->k == ls[0]->k;
    if (!shared || ls[0]->k % 32) {
        int rc = 0;
        for (int i = 0; i < n; i++) rc |= linear(ls[i], M, x, ys[i], threads);
        return rc;
    }
    int packed_jobs = 0;
    for (int i = 0; i < n; i++) packed_jobs += ls[i]->packed && gptlab_q4_packs(ls[i]->n, ls[i]->k);
    q4_input in;
    if (q4_prepare(&in, M, ls[0]->k, x, packed_jobs == 0 ? 0 : packed_jobs == n ? 1 : 2)) return -2;
    q4_job jobs[Q4_MAX_JOBS];
    for (int i = 0; i < n; i++) {
        const int packed = ls[i]->packed && gptlab_q4_packs(ls[i]->n, ls[i]->k);
        jobs[i] = (q4_job){ls[i]->n, (const uint8_t *)ls[i]->w, ls[i]->scale, ls[i]->minimum, ls[i]->bias, ys[i],
                           packed ? ls[i]->packed : NULL, ls[i]->pscale, ls[i]->pmin};
    }
    q4_run(&in, jobs, n, threads);
    q4_release(&in);
    return 0;
}

/* e^x for a vector of floats (Cephes' expf: n = round(x·log2 e), r = x - n·ln 2 in two parts, e^r by a
 * degree-6 polynomial, times 2^n; within ~1 float step of expf), x clamped to ±88.376 (a NaN stays NaN).
 * A decode step at 8 rows took ~1.5 ms of scalar expf in the layers' SiLU and softmax. */
#if defined(GPTLAB_AVX512)
#define VEXP_W 16
typedef __m512 vexp_t;
#define VX_SET1 _mm512_set1_ps
#define VX_ADD _mm512_add_ps
#define VX_MUL _mm512_mul_ps
#define VX_FMA _mm512_fmadd_ps
#define VX_FNMA _mm512_fnmadd_ps
#define VX_LOAD _mm512_loadu_ps
#define VX_STORE _mm512_storeu_ps
#define VX_DIV _mm512_div_ps
#define VX_SUM _mm512_reduce_add_ps
static inline __m512 vx_clamp(__m512 x) {
    return _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), _mm512_max_ps(_mm512_set1_ps(-88.3762626647949f), x));
}
static inline __m512 vx_floor(__m512 x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
static inline __m512 vx_pow2(__m512 n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#else
#define VEXP_W 8
typedef __m256 vexp_t;
#define VX_SET1 _mm256_set1_ps
#define VX_ADD _mm256_add_ps
#define VX_MUL _mm256_mul_ps
#define VX_FMA _mm256_fmadd_ps
#define VX_FNMA _mm256_fnmadd_ps
#define VX_LOAD _mm256_loadu_ps
#define VX_STORE _mm256_storeu_ps
#define VX_DIV _mm256_div_ps
#define VX_SUM hsum
static inline __m256 vx_clamp(__m256 x) {
    return _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), x));
}
static inline __m256 vx_floor(__m256 x) { return _mm256_floor_ps(x); }
static inline __m256 vx_pow2(__m256 n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#endif

static inline vexp_t vexp(vexp_t x) {
    x = vx_clamp(x);
    const vexp_t n = vx_floor(VX_FMA(x, VX_SET1(1.44269504088896341f), VX_SET1(0.5f)));
    x = VX_FNMA(n, VX_SET1(0.693359375f), x);
    x = VX_FNMA(n, VX_SET1(-2.12194440e-4f), x);
    vexp_t y = VX_SET1(1.9875691500e-4f);
    y = VX_FMA(y, x, VX_SET1(1.3981999507e-3f));
    y = VX_FMA(y, x, VX_SET1(8.3334519073e-3f));
    y = VX_FMA(y, x, VX_SET1(4.1665795894e-2f));
    y = VX_FMA(y, x, VX_SET1(1.6666665459e-1f));
    y = VX_FMA(y, x, VX_SET1(5.0000001201e-1f));
    y = VX_FMA(y, VX_MUL(x, x), VX_ADD(x, VX_SET1(1.0f)));
    return VX_MUL(y, vx_pow2(n));
}

/* g[i] = silu(g[i]) · u[i] over one row of n values (a fixed split into vectors and a scalar tail: a
 * row's result never depends on the other rows). */
static void silu_mul_row(float *g, const float *u, int n) {
    int i = 0;
    for (; i + VEXP_W <= n; i += VEXP_W) {
        const vexp_t a = VX_LOAD(g + i);
        const vexp_t e = vexp(VX_MUL(a, VX_SET1(-1.0f)));
        VX_STORE(g + i, VX_MUL(VX_DIV(a, VX_ADD(VX_SET1(1.0f), e)), VX_LOAD(u + i)));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* p[s] = e^(p[s] - mx) over one row of n values; returns their sum. */
static float exp_row(float *p, int n, float mx) {
    vexp_t acc = VX_SET1(0.0f);
    int s = 0;
    for (; s + VEXP_W <= n; s += VEXP_W) {
        const vexp_t e = vexp(VX_ADD(VX_LOAD(p + s), VX_SET1(-mx)));
        VX_STORE(p + s, e);
        acc = VX_ADD(acc, e);
    }
    float sum = VX_SUM(acc);
    for (; s < n; s++) sum += (p[s] = expf(p[s] - mx));
    return sum;
}

/* "rotate half" RoPE of one head in place: t·cos + (-t[half:], t[:half])·sin */
static void rope(float *t, const float *cos, const float *sin, int hd) {
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        const float a = t[i], b = t[i + half];
        t[i] = a * cos[i] - b * sin[i];
        t[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

static float dot(const float *a, const float *b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

int gptlab_decode_layer(const gptlab_layer *L, int B, float *x, const float *cos, const float *sin, float *kc,
                        float *vc, const int64_t *slots, const int64_t *pos, int max_len, int threads) {
    const int d = L->d, H = L->n_heads, Hkv = L->n_kv_heads, hd = L->head_dim, F = L->hidden;
    const int qd = H * hd, kvd = Hkv * hd, group = H / Hkv;
    for (int b = 0; b < B; b++)
        if (pos[b] < 0 || pos[b] >= max_len) return -1;
    float *buf = malloc(sizeof(float) * (size_t)B * (d + 2 * qd + 2 * kvd + 2 * F + d));
    if (!buf) return -2;
    float *h = buf, *q = h + (size_t)B * d, *k = q + (size_t)B * qd, *v = k + (size_t)B * kvd;
    float *att = v + (size_t)B * kvd, *g = att + (size_t)B * qd, *u = g + (size_t)B * F, *out = u + (size_t)B * F;
    const size_t slot_stride = (size_t)Hkv * max_len * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    int rc = 0, failed = 0;

    gptlab_rms_norm(B, d, x, L->in_norm, L->eps, h);
    {
        const gptlab_linear *qkv[3] = {&L->q, &L->k, &L->v};
        float *out3[3] = {q, k, v};
        rc |= linears(qkv, 3, B, h, out3, threads);
    }
    for (int b = 0; b < B; b++) { /* rotate, then store this token's keys and values in its slot */
        for (int i = 0; i < H; i++) rope(q + (size_t)b * qd + i * hd, cos + (size_t)b * hd, sin + (size_t)b * hd, hd);
        for (int j = 0; j < Hkv; j++) {
            float *kt = k + (size_t)b * kvd + j * hd;
            rope(kt, cos + (size_t)b * hd, sin + (size_t)b * hd, hd);
            const size_t at = slots[b] * slot_stride + ((size_t)j * max_len + pos[b]) * hd;
            memcpy(kc + at, kt, sizeof(float) * hd);
            memcpy(vc + at, v + (size_t)b * kvd + j * hd, sizeof(float) * hd);
        }
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B * Hkv > 1)
    for (int task = 0; task < B * Hkv; task++) { /* softmax(q·Kᵀ / √hd)·V, each KV head for its query heads */
        const int b = task / Hkv, j = task % Hkv, S = (int)pos[b] + 1;
        const float *K = kc + slots[b] * slot_stride + (size_t)j * max_len * hd, *V = vc + (K - kc);
        float *p = malloc(sizeof(float) * (size_t)S);
        if (!p) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        for (int i = j * group; i < (j + 1) * group; i++) {
            const float *qi = q + (size_t)b * qd + i * hd;
            float mx = -INFINITY, sum = 0.0f;
            for (int s = 0; s < S; s++) {
                p[s] = dot(qi, K + (size_t)s * hd, hd) * scale;
                mx = p[s] > mx ? p[s] : mx;
            }
            sum = exp_row(p, S, mx);
            float *o = att + (size_t)b * qd + i * hd;
            memset(o, 0, sizeof(float) * hd);
            for (int s = 0; s < S; s++) {
                const float w = p[s] / sum, *vs = V + (size_t)s * hd;
#pragma omp simd
                for (int t = 0; t < hd; t++) o[t] += w * vs[t];
            }
        }
        free(p);
    }
    if (failed) {
        free(buf);
        return -2;
    }
    rc |= linear(&L->o, B, att, out, threads);
    for (size_t i = 0; i < (size_t)B * d; i++) x[i] += out[i];
    gptlab_rms_norm(B, d, x, L->post_norm, L->eps, h);
    {
        const gptlab_linear *gu[2] = {&L->gate, &L->up};
        float *out2[2] = {g, u};
        rc |= linears(gu, 2, B, h, out2, threads);
    }
    if (L->act == 0)
        for (int b = 0; b < B; b++) silu_mul_row(g + (size_t)b * F, u + (size_t)b * F, F);
    else
        for (size_t i = 0; i < (size_t)B * F; i++) {
            const float a = g[i];
            g[i] = 0.5f * a * (1.0f + tanhf(0.7978845608028654f * (a + 0.044715f * a * a * a))) * u[i];
        }
    rc |= linear(&L->down, B, g, out, threads);
    for (size_t i = 0; i < (size_t)B * d; i++) x[i] += out[i];
    free(buf);
    return rc;
}
#endif

#if defined(GPTLAB_AVX512) || defined(GPTLAB_AVX2)
/* Every decoder layer of a decode step in one call (the engine's whole stack: a Python call per
 * layer cost ~70 us of the ~300 a layer takes): layer i uses L[i] and its own cache kc[i], vc[i]. */
int gptlab_decode_layers(const gptlab_layer *L, int n_layers, int B, float *x, const float *cos, const float *sin,
                         float *const *kc, float *const *vc, const int64_t *slots, const int64_t *pos, int max_len,
                         int threads) {
    for (int i = 0; i < n_layers; i++) {
        const int rc = gptlab_decode_layer(L + i, B, x, cos, sin, kc[i], vc[i], slots, pos, max_len, threads);
        if (rc) return rc;
    }
    return 0;
}
#endif

