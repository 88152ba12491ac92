/* GPT-2's training kernels on CPU: causal self-attention straight from a packed q/k/v projection, and the
 * GELU of its MLP, each forward and backward.
 *
 * ---- attention (read with models/fused_attention.py) ---- Shapes (row-major float32):
 *   qkv  (B, T, 3C)  the q/k/v linear's output: q = [.., 0:C], k = [.., C:2C], v = [.., 2C:3C];
 *                    head h is the D columns h*D .. h*D+D-1 of each (C = H*D)
 *   out  (B, T, C)   softmax(q k^T * scale, causal) v, heads side by side: the layout the output
 *                    projection reads, so no transpose or copy follows
 *   lse  (B, H, T)   each row's log-sum-exp, kept for the backward pass
 *
 * One (batch, head) pair is one task; OpenMP spreads the B*H tasks over the threads. A task copies its
 * K (and V) into transposed scratch (D x Tp, T rounded up to 8) so that the scores of 8 keys are one
 * vector, accumulated over d in registers. Forward takes one query row at a time over the keys it may
 * see (j <= i). Backward recomputes each row's probabilities from lse (as FlashAttention does), keeps
 * the (T, T) p and ds of the task in scratch, then forms dK and dV column by column:
 *   p_ij = exp(scale q_i.k_j - lse_i),  dp_ij = do_i.v_j,  ds_ij = scale p_ij (dp_ij - do_i.o_i)
 *   dq_i = sum_j ds_ij k_j,  dk_j = sum_i ds_ij q_i,  dv_j = sum_i p_ij do_i
 * exp: Cephes' expf polynomial, 8 lanes at a time (relative error < 2e-7).
 *
 * AVX2 + FMA only, head widths D = 8, 16, ..., 64 (gptlab_attention_supports); elsewhere the caller
 * uses PyTorch's SDPA.
 *
 * ---- GELU (read with models/fused_gelu.py) ----
 * GPT-2's tanh form y = x Φ(x), Φ(x) ≈ (1 + tanh(u)) / 2 = σ(2u), u = √(2/π) (x + 0.044715 x³);
 * dx = dy (Φ + x Φ'). One exponential per value and one pass over memory each way instead of
 * PyTorch's (its AVX2 tanh is slow). (An erf form measured no faster than PyTorch's own erf GELU
 * on an AVX2 EPYC in a training step, and slower on an AVX-512 Xeon: 0.80 against 0.65 ms forward
 * and backward per 768 x 512; the exact GELU is PyTorch's.)
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MAXV 8 /* D / 8 at most: the accumulators of one row stay in registers */

int gptlab_attention_supports(int D) { return D > 0 && D % 8 == 0 && D / 8 <= MAXV; }

/* e^x, 8 at a time: x = k ln2 + r with |r| <= ln2/2, e^r by Cephes' expf polynomial, 2^k in the exponent bits. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x); /* this operand order passes a NaN through */
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* s[0 .. 8*nb) = scale * x . key_j, from xt (D x Tp, key j in column j); four 8-key blocks at a time. */
static void scores(const float *x, const float *xt, int Tp, int D, int nb, float scale, float *s) {
    int b = 0;
    for (; b + 4 <= nb; b += 4) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        const float *col = xt + 8 * b;
        for (int d = 0; d < D; d++, col += Tp) {
            const __m256 xd = _mm256_set1_ps(x[d]);
            a0 = _mm256_fmadd_ps(xd, _mm256_loadu_ps(col), a0);
            a1 = _mm256_fmadd_ps(xd, _mm256_loadu_ps(col + 8), a1);
            a2 = _mm256_fmadd_ps(xd, _mm256_loadu_ps(col + 16), a2);
            a3 = _mm256_fmadd_ps(xd, _mm256_loadu_ps(col + 24), a3);
        }
        const __m256 sc = _mm256_set1_ps(scale);
        _mm256_storeu_ps(s + 8 * b, _mm256_mul_ps(a0, sc));
        _mm256_storeu_ps(s + 8 * b + 8, _mm256_mul_ps(a1, sc));
        _mm256_storeu_ps(s + 8 * b + 16, _mm256_mul_ps(a2, sc));
        _mm256_storeu_ps(s + 8 * b + 24, _mm256_mul_ps(a3, sc));
    }
    if (b < nb) { /* the last 1-3 blocks together: independent chains */
        const int r = nb - b;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0;
        const float *col = xt + 8 * b;
        for (int d = 0; d < D; d++, col += Tp) {
            const __m256 xd = _mm256_set1_ps(x[d]);
            a0 = _mm256_fmadd_ps(xd, _mm256_loadu_ps(col), a0);
            if (r > 1) a1 = _mm256_fmadd_ps(xd, _mm256_loadu_ps(col + 8), a1);
            if (r > 2) a2 = _mm256_fmadd_ps(xd, _mm256_loadu_ps(col + 16), a2);
        }
        const __m256 sc = _mm256_set1_ps(scale);
        _mm256_storeu_ps(s + 8 * b, _mm256_mul_ps(a0, sc));
        if (r > 1) _mm256_storeu_ps(s + 8 * b + 8, _mm256_mul_ps(a1, sc));
        if (r > 2) _mm256_storeu_ps(s + 8 * b + 16, _mm256_mul_ps(a2, sc));
    }
}

/* dst (D floats) = times * sum_{j < n} w[j] * rows[j * stride ...], accumulated in registers. */
static void weighted_rows(const float *w, const float *rows, size_t stride, int n, int D, float times, float *dst) {
    const int V = D / 8;
    __m256 a[MAXV], c[MAXV];
    for (int u = 0; u < V; u++) a[u] = c[u] = _mm256_setzero_ps();
    int j = 0;
    for (; j + 2 <= n; j += 2) { /* two sets of accumulators: even and odd j */
        const __m256 w0 = _mm256_set1_ps(w[j]), w1 = _mm256_set1_ps(w[j + 1]);
        const float *r0 = rows + (size_t)j * stride, *r1 = r0 + stride;
        for (int u = 0; u < V; u++) {
            a[u] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(r0 + 8 * u), a[u]);
            c[u] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(r1 + 8 * u), c[u]);
        }
    }
    if (j < n) {
        const __m256 w0 = _mm256_set1_ps(w[j]);
        const float *r0 = rows + (size_t)j * stride;
        for (int u = 0; u < V; u++) a[u] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(r0 + 8 * u), a[u]);
    }
    const __m256 t = _mm256_set1_ps(times);
    for (int u = 0; u < V; u++) _mm256_storeu_ps(dst + 8 * u, _mm256_mul_ps(_mm256_add_ps(a[u], c[u]), t));
}

/* Copy the D columns of one head out of a strided (T, stride) matrix into a transposed (D, Tp) block. */
static void transpose_head(const float *src, size_t stride, int T, int Tp, int D, float *dst) {
    for (int j = 0; j < T; j++)
        for (int d = 0; d < D; d++) dst[(size_t)d * Tp + j] = src[(size_t)j * stride + d];
}

/* The largest of s[0 .. n), after setting s[n .. 8*nb) to -inf (s has room). */
static float masked_max(float *s, int n, int nb) {
    for (int j = n; j < 8 * nb; j++) s[j] = -INFINITY;
    __m256 m = _mm256_loadu_ps(s);
    for (int b = 1; b < nb; b++) m = _mm256_max_ps(m, _mm256_loadu_ps(s + 8 * b));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

/* Row i's probabilities over keys 0..i in p[0 .. 8*nb): exp(s - shift), zero past i (set to -inf first). */
static void masked_exp(float *p, int nb, float shift) {
    const __m256 sh = _mm256_set1_ps(shift);
    for (int b = 0; b < nb; b++) {
        const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(p + 8 * b), sh);
        /* -inf - shift stays -inf; exp8 clamps it to e^-87 ~ 1.6e-38: zeroed exactly below (a NaN stays NaN) */
        _mm256_storeu_ps(p + 8 * b, _mm256_and_ps(exp8(x), _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_UQ)));
    }
}

/* One call's shapes and tensors (see the top of the file); each (batch, head) task reads what it needs. */
typedef struct {
    int B, T, H, D, C, Tp;
    size_t row; /* 3C: the stride of qkv and dqkv */
    float scale;
    const float *qkv, *out, *dout, *lse;
    float *o, *l, *dqkv; /* written: forward's out and lse, backward's dqkv */
} Attn;

static Attn attn_of(int B, int T, int H, int D, float scale) {
    Attn a = {0};
    a.B = B, a.T = T, a.H = H, a.D = D, a.C = H * D, a.Tp = (T + 7) / 8 * 8;
    a.row = 3 * (size_t)a.C, a.scale = scale;
    return a;
}

/* Run task(a, b, h) for every (batch, head) over the threads: 0, 1 (head width not supported) or 2 (out of
 * memory in some task). */
static int run_tasks(const Attn *a, int (*task)(const Attn *, int, int), int threads) {
    if (!gptlab_attention_supports(a->D)) return 1;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int t = 0; t < a->B * a->H; t++) {
        if (task(a, t / a->H, t % a->H)) {
#pragma omp atomic write
            failed = 2;
        }
    }
    return failed;
}

static int forward_task(const Attn *a, int b, int h) {
    const int T = a->T, D = a->D, C = a->C, Tp = a->Tp;
    const size_t row = a->row;
    const float *q = a->qkv + (size_t)b * T * row + (size_t)h * D, *v = q + 2 * C;
    float *o = a->o + (size_t)b * T * C + (size_t)h * D, *l = a->l + ((size_t)b * a->H + h) * T;
    float *kt = calloc((size_t)D * Tp + Tp, sizeof(float));
    if (kt == NULL) return 2;
    float *s = kt + (size_t)D * Tp;
    transpose_head(q + C, row, T, Tp, D, kt);
    for (int i = 0; i < T; i++) {
        const int n = i + 1, nb = (n + 7) / 8;
        scores(q + (size_t)i * row, kt, Tp, D, nb, a->scale, s);
        const float m = masked_max(s, n, nb);
        masked_exp(s, nb, m);
        __m256 acc = _mm256_setzero_ps();
        for (int bb = 0; bb < nb; bb++) acc = _mm256_add_ps(acc, _mm256_loadu_ps(s + 8 * bb));
        const float sum = hsum8(acc);
        weighted_rows(s, v, row, n, D, 1.0f / sum, o + (size_t)i * C);
        l[i] = m + logf(sum);
    }
    free(kt);
    return 0;
}

static int backward_task(const Attn *a, int b, int h) {
    const int T = a->T, D = a->D, C = a->C, Tp = a->Tp;
    const size_t row = a->row, base = (size_t)b * T * row + (size_t)h * D;
    const float scale = a->scale;
    const float *q = a->qkv + base, *k = q + C, *v = q + 2 * C;
    const float *o = a->out + (size_t)b * T * C + (size_t)h * D, *go = a->dout + (size_t)b * T * C + (size_t)h * D;
    const float *l = a->lse + ((size_t)b * a->H + h) * T;
    float *dq = a->dqkv + base, *dk = dq + C, *dv = dq + 2 * C;
    /* scratch: k^T, v^T (D x Tp each); P and dS (T x Tp each, row i valid for j <= i); a column (T) */
    float *kt = malloc(sizeof(float) * (2 * (size_t)D * Tp + 2 * (size_t)T * Tp + T));
    if (kt == NULL) return 2;
    float *vt = kt + (size_t)D * Tp, *P = vt + (size_t)D * Tp, *dS = P + (size_t)T * Tp, *col = dS + (size_t)T * Tp;
    memset(kt, 0, sizeof(float) * 2 * (size_t)D * Tp);
    transpose_head(k, row, T, Tp, D, kt);
    transpose_head(v, row, T, Tp, D, vt);
    for (int i = 0; i < T; i++) {
        const int n = i + 1, nb = (n + 7) / 8;
        const float *qi = q + (size_t)i * row, *goi = go + (size_t)i * C, *oi = o + (size_t)i * C;
        float *p = P + (size_t)i * Tp, *ds = dS + (size_t)i * Tp;
        float di = 0.0f;
        for (int d = 0; d < D; d++) di += goi[d] * oi[d];
        scores(qi, kt, Tp, D, nb, scale, p);
        for (int j = n; j < 8 * nb; j++) p[j] = -INFINITY;
        masked_exp(p, nb, l[i]);
        scores(goi, vt, Tp, D, nb, 1.0f, ds); /* ds <- dp_ij = do_i . v_j */
        const __m256 dv8 = _mm256_set1_ps(di), sc = _mm256_set1_ps(scale);
        for (int bb = 0; bb < nb; bb++) { /* p is 0 past i, so ds is too */
            const __m256 p8 = _mm256_loadu_ps(p + 8 * bb), d8 = _mm256_loadu_ps(ds + 8 * bb);
            _mm256_storeu_ps(ds + 8 * bb, _mm256_mul_ps(_mm256_mul_ps(p8, _mm256_sub_ps(d8, dv8)), sc));
        }
        weighted_rows(ds, k, row, n, D, 1.0f, dq + (size_t)i * row);
    }
    for (int j = 0; j < T; j++) { /* dk_j = sum_{i >= j} ds_ij q_i; dv_j = sum_{i >= j} p_ij do_i */
        const int n = T - j;
        for (int i = j; i < T; i++) col[i - j] = dS[(size_t)i * Tp + j];
        weighted_rows(col, q + (size_t)j * row, row, n, D, 1.0f, dk + (size_t)j * row);
        for (int i = j; i < T; i++) col[i - j] = P[(size_t)i * Tp + j];
        weighted_rows(col, go + (size_t)j * C, C, n, D, 1.0f, dv + (size_t)j * row);
    }
    free(kt);
    return 0;
}

int gptlab_causal_attention_forward(int B, int T, int H, int D, const float *qkv, float *out, float *lse,
                                    float scale, int threads) {
    Attn a = attn_of(B, T, H, D, scale);
    a.qkv = qkv, a.o = out, a.l = lse;
    return run_tasks(&a, forward_task, threads);
}

int gptlab_causal_attention_backward(int B, int T, int H, int D, const float *qkv, const float *out,
                                     const float *dout, const float *lse, float *dqkv, float scale, int threads) {
    Attn a = attn_of(B, T, H, D, scale);
    a.qkv = qkv, a.out = out, a.dout = dout, a.lse = lse, a.dqkv = dqkv;
    return run_tasks(&a, backward_task, threads);
}

/* ---- GELU ---- */

/* GPT-2's tanh-form Φ(x) and Φ'(x) for 8 values: σ(2u) = 1 / (1 + e^{-2u}); Φ' = 2 σ (1 - σ) u'. */
static inline void gelu_phi8(__m256 x, __m256 *phi, __m256 *dphi) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 b = _mm256_set1_ps(0.7978845608028654f), k = _mm256_set1_ps(0.044715f);
    const __m256 x2 = _mm256_mul_ps(x, x);
    const __m256 u = _mm256_mul_ps(b, _mm256_fmadd_ps(_mm256_mul_ps(k, x2), x, x));
    /* e^{-2u} capped at e^88 (< FLT_MAX; exp8 has no upper clamp), and σ = 0 past it */
    const __m256 m = _mm256_mul_ps(_mm256_set1_ps(-2.0f), u);
    const __m256 e = exp8(_mm256_min_ps(_mm256_set1_ps(88.0f), m));
    const __m256 s = _mm256_and_ps(_mm256_div_ps(one, _mm256_add_ps(one, e)),
                                   _mm256_cmp_ps(m, _mm256_set1_ps(88.0f), _CMP_LT_OQ));
    *phi = s;
    const __m256 du = _mm256_mul_ps(b, _mm256_fmadd_ps(_mm256_set1_ps(3.0f * 0.044715f), x2, one));
    /* 1 - σ = e σ: no cancellation where σ rounds to 1 */
    *dphi = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(2.0f), _mm256_mul_ps(s, _mm256_mul_ps(e, s))), du);
}

/* A tail of n < 8 values through the 8-lane code (zero-padded): the same results as a full vector. */
static inline __m256 load_tail(const float *p, int n) {
    float buf[8] = {0};
    memcpy(buf, p, sizeof(float) * (size_t)n);
    return _mm256_loadu_ps(buf);
}

static inline void store_tail(float *p, __m256 v, int n) {
    float buf[8];
    _mm256_storeu_ps(buf, v);
    memcpy(p, buf, sizeof(float) * (size_t)n);
}

#define GELU_CHUNK 4096 /* values per OpenMP task */

/* out[i .. end) = gelu(x) (backward 0) or dy * gelu'(x) (backward 1); the last < 8 values go through the
 * same 8-lane code, zero-padded. backward is a constant where this is inlined. */
static inline __attribute__((always_inline)) void gelu_range(long i, long end, const float *x, const float *dy,
                                                             float *out, const int backward) {
    __m256 phi, dphi;
    for (; i + 8 <= end; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        gelu_phi8(v, &phi, &dphi);
        _mm256_storeu_ps(out + i, backward ? _mm256_mul_ps(_mm256_loadu_ps(dy + i), _mm256_fmadd_ps(v, dphi, phi))
                                           : _mm256_mul_ps(v, phi));
    }
    if (i < end) {
        const int m = (int)(end - i);
        const __m256 v = load_tail(x + i, m);
        gelu_phi8(v, &phi, &dphi);
        store_tail(out + i, backward ? _mm256_mul_ps(load_tail(dy + i, m), _mm256_fmadd_ps(v, dphi, phi))
                                     : _mm256_mul_ps(v, phi), m);
    }
}

/* Chunks of GELU_CHUNK values over the threads (the pragma stays in each caller: OpenMP outlines the loop
 * before inlining, which would leave backward a variable). */
#define GELU_CHUNKS(n, threads, BODY)                                                                       \
    do {                                                                                                 \
        const long chunks_ = ((n) + GELU_CHUNK - 1) / GELU_CHUNK;                                        \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if (threads > 1 && chunks_ > 1)") \
        for (long c = 0; c < chunks_; c++) {                                                             \
            const long start = c * GELU_CHUNK, end = start + GELU_CHUNK < (n) ? start + GELU_CHUNK : (n); \
            BODY;                                                                                        \
        }                                                                                                \
    } while (0)

int gptlab_gelu_forward(long n, const float *x, float *y, int threads) {
    GELU_CHUNKS(n, threads, gelu_range(start, end, x, NULL, y, 0));
    return 0;
}

int gptlab_gelu_backward(long n, const float *x, const float *dy, float *dx, int threads) {
    GELU_CHUNKS(n, threads, gelu_range(start, end, x, dy, dx, 1));
    return 0;
}

int gptlab_gelu_supported(void) { return 1; }

#else
int gptlab_attention_supports(int D) { (void)D; return 0; }
int gptlab_causal_attention_forward(int B, int T, int H, int D, const float *qkv, float *out, float *lse,
                                    float scale, int threads) {
    (void)B; (void)T; (void)H; (void)D; (void)qkv; (void)out; (void)lse; (void)scale; (void)threads;
    return 1;
}
int gptlab_causal_attention_backward(int B, int T, int H, int D, const float *qkv, const float *out,
                                     const float *dout, const float *lse, float *dqkv, float scale, int threads) {
    (void)B; (void)T; (void)H; (void)D; (void)qkv; (void)out; (void)dout; (void)lse; (void)dqkv; (void)scale;
    (void)threads;
    return 1;
}
int gptlab_gelu_supported(void) { return 0; }
int gptlab_gelu_forward(long n, const float *x, float *y, int threads) {
    (void)n; (void)x; (void)y; (void)threads;
    return 1;
}
int gptlab_gelu_backward(long n, const float *x, const float *dy, float *dx, int threads) {
    (void)n; (void)x; (void)dy; (void)dx; (void)threads;
    return 1;
}
#endif
