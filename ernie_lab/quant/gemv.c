/* Batch-1 decode matmuls that stream the weights once: y = x W^T for a few rows x.

   At decode time each linear layer multiplies one token's activations x (K numbers) by a weight
   matrix W (N x K). Every weight is used once per token, so the time is the time to read W from
   memory: the fewer bytes per weight, the faster the token, as long as the work per weight stays
   small. These kernels read W in its stored format:

     f32   float  [N][K]
     bf16  uint16 [N][K]            the top 16 bits of an fp32: widen by a 16-bit shift, fp32 sums
                                    (bf16 rows where the CPU has AVX512-BF16: pairs multiplied as they are)
     q8    int8   [N][K]            w = q * s[n]
     q4    uint8  [N][K/2]          byte j = u[2j] << 4 | u[2j+1];  w = (u - z[n][g]) * s[n][g]
     q2    uint8  [N][K/4]          byte j = u[4j] << 6 | u[4j+1] << 4 | u[4j+2] << 2 | u[4j+3]

   (the layouts of ernie_lab/quant/formats.py; groups g of G consecutive inputs). For the integer
   codes two things keep the work per weight small:
     * the zero point leaves the inner loop:  sum_k (u_k - z) s x_k = s (sum_k u_k x_k - z sum_k x_k),
       with the group sums of x computed once per token, not once per row;
     * x is rounded once per token to int16, one scale per group (an error below 2^-16 of the group's
       largest |x|; PyTorch's weight-only kernels round x to bf16, 2^-9), so the inner loop is integer
       multiply-adds of 16 lanes (vpmaddwd) summed exactly in int32.
   For packed codes x is also split by phase (x[2j] and x[2j+1] for int4, x[4j+p] for int2), so the
   codes of one byte meet contiguous activations. int4 rows (groups a multiple of 64) go four at a time where
   AVX2 is there, each int16 of x split into two bytes so that byte products (vpdpbusd) do the work (rows_q4).
   W8A8 (int8 activations) sums exactly in int32 too.

   Rows n are shared among threads (OpenMP, the runtime PyTorch itself uses). Built on first use by
   ernie_lab/quant/native.py with the machine's C compiler (-O3 -march=native -fopenmp); the AVX2
   paths are used when the compiler targets AVX2 + FMA, portable C (which the compiler vectorises
   as it can) otherwise. Where the CPU also has AVX-512's VNNI and BF16 (with VL), two paths use their
   256-bit instructions: the int4 kernels' byte dot products (vpdpbusd) and bf16 rows on bf16 weights
   (vdpbf16ps). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HAVE_VNNI 1     /* _mm256_dpbusd_epi32: four byte products summed into int32 in one instruction */
#endif
#endif

/* below this many weights a matmul runs on the calling thread: waking the other threads costs more */
#define PARALLEL_WORK 65536
/* int8 weights meet x rounded to int16 in groups of this many inputs */
#define Q8_GROUP 128

int ernie_gemv_has_avx2(void) {
#ifdef HAVE_AVX2
    return 1;
#else
    return 0;
#endif
}

#ifdef HAVE_AVX2
static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* the zero point's term of a row of int4 codes, sum_g s_w[g] z_g c_g (z_g = 8 where zeros is NULL), eight
   groups a step: c_g is what the activations contribute, computed once per token */
static inline float zero_term(const float *scales, const uint8_t *zeros, const float *zsums, int64_t groups) {
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
        const __m256 z = zeros ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zeros + g))))
                               : _mm256_set1_ps(8.0f);
        acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(scales + g), z), _mm256_loadu_ps(zsums + g), acc);
    }
    float sum = hsum(acc);
    for (; g < groups; g++) sum += scales[g] * (float)(zeros ? zeros[g] : 8) * zsums[g];
    return sum;
}
#endif

/* ------------------------------------------------------------------ rows four at a time

   One row of weights at a time, a kernel loads x once per row and reads one sequential stream of weights per
   thread. The kernels below take four rows at a time, so that each load of x serves four rows, and the four are
   far apart (rows start + i + {0, q, 2q, 3q} of a thread's share): four sequential streams, which the CPU's
   prefetchers follow, where four neighbouring rows read side by side (512 bytes apart for int4 codes at
   K = 1024) lost them and ran slower than one row (6.5 against 20 GB/s, one thread). For fp32, bf16 and int8
   weights each row's sums are those of one row at a time, in the same order; the int4 kernels group their
   lanes differently (rows_q4, rows_w4a8: 4e-7 apart). */

/* this thread's share of N rows, [start, end), for the kernels that take rows four at a time: the first 4q as
   start + i + {0, q, 2q, 3q} for i < q, four far-apart sequential streams; the rest one by one */
static inline void four_row_share(int64_t N, int64_t *start, int64_t *end, int64_t *q) {
#ifdef _OPENMP
    const int64_t parts = omp_get_num_threads(), part = omp_get_thread_num();
#else
    const int64_t parts = 1, part = 0;
#endif
    *start = N * part / parts;
    *end = N * (part + 1) / parts;
    *q = (*end - *start) / 4;
}

/* ------------------------------------------------------------------ fp32 and bf16 weights

   Four rows at a time: from memory 1.02-1.17x one row at a time (fp32, bf16 widened and bf16 x bf16; the 0.3B's
   126 matrices, the 21B-A3B's shapes and its 530 MB / 1.06 GB heads; interleaved A/B, 2 threads), the same values. */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* fp32 -> bf16, rounded to nearest even (as PyTorch's .to(torch.bfloat16)) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* y[r] = x . w_r for the rows r = n + i step, i < nr: four sums of 8 lanes per row, 32 inputs a step */
static inline __attribute__((always_inline)) void rows_f32(const float *x, const float *w, float *y, int64_t n,
                                                           int64_t step, int64_t K, const int nr) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t k = 0;
#ifdef HAVE_AVX2
    __m256 a[4][4];
    for (int i = 0; i < nr; i++)
        for (int j = 0; j < 4; j++) a[i][j] = _mm256_setzero_ps();
    for (; k + 32 <= K; k += 32)
        for (int j = 0; j < 4; j++) {
            const __m256 xv = _mm256_loadu_ps(x + k + 8 * j);
            for (int i = 0; i < nr; i++)
                a[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(w + (n + i * step) * K + k + 8 * j), xv, a[i][j]);
        }
    for (int i = 0; i < nr; i++) acc[i] = hsum(_mm256_add_ps(_mm256_add_ps(a[i][0], a[i][1]), _mm256_add_ps(a[i][2], a[i][3])));
#endif
    for (int i = 0; i < nr; i++) {
        const float *row = w + (n + i * step) * K;
        for (int64_t kk = k; kk < K; kk++) acc[i] += row[kk] * x[kk];
        y[n + i * step] = acc[i];
    }
}

/* bf16 weights widened to fp32 (a 16-bit shift) against fp32 x: two sums of 8 lanes per row, 16 inputs a step */
static inline __attribute__((always_inline)) void rows_bf16(const float *x, const uint16_t *w, float *y, int64_t n,
                                                            int64_t step, int64_t K, const int nr) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t k = 0;
#ifdef HAVE_AVX2
    __m256 a0[4], a1[4];
    for (int i = 0; i < nr; i++) a0[i] = a1[i] = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
        for (int i = 0; i < nr; i++) {
            const uint16_t *row = w + (n + i * step) * K;
            const __m256i h0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + k)));
            const __m256i h1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + k + 8)));
            a0[i] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(h0, 16)), x0, a0[i]);
            a1[i] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(h1, 16)), x1, a1[i]);
        }
    }
    for (int i = 0; i < nr; i++) acc[i] = hsum(_mm256_add_ps(a0[i], a1[i]));
#endif
    for (int i = 0; i < nr; i++) {
        const uint16_t *row = w + (n + i * step) * K;
        for (int64_t kk = k; kk < K; kk++) acc[i] += bf16_to_f32(row[kk]) * x[kk];
        y[n + i * step] = acc[i];
    }
}

#if defined(HAVE_AVX2) && defined(__AVX512BF16__) && defined(__AVX512VL__)
#define HAVE_BF16_DOT 1
/* bf16 rows times bf16 weights where the CPU has AVX512-BF16: one vdpbf16ps per 16 weights multiplies pairs
   (exact in fp32, as the widened FMAs above) and adds them to fp32 lanes, three instructions per 32 bytes of
   weights where widening takes eight. Denormal inputs count as zero (the instruction's rule). */
static inline __attribute__((always_inline)) void rows_bf16_bf16(const uint16_t *x, const uint16_t *w, float *y,
                                                                 int64_t n, int64_t step, int64_t K, const int nr) {
    int64_t k = 0;
    __m256 a0[4], a1[4];
    for (int i = 0; i < nr; i++) a0[i] = a1[i] = _mm256_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        const __m256bh x0 = (__m256bh)_mm256_loadu_si256((const __m256i *)(x + k));
        const __m256bh x1 = (__m256bh)_mm256_loadu_si256((const __m256i *)(x + k + 16));
        for (int i = 0; i < nr; i++) {
            const uint16_t *row = w + (n + i * step) * K;
            a0[i] = _mm256_dpbf16_ps(a0[i], (__m256bh)_mm256_loadu_si256((const __m256i *)(row + k)), x0);
            a1[i] = _mm256_dpbf16_ps(a1[i], (__m256bh)_mm256_loadu_si256((const __m256i *)(row + k + 16)), x1);
        }
    }
    for (int i = 0; i < nr; i++) {
        const uint16_t *row = w + (n + i * step) * K;
        float acc = hsum(_mm256_add_ps(a0[i], a1[i]));
        for (int64_t kk = k; kk < K; kk++) acc += bf16_to_f32(row[kk]) * bf16_to_f32(x[kk]);
        y[n + i * step] = acc;
    }
}
#endif

#define KIND_BF16_BF16 17   /* bf16 weights meeting bf16 rows as they are (HAVE_BF16_DOT) */

/* the rows r = n + i step of one row of x: kind 32 fp32 weights, 16 bf16 weights (x fp32), KIND_BF16_BF16 */
static inline __attribute__((always_inline)) void rows_float(int kind, const void *x, const void *w, float *y,
                                                             int64_t n, int64_t step, int64_t K, const int nr) {
    if (kind == 32) rows_f32((const float *)x, (const float *)w, y, n, step, K, nr);
#ifdef HAVE_BF16_DOT
    else if (kind == KIND_BF16_BF16) rows_bf16_bf16((const uint16_t *)x, (const uint16_t *)w, y, n, step, K, nr);
#endif
    else rows_bf16((const float *)x, (const uint16_t *)w, y, n, step, K, nr);
}

/* x (M, K) fp32 (bf16 for KIND_BF16_BF16), w (N, K) fp32 or bf16, y (M, N) fp32 */
static void gemv_float(int kind, const void *x, const void *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t row_bytes = K * (kind == KIND_BF16_BF16 ? 2 : 4);     /* one row of x */
#pragma omp parallel num_threads(threads) if (N * K >= PARALLEL_WORK)
    {
        int64_t start, end, q;
        four_row_share(N, &start, &end, &q);
        for (int64_t i = 0; i < q; i++)
            for (int64_t m = 0; m < M; m++) rows_float(kind, (const char *)x + m * row_bytes, w, y + m * N, start + i, q, K, 4);
        for (int64_t n = start + 4 * q; n < end; n++)
            for (int64_t m = 0; m < M; m++) rows_float(kind, (const char *)x + m * row_bytes, w, y + m * N, n, 0, K, 1);
    }
}

/* ------------------------------------------------------------------ int8, one scale per row */

static float dot_q8(const float *x, const int8_t *q, int64_t K) {
    int64_t k = 0;
    float acc = 0.0f;
#ifdef HAVE_AVX2
    /* eight independent sums, so the FMA units never wait on one another's result */
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    for (; k + 64 <= K; k += 64)
        for (int i = 0; i < 8; i++) {
            __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k + 8 * i)));
            a[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(w), _mm256_loadu_ps(x + k + 8 * i), a[i]);
        }
    for (int i = 1; i < 8; i++) a[0] = _mm256_add_ps(a[0], a[i]);
    acc = hsum(a[0]);
#endif
    for (; k < K; k++) acc += (float)q[k] * x[k];
    return acc;
}

static void ernie_gemv_q8(const float *x, const int8_t *q, const float *scales, float *y,
                   int64_t M, int64_t N, int64_t K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= PARALLEL_WORK)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) y[m * N + n] = scales[n] * dot_q8(x + m * K, q + n * K, K);
}

/* ------------------------------------------------------------------ packed int4 and int2, group-wise */

/* Small codes meet int16 activations: x is rounded once per token to int16 with one scale per group
   (xq = round(x / t_g), t_g = max|x_g| / 32767, an error below 2^-16 of the group's largest |x|), so the
   inner loop is integer multiply-adds of 16 lanes (_mm256_madd_epi16) instead of 8 float lanes with a
   conversion each. Per group the sum is exact in int32 (|u - z| <= 15, |xq| <= 32767, G <= 2048):

       y_n = sum_g s_ng t_g (sum_k u_k xq_k - z_ng sum_k xq_k)

   Prepared x, per row: R phase arrays of B = K/R int16 (xs[p B + j] = xq[R j + p]), then per group the
   int32 sum of xq and the float scale t_g. */
typedef struct { int16_t *xs; int32_t *sums; float *scales; } prepared_x;

static prepared_x prepared_at(uint8_t *work, int64_t m, int64_t K, int64_t groups) {
    uint8_t *base = work + m * (2 * K + 8 * groups);
    prepared_x px = {(int16_t *)base, (int32_t *)(base + 2 * K), (float *)(base + 2 * K + 4 * groups)};
    return px;
}

#ifdef HAVE_AVX2
/* group g of prepare, eight lanes at a time (G a multiple of 8), the same operations: |x| by its sign bit
   cleared, v + 0.5 sign(v) truncated; the int16 codes stored by phase */
static void prepare_group_avx2(const float *x, prepared_x px, int64_t g, int64_t G, int64_t B, int R) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 top8 = _mm256_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 8)
        top8 = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)), top8);
    const float top = hmax(top8), t = top > 0.0f ? top / 32767.0f : 1.0f;
    __m256i sum8 = _mm256_setzero_si256();
    for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
        const __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + k), _mm256_set1_ps(t));
        const __m256 half = _mm256_or_ps(_mm256_and_ps(v, sign), _mm256_set1_ps(0.5f));
        const __m256i q = _mm256_cvttps_epi32(_mm256_add_ps(v, half));
        sum8 = _mm256_add_epi32(sum8, q);
        const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        if (R == 1) {
            _mm_storeu_si128((__m128i *)(px.xs + k), q16);
        } else if (R == 2) {        /* inputs k, k+2, .. to phase 0, k+1, k+3, .. to phase 1 */
            const __m128i split = _mm_shuffle_epi8(q16, _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
            _mm_storel_epi64((__m128i *)(px.xs + k / 2), split);
            _mm_storel_epi64((__m128i *)(px.xs + B + k / 2), _mm_unpackhi_epi64(split, split));
        } else {
            int32_t lanes[8];
            _mm256_storeu_si256((__m256i *)lanes, q);
            for (int i = 0; i < 8; i++) px.xs[((k + i) % R) * B + (k + i) / R] = (int16_t)lanes[i];
        }
    }
    const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
    const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    px.sums[g] = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xB1)));
    px.scales[g] = t;
}
#endif

static void prepare(const float *x, prepared_x px, int64_t K, int64_t G, int R) {
    const int64_t B = K / R;
    for (int64_t g = 0; g < K / G; g++) {
#ifdef HAVE_AVX2
        if (G % 8 == 0) {
            prepare_group_avx2(x, px, g, G, B, R);
            continue;
        }
#endif
        float top = 0.0f;
        for (int64_t k = g * G; k < (g + 1) * G; k++) top = x[k] > top ? x[k] : (-x[k] > top ? -x[k] : top);
        float t = top > 0.0f ? top / 32767.0f : 1.0f;
        int32_t sum = 0;
        for (int64_t k = g * G; k < (g + 1) * G; k++) {
            float v = x[k] / t;
            int16_t q = (int16_t)(v >= 0.0f ? v + 0.5f : v - 0.5f);
            px.xs[(k % R) * B + k / R] = q;
            sum += q;
        }
        px.sums[g] = sum;
        px.scales[g] = t;
    }
}


/* x (K) fp32 -> the prepared row (xs: K int16 by phase, sums and scales per group): the rounding alone, for
   the tests (they compare it with PyTorch's) */
void ernie_prepare_int16(const float *x, int16_t *xs, int32_t *sums, float *scales, int64_t K, int64_t G, int R) {
    prepared_x px = {xs, sums, scales};
    prepare(x, px, K, G, R);
}

/* sum_j u_j xq_j over bytes [j0, j1) of one row (the portable path); bits = 4 (R = 2) or 2 (R = 4) */
static inline int32_t dot_codes(const uint8_t *row, const int16_t *xs, int64_t B, int64_t j0, int64_t j1, int bits) {
    const int R = 8 / bits, mask = (1 << bits) - 1;
    int32_t dot = 0;
    for (int64_t j = j0; j < j1; j++)
        for (int p = 0; p < R; p++) dot += ((row[j] >> ((R - 1 - p) * bits)) & mask) * (int32_t)xs[p * B + j];
    return dot;
}

static inline __attribute__((always_inline)) float row_packed(const uint8_t *row, prepared_x px, const float *scales,
                                                              const uint8_t *zeros, int64_t K, int64_t G, int bits) {
    const int R = 8 / bits;
    const int64_t B = K / R, Bg = G / R, groups = K / G;
    const int32_t zdefault = 1 << (bits - 1);
    float offset = 0.0f;                                    /* sum_g s_g t_g z_g sum_k xq_k */
    for (int64_t g = 0; g < groups; g++)
        offset += scales[g] * px.scales[g] * (float)((zeros ? (int32_t)zeros[g] : zdefault) * px.sums[g]);
#ifdef HAVE_AVX2
    if (Bg % 16 == 0) {                                     /* whole 16-byte steps: one hsum per row */
        const __m256i m = _mm256_set1_epi16((short)((1 << bits) - 1));
        __m256 total = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
            for (int64_t j = g * Bg; j < (g + 1) * Bg; j += 16) {
                __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(row + j)));  /* 16 bytes */
                for (int p = 0; p < R; p++) {       /* phase p sits at bit (R - 1 - p) * bits of each byte */
                    __m256i u = _mm256_and_si256(_mm256_srli_epi16(b, (R - 1 - p) * bits), m);
                    __m256i prod = _mm256_madd_epi16(u, _mm256_loadu_si256((const __m256i *)(px.xs + p * B + j)));
                    if (p % 2 == 0) a0 = _mm256_add_epi32(a0, prod); else a1 = _mm256_add_epi32(a1, prod);
                }
            }
            __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(a0, a1));
            total = _mm256_fmadd_ps(_mm256_set1_ps(scales[g] * px.scales[g]), dot, total);
        }
        return hsum(total) - offset;
    }
#endif
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; g++)
        acc += scales[g] * px.scales[g] * (float)dot_codes(row, px.xs, B, g * Bg, (g + 1) * Bg, bits);
    return acc - offset;
}

#ifdef HAVE_AVX2
/* int4 codes, four rows at a time (G a multiple of 64; four_row_share). One row at a time, row_packed is bound by
   its own work, not by memory: about 14 GB/s of codes a thread from cache, 12 from memory, where memory gives 18
   to one thread. Four far-apart rows that share each load of x do about half the work per byte of codes: 29 GB/s
   a thread from cache, 20 from memory (20-28 against 16-20 GB/s for row_packed on two threads, 3072 x 1024;
   1.17-1.56x over the 0.3B's 126 matrices, interleaved A/B).

   x is the same int16 rounding, each value split in two bytes, xq = 256 h + l with h = xq >> 8 (signed) and
   l = xq & 255 (unsigned), so that u xq = 256 (u h) + (l u) are byte products: one _mm256_dpbusd_epi32 (unsigned
   bytes times signed bytes, four products summed into int32) where the CPU has VNNI, _mm256_maddubs_epi16 and a
   multiply-add by 1 elsewhere (pairs below 2^15: 2 * 15 * 128 and 2 * 255 * 15). A group's sum stays exact in
   int32 (256 G 15 128 < 2^31 for G <= 2048). The high bytes and the low bytes are each stored by phase, as the
   int16 values are. */
typedef struct { int8_t *high; uint8_t *low; float *zsums; } split_x;   /* zsums[g] = t_g sum_k xq_k */

static split_x split_at(uint8_t *work, int64_t M, int64_t m, int64_t K, int64_t groups) {
    uint8_t *base = work + M * (2 * K + 8 * groups) + m * (2 * K + 4 * groups);   /* after the M prepared rows */
    split_x sx = {(int8_t *)base, base + K, (float *)(base + 2 * K)};
    return sx;
}

static void split_bytes(prepared_x px, split_x sx, int64_t K, int64_t groups) {
    for (int64_t k = 0; k < K; k++) {
        sx.high[k] = (int8_t)(px.xs[k] >> 8);
        sx.low[k] = (uint8_t)(px.xs[k] & 0xFF);
    }
    for (int64_t g = 0; g < groups; g++) sx.zsums[g] = px.scales[g] * (float)px.sums[g];
}

/* acc + the byte products a b summed by four into int32 lanes (a unsigned, b signed) */
static inline __m256i add_byte_products(__m256i acc, __m256i a, __m256i b) {
#ifdef HAVE_VNNI
    return _mm256_dpbusd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

/* y[r] for the rows r = n + i step, i < nr, of one row of x (t: its group scales) */
static inline __attribute__((always_inline)) void rows_q4(const uint8_t *packed, const float *scales, const uint8_t *zeros,
                                                          split_x sx, const float *t, float *y, int64_t n, int64_t step,
                                                          int64_t K, int64_t G, const int nr) {
    const int64_t B = K / 2, Bg = G / 2, groups = K / G;
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    __m256 total[4];
    for (int i = 0; i < nr; i++) total[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256i high[4], low[4];                            /* per row: sum u h and sum l u over the group */
        for (int i = 0; i < nr; i++) high[i] = low[i] = _mm256_setzero_si256();
        for (int64_t j = g * Bg; j < (g + 1) * Bg; j += 32) {
            const __m256i h0 = _mm256_loadu_si256((const __m256i *)(sx.high + j));           /* even columns */
            const __m256i h1 = _mm256_loadu_si256((const __m256i *)(sx.high + B + j));       /* odd columns */
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(sx.low + j));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(sx.low + B + j));
            for (int i = 0; i < nr; i++) {
                const __m256i codes = _mm256_loadu_si256((const __m256i *)(packed + (n + i * step) * B + j));
                const __m256i even = _mm256_and_si256(_mm256_srli_epi16(codes, 4), nibble);  /* high nibbles */
                const __m256i odd = _mm256_and_si256(codes, nibble);
                high[i] = add_byte_products(add_byte_products(high[i], even, h0), odd, h1);
                low[i] = add_byte_products(add_byte_products(low[i], l0, even), l1, odd);
            }
        }
        for (int i = 0; i < nr; i++) {
            const __m256i dot = _mm256_add_epi32(_mm256_slli_epi32(high[i], 8), low[i]);   /* sum u xq, exact */
            total[i] = _mm256_fmadd_ps(_mm256_set1_ps(scales[(n + i * step) * groups + g] * t[g]),
                                       _mm256_cvtepi32_ps(dot), total[i]);
        }
    }
    for (int i = 0; i < nr; i++) {
        const int64_t r = n + i * step;
        y[r] = hsum(total[i]) - zero_term(scales + r * groups, zeros ? zeros + r * groups : NULL, sx.zsums, groups);
    }
}

/* ernie_gemv_packed for int4 codes with G a multiple of 64, x already prepared (M rows) */
static void gemv_q4_four_rows(const uint8_t *packed, const float *scales, const uint8_t *zeros, float *y,
                              int64_t M, int64_t N, int64_t K, int64_t G, uint8_t *work, int threads) {
    const int64_t groups = K / G;
    for (int64_t m = 0; m < M; m++) split_bytes(prepared_at(work, m, K, groups), split_at(work, M, m, K, groups), K, groups);
#pragma omp parallel num_threads(threads) if (N * K >= PARALLEL_WORK)
    {
        int64_t start, end, q;
        four_row_share(N, &start, &end, &q);
        for (int64_t i = 0; i < q; i++)                     /* rows start + i + {0, q, 2q, 3q} */
            for (int64_t m = 0; m < M; m++)
                rows_q4(packed, scales, zeros, split_at(work, M, m, K, groups), prepared_at(work, m, K, groups).scales,
                        y + m * N, start + i, q, K, G, 4);
        for (int64_t n = start + 4 * q; n < end; n++)       /* the last rows, one at a time */
            for (int64_t m = 0; m < M; m++)
                rows_q4(packed, scales, zeros, split_at(work, M, m, K, groups), prepared_at(work, m, K, groups).scales,
                        y + m * N, n, 0, K, G, 1);
    }
}
#endif

/* x (M, K); packed (N, K*bits/8); scales (N, K/G) fp32; zeros (N, K/G) uint8 or NULL (symmetric:
   z = 2^(bits-1)); work: M * (2K + 8 K/G) bytes of scratch (int4
   with G a multiple of 64 where AVX2: M * (4K + 12 K/G)), written here; y (M, N). */
static void ernie_gemv_packed(const float *x, const uint8_t *packed, const float *scales, const uint8_t *zeros, float *y,
                       int64_t M, int64_t N, int64_t K, int64_t G, int bits, uint8_t *work, int threads) {
    const int64_t groups = K / G, rowbytes = K * bits / 8;
    for (int64_t m = 0; m < M; m++) prepare(x + m * K, prepared_at(work, m, K, groups), K, G, 8 / bits);
#ifdef HAVE_AVX2
    if (bits == 4 && G % 64 == 0) {
        gemv_q4_four_rows(packed, scales, zeros, y, M, N, K, G, work, threads);
        return;
    }
#endif
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= PARALLEL_WORK)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            const uint8_t *row = packed + n * rowbytes, *z = zeros ? zeros + n * groups : NULL;
            prepared_x px = prepared_at(work, m, K, groups);
            /* two call sites with constant bits, so each is compiled with its shifts unrolled */
            y[m * N + n] = bits == 4 ? row_packed(row, px, scales + n * groups, z, K, G, 4)
                                     : row_packed(row, px, scales + n * groups, z, K, G, 2);
        }
}

/* int8 codes meet the same int16 activations (groups of G inputs for x only; the weight keeps one scale
   per row): y_n = s_n sum_g t_g sum_k q_k xq_k, 16 lanes per multiply-add (rows_q8; row_q8 is the portable
   loop). |q| <= 127, so a group's sum is exact in int32 for G <= 2048 as well. */
static float row_q8(const int8_t *row, prepared_x px, int64_t K, int64_t G) {
    float acc = 0.0f;
    for (int64_t g = 0; g < K / G; g++) {
        int32_t dot = 0;
        for (int64_t k = g * G; k < (g + 1) * G; k++) dot += (int32_t)row[k] * px.xs[k];
        acc += px.scales[g] * (float)dot;
    }
    return acc;
}

#ifdef HAVE_AVX2
/* y[r] = s_r sum_g t_g sum_k q_rk xq_k for the rows r = n + i step, i < nr: four far-apart rows share each load
   of x, as rows_q4 takes them (G a multiple of 32). 1.18-1.38x one row at a time while memory gave ~45 GB/s
   (16384 x 1024: 35 -> 48 GB/s on 2 threads), 1.03-1.10x over the 0.3B's 126 matrices while it gave ~27; the
   same sums in the same order: the same values. */
static inline __attribute__((always_inline)) void rows_q8(const int8_t *q, const float *scales, prepared_x px, float *y,
                                                          int64_t n, int64_t step, int64_t K, int64_t G, const int nr) {
    __m256 total[4];
    for (int i = 0; i < nr; i++) total[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / G; g++) {
        __m256i a0[4], a1[4];
        for (int i = 0; i < nr; i++) a0[i] = a1[i] = _mm256_setzero_si256();
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(px.xs + k));
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(px.xs + k + 16));
            for (int i = 0; i < nr; i++) {
                const int8_t *row = q + (n + i * step) * K;
                const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + k)));
                const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + k + 16)));
                a0[i] = _mm256_add_epi32(a0[i], _mm256_madd_epi16(w0, x0));
                a1[i] = _mm256_add_epi32(a1[i], _mm256_madd_epi16(w1, x1));
            }
        }
        for (int i = 0; i < nr; i++)
            total[i] = _mm256_fmadd_ps(_mm256_set1_ps(px.scales[g]), _mm256_cvtepi32_ps(_mm256_add_epi32(a0[i], a1[i])),
                                       total[i]);
    }
    for (int i = 0; i < nr; i++) y[n + i * step] = scales[n + i * step] * hsum(total[i]);
}
#endif

/* y (M, N) = s_n sum_g t_g sum_k q_nk xq_mk for M prepared rows of x (px[m]), groups of G inputs */
static void gemv_q8_prepared(const int8_t *q, const float *scales, const prepared_x *px, float *y,
                             int64_t M, int64_t N, int64_t K, int64_t G, int threads) {
#ifdef HAVE_AVX2
    if (G % 32 == 0) {
#pragma omp parallel num_threads(threads) if (N * K >= PARALLEL_WORK)
        {
            int64_t start, end, q4;
            four_row_share(N, &start, &end, &q4);
            for (int64_t i = 0; i < q4; i++)
                for (int64_t m = 0; m < M; m++) rows_q8(q, scales, px[m], y + m * N, start + i, q4, K, G, 4);
            for (int64_t n = start + 4 * q4; n < end; n++)
                for (int64_t m = 0; m < M; m++) rows_q8(q, scales, px[m], y + m * N, n, 0, K, G, 1);
        }
        return;
    }
#endif
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= PARALLEL_WORK)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) y[m * N + n] = scales[n] * row_q8(q + n * K, px[m], K, G);
}

/* x (M, K); q (N, K) int8; scales (N,); x rounded to int16 in groups of G; work as for ernie_gemv_packed */
static void ernie_gemv_q8_int16(const float *x, const int8_t *q, const float *scales, float *y,
                         int64_t M, int64_t N, int64_t K, int64_t G, uint8_t *work, int threads) {
    const int64_t groups = K / G;
    prepared_x *px = (prepared_x *)malloc((size_t)M * sizeof(prepared_x));
    for (int64_t m = 0; m < M; m++) {
        px[m] = prepared_at(work, m, K, groups);
        prepare(x + m * K, px[m], K, G, 1);
    }
    gemv_q8_prepared(q, scales, px, y, M, N, K, G, threads);
    free(px);
}

/* W8A8: int8 weights times activations already rounded to int8 per token (held as int16 here), summed
   exactly in int32 (|sum| <= K 127^2 < 2^31 for K < 133000): y_mn = xs_m s_n sum_k q_nk xq_mk, one group of
   K inputs whose scale is xs_m */
void ernie_gemv_i8i8(const int16_t *xq, const float *xs, const int8_t *q, const float *scales, float *y,
                     int64_t M, int64_t N, int64_t K, int threads) {
    prepared_x *px = (prepared_x *)malloc((size_t)M * sizeof(prepared_x));
    for (int64_t m = 0; m < M; m++) {
        prepared_x row = {(int16_t *)(xq + m * K), NULL, (float *)(xs + m)};
        px[m] = row;
    }
    gemv_q8_prepared(q, scales, px, y, M, N, K, K, threads);
    free(px);
}

/* ------------------------------------------------------------------ W4A8: int8 activations x int4 codes

   The int4 codes meet activations rounded to int8, one scale per block of 32 inputs (llama.cpp's Q8_0,
   which its Q4_0 dot product uses): xq = round(x / s_b), s_b = max|x_b| / 127. A block of 32 codes is 16
   bytes; one multiply-add of unsigned bytes by signed bytes (_mm256_maddubs_epi16: u in [0, 15] times
   xq in [-127, 127], pairs summed to int16 without saturating: 2 * 15 * 127 < 2^15) and one of int16 by
   1 (_mm256_madd_epi16) give the block's sum_k u_k xq_k exactly in int32; it is scaled in fp32:

       y_n = sum_b s_w[g(b)] s_b dot_b  -  sum_g s_w[g] z_g c_g,     c_g = sum_{b in g} s_b sum_{k in b} xq_k

   (z_g = 8 when symmetric; c_g, like the zero point's term in the int16 kernels, is computed once per token).
   The codes of byte j are columns 2j (high nibble) and 2j + 1 (low nibble), so x is stored per block as its
   16 even columns, then its 16 odd ones: the block's high nibbles meet the low 128-bit lane, the low
   nibbles the high lane. 32 codes cost 16 bytes of weights and 2 vector multiply-adds (the int16 kernel
   spends 4 on them, and 64 bytes of activations instead of 32). */
#define BLOCK 32

/* one block of 32 activations -> 32 int8 in column order, returns the scale. The same float operations as
   formats.quantize_activations_blocks: s = max|x| / 127 (at least 1e-12), q = round(x / s) half to even
   (nearbyintf in the default rounding mode, as torch.round), clamped to [-127, 127]: the same int8 values */
static float round_block(const float *x, int8_t *q) {
#ifdef HAVE_AVX2
    /* the same operations eight lanes at a time (a decode step rounds every linear's input: the scalar loop,
       with a division and a rounding call per input, cost 3 us of a 1024-wide layer's call) */
    __m256 v[4], top8 = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        top8 = _mm256_max_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), v[i]), top8);   /* a NaN lane is skipped */
    }
    float top = hmax(top8);
    float s = top / 127.0f;
    s = s < 1e-12f ? 1e-12f : s;
    __m256i c[4];
    for (int i = 0; i < 4; i++) {
        __m256 r = _mm256_round_ps(_mm256_div_ps(v[i], _mm256_set1_ps(s)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
        c[i] = _mm256_cvtps_epi32(r);
    }
    /* 32 int32 -> 32 int8 in column order: the packs interleave 4-wide pieces per 128-bit lane, the permute undoes it */
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return s;
#else
    float top = 0.0f;
    for (int k = 0; k < BLOCK; k++) top = fabsf(x[k]) > top ? fabsf(x[k]) : top;
    float s = top / 127.0f;
    s = s < 1e-12f ? 1e-12f : s;
    for (int k = 0; k < BLOCK; k++) {
        float v = nearbyintf(x[k] / s);
        q[k] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
    }
    return s;
#endif
}

/* x (M, K) fp32 -> xq (M, K) int8 and xs (M, K/32): the rounding alone (the tests compare it with PyTorch's) */
void ernie_quantize_blocks(const float *x, int8_t *xq, float *xs, int64_t M, int64_t K) {
    for (int64_t i = 0; i < M * K / BLOCK; i++) xs[i] = round_block(x + i * BLOCK, xq + i * BLOCK);
}

/* A prompt's W4A8 rows for a GEMM (the weight dequantized): each block rounded to int8 and back, s_b q, written
   as fp32 or bf16 (f32_to_bf16); x read as fp32 or bf16 (M, K), K a multiple of 32. One pass where
   PyTorch's ops take a dozen: the same values as formats.dequantize_activations_blocks of quantize_blocks. */
void ernie_round_blocks(const void *x, int x_bf16, void *out, int out_bf16, int64_t M, int64_t K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (M * K >= PARALLEL_WORK)
    for (int64_t i = 0; i < M * K / BLOCK; i++) {
        float block[BLOCK];
        int8_t q[BLOCK];
        for (int k = 0; k < BLOCK; k++)
            block[k] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[i * BLOCK + k]) : ((const float *)x)[i * BLOCK + k];
        const float s = round_block(block, q);
        for (int k = 0; k < BLOCK; k++) {
            const float v = (float)q[k] * s;
            if (out_bf16) ((uint16_t *)out)[i * BLOCK + k] = f32_to_bf16(v);
            else ((float *)out)[i * BLOCK + k] = v;
        }
    }
}

/* Prepared x, per row: K int8 in one of two orders (below), K/32 float scales s_b, K/G floats c_g (the zero
   point's term), and for the paired order K/8 floats: per pair of blocks the vector (s_b x4, s_b+1 x4).

   one block at a time: each block as its 16 even columns, then its 16 odd ones;
   pairs of blocks (G a multiple of 64, the AVX2 path): per 64 inputs, the even columns of block b, those of
       block b + 1, the odd columns of b, those of b + 1, so one 32-byte load of codes (two blocks) meets
       the activations of its high nibbles in one vector and those of its low nibbles in another. */
typedef struct { int8_t *xq; float *scales; float *zsums; float *lanes; } blocked_x;

static int64_t blocked_bytes(int64_t K, int64_t G) { return K + 4 * (K / BLOCK) + 4 * (K / G) + 4 * (K / 8); }

static blocked_x blocked_at(uint8_t *work, int64_t m, int64_t K, int64_t G) {
    uint8_t *base = work + m * blocked_bytes(K, G);
    blocked_x bx = {(int8_t *)base, (float *)(base + K), (float *)(base + K + 4 * (K / BLOCK)),
                    (float *)(base + K + 4 * (K / BLOCK) + 4 * (K / G))};
    return bx;
}

/* where column k of block b goes: one block at a time, or in pairs of blocks */
static inline int64_t blocked_slot(int64_t b, int k, int paired) {
    if (!paired) return b * BLOCK + (k % 2) * (BLOCK / 2) + k / 2;
    return (b / 2) * 2 * BLOCK + (k % 2) * BLOCK + (b % 2) * (BLOCK / 2) + k / 2;
}

static void prepare_blocks(const float *x, blocked_x bx, int64_t K, int64_t G, int paired) {
    for (int64_t g = 0; g < K / G; g++) bx.zsums[g] = 0.0f;
    for (int64_t b = 0; b < K / BLOCK; b++) {
        int8_t q[BLOCK];
        float s = round_block(x + b * BLOCK, q);
        int32_t sum = 0;
        for (int k = 0; k < BLOCK; k++) sum += q[k];
#ifdef HAVE_AVX2
        {   /* even columns to their slot, odd ones to theirs: a byte shuffle per half, then the halves joined */
            const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
            const __m128i a = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)q), split);
            const __m128i c = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(q + 16)), split);
            _mm_storeu_si128((__m128i *)(bx.xq + blocked_slot(b, 0, paired)), _mm_unpacklo_epi64(a, c));
            _mm_storeu_si128((__m128i *)(bx.xq + blocked_slot(b, 1, paired)), _mm_unpackhi_epi64(a, c));
        }
#else
        for (int k = 0; k < BLOCK; k++) bx.xq[blocked_slot(b, k, paired)] = q[k];
#endif
        bx.scales[b] = s;
        for (int i = 0; i < 4; i++) bx.lanes[(b / 2) * 8 + (b % 2) * 4 + i] = s;
        bx.zsums[b * BLOCK / G] += s * (float)sum;
    }
}

#ifdef HAVE_AVX2
/* sum_k u_k xq_k of block b, as 8 int32 partial sums converted to float */
static inline __m256 block_dot(const uint8_t *row, const int8_t *xq, int64_t b) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)(row + b * BLOCK / 2));           /* 32 codes */
    const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_srli_epi16(bytes, 4)), bytes, 1);
    const __m256i u = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));     /* high nibbles | low nibbles */
    const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * BLOCK));
    const __m256i pairs = _mm256_maddubs_epi16(u, x);                     /* 16 int16: u x + u' x' */
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));   /* 8 int32, as floats */
}
#endif

static inline float row_w4a8(const uint8_t *row, blocked_x bx, const float *scales, const uint8_t *zeros,
                             int64_t K, int64_t G) {
    const int64_t groups = K / G, per_group = G / BLOCK;
    float offset = 0.0f;                                    /* sum_g s_w[g] z_g c_g */
    for (int64_t g = 0; g < groups; g++) offset += scales[g] * (float)(zeros ? zeros[g] : 8) * bx.zsums[g];
#ifdef HAVE_AVX2
    __m256 total = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {                  /* per group: sum_b s_b dot_b, then times s_w[g] */
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();   /* two sums, so the FMAs overlap */
        int64_t b = g * per_group;
        const int64_t end = b + per_group;
        for (; b + 2 <= end; b += 2) {
            a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(bx.scales + b), block_dot(row, bx.xq, b), a0);
            a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(bx.scales + b + 1), block_dot(row, bx.xq, b + 1), a1);
        }
        if (b < end) a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(bx.scales + b), block_dot(row, bx.xq, b), a0);
        total = _mm256_fmadd_ps(_mm256_set1_ps(scales[g]), _mm256_add_ps(a0, a1), total);
    }
    return hsum(total) - offset;
#else
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        float sum = 0.0f;
        for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) {
            const uint8_t *bytes = row + b * BLOCK / 2;
            const int8_t *x = bx.xq + b * BLOCK;
            int32_t dot = 0;
            for (int j = 0; j < BLOCK / 2; j++) dot += (bytes[j] >> 4) * x[j] + (bytes[j] & 15) * x[BLOCK / 2 + j];
            sum += bx.scales[b] * (float)dot;
        }
        acc += scales[g] * sum;
    }
    return acc - offset;
#endif
}

#ifdef HAVE_AVX2
/* Two blocks per load (the paired order, G a multiple of 64). One 32-byte load holds 64 codes: its high
   nibbles (shift, and 0x0F) meet the even-column activation vector and its low nibbles (and 0x0F) the odd
   one (_mm256_maddubs_epi16 each), and the two results add in int16 (|.| <= 2 * 2 * 15 * 127 < 2^15)
   before one widening multiply-add by 1 (pair_dots), one conversion and one multiply-add by (s_b x4, s_b+1 x4):
   about five vector operations per block, where row_w4a8 spends eight. Where the CPU has AVX512-VNNI (with
   VL), one _mm256_dpbusd_epi32 per nibble vector does the byte products and their sums into int32 at once.
   Rows go four at a time, as rows_q4 takes them: four far-apart rows that share each load of the activations
   and their scales (1.19-1.35x over the 0.3B's 126 matrices from memory against one row at a time with its
   codes prefetched 4 KB ahead, which had been 18.5 -> 21.1 GB/s over no prefetch; interleaved A/B, 2 threads;
   0.93-1.17x built for AVX2 without VNNI; neighbouring rows side by side had been slower: 14 against 20 GB/s).
   The zero point's term, sum_g s_w[g] z_g c_g, is a dot product of eight groups a step (zero_term), not a
   serial chain in the row's loop. */

/* sum_k u_k xq_k of two blocks as 8 int32 (4 per block): the high nibbles of 32 bytes of codes meet the even
   columns, the low nibbles the odd ones */
static inline __m256i pair_dots(__m256i codes, __m256i x_high, __m256i x_low, __m256i nibble) {
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(codes, 4), nibble);
    const __m256i low = _mm256_and_si256(codes, nibble);
#ifdef HAVE_VNNI
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), high, x_high), low, x_low);
#else
    const __m256i sums = _mm256_add_epi16(_mm256_maddubs_epi16(high, x_high), _mm256_maddubs_epi16(low, x_low));
    return _mm256_madd_epi16(sums, _mm256_set1_epi16(1));
#endif
}

/* y[r] for the rows r = n + i step, i < nr (four far-apart rows, as rows_q4 reads them), of one row of x */
static inline __attribute__((always_inline)) void rows_w4a8(const uint8_t *packed, const float *scales,
                                                            const uint8_t *zeros, blocked_x bx, float *y, int64_t n,
                                                            int64_t step, int64_t K, int64_t G, const int nr) {
    const int64_t groups = K / G, pairs = G / (2 * BLOCK), B = K / 2;
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    __m256 total[4];
    for (int i = 0; i < nr; i++) total[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {              /* per group: sum_b s_b dot_b, then times s_w[g] */
        __m256 acc[4];
        for (int i = 0; i < nr; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t p = g * pairs; p < (g + 1) * pairs; p++) {
            const __m256i x_high = _mm256_loadu_si256((const __m256i *)(bx.xq + p * 2 * BLOCK));          /* even */
            const __m256i x_low = _mm256_loadu_si256((const __m256i *)(bx.xq + p * 2 * BLOCK + BLOCK));   /* odd */
            const __m256 lanes = _mm256_loadu_ps(bx.lanes + p * 8);                  /* s_b x4, s_b+1 x4 */
            for (int i = 0; i < nr; i++) {
                const __m256i codes = _mm256_loadu_si256((const __m256i *)(packed + (n + i * step) * B + p * BLOCK));
                acc[i] = _mm256_fmadd_ps(lanes, _mm256_cvtepi32_ps(pair_dots(codes, x_high, x_low, nibble)), acc[i]);
            }
        }
        for (int i = 0; i < nr; i++)
            total[i] = _mm256_fmadd_ps(_mm256_set1_ps(scales[(n + i * step) * groups + g]), acc[i], total[i]);
    }
    for (int i = 0; i < nr; i++) {
        const int64_t r = n + i * step;
        y[r] = hsum(total[i]) - zero_term(scales + r * groups, zeros ? zeros + r * groups : NULL, bx.zsums, groups);
    }
}
#endif

/* x (M, K) fp32; packed (N, K/2) int4 codes; scales (N, K/G) fp32; zeros (N, K/G) uint8 or NULL (z = 8);
   G and K multiples of 32; work: M * blocked_bytes(K, G) bytes of scratch; y (M, N) */
static void ernie_gemv_w4a8(const float *x, const uint8_t *packed, const float *scales, const uint8_t *zeros, float *y,
                            int64_t M, int64_t N, int64_t K, int64_t G, uint8_t *work, int threads) {
    const int64_t groups = K / G;
#ifdef HAVE_AVX2
    const int paired = G % (2 * BLOCK) == 0;
#else
    const int paired = 0;
#endif
    for (int64_t m = 0; m < M; m++) prepare_blocks(x + m * K, blocked_at(work, m, K, G), K, G, paired);
#ifdef HAVE_AVX2
    if (paired) {
#pragma omp parallel num_threads(threads) if (N * K >= PARALLEL_WORK)
        {
            int64_t start, end, q;
            four_row_share(N, &start, &end, &q);
            for (int64_t i = 0; i < q; i++)
                for (int64_t m = 0; m < M; m++)
                    rows_w4a8(packed, scales, zeros, blocked_at(work, m, K, G), y + m * N, start + i, q, K, G, 4);
            for (int64_t n = start + 4 * q; n < end; n++)
                for (int64_t m = 0; m < M; m++)
                    rows_w4a8(packed, scales, zeros, blocked_at(work, m, K, G), y + m * N, n, 0, K, G, 1);
        }
        return;
    }
#endif
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= PARALLEL_WORK)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            const uint8_t *row = packed + n * (K / 2), *z = zeros ? zeros + n * groups : NULL;
            y[m * N + n] = row_w4a8(row, blocked_at(work, m, K, G), scales + n * groups, z, K, G);
        }
}

/* ------------------------------------------------------------------ dequantize (longer inputs)

   For a prompt of many tokens the matmul is compute-bound and PyTorch's GEMM does it well; what it
   needs is the weight as floats. This writes w = (u - z) s for every code, as fp32 or as bf16
   (round to nearest even, as PyTorch's .to(torch.bfloat16) does), in (N, K) row-major order. */

#ifdef HAVE_AVX2
/* eight fp32 -> eight bf16 (the integer rounding of f32_to_bf16, eight lanes at once) */
static inline __m128i bf16_x8(__m256 w) {
    __m256i b = _mm256_castps_si256(w);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), odd), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}

static inline void store_x8(void *out, int64_t at, __m256 w, int out_bf16) {
    if (out_bf16) _mm_storeu_si128((__m128i *)((uint16_t *)out + at), bf16_x8(w));
    else _mm256_storeu_ps((float *)out + at, w);
}

/* One row, eight weights a step (int8) or sixteen (int4: the high nibble of byte j is column 2j, the low
   one column 2j + 1); the same float operations as the loop below, so the same values. */
static void dequantize_row_avx2(const uint8_t *row, const float *scales, const uint8_t *zeros, void *out,
                                int64_t K, int64_t G, int bits, int out_bf16) {
    if (bits == 8) {
        const __m256 s = _mm256_set1_ps(scales[0]);
        for (int64_t k = 0; k < K; k += 8) {
            const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + k)));
            store_x8(out, k, _mm256_mul_ps(_mm256_cvtepi32_ps(q), s), out_bf16);
        }
        return;
    }
    for (int64_t g = 0; g < K / G; g++) {
        const __m256 s = _mm256_set1_ps(scales[g]), z = _mm256_set1_ps(zeros ? (float)zeros[g] : 8.0f);
        for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
            const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + k / 2)));
            const __m256i high = _mm256_srli_epi32(bytes, 4), low = _mm256_and_si256(bytes, _mm256_set1_epi32(15));
            const __m256i a = _mm256_unpacklo_epi32(high, low), b = _mm256_unpackhi_epi32(high, low);
            const __m256i first = _mm256_permute2x128_si256(a, b, 0x20), second = _mm256_permute2x128_si256(a, b, 0x31);
            store_x8(out, k, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(first), z), s), out_bf16);
            store_x8(out, k + 8, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(second), z), s), out_bf16);
        }
    }
}
#endif

/* bits 8: int8 codes q, w = q * s (G = K, no zero point); bits 4 / 2: packed u, w = (u - z) * s */
void ernie_dequantize_packed(const uint8_t *packed, const float *scales, const uint8_t *zeros, void *out,
                             int64_t N, int64_t K, int64_t G, int bits, int out_bf16, int threads) {
    const int R = 8 / bits, mask = (1 << bits) - 1;
    const int64_t groups = K / G, rowbytes = K / R;
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= PARALLEL_WORK)
    for (int64_t n = 0; n < N; n++) {
        float *of = (float *)out + n * K;
        uint16_t *ob = (uint16_t *)out + n * K;
#ifdef HAVE_AVX2
        if ((bits == 8 && K % 8 == 0) || (bits == 4 && G % 16 == 0)) {
            dequantize_row_avx2(packed + n * rowbytes, scales + n * groups, zeros ? zeros + n * groups : NULL,
                                out_bf16 ? (void *)ob : (void *)of, K, G, bits, out_bf16);
            continue;
        }
#endif
        for (int64_t k = 0; k < K; k++) {
            int64_t g = n * groups + k / G;
            float w;
            if (bits == 8) {
                w = (float)((const int8_t *)packed)[n * K + k] * scales[g];
            } else {
                int u = (packed[n * rowbytes + k / R] >> ((R - 1 - k % R) * bits)) & mask;
                float z = zeros ? (float)zeros[g] : (float)(1 << (bits - 1));
                w = ((float)u - z) * scales[g];
            }
            if (out_bf16) ob[k] = f32_to_bf16(w); else of[k] = w;
        }
    }
}

/* ------------------------------------------------------------------ quantize (loading)

   Symmetric round-to-nearest codes of fp32 or bf16 weights, one pass over each group, exactly as
   formats.quantize_weight computes them with PyTorch ops:
       s = max(max_k |w_k| / (2^(b-1) - 1), 1e-12)       one scale per group of G inputs
       q = round_half_even(w / s)                        int8: q in [-127, 127]
                                                         int4: u = q + 8 in [0, 15], two to a byte
   (formats' layout: the first column in the high nibble). Quantize-on-read of a 21B model rounds
   about 5 000 matrices: one pass instead of ten PyTorch ops each is minutes instead of an hour.
   Returns the number of values that are not finite (their scales would be NaN: the caller refuses). */
long long ernie_quantize_symmetric(const void *w, int w_bf16, uint8_t *codes, float *scales,
                                   int64_t N, int64_t K, int64_t G, int bits, int threads) {
    const int64_t groups = K / G;
    const float top = (float)((1 << (bits - 1)) - 1), low = bits == 8 ? -127.0f : 0.0f, high = bits == 8 ? 127.0f : 15.0f;
    const float offset = bits == 8 ? 0.0f : 8.0f;
    long long bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+:bad) if (N * K >= PARALLEL_WORK)
    for (int64_t n = 0; n < N; n++) {
        const float *wf = (const float *)w + n * K;
        const uint16_t *wb = (const uint16_t *)w + n * K;
        float row[K];                                          /* the row as fp32 */
        for (int64_t k = 0; k < K; k++) row[k] = w_bf16 ? bf16_to_f32(wb[k]) : wf[k];
        for (int64_t g = 0; g < groups; g++) {
            float amax = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) {
                bad += !isfinite(row[k]);
                amax = fmaxf(amax, fabsf(row[k]));
            }
            const float s = fmaxf(amax / top, 1e-12f);
            scales[n * groups + g] = s;
            for (int64_t k = g * G; k < (g + 1) * G; k++)
                row[k] = fminf(fmaxf(nearbyintf(row[k] / s) + offset, low), high);
        }
        if (bits == 8) {
            int8_t *out = (int8_t *)codes + n * K;
            for (int64_t k = 0; k < K; k++) out[k] = (int8_t)row[k];
        } else {
            uint8_t *out = codes + n * (K / 2);
            for (int64_t j = 0; j < K / 2; j++) out[j] = (uint8_t)(((int)row[2 * j] << 4) | (int)row[2 * j + 1]);
        }
    }
    return bad;
}

/* ------------------------------------------------------------------ one entry point for a linear layer

   kind 32 / 16: fp32 / bf16 weights; 8: int8 codes with one scale per row; 4 / 2: packed codes with
   group-wise scales (and zeros, or NULL); KIND_W4A8: packed int4 codes meeting x rounded to int8 blocks.
   x holds M rows of K values as fp32, or bf16 when x_bf16; y
   receives (M, N) as fp32, or bf16 when y_bf16, with the bias (N floats, or NULL) added. Converting
   here saves two framework ops per layer call, which at decode cost more than the conversion. */
#define KIND_W4A8 48   /* 4-bit weights, 8-bit activations */

void ernie_linear(int kind, const void *x, int x_bf16, const void *w, const float *scales, const uint8_t *zeros,
                  const float *bias, void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int64_t G, int threads) {
    const int64_t groups = (kind == 4 || kind == 2) ? K / G : K / Q8_GROUP;
    float *xf = (float *)x, *yf = (float *)y, *owned_x = NULL, *owned_y = NULL;
    uint8_t *work = NULL;
#ifdef HAVE_BF16_DOT
    const int bf16_dot = kind == 16 && x_bf16;      /* bf16 rows meet bf16 weights as they are */
#else
    const int bf16_dot = 0;
#endif
    if (x_bf16 && !bf16_dot) {
        owned_x = xf = (float *)malloc((size_t)(M * K) * sizeof(float));
        for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    }
    if (y_bf16) owned_y = yf = (float *)malloc((size_t)(M * N) * sizeof(float));
    if (kind == 8 || kind == 2) work = (uint8_t *)malloc((size_t)(M * (2 * K + 8 * groups)));
    if (kind == 4) work = (uint8_t *)malloc((size_t)(M * (4 * K + 12 * groups)));   /* x also split in bytes */
    if (kind == KIND_W4A8) work = (uint8_t *)malloc((size_t)(M * blocked_bytes(K, G)));
    if (bf16_dot) {
#ifdef HAVE_BF16_DOT
        gemv_float(KIND_BF16_BF16, x, w, yf, M, N, K, threads);
#endif
    } else if (kind == 32 || kind == 16) gemv_float(kind, xf, w, yf, M, N, K, threads);
    else if (kind == 8 && K % Q8_GROUP == 0) ernie_gemv_q8_int16(xf, (const int8_t *)w, scales, yf, M, N, K, Q8_GROUP, work, threads);
    else if (kind == 8) ernie_gemv_q8(xf, (const int8_t *)w, scales, yf, M, N, K, threads);
    else if (kind == KIND_W4A8) ernie_gemv_w4a8(xf, (const uint8_t *)w, scales, zeros, yf, M, N, K, G, work, threads);
    else ernie_gemv_packed(xf, (const uint8_t *)w, scales, zeros, yf, M, N, K, G, kind, work, threads);
    for (int64_t m = 0; m < M && (bias || y_bf16); m++)
        for (int64_t n = 0; n < N; n++) {
            float v = yf[m * N + n] + (bias ? bias[n] : 0.0f);
            if (y_bf16) ((uint16_t *)y)[m * N + n] = f32_to_bf16(v); else yf[m * N + n] = v;
        }
    free(owned_x);
    free(owned_y);
    free(work);
}
