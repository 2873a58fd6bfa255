/* gpt2ft's attention for decoding on a CPU: each query (b, h, t) of q (B, nh, T, hs) over the keys and values
 * of cache slots 0 .. pos[b, t] of row b, head h: out[b, t, h] = softmax(q k^T * scale) v, in float32, written
 * as (B, T, nh, hs): the layout the output projection reads.
 *
 * A decode step has one query a row (a speculative verify a few), and its cost is reading the cache: this
 * reads each row's slots once, in the cache's own dtype (float32, or bfloat16 at half the bytes), where
 * torch's fused kernel at one query spends several times that. Each query is computed on its own, over its
 * own slots, in one fixed order: its result does not depend on the other rows, the other queries, the
 * cache's length or the thread count (a seeded row decodes alone as in a batch; a verify gives each drafted
 * token the logits of decoding it alone).
 *
 * Given the step's new keys and values (k_new, v_new: (B, nh, T, hs) in the cache's dtype, strided as q), it
 * first writes them into the cache at slots pos[b, t] (torch's indexed write costs more than the attention
 * at few rows), then attends: two loops, so every query sees every key of its step. */
#include <math.h>
#include <stdlib.h>

#include "vectors.h"

static inline float one(const void *base, int64_t i, int bf16) {
    if (!bf16) return ((const float *)base)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)base)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline f32x16 chunk(const void *base, int64_t i, int bf16) {
    return bf16 ? load_bf16((const uint16_t *)base + i) : load_f32((const float *)base + i);
}

/* q: element strides qs[0..2] (row, head, query; qb, qh, qt in the entry point), float32 or bfloat16 (q_bf16). k and v: S slots, element
 * strides sb (row), sh (head), sl (slot), float32 or bfloat16 (bf16). The last dimensions contiguous. A query
 * whose position is not one of the S slots gets NaN (never a read outside them). */
static inline __attribute__((always_inline)) void attend(
        const void *q, const int64_t *qs, int q_bf16, const void *k, const void *v, int64_t sb, int64_t sh,
        int64_t sl, int64_t S, const int64_t *pos, float *out, int64_t nh, int64_t T, int64_t hs, float scale,
        int64_t item, const int bf16) {
    const int64_t whole = hs - hs % 16;
    const int64_t b = item / (nh * T), h = item / T % nh, t = item % T;
    const int64_t n = pos[b * T + t] + 1, base = b * sb + h * sh;
    float qi[hs];
    for (int64_t d = 0; d < hs; d++) qi[d] = one(q, b * qs[0] + h * qs[1] + t * qs[2] + d, q_bf16);
    float *o = out + ((b * T + t) * nh + h) * hs;
    if (n < 1 || n > S) {
        for (int64_t d = 0; d < hs; d++) o[d] = NAN;
        return;
    }
    float local[1024];
    float *scores = n <= 1024 ? local : malloc(n * sizeof(float));
    if (!scores) {
        for (int64_t d = 0; d < hs; d++) o[d] = NAN;
        return;
    }
    const int64_t size = bf16 ? 2 : 4;  /* bytes an element: what the prefetches below step by */
    float top = -INFINITY;
    for (int64_t j = 0; j < n; j++) {  /* scores, in one pass over the keys */
        const int64_t at = base + j * sl;
        /* the key 8 slots on, and this slot's value for the second pass (a row's slots span pages, where
         * the CPU's own prefetching stops): a third less time over a cache that is not in cache */
        if (j + 8 < n) {
            __builtin_prefetch((const char *)k + (at + 8 * sl) * size);
            __builtin_prefetch((const char *)k + (at + 8 * sl) * size + 64);
        }
        __builtin_prefetch((const char *)v + at * size);
        __builtin_prefetch((const char *)v + at * size + 64);
        f32x16 acc = {0};
        for (int64_t d = 0; d < whole; d += 16) acc += load_f32(qi + d) * chunk(k, at + d, bf16);
        float s = sum16(acc);
        for (int64_t d = whole; d < hs; d++) s += qi[d] * one(k, at + d, bf16);
        scores[j] = s * scale;
        top = scores[j] > top ? scores[j] : top;
    }
    float total = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        scores[j] = expf(scores[j] - top);
        total += scores[j];
    }
    for (int64_t j = 0; j < n; j++) scores[j] /= total;
    /* the weighted values: each 16 of the head's dimensions summed over the slots in order, the slots the
     * outer loop (one pass over the values for up to 256 dimensions; the chunks' sums are independent) */
    for (int64_t from = 0; from < whole; from += 256) {
        const int64_t chunks = (whole - from < 256 ? whole - from : 256) / 16;
        f32x16 acc[16] = {{0}};
        for (int64_t j = 0; j < n; j++)
            for (int64_t c = 0; c < chunks; c++) acc[c] += scores[j] * chunk(v, base + j * sl + from + 16 * c, bf16);
        memcpy(o + from, acc, chunks * sizeof acc[0]);
    }
    for (int64_t d = whole; d < hs; d++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < n; j++) acc += scores[j] * one(v, base + j * sl + d, bf16);
        o[d] = acc;
    }
    if (scores != local) free(scores);
}

void decode_attention(const void *q, int64_t qb, int64_t qh, int64_t qt, _Bool q_bf16, void *k,
                      void *v, _Bool bf16, int64_t sb, int64_t sh, int64_t sl, int64_t S, const int64_t *pos,
                      float *out, int64_t B, int64_t nh, int64_t T, int64_t hs, float scale, int threads,
                      const void *k_new, const void *v_new, int64_t nb, int64_t nhs, int64_t nt) {
    const int64_t qs[3] = {qb, qh, qt};
    const size_t size = bf16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    {
        if (k_new) {
#pragma omp for schedule(static)
            for (int64_t item = 0; item < B * nh * T; item++) {
                const int64_t b = item / (nh * T), h = item / T % nh, t = item % T, slot = pos[b * T + t];
                if (slot < 0 || slot >= S) continue;  /* attend() gives this query NaN */
                const int64_t from = b * nb + h * nhs + t * nt, to = b * sb + h * sh + slot * sl;
                memcpy((char *)k + to * size, (const char *)k_new + from * size, hs * size);
                memcpy((char *)v + to * size, (const char *)v_new + from * size, hs * size);
            }  /* (the loop's end waits for every thread: the keys are all written before any query reads) */
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < B * nh * T; item++) {
            if (bf16) attend(q, qs, q_bf16, k, v, sb, sh, sl, S, pos, out, nh, T, hs, scale, item, 1);  /* each cache */
            else attend(q, qs, q_bf16, k, v, sb, sh, sl, S, pos, out, nh, T, hs, scale, item, 0);       /* dtype's loop */
        }
    }
}
