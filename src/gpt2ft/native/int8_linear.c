/* gpt2ft's int8 weight-only linear on a CPU: y (M, N) = x (M, K) @ (q (N, K) * scale (N))^T + bias (N),
 * x and y float32, q int8.
 *
 * Decoding reads every weight once a step for a few rows, so the product is bound by memory: int8 weights
 * are half of bf16's bytes. torch's own int8 kernel (aten._weight_int8pack_mm) converts them too slowly to
 * gain that; this loop converts 16 weights to float at a time and keeps each weight row in L1 while up to
 * four rows of x are multiplied by it (two weight rows at a time). Each output is one dot product summed
 * in one fixed order whatever M is, so a row alone gets bitwise what it gets among others (speculative
 * decoding's verify depends on it). */
#include "vectors.h"

static inline float finish(f32x16 even, f32x16 odd, float rest, float scale, float bias) {
    return (sum16(even + odd) + rest) * scale + bias;
}

/* R rows of x (R <= 4, row stride K) against NW consecutive weight rows (NW <= 2): out[r * N + j] for
 * j < NW. Every (row, weight row) pair sums the same way whatever R and NW are: two accumulators, the
 * even and odd 16-wide chunks of k, then finish(). Inlined with constant R and NW, so the arrays live in
 * registers. */
static inline __attribute__((always_inline)) void tile(const float *x, const int8_t *w, const float *scale,
                                                       const float *bias, float *out, int64_t N, int64_t K,
                                                       const int R, const int NW) {
    f32x16 even[4][2], odd[4][2];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NW; j++) even[r][j] = odd[r][j] = (f32x16){0};
    const int64_t whole = K - K % 32;
    for (int64_t k = 0; k < whole; k += 32) {
        f32x16 w0[2], w1[2];
        /* 2 KB down the weights' stream (a thread's rows are consecutive): the CPU's own prefetching
         * stops at each 4 KB page; a third less time a step at one row with cold weights */
        __builtin_prefetch(w + (NW - 1) * K + k + 2048);
        for (int j = 0; j < NW; j++) { w0[j] = load_int8(w + j * K + k); w1[j] = load_int8(w + j * K + k + 16); }
        for (int r = 0; r < R; r++) {
            f32x16 xe = load_f32(x + r * K + k), xo = load_f32(x + r * K + k + 16);
            for (int j = 0; j < NW; j++) { even[r][j] += xe * w0[j]; odd[r][j] += xo * w1[j]; }
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NW; j++) {
            float rest = 0.0f;  /* the last K % 32 products, one by one */
            for (int64_t k = whole; k < K; k++) rest += x[r * K + k] * (float)w[j * K + k];
            out[r * N + j] = finish(even[r][j], odd[r][j], rest, scale[j], bias ? bias[j] : 0.0f);
        }
}

/* rows [0, M) of x against weight rows n, n + 1 (NW = 2) or n alone (NW = 1) */
static inline __attribute__((always_inline)) void rows(const float *x, const int8_t *q, const float *scale,
                                                       const float *bias, float *y, int64_t M, int64_t N,
                                                       int64_t K, int64_t n, const int NW) {
    const int8_t *w = q + n * K;
    const float *s = scale + n, *b = bias ? bias + n : 0;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile(x + m * K, w, s, b, y + m * N + n, N, K, 4, NW);
    switch (M - m) {
        case 3: tile(x + m * K, w, s, b, y + m * N + n, N, K, 3, NW); break;
        case 2: tile(x + m * K, w, s, b, y + m * N + n, N, K, 2, NW); break;
        case 1: tile(x + m * K, w, s, b, y + m * N + n, N, K, 1, NW); break;
    }
}

void int8_linear(const float *x, const int8_t *q, const float *scale, const float *bias, float *y,
                 int64_t M, int64_t N, int64_t K, int threads) {
    if (M < 4) {  /* few rows: bound by reading the weights, one weight row at a time */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n = 0; n < N; n++) rows(x, q, scale, bias, y, M, N, K, n, 1);
        return;
    }
    /* more rows: bound by the multiplications, two weight rows share each load of x */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t pair = 0; pair < N / 2; pair++) rows(x, q, scale, bias, y, M, N, K, 2 * pair, 2);
    if (N % 2) rows(x, q, scale, bias, y, M, N, K, N - 1, 1);
}
