/*
 * Products of a few rows with a weight matrix, for decoding on a CPU (mingpt/gemv.py builds and calls this).
 *
 *   y (M, N) = x (M, K) @ W (N, K)^T [* scale (N,)] [+ bias (N,)]
 *
 * A decode step multiplies one row by every weight of the model, so it runs at the speed the weights
 * stream from memory. The weight is read in the blocked layout mingpt.gemv.block makes: blocks of ROWS
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
#include <stdint.h>

#define ROWS 8

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vload_i8(const int8_t *p) {  /* 16 int8 -> 16 fp32 */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
#else  /* AVX2 + FMA */
#define LANES 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vload_i8(const int8_t *p) {  /* 8 int8 -> 8 fp32 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

int mingpt_gemv_rows(void) { return ROWS; }
int mingpt_gemv_lanes(void) { return LANES; }

/* one block of ROWS weight rows times M input rows; is_int8 is a constant at each call, so the
 * compiler makes a loop for each weight type */
static inline void block_product(const float *x, const void *block, int is_int8, const float *scale,
                                 const float *bias, float *y, long M, long N, long n0, long K)
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
            y[m * N + n0 + r] = bias ? v + bias[n0 + r] : v;
        }
    }
}

void mingpt_gemv_f32(const float *x, const float *w, const float *bias, float *y,
                     long M, long N, long K, int threads)
{
    long blocks = (N + ROWS - 1) / ROWS;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long b = 0; b < blocks; b++)
        block_product(x, w + b * ROWS * K, 0, 0, bias, y, M, N, b * ROWS, K);
}

void mingpt_gemv_int8(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                      long M, long N, long K, int threads)
{
    long blocks = (N + ROWS - 1) / ROWS;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long b = 0; b < blocks; b++)
        block_product(x, w + b * ROWS * K, 1, scale, bias, y, M, N, b * ROWS, K);
}
