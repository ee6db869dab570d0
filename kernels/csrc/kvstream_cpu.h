/* Shared by the CPU helpers (kernels/cpu_ext.py builds them): OpenMP thread helpers, fp16 and
 * bf16 conversions, exp of non-positive floats, and the quantized page layout as kernels/cpu_ext.py passes it (18 int64 words
 * in this order, see _layout_words). */
#ifndef KVSTREAM_CPU_H
#define KVSTREAM_CPU_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
static int max_threads(void) { return omp_get_max_threads(); }
static int thread_num(void) { return omp_get_thread_num(); }
#else
static int max_threads(void) { return 1; }
static int thread_num(void) { return 0; }
#endif

/* IEEE fp16 -> fp32, subnormals included. */
static inline float h2f(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {
            exp = 127 - 15 + 1;
            while (!(man & 0x400u)) { man <<= 1; exp--; }
            man &= 0x3ffu;
            u = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp32 -> fp16: round to nearest even, overflow to inf, subnormals kept. */
static inline uint16_t f2h(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, exp = (x >> 23) & 0xffu, man = x & 0x7fffffu;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0u));
    const int32_t e = (int32_t)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        const uint32_t m = man | 0x800000u, shift = (uint32_t)(14 - e);
        uint32_t hm = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (hm & 1u))) hm++;
        return (uint16_t)(sign | hm);
    }
    uint32_t h = sign | ((uint32_t)e << 10) | (man >> 13);
    const uint32_t rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (uint16_t)h;
}

/* bfloat16 <-> float32 (vLLM's bf16 caches). */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* exp(x) for x <= 0 (scores minus their running max): 2^(x log2 e) split into an integer
 * power (exponent bits) and 2^f on [-0.5, 0.5] by a degree-6 polynomial, relative error
 * below 2e-7 (expf's own is 1 ulp); inline, so the loops over slots vectorize. */
/* log2(e) and the polynomial's coefficients (2^f = 1 + C1 f + ... + C6 f^6), shared with the
 * vector form in selected_decode.c. */
#define EXP2_LOG2E 1.4426950408889634f
#define EXP2_C1 6.9314718055994531e-1f
#define EXP2_C2 2.4022650695910071e-1f
#define EXP2_C3 5.5504108664821580e-2f
#define EXP2_C4 9.6181291076284772e-3f
#define EXP2_C5 1.3333558146428443e-3f
#define EXP2_C6 1.5403530393381606e-4f
static inline float exp_nonpos(float x) {
    if (x < -87.0f) return 0.0f;
    const float y = x * EXP2_LOG2E;
    const float n = __builtin_floorf(y + 0.5f);
    const float f = y - n;
    float p = EXP2_C6;
    p = p * f + EXP2_C5;
    p = p * f + EXP2_C4;
    p = p * f + EXP2_C3;
    p = p * f + EXP2_C2;
    p = p * f + EXP2_C1;
    p = p * f + 1.0f;
    const int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return p * scale;
}

/* A quantized page's layout (kernels/kv_quant.py, QuantLayout): byte offsets per (block, head). */
typedef struct {
    int64_t bits, D, bs, S, n_out, zero_point, nf4, neox, code_bytes;
    int64_t k_scale_off, k_zero_off, v_scale_off, sink_scale_off, k_codes_off, v_codes_off, sink_k_off,
        out_idx_off, out_k_off;
} layout_t;

#endif
