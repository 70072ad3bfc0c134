/*
 * mingpt's CPU kernels (mingpt/kernels.py builds and calls them):
 *
 *   mingpt_gemv_*: y (M, N) = x (M, K) @ W (N, K)^T [* scale (N,)] [+ bias (N,)], M a few rows
 *   mingpt_block_step: one GPT-2 block for one row of a KV cache, every op of it in one call
 *   mingpt_gelu: GPT-2's GELU and its gradient over a whole activation (training)
 *   mingpt_attention_forward, _backward: causal self-attention and its gradients (training)
 *
 * A decode step multiplies one row by every weight of the model, so it runs at the speed the weights
 * stream from memory. The weight is read in the blocked layout mingpt.kernels.block makes: blocks of ROWS
 * output rows, each block a sequence of (ROWS, LANES) tiles along K:
 *
 *   blocked[b][k / LANES][r][l] = W[b * ROWS + r][k + l]      (rows past N are zeros)
 *
 * so that each thread reads one contiguous stream (the hardware prefetcher's best case) and each load of
 * x serves ROWS multiply-adds. W is fp32, or int8 with one fp32 scale per output row (mingpt.quantize),
 * widened to fp32 in registers: the activations stay fp32, nothing is quantized per call.
 * Requires K % LANES == 0. Threads: OpenMP, linked against the runtime torch itself uses.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define ROWS 8

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vset(float a) { return _mm512_set1_ps(a); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vec a) { _mm512_storeu_ps(p, a); }
static inline vec vload_i8(const int8_t *p) {  /* 16 int8 -> 16 fp32 */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vpow2(vec n) {  /* 2^n for whole n in [-126, 127]: n + 127 in the exponent bits */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
static inline vec vhead(vec a, long n, float fill) {  /* a's first n lanes (all when n >= LANES), then fill */
    return n >= LANES ? a : _mm512_mask_blend_ps((__mmask16)((1u << n) - 1), vset(fill), a);
}
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
static inline float vmax_all(vec a) { return _mm512_reduce_max_ps(a); }
#else  /* AVX2 + FMA */
#define LANES 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vset(float a) { return _mm256_set1_ps(a); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vec a) { _mm256_storeu_ps(p, a); }
static inline vec vload_i8(const int8_t *p) {  /* 8 int8 -> 8 fp32 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vpow2(vec n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline vec vhead(vec a, long n, float fill) {
    if (n >= LANES) return a;
    vec lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_blendv_ps(vset(fill), a, _mm256_cmp_ps(lane, vset((float)n), _CMP_LT_OQ));
}
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float vmax_all(vec a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* exp(x), to ~1 ulp: x = n ln2 + r with |r| <= ln2 / 2, exp(r) = 1 + r + r^2 P(r) (Cephes' expf
 * polynomial), times 2^n; clamped to the range where the result is a normal float */
static inline vec vexp(vec x) {
    x = vmin(vmax(x, vset(-87.3f)), vset(88.3f));
    vec n = vround(vmul(x, vset(1.44269504f)));
    vec r = vfma(n, vset(-0.693359375f), x);  /* ln2 in two parts, so that n ln2 is exact enough */
    r = vfma(n, vset(2.12194440e-4f), r);
    vec p = vset(1.9875691500e-4f);
    p = vfma(p, r, vset(1.3981999507e-3f));
    p = vfma(p, r, vset(8.3334519073e-3f));
    p = vfma(p, r, vset(4.1665795894e-2f));
    p = vfma(p, r, vset(1.6666665459e-1f));
    p = vfma(p, r, vset(5.0000001201e-1f));
    p = vfma(p, vmul(r, r), vadd(r, vset(1.0f)));
    return vmul(p, vpow2(n));
}

int mingpt_gemv_rows(void) { return ROWS; }
int mingpt_gemv_lanes(void) { return LANES; }

/* one block of ROWS weight rows times M input rows, into y (add: onto y, a residual); is_int8 is a
 * constant at each call, so the compiler makes a loop for each weight type */
static inline void block_product(const float *x, const void *block, int is_int8, const float *scale,
                                 const float *bias, float *y, long M, long N, long n0, long K, int add)
{
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * K;
        vec acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = vzero();
        for (long k = 0; k < K; k += LANES) {
            vec xv = vload(xm + k);
            long tile = k * ROWS;  /* the (ROWS, LANES) tile of these K columns */
            for (int r = 0; r < ROWS; r++) {
                vec wv = is_int8 ? vload_i8((const int8_t *)block + tile + r * LANES)
                                 : vload((const float *)block + tile + r * LANES);
                acc[r] = vfma(wv, xv, acc[r]);
            }
        }
        for (int r = 0; r < ROWS && n0 + r < N; r++) {
            float v = vsum(acc[r]);
            if (scale) v *= scale[n0 + r];
            if (bias) v += bias[n0 + r];
            y[m * N + n0 + r] = add ? y[m * N + n0 + r] + v : v;
        }
    }
}

struct linear {           /* one Linear, as mingpt.kernels.block laid it out */
    const void *weight;   /* blocked fp32 or int8 */
    const float *scale;   /* int8: one per output row; else NULL */
    const float *bias;    /* or NULL */
    long n, k;            /* out and in features */
    int is_int8;
};

/* [lo, hi) of n items: this thread's share, the same split for every op */
static void share(long n, long *lo, long *hi)
{
    long t = omp_get_thread_num(), T = omp_get_num_threads();
    *lo = n * t / T;
    *hi = n * (t + 1) / T;
}

/* this thread's blocks of y (M, n) = x (M, k) L (add: y += x L); [lo, hi) its outputs of each row */
static void linear_share(const float *x, const struct linear *L, float *y, long M, int add, long *lo, long *hi)
{
    long blocks = (L->n + ROWS - 1) / ROWS, b0, b1;
    share(blocks, &b0, &b1);
    for (long b = b0; b < b1; b++) {
        if (L->is_int8)
            block_product(x, (const int8_t *)L->weight + b * ROWS * L->k, 1, L->scale, L->bias, y, M, L->n, b * ROWS, L->k, add);
        else
            block_product(x, (const float *)L->weight + b * ROWS * L->k, 0, 0, L->bias, y, M, L->n, b * ROWS, L->k, add);
    }
    *lo = b0 * ROWS;
    *hi = b1 * ROWS < L->n ? b1 * ROWS : L->n;
}

/* the entry points take the weight's own arguments: ctypes passes them with no struct to build */
void mingpt_gemv_f32(const float *x, const float *w, const float *bias, float *y,
                     long M, long N, long K, int threads)
{
    struct linear L = {w, 0, bias, N, K, 0};
    #pragma omp parallel num_threads(threads)
    {
        long lo, hi;
        linear_share(x, &L, y, M, 0, &lo, &hi);
    }
}

void mingpt_gemv_int8(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                      long M, long N, long K, int threads)
{
    struct linear L = {w, scale, bias, N, K, 1};
    #pragma omp parallel num_threads(threads)
    {
        long lo, hi;
        linear_share(x, &L, y, M, 0, &lo, &hi);
    }
}

/* -------------------------------------------------------------------------------------------------
 * One block for one row: what GPT-2's Block.forward computes for a single new token, in one call.
 * Between torch ops a decode step spends ~0.1 ms a layer on its ~25 small ops (dispatch, Python,
 * allocation), as long as the int8 products themselves take; here the threads go from one op to the
 * next at a barrier. Every op is GPT-2's:
 *
 *   h = LN_1(x); q, k, v = h c_attn; k, v -> the cache at pos; a = softmax(q K^T / sqrt(hs)) V per head
 *   x += a attn_proj; h = LN_2(x); x += gelu_tanh(h c_fc) mlp_proj
 */

struct block {
    const float *ln_1_weight, *ln_1_bias, *ln_2_weight, *ln_2_bias;  /* biases may be NULL */
    float eps;
    long n_head;
    struct linear c_attn, attn_proj, c_fc, mlp_proj;
};

static void layer_norm(const float *x, const float *weight, const float *bias, float eps, float *out, long C)
{
    double mean = 0, var = 0;  /* in double: the result is then torch's to fp32 rounding */
    for (long i = 0; i < C; i++) mean += x[i];
    mean /= C;
    for (long i = 0; i < C; i++) var += (x[i] - mean) * (x[i] - mean);
    float rstd = (float)(1.0 / sqrt(var / C + eps));
    for (long i = 0; i < C; i++) out[i] = ((float)(x[i] - mean)) * rstd * weight[i] + (bias ? bias[i] : 0.0f);
}

/* GPT-2's gelu is 0.5 x (1 + tanh(y)) with y = sqrt(2/pi) (x + 0.044715 x^3), which is x sigmoid(2y):
 * one exp and a division, cheaper than a tanh. vgelu_gate(x) is that sigmoid(2y). */
static inline vec vgelu_gate(vec x)
{
    vec y2 = vmul(vset(-1.5957691216f), vfma(vmul(vset(0.044715f), vmul(x, x)), x, x));  /* -2y */
    return vdiv(vset(1.0f), vadd(vset(1.0f), vexp(y2)));
}

/* dy NULL: gelu(x); else dy gelu'(x), where gelu'(x) = s + x s (1 - s) 2 sqrt(2/pi) (1 + 3 0.044715 x^2), s the gate */
static inline vec vgelu(vec x, const float *dy)
{
    vec s = vgelu_gate(x);
    if (!dy) return vmul(x, s);
    vec slope = vmul(vset(1.5957691216f), vfma(vset(0.134145f), vmul(x, x), vset(1.0f)));
    return vmul(vload(dy), vfma(vmul(x, vmul(s, vsub(vset(1.0f), s))), slope, s));
}

/* out[i] = gelu(x[i]) (dy NULL) or dy[i] gelu'(x[i]), i in [0, n), on this thread */
static void gelu_span(const float *x, const float *dy, float *out, long n)
{
    long i = 0;
    for (; i + LANES <= n; i += LANES) vstore(out + i, vgelu(vload(x + i), dy ? dy + i : 0));
    if (i < n) {  /* the tail through padded vectors */
        float xt[LANES] = {0}, dt[LANES] = {0}, ot[LANES];
        memcpy(xt, x + i, (n - i) * sizeof(float));
        if (dy) memcpy(dt, dy + i, (n - i) * sizeof(float));
        vstore(ot, vgelu(vload(xt), dy ? dt : 0));
        memcpy(out + i, ot, (n - i) * sizeof(float));
    }
}

/* one head: k, v written at pos of its cache (K, V: (max_len, hs)), then its query over positions
 * 0..pos; scores is room for pos + 1 + LANES floats */
static void attend(const float *q, const float *k, const float *v, float *K, float *V, long pos, long hs,
                   float *scores, float *out)
{
    memcpy(K + pos * hs, k, hs * sizeof(float));
    memcpy(V + pos * hs, v, hs * sizeof(float));
    float scale = 1.0f / sqrtf((float)hs), top = -INFINITY;
    for (long t = 0; t <= pos; t++) {
        vec acc = vzero();
        for (long i = 0; i < hs; i += LANES) acc = vfma(vload(q + i), vload(K + t * hs + i), acc);
        scores[t] = vsum(acc) * scale;
        top = scores[t] > top ? scores[t] : top;
    }
    long n = pos + 1;
    for (long t = n; t < n + LANES; t++) scores[t] = -INFINITY;  /* pad to whole vectors: exp -> 0 */
    vec total = vzero();
    for (long t = 0; t < n; t += LANES) {
        vec p = vexp(vadd(vload(scores + t), vset(-top)));
        vstore(scores + t, p);
        total = vadd(total, p);
    }
    float norm = 1.0f / vsum(total);
    for (long i = 0; i < hs; i += LANES) {
        vec acc = vzero();
        for (long t = 0; t < n; t++) acc = vfma(vset(scores[t]), vload(V + t * hs + i), acc);
        vstore(out + i, vmul(acc, vset(norm)));
    }
}

/* x (C,) the residual stream, updated in place; k_cache, v_cache (n_head, max_len, hs) this layer's,
 * pos the new token's position; work: room for 5 C + c_fc.n + n_head (max_len + 2 LANES) floats */
void mingpt_block_step(float *x, const struct block *b, float *k_cache, float *v_cache, long max_len,
                       long pos, float *work, int threads)
{
    long C = b->c_attn.k, nh = b->n_head, hs = C / nh;
    float *h = work, *qkv = h + C, *a = qkv + 3 * C, *u = a + C, *scores = u + b->c_fc.n;
    #pragma omp parallel num_threads(threads)
    {
        long lo, hi;
        #pragma omp single
        layer_norm(x, b->ln_1_weight, b->ln_1_bias, b->eps, h, C);
        linear_share(h, &b->c_attn, qkv, 1, 0, &lo, &hi);
        #pragma omp barrier
        share(nh, &lo, &hi);
        for (long i = lo; i < hi; i++)
            attend(qkv + i * hs, qkv + C + i * hs, qkv + 2 * C + i * hs, k_cache + i * max_len * hs,
                   v_cache + i * max_len * hs, pos, hs, scores + i * (max_len + 2 * LANES), a + i * hs);
        #pragma omp barrier
        linear_share(a, &b->attn_proj, x, 1, 1, &lo, &hi);
        #pragma omp barrier
        #pragma omp single
        layer_norm(x, b->ln_2_weight, b->ln_2_bias, b->eps, h, C);
        linear_share(h, &b->c_fc, u, 1, 0, &lo, &hi);
        gelu_span(u + lo, 0, u + lo, hi - lo);  /* this thread's own outputs: no barrier needed before */
        #pragma omp barrier
        linear_share(u, &b->mlp_proj, x, 1, 1, &lo, &hi);
    }
}

/* -------------------------------------------------------------------------------------------------
 * GPT-2's GELU over a whole activation, forward (dy NULL: out = gelu(x)) or backward (out = dy gelu'(x)),
 * for training: torch's CPU kernel evaluates a vectorised tanh, ~2.5x the time of its erf GELU. */

void mingpt_gelu(const float *x, const float *dy, float *out, long n, int threads)
{
    const long chunk = 4096;
    long chunks = (n + chunk - 1) / chunk;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long c = 0; c < chunks; c++) {
        long i = c * chunk, m = i + chunk < n ? chunk : n - i;
        gelu_span(x + i, dy ? dy + i : 0, out + i, m);
    }
}

/* -------------------------------------------------------------------------------------------------
 * Causal self-attention for training, forward and backward, one (batch, head) pair per thread at a
 * time. torch's CPU kernel (flash attention) works in blocks of keys with an online softmax, built for
 * long contexts; at the contexts a CPU trains on (T of a few hundred, heads 32-64 wide) it runs well
 * below the matrix products' speed. Here a pair's whole (T, T) score matrix fits in the cache, so it is
 * computed once, softmaxed in place and multiplied out, each product a register-blocked loop:
 *
 *   forward:  S = Q K^T scale, P = softmax(S) (causal), O = P V, lse = log sum exp of each row of S
 *   backward: P again from Q, K and lse; dV = P^T dO; dP = dO V^T; dS = P (dP - rowsum(dO O));
 *             dQ = dS K scale; dK = dS^T Q scale
 *
 * Q, K, V are read where they lie (strides of their batch, head and position; each row contiguous), and
 * their gradients written alike; O is written (B, T, H, D), the layout the projection after attention
 * reads.
 * Requires D % LANES == 0. */

#define RB 4  /* rows of output a product loop computes at once: RB x 2 vector accumulators */

struct strided { const float *p; long b, h, t; };  /* element [b][h][t][d] at p + b*.b + h*.h + t*.t + d */

static inline const float *row_of(const struct strided *x, long b, long h) { return x->p + b * x->b + h * x->h; }

/* The next pair's rows, toward the L2 cache while this pair computes. A pair's rows lie all over memory
 * (the other heads' rows between them), each a cache line or two: read when needed, every row is a wait
 * on memory, and at gpt-mini's size (tensors larger than the L3 cache) a pair took ~1.4x its time on rows
 * already in the cache, forward and backward. Asked for a part at a time between the stages of the pair
 * before, they arrive spread out and in time: ~1.2x. */
struct ahead { const struct strided *const *x; int n; long b, h, T, D, parts; };  /* n tensors' pair (b, h) */

/* always inlined: as a function of its own, gcc finds it without effects (prefetches do not count) and
 * drops the calls */
static inline __attribute__((always_inline)) void prefetch_part(const struct ahead *a, long part)
{
    for (long t = part * a->T / a->parts; t < (part + 1) * a->T / a->parts; t++)
        for (int i = 0; i < a->n; i++)
            for (long d = 0; d < a->D; d += 16)
                _mm_prefetch((const char *)(row_of(a->x[i], a->b, a->h) + t * a->x[i]->t + d), _MM_HINT_T1);
}

/* S[i][j] = sum_d A[i][d] Bt[d][j] for j <= i (rounded up to whole vectors; the rest is not written):
 * A (T, D) with row stride sa, Bt (D, Tp), S (T, Tp) */
static void scores(const float *A, long sa, const float *Bt, long T, long Tp, long D, float *S)
{
    for (long i0 = 0; i0 < T; i0 += RB) {
        long nr = T - i0 < RB ? T - i0 : RB;
        const float *a[RB];
        for (int r = 0; r < RB; r++) a[r] = A + (i0 + (r < nr ? r : nr - 1)) * sa;  /* past T: the last row again */
        for (long j0 = 0; j0 < i0 + nr; j0 += 2 * LANES) {
            vec acc[RB][2];
            for (int r = 0; r < RB; r++) acc[r][0] = acc[r][1] = vzero();
            for (long d = 0; d < D; d++) {
                vec b0 = vload(Bt + d * Tp + j0), b1 = vload(Bt + d * Tp + j0 + LANES);
                for (int r = 0; r < RB; r++) {
                    vec x = vset(a[r][d]);
                    acc[r][0] = vfma(x, b0, acc[r][0]);
                    acc[r][1] = vfma(x, b1, acc[r][1]);
                }
            }
            for (int r = 0; r < nr; r++) {
                vstore(S + (i0 + r) * Tp + j0, acc[r][0]);
                vstore(S + (i0 + r) * Tp + j0 + LANES, acc[r][1]);
            }
        }
    }
}

/* C[i][:] = factor rf[i] sum_l A[i][l] B[l][:] (rf NULL: 1) over rows i of [0, T): A element [i][l] at
 * A + i*ai + l*al (the score matrix or its transpose, zero outside the causal triangle, so only its nonzero
 * range of l is summed: l <= i, or l >= i when transposed), B (T, D) row stride sb, C row stride sc */
static void rows_times(const float *A, long ai, long al, int transposed, const float *B, long sb,
                       long T, long D, float factor, const float *rf, float *C, long sc)
{
    for (long i0 = 0; i0 < T; i0 += RB) {
        long nr = T - i0 < RB ? T - i0 : RB;
        long l0 = transposed ? i0 : 0, l1 = transposed ? T : i0 + nr;
        for (long d0 = 0; d0 < D; d0 += 2 * LANES) {
            int two = d0 + LANES < D;  /* a second vector of columns */
            vec acc[RB][2];
            for (int r = 0; r < RB; r++) acc[r][0] = acc[r][1] = vzero();
            for (long l = l0; l < l1; l++) {
                const float *a = A + i0 * ai + l * al;
                vec b0 = vload(B + l * sb + d0), b1 = two ? vload(B + l * sb + d0 + LANES) : vzero();
                for (int r = 0; r < RB; r++) {  /* rows past T: the buffers' padding, never stored */
                    vec x = vset(a[r * ai]);
                    acc[r][0] = vfma(x, b0, acc[r][0]);
                    acc[r][1] = vfma(x, b1, acc[r][1]);
                }
            }
            for (int r = 0; r < nr; r++) {
                vec f = vset(rf ? factor * rf[i0 + r] : factor);
                vstore(C + (i0 + r) * sc + d0, vmul(acc[r][0], f));
                if (two) vstore(C + (i0 + r) * sc + d0 + LANES, vmul(acc[r][1], f));
            }
        }
    }
}

/* Xt (D, Tp) = X (T, D)^T, row stride sx, the columns past T zero */
static void transpose_rows(const float *X, long sx, long T, long Tp, long D, float *Xt)
{
    for (long d = 0; d < D; d++) {
        for (long t = 0; t < T; t++) Xt[d * Tp + t] = X[t * sx + d];
        for (long t = T; t < Tp; t++) Xt[d * Tp + t] = 0.0f;
    }
}

/* P = exp(S scale - top) over each row's j <= i, in place, zero past i (to Tp). With inv_sum, top is the
 * row's largest scaled score, and lse[i] and inv_sum[i] (1 / the row's sum, the softmax's normalisation,
 * left to the product with V) are written; without, top is the given lse[i] and P the softmax itself
 * (the backward pass: the forward's P). Each row's last vector is masked, not finished in scalar code:
 * expf on 0-15 leftover scores a row costs more than the vectors before them */
static void softmax_rows(float *S, long T, long Tp, float scale, float *lse, float *inv_sum)
{
    for (long i = 0; i < T; i++) {
        float *s = S + i * Tp, top;
        long n = i + 1, j;
        if (inv_sum) {
            vec m = vset(-INFINITY);
            for (j = 0; j < n; j += LANES) m = vmax(m, vhead(vload(s + j), n - j, -INFINITY));
            top = vmax_all(m) * scale;  /* scale > 0: the largest score scaled */
        } else {
            top = lse[i];
        }
        vec total = vzero();
        for (j = 0; j < n; j += LANES) {
            vec p = vhead(vexp(vfma(vload(s + j), vset(scale), vset(-top))), n - j, 0.0f);
            vstore(s + j, p);
            total = vadd(total, p);
        }
        for (; j < Tp; j += LANES) vstore(s + j, vzero());
        if (inv_sum) {
            float sum = vsum(total);
            lse[i] = top + logf(sum);
            inv_sum[i] = 1.0f / sum;
        }
    }
}

static long padded(long T) { return (T + 2 * LANES - 1) / (2 * LANES) * (2 * LANES); }

/* the floats of work each thread needs, forward or backward: a transposed (D, Tp) matrix, two (T, Tp)
 * ones with RB rows of padding (read, never stored, by the last row block), T more */
long mingpt_attention_work(long T, long D) { return D * padded(T) + 2 * (T + RB) * padded(T) + T; }

/* q, k, v: (B, H, T, D) strided; out (B, T, H, D); lse (B, H, T); work: threads x mingpt_attention_work */
void mingpt_attention_forward(const struct strided *q, const struct strided *k, const struct strided *v,
                              float *out, float *lse, long B, long H, long T, long D, float scale,
                              float *work, int threads)
{
    long Tp = padded(T);
    struct strided o_ = {out, T * H * D, D, H * D};
    const struct strided *tensors[] = {q, k, v, &o_};  /* what a pair reads and writes */
    #pragma omp parallel num_threads(threads)
    {
        float *Kt = work + omp_get_thread_num() * mingpt_attention_work(T, D), *S = Kt + D * Tp;
        float *inv_sum = S + (T + RB) * Tp;
        #pragma omp for schedule(static)
        for (long bh = 0; bh < B * H; bh++) {
            long b = bh / H, h = bh % H;
            struct ahead next = {tensors, bh + 1 < B * H ? 4 : 0, (bh + 1) / H, (bh + 1) % H, T, D, 4};
            prefetch_part(&next, 0);
            transpose_rows(row_of(k, b, h), k->t, T, Tp, D, Kt);
            prefetch_part(&next, 1);
            scores(row_of(q, b, h), q->t, Kt, T, Tp, D, S);
            prefetch_part(&next, 2);
            softmax_rows(S, T, Tp, scale, lse + bh * T, inv_sum);
            prefetch_part(&next, 3);
            rows_times(S, Tp, 1, 0, row_of(v, b, h), v->t, T, D, 1.0f, inv_sum, out + (b * T * H + h) * D, H * D);
        }
    }
}

/* dout, out: (B, T, H, D) contiguous; dq, dk, dv written where they lie, as q, k, v are read */
void mingpt_attention_backward(const struct strided *q, const struct strided *k, const struct strided *v,
                               const float *out, const float *lse, const float *dout, const struct strided *dq,
                               const struct strided *dk, const struct strided *dv, long B, long H, long T, long D,
                               float scale, float *work, int threads)
{
    long Tp = padded(T), s = H * D;
    struct strided o_ = {out, T * s, D, s}, do_ = {dout, T * s, D, s};
    const struct strided *tensors[] = {q, k, v, &o_, &do_, dq, dk, dv};  /* what a pair reads and writes */
    #pragma omp parallel num_threads(threads)
    {
        float *Xt = work + omp_get_thread_num() * mingpt_attention_work(T, D), *P = Xt + D * Tp;
        float *dS = P + (T + RB) * Tp, *delta = dS + (T + RB) * Tp;
        #pragma omp for schedule(static)
        for (long bh = 0; bh < B * H; bh++) {
            long b = bh / H, h = bh % H, o = (b * T * H + h) * D;
            const float *qr = row_of(q, b, h), *kr = row_of(k, b, h), *vr = row_of(v, b, h);
            struct ahead next = {tensors, bh + 1 < B * H ? 8 : 0, (bh + 1) / H, (bh + 1) % H, T, D, 8};
            prefetch_part(&next, 0);
            transpose_rows(kr, k->t, T, Tp, D, Xt);
            prefetch_part(&next, 1);
            scores(qr, q->t, Xt, T, Tp, D, P);
            prefetch_part(&next, 2);
            softmax_rows(P, T, Tp, scale, (float *)lse + bh * T, 0);
            prefetch_part(&next, 3);
            rows_times(P, 1, Tp, 1, dout + o, s, T, D, 1.0f, 0, (float *)row_of(dv, b, h), dv->t);  /* dV = P^T dO */
            prefetch_part(&next, 4);
            transpose_rows(vr, v->t, T, Tp, D, Xt);
            prefetch_part(&next, 5);
            scores(dout + o, s, Xt, T, Tp, D, dS);                               /* dP = dO V^T */
            prefetch_part(&next, 6);
            for (long i = 0; i < T; i++) {
                vec acc = vzero();
                for (long d = 0; d < D; d += LANES) acc = vfma(vload(dout + o + i * s + d), vload(out + o + i * s + d), acc);
                delta[i] = vsum(acc);
            }
            for (long i = 0; i < T; i++) {  /* dS = P (dP - delta): P is zero past i, and dP is finite up to
                                               the end of the vector holding i (scores wrote it), so whole
                                               vectors give the zeros too */
                long j = 0;
                for (; j <= i; j += LANES)
                    vstore(dS + i * Tp + j, vmul(vload(P + i * Tp + j), vsub(vload(dS + i * Tp + j), vset(delta[i]))));
                for (; j < Tp; j += LANES) vstore(dS + i * Tp + j, vzero());
            }
            prefetch_part(&next, 7);
            rows_times(dS, Tp, 1, 0, kr, k->t, T, D, scale, 0, (float *)row_of(dq, b, h), dq->t);  /* dQ = dS K scale */
            rows_times(dS, 1, Tp, 1, qr, q->t, T, D, scale, 0, (float *)row_of(dk, b, h), dk->t);  /* dK = dS^T Q scale */
        }
    }
}
