/* The in-place decode's sink copies in one pass (kernels/sink_in_place.py, stage_sinks_):
 * read each evicting request's sink tokens from its sink blocks, rotate their keys by the
 * request's evicted count (cos/sin given), and write keys and values into their destination
 * slots (values only where value_mask is NULL or set: the plan knows which value copies
 * are still in place from the previous step). vLLM's CPU cache layout, per block and kv head: keys [D][B] (transposed), then values
 * [B][D]. Built by kernels/cpu_ext.py (cc -O3 -shared), called through ctypes; the torch
 * path in sink_in_place.py is the reference it is tested against. Sources and destinations
 * are distinct blocks (the plan guarantees it), so request by request is safe. */
#include "kvstream_cpu.h"

/* Per request: the source and destination offsets of each sink (one division each), then
 * per kv head and key row d a sequential sweep over the sinks (row d of a [D][B] block is
 * contiguous in tokens), then the value rows. */
#define STAGE(NAME, T, LOAD, STORE)                                                                  \
    int NAME(T *cache, int64_t block_stride, int64_t head_stride, int64_t H, int64_t B, int64_t D,     \
              const int64_t *sink_blocks, int64_t sb, const int64_t *dst, int64_t E, int64_t S,          \
              const float *cosv, const float *sinv, int64_t rd, int64_t neox,                       \
              const uint8_t *value_mask) {                                                          \
        const int64_t half = rd / 2, per_thread = 4 * (S > 0 ? S : 1);                               \
        int64_t *scratch = (int64_t *)malloc(sizeof(int64_t) * per_thread * max_threads());          \
        if (!scratch) return 1;                                                                      \
        _Pragma("omp parallel if (E > 1)")                                                               \
        {                                                                                            \
        int64_t *buf = scratch + per_thread * thread_num();                                          \
        int64_t *sblk = buf, *soff = buf + S, *dblk = buf + 2 * S, *doff = buf + 3 * S;             \
        _Pragma("omp for schedule(static)")                                                          \
        for (int64_t r = 0; r < E; r++) { /* requests write distinct blocks */                      \
            for (int64_t i = 0; i < S; i++) { /* block bases (elements) and in-block offsets */      \
                const int64_t slot = dst[r * S + i];                                                 \
                sblk[i] = sink_blocks[r * sb + i / B] * block_stride;                                \
                soff[i] = i % B;                                                                     \
                dblk[i] = (slot / B) * block_stride;                                                 \
                doff[i] = slot % B;                                                                  \
            }                                                                                        \
            const float *c = cosv ? cosv + r * half : 0;                                             \
            const float *s = sinv ? sinv + r * half : 0;                                             \
            for (int64_t h = 0; h < H; h++) {                                                        \
                T *base = cache + h * head_stride;                                                   \
                if (c) {                                                                             \
                    for (int64_t j = 0; j < half; j++) {                                             \
                        const int64_t a = (neox ? j : 2 * j) * B, b = (neox ? j + half : 2 * j + 1) * B; \
                        const float cj = c[j], sj = s[j];                                            \
                        for (int64_t i = 0; i < S; i++) {                                            \
                            const T *src = base + sblk[i] + soff[i];                                 \
                            T *out = base + dblk[i] + doff[i];                                       \
                            const float x1 = LOAD(src[a]), x2 = LOAD(src[b]);                        \
                            out[a] = STORE(x1 * cj - x2 * sj);                                       \
                            out[b] = STORE(x2 * cj + x1 * sj);                                       \
                        }                                                                            \
                    }                                                                                \
                }                                                                                    \
                for (int64_t d = c ? rd : 0; d < D; d++)                                             \
                    for (int64_t i = 0; i < S; i++)                                                  \
                        base[dblk[i] + doff[i] + d * B] = base[sblk[i] + soff[i] + d * B];           \
                for (int64_t i = 0; i < S; i++) /* values: row i of [B][D], after the keys */        \
                    if (!value_mask || value_mask[r * S + i])                                        \
                        memcpy(base + dblk[i] + B * D + doff[i] * D, base + sblk[i] + B * D + soff[i] * D, sizeof(T) * D); \
            }                                                                                        \
        }                                                                                            \
        }                                                                                            \
        free(scratch);                                                                               \
        return 0;                                                                                    \
    }

#define ID(x) (x)
STAGE(kvs_stage_sinks_f32, float, ID, ID)
STAGE(kvs_stage_sinks_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
