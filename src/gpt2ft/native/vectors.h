/* The vector helpers gpt2ft's C kernels share: 16 floats a vector (GCC's vector extensions, which the
 * compiler maps to the CPU it builds for: one AVX-512 register, two AVX2 ones), loads that convert int8 and
 * bfloat16 to them, and a horizontal sum in a fixed order. */
#ifndef GPT2FT_VECTORS_H
#define GPT2FT_VECTORS_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float f32x16 __attribute__((vector_size(64)));

static inline f32x16 load_f32(const float *p) { f32x16 v; memcpy(&v, p, sizeof v); return v; }

/* 16 int8 weights as floats: GCC's own conversion of a vector of int8 goes element by element */
static inline f32x16 load_int8(const int8_t *p) {
#if defined(__AVX512F__)
    __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    struct { __m256 lo, hi; } v = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
                                   _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
#else
    f32x16 v;
    for (int i = 0; i < 16; i++) v[i] = (float)p[i];
#endif
    f32x16 out;
    memcpy(&out, &v, sizeof out);
    return out;
}

/* 16 bfloat16 values as floats: a bf16 is the high half of a float's bits */
static inline f32x16 load_bf16(const uint16_t *p) {
#if defined(__AVX512F__)
    __m512i v = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#elif defined(__AVX2__)
    __m128i lo = _mm_loadu_si128((const __m128i *)p), hi = _mm_loadu_si128((const __m128i *)(p + 8));
    struct { __m256i lo, hi; } v = {_mm256_slli_epi32(_mm256_cvtepu16_epi32(lo), 16),
                                    _mm256_slli_epi32(_mm256_cvtepu16_epi32(hi), 16)};
#else
    uint32_t v[16];
    for (int i = 0; i < 16; i++) v[i] = (uint32_t)p[i] << 16;
#endif
    f32x16 out;
    memcpy(&out, &v, sizeof out);
    return out;
}

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

static inline float sum16(f32x16 s) {  /* halves added pairwise: a fixed order */
    f32x8 a, b;
    memcpy(&a, &s, sizeof a);
    memcpy(&b, (char *)&s + sizeof a, sizeof b);
    a += b;
    f32x4 c, d;
    memcpy(&c, &a, sizeof c);
    memcpy(&d, (char *)&a + sizeof c, sizeof d);
    c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
}

#endif
