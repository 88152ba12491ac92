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
 * One (batch, head) pair is one task; OpenMP spreads the B*H tasks over the threads, each with one
 * scratch buffer for all its tasks. A task copies its head's q, k, v (and do) into zero-padded rows and
 * k, v into transposed blocks, then every product is a register-blocked micro-kernel (mkernel): MR = 4
 * rows at a time, each vector of the other operand loaded once for the four. Rows are taken in blocks
 * of 4 queries, over the keys the block may see (j <= i, rounded up to a vector):
 *   forward:  s = scale q k^T, p = exp(s - max) zero past i, o = p v / sum, lse = max + log(sum)
 *   backward: p = exp(scale q k^T - lse) (recomputed, as FlashAttention does), dp = do v^T,
 *             ds = p (dp - do_i.o_i) scale; dq = ds k by query blocks; then by key blocks
 *             dk_j = sum_{i >= j} ds_ij q_i, dv_j = sum_{i >= j} p_ij do_i (p and ds kept, T x T)
 * exp: Cephes' expf polynomial (relative error < 2e-7). Vectors are AVX-512 (16 floats) where the build
 * has it, else AVX2 + FMA (8); head widths D = 8, 16, ..., 64 (gptlab_attention_supports); elsewhere
 * the caller uses PyTorch's SDPA.
 *
 * ---- GELU (read with models/fused_gelu.py) ----
 * GPT-2's tanh form y = x Φ(x), Φ(x) ≈ (1 + tanh(u)) / 2 = σ(2u), u = √(2/π) (x + 0.044715 x³);
 * dx = dy (Φ + x Φ'). One exponential per value and one pass over memory each way instead of
 * PyTorch's (its AVX2 tanh is slow), in the same vectors as the attention. (An exact (erf) form, 16 floats at a time with Φ and φ sharing one
 * exponential, measured 0.41 against PyTorch's 0.51 ms forward + backward per 768 x 512 on an AVX-512
 * Xeon but no faster in the Shakespeare step, 48.8 against 48.5 ms, both memory-bound: the exact GELU is
 * PyTorch's.)
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

int gptlab_attention_supports(int D) { return D > 0 && D % 8 == 0 && D <= 64; }

/* One vector `vec` of VL floats, for the attention and the GELU alike: AVX-512 where the build has it
 * (-march=native), else AVX2 + FMA. */
#if defined(__AVX512F__)
#define VL 16
#define NB 4 /* vectors per micro-kernel row: MR x NB accumulators stay in registers */
typedef __m512 vec;
#define vzero _mm512_setzero_ps
#define vset1 _mm512_set1_ps
#define vload _mm512_loadu_ps
#define vstore _mm512_storeu_ps
#define vfmadd _mm512_fmadd_ps
#define vfnmadd _mm512_fnmadd_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vdiv _mm512_div_ps
#define vmax _mm512_max_ps
#define vmin _mm512_min_ps
#define vhsum _mm512_reduce_add_ps
#define vhmax _mm512_reduce_max_ps
#define vround(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

/* 2^k for whole-numbered k (in the exponent bits) */
static inline vec vpow2(vec k) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23));
}

/* v where x < limit, else 0 */
static inline vec vkeep_below(vec v, vec x, float limit) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, vset1(limit), _CMP_LT_OQ), v);
}

/* v with its lanes j0 + l > last set to fill. */
static inline vec vkeep(vec v, int j0, int last, float fill) {
    const int n = last - j0 + 1;
    const __mmask16 m = n >= VL ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
    return _mm512_mask_blend_ps(m, vset1(fill), v);
}
#else
#define VL 8
#define NB 2
typedef __m256 vec;
#define vzero _mm256_setzero_ps
#define vset1 _mm256_set1_ps
#define vload _mm256_loadu_ps
#define vstore _mm256_storeu_ps
#define vfmadd _mm256_fmadd_ps
#define vfnmadd _mm256_fnmadd_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vdiv _mm256_div_ps
#define vmax _mm256_max_ps
#define vmin _mm256_min_ps
#define vround(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

static inline vec vpow2(vec k) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
}

static inline vec vkeep_below(vec v, vec x, float limit) {
    return _mm256_and_ps(v, _mm256_cmp_ps(x, vset1(limit), _CMP_LT_OQ));
}

static inline float vhsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float vhmax(vec v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

static inline vec vkeep(vec v, int j0, int last, float fill) {
    const __m256 lane = _mm256_add_ps(_mm256_set1_ps((float)j0), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_blendv_ps(vset1(fill), v, _mm256_cmp_ps(lane, _mm256_set1_ps((float)last), _CMP_LE_OQ));
}
#endif

/* e^x by Cephes' expf: x = k ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial, 2^k in the exponent
 * bits (relative error < 2e-7); no upper clamp. */
static inline vec vexp(vec x) {
    x = vmax(vset1(-87.0f), x); /* this operand order passes a NaN through */
    const vec k = vround(vmul(x, vset1(1.44269504088896341f)));
    vec r = vfnmadd(k, vset1(0.693359375f), x);
    r = vfnmadd(k, vset1(-2.12194440e-4f), r);
    vec p = vset1(1.9875691500e-4f);
    p = vfmadd(p, r, vset1(1.3981999507e-3f));
    p = vfmadd(p, r, vset1(8.3334519073e-3f));
    p = vfmadd(p, r, vset1(4.1665795894e-2f));
    p = vfmadd(p, r, vset1(1.6666665459e-1f));
    p = vfmadd(p, r, vset1(5.0000001201e-1f));
    p = vfmadd(vmul(p, r), r, vadd(r, vset1(1.0f)));
    return vmul(p, vpow2(k));
}

/* ---- attention ---- */

#define MR 4 /* rows per micro-kernel call */

int gptlab_attention_lanes(void) { return VL; }

static inline int round_up(int n, int m) { return (n + m - 1) / m * m; }

/* c[r * ldc + 0 .. nv * VL) = alpha * sum_{k < K} a[r * ar + k * ak] * b[k * ldb + 0 .. nv * VL) for the MR
 * rows r: each vector of b's row k is loaded once for all MR rows. Inlined with nv a constant. */
static inline __attribute__((always_inline)) void mkernel(const int nv, int K, const float *a, size_t ar,
                                                          size_t ak, const float *b, size_t ldb, float alpha,
                                                          float *c, size_t ldc) {
    vec acc[MR][NB];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < nv; v++) acc[r][v] = vzero();
    for (int k = 0; k < K; k++) {
        vec bv[NB];
        for (int v = 0; v < nv; v++) bv[v] = vload(b + (size_t)k * ldb + v * VL);
        for (int r = 0; r < MR; r++) {
            const vec x = vset1(a[r * ar + (size_t)k * ak]);
            for (int v = 0; v < nv; v++) acc[r][v] = vfmadd(x, bv[v], acc[r][v]);
        }
    }
    const vec s = vset1(alpha);
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < nv; v++) vstore(c + r * ldc + v * VL, vmul(acc[r][v], s));
}

/* The MR rows of c = alpha * A B over n columns (a multiple of VL), NB vectors at a time (see mkernel). */
static void gemm_rows(int n, int K, const float *a, size_t ar, size_t ak, const float *b, size_t ldb, float alpha,
                      float *c, size_t ldc) {
    for (int col = 0; col < n; col += NB * VL) {
        const int nv = (n - col) / VL < NB ? (n - col) / VL : NB;
        if (nv == 1) mkernel(1, K, a, ar, ak, b + col, ldb, alpha, c + col, ldc);
        else if (nv == 2) mkernel(2, K, a, ar, ak, b + col, ldb, alpha, c + col, ldc);
#if NB > 2
        else if (nv == 3) mkernel(3, K, a, ar, ak, b + col, ldb, alpha, c + col, ldc);
        else mkernel(4, K, a, ar, ak, b + col, ldb, alpha, c + col, ldc);
#endif
    }
}

/* One call's shapes and tensors (see the top of the file); each (batch, head) task reads what it needs. */
typedef struct {
    int B, T, H, D, C;
    int Tr, Tp, Dp; /* T rounded up to MR rows and to VL columns, D to VL columns */
    size_t row;     /* 3C: the stride of qkv and dqkv */
    float scale;
    const float *qkv, *out, *dout, *lse;
    float *o, *l, *dqkv; /* written: forward's out and lse, backward's dqkv */
} Attn;

static Attn attn_of(int B, int T, int H, int D, float scale) {
    Attn a = {0};
    a.B = B, a.T = T, a.H = H, a.D = D, a.C = H * D;
    a.Tr = round_up(T, MR), a.Tp = round_up(T, VL), a.Dp = round_up(D, VL);
    a.row = 3 * (size_t)a.C, a.scale = scale;
    return a;
}

/* Floats of one thread's scratch (the backward's; the forward uses less). */
static size_t scratch_floats(const Attn *a) {
    return 3 * (size_t)a->Tr * a->Dp + 2 * (size_t)a->D * a->Tp + 2 * (size_t)a->Tr * a->Tp + MR * (size_t)a->Dp;
}

/* A head's D columns of rows 0 .. T-1 (row stride `stride`) into dst (Tr x Dp), zero-padded. */
static void copy_rows(const Attn *a, const float *src, size_t stride, float *dst) {
    for (int i = 0; i < a->Tr; i++) {
        float *d = dst + (size_t)i * a->Dp;
        const int n = i < a->T ? a->D : 0;
        if (n) memcpy(d, src + (size_t)i * stride, sizeof(float) * (size_t)n);
        memset(d + n, 0, sizeof(float) * (size_t)(a->Dp - n));
    }
}

/* The same columns transposed: dst (D x Tp), row j of src in column j, zero past T. */
static void copy_transposed(const Attn *a, const float *src, size_t stride, float *dst) {
    for (int d = 0; d < a->D; d++) {
        float *t = dst + (size_t)d * a->Tp;
        for (int j = 0; j < a->T; j++) t[j] = src[(size_t)j * stride + d];
        memset(t + a->T, 0, sizeof(float) * (size_t)(a->Tp - a->T));
    }
}

/* Rows i0 .. i0+MR-1 of blk (MR x Dp) times mul[r] into dst's rows (stride `stride`), those below T. */
static void store_rows(const Attn *a, const float *blk, int i0, const float *mul, float *dst, size_t stride) {
    for (int r = 0; r < MR && i0 + r < a->T; r++) {
        float *d = dst + (size_t)(i0 + r) * stride;
        for (int c = 0; c < a->D; c++) d[c] = blk[r * a->Dp + c] * (mul ? mul[r] : 1.0f);
    }
}

static void forward_task(const Attn *a, int b, int h, float *w) {
    const int T = a->T, D = a->D, C = a->C, Tp = a->Tp, Dp = a->Dp;
    const size_t row = a->row;
    const float *q = a->qkv + (size_t)b * T * row + (size_t)h * D, *k = q + C, *v = q + 2 * C;
    float *qs = w, *vs = qs + (size_t)a->Tr * Dp, *kt = vs + (size_t)a->Tr * Dp, *P = kt + (size_t)D * Tp;
    float *blk = P + (size_t)a->Tr * Tp, *l = a->l + ((size_t)b * a->H + h) * T;
    copy_rows(a, q, row, qs);
    copy_rows(a, v, row, vs);
    copy_transposed(a, k, row, kt);
    for (int i0 = 0; i0 < T; i0 += MR) {
        const int keys = i0 + MR < T ? i0 + MR : T, ncol = round_up(keys, VL);
        float inv[MR] = {0};
        gemm_rows(ncol, D, qs + (size_t)i0 * Dp, Dp, 1, kt, Tp, a->scale, P + (size_t)i0 * Tp, Tp);
        for (int r = 0; r < MR && i0 + r < T; r++) { /* row i's softmax over keys 0 .. i, zero past i */
            const int i = i0 + r;
            float *s = P + (size_t)i * Tp;
            vec m = vset1(-INFINITY), sum = vzero();
            for (int j = 0; j < ncol; j += VL) m = vmax(vkeep(vload(s + j), j, i, -INFINITY), m);
            const float mx = vhmax(m);
            for (int j = 0; j < ncol; j += VL) {
                const vec e = vkeep(vexp(vsub(vload(s + j), vset1(mx))), j, i, 0.0f);
                vstore(s + j, e);
                sum = vadd(sum, e);
            }
            const float total = vhsum(sum);
            l[i] = mx + logf(total);
            inv[r] = 1.0f / total;
        }
        gemm_rows(Dp, keys, P + (size_t)i0 * Tp, Tp, 1, vs, Dp, 1.0f, blk, Dp);
        store_rows(a, blk, i0, inv, a->o + (size_t)b * T * C + (size_t)h * D, C);
    }
}

static void backward_task(const Attn *a, int b, int h, float *w) {
    const int T = a->T, D = a->D, C = a->C, Tp = a->Tp, Dp = a->Dp, Tr = a->Tr;
    const size_t row = a->row, base = (size_t)b * T * row + (size_t)h * D, ob = (size_t)b * T * C + (size_t)h * D;
    const float *q = a->qkv + base, *k = q + C, *v = q + 2 * C, *o = a->out + ob, *go = a->dout + ob;
    const float *l = a->lse + ((size_t)b * a->H + h) * T;
    float *dq = a->dqkv + base, *dk = dq + C, *dv = dq + 2 * C;
    float *qs = w, *ks = qs + (size_t)Tr * Dp, *dos = ks + (size_t)Tr * Dp, *kt = dos + (size_t)Tr * Dp;
    float *vt = kt + (size_t)D * Tp, *P = vt + (size_t)D * Tp, *dS = P + (size_t)Tr * Tp, *blk = dS + (size_t)Tr * Tp;
    copy_rows(a, q, row, qs);
    copy_rows(a, k, row, ks);
    copy_rows(a, go, C, dos);
    copy_transposed(a, k, row, kt);
    copy_transposed(a, v, row, vt);
    for (int i0 = 0; i0 < T; i0 += MR) { /* P and dS by rows, and dq = dS k */
        const int keys = i0 + MR < T ? i0 + MR : T, ncol = round_up(keys, VL);
        gemm_rows(ncol, D, qs + (size_t)i0 * Dp, Dp, 1, kt, Tp, a->scale, P + (size_t)i0 * Tp, Tp);
        gemm_rows(ncol, D, dos + (size_t)i0 * Dp, Dp, 1, vt, Tp, 1.0f, dS + (size_t)i0 * Tp, Tp); /* dp */
        for (int r = 0; r < MR && i0 + r < T; r++) {
            const int i = i0 + r;
            float *p = P + (size_t)i * Tp, *ds = dS + (size_t)i * Tp;
            float di = 0.0f; /* do_i . o_i */
            for (int d = 0; d < D; d++) di += go[(size_t)i * C + d] * o[(size_t)i * C + d];
            const vec li = vset1(l[i]), dv8 = vset1(di), sc = vset1(a->scale);
            for (int j = 0; j < ncol; j += VL) { /* zero past i, exactly: dk and dv read these columns */
                const vec pj = vkeep(vexp(vsub(vload(p + j), li)), j, i, 0.0f);
                vstore(p + j, pj);
                vstore(ds + j, vkeep(vmul(vmul(pj, vsub(vload(ds + j), dv8)), sc), j, i, 0.0f));
            }
            memset(p + ncol, 0, sizeof(float) * (size_t)(Tp - ncol));
            memset(ds + ncol, 0, sizeof(float) * (size_t)(Tp - ncol));
        }
        gemm_rows(Dp, keys, dS + (size_t)i0 * Tp, Tp, 1, ks, Dp, 1.0f, blk, Dp);
        store_rows(a, blk, i0, NULL, dq, row);
    }
    for (int j0 = 0; j0 < T; j0 += MR) { /* dk_j = sum_{i >= j} ds_ij q_i, dv_j = sum_{i >= j} p_ij do_i */
        const size_t at = (size_t)j0 * Tp + j0; /* A(r, k) = dS[j0 + k][j0 + r] */
        gemm_rows(Dp, T - j0, dS + at, 1, Tp, qs + (size_t)j0 * Dp, Dp, 1.0f, blk, Dp);
        store_rows(a, blk, j0, NULL, dk, row);
        gemm_rows(Dp, T - j0, P + at, 1, Tp, dos + (size_t)j0 * Dp, Dp, 1.0f, blk, Dp);
        store_rows(a, blk, j0, NULL, dv, row);
    }
}

/* Run task(a, b, h, scratch) for every (batch, head) over the threads, one scratch per thread: 0, 1 (head
 * width not supported) or 2 (out of memory). */
static int run_tasks(const Attn *a, void (*task)(const Attn *, int, int, float *), int threads) {
    if (!gptlab_attention_supports(a->D)) return 1;
    int failed = 0;
    const size_t floats = scratch_floats(a);
#pragma omp parallel num_threads(threads)
    {
        float *w = malloc(sizeof(float) * floats);
        if (w == NULL) {
#pragma omp atomic write
            failed = 2;
        }
#pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < a->B * a->H; t++)
            if (w != NULL) task(a, t / a->H, t % a->H, w);
        free(w);
    }
    return failed;
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

/* GPT-2's tanh-form Φ(x) and Φ'(x) for VL values: σ(2u) = 1 / (1 + e^{-2u}); Φ' = 2 σ (1 - σ) u'. */
static inline void gelu_phi(vec x, vec *phi, vec *dphi) {
    const vec one = vset1(1.0f);
    const vec b = vset1(0.7978845608028654f), k = vset1(0.044715f);
    const vec x2 = vmul(x, x);
    const vec u = vmul(b, vfmadd(vmul(k, x2), x, x));
    /* e^{-2u} capped at e^88 (< FLT_MAX; vexp has no upper clamp), and σ = 0 past it */
    const vec m = vmul(vset1(-2.0f), u);
    const vec e = vexp(vmin(vset1(88.0f), m));
    const vec s = vkeep_below(vdiv(one, vadd(one, e)), m, 88.0f);
    *phi = s;
    const vec du = vmul(b, vfmadd(vset1(3.0f * 0.044715f), x2, one));
    /* 1 - σ = e σ: no cancellation where σ rounds to 1 */
    *dphi = vmul(vmul(vset1(2.0f), vmul(s, vmul(e, s))), du);
}

/* gelu(v) (backward 0) or dy * gelu'(v) (backward 1) */
static inline vec gelu_vec(vec v, vec dy, const int backward) {
    vec phi, dphi;
    gelu_phi(v, &phi, &dphi);
    return backward ? vmul(dy, vfmadd(v, dphi, phi)) : vmul(v, phi);
}

#define GELU_CHUNK 4096 /* values per OpenMP task */

/* out[i .. end) = gelu(x) (backward 0) or dy * gelu'(x) (backward 1); the last < VL values go through the
 * same vector code, zero-padded. backward is a constant where this is inlined. */
static inline __attribute__((always_inline)) void gelu_range(long i, long end, const float *x, const float *dy,
                                                             float *out, const int backward) {
    for (; i + VL <= end; i += VL)
        vstore(out + i, gelu_vec(vload(x + i), backward ? vload(dy + i) : vzero(), backward));
    if (i < end) {
        const size_t m = (size_t)(end - i);
        float xb[VL] = {0}, db[VL] = {0}, ob[VL];
        memcpy(xb, x + i, sizeof(float) * m);
        if (backward) memcpy(db, dy + i, sizeof(float) * m);
        vstore(ob, gelu_vec(vload(xb), vload(db), backward));
        memcpy(out + i, ob, sizeof(float) * m);
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
int gptlab_attention_lanes(void) { return 0; }
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
