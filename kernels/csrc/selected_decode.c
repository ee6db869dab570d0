/* topk-importance's steady decode (kernels/topk_attention.py, selected_decode_cpu): one query
 * per request over its own kept blocks, read in place from vLLM's CPU cache, with the
 * attention mass each kept block receives. Per (request, kv head): for each kept block the
 * group's queries are rotated back by the block's shift (<R(-s) q, k> = <q, R(s) k>: m x heads
 * vectors instead of m x block_size keys), scored against the block's stored transposed keys
 * [D][bs], then one softmax over every kept slot (two passes: the max, then exponentials,
 * values and per-block sums). Padding blocks past counts[r] are never dereferenced; the
 * slots of the last block after the query (tails[r] slots are cached) may be loaded into
 * vector lanes that are then dropped, never into a score, weight or value, so their contents
 * (stale data, NaN) cannot leak in. streaming-sink's decode past eviction (kernels/sink_direct.py)
 * runs the same pass over its sink and window blocks, each entry with a slot range of its own
 * (the sinks, the window's live slots) and the sinks' shift. Built by kernels/cpu_ext.py,
 * called through ctypes; the torch paths are the references it is tested against. */
/* Fused multiply-adds allowed here (the build's -ffp-contract=off is for stage_sinks.c). */
#if defined(__clang__)
#pragma clang fp contract(fast)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=fast")
#endif
#include "kvstream_cpu.h"

/* Scores of one query against slots [0, n) of transposed keys kt[D][stride bs] (kt may start
 * inside a block's rows: lim slots are left in each row): tiles of TB slots accumulate in one
 * vector (GCC/Clang vector extensions: one key load and one multiply-add per channel; the
 * compiler picks the machine's widths), the rest slot by slot. Lanes past n in a tile inside
 * the row are computed and dropped; a tile reaching past the row's end is never read whole. */
#define TB 16
typedef float vf __attribute__((vector_size(TB * sizeof(float))));
typedef uint16_t vh __attribute__((vector_size(TB * sizeof(uint16_t))));
typedef uint32_t vu __attribute__((vector_size(TB * sizeof(uint32_t))));
typedef int32_t vi __attribute__((vector_size(TB * sizeof(int32_t))));

static inline float load_f32(const float *p) { return *p; }
static inline float load_bf16(const uint16_t *p) { return bf16_to_f32(*p); }
static inline vf loadv_f32(const float *p) {
    vf v;
    memcpy(&v, p, sizeof(v));
    return v;
}
static inline vf loadv_bf16(const uint16_t *p) { /* bf16 is the top half of a float */
    vh h;
    memcpy(&h, p, sizeof(h));
    const vu u = __builtin_convertvector(h, vu) << 16;
    vf v;
    memcpy(&v, &u, sizeof(v));
    return v;
}

/* exp_nonpos (kvstream_cpu.h) a vector at a time: the same polynomial; rounding to the nearest
 * integer by adding and subtracting 1.5 * 2^23; lanes below -87 (the -inf of masked scores
 * included) clamped first and zeroed after. */
static inline vf vexp_nonpos(vf x) {
    const vi low = x < -87.0f;
    vi bits;
    memcpy(&bits, &x, sizeof(bits));
    const float clamp = -87.0f;
    int32_t cbits;
    memcpy(&cbits, &clamp, 4);
    bits = (bits & ~low) | (cbits & low);
    memcpy(&x, &bits, sizeof(x));
    const vf y = x * EXP2_LOG2E;
    const vf r = (y + 12582912.0f) - 12582912.0f;
    const vf f = y - r;
    vf p = EXP2_C6 * f + EXP2_C5;
    p = p * f + EXP2_C4;
    p = p * f + EXP2_C3;
    p = p * f + EXP2_C2;
    p = p * f + EXP2_C1;
    p = p * f + 1.0f;
    const vi e = (__builtin_convertvector(r, vi) + 127) << 23;
    vf scale;
    memcpy(&scale, &e, sizeof(scale));
    p *= scale;
    memcpy(&bits, &p, sizeof(bits));
    bits &= ~low;
    memcpy(&p, &bits, sizeof(p));
    return p;
}

/* x[0, n) = exp(x - top), a tile at a time, then the rest. */
static inline void exp_shifted(float *restrict x, int64_t n, float top) {
    int64_t t = 0;
    for (; t + TB <= n; t += TB) {
        const vf e = vexp_nonpos(loadv_f32(x + t) - top);
        memcpy(x + t, &e, sizeof(e));
    }
    for (; t < n; t++) x[t] = exp_nonpos(x[t] - top);
}

/* sum of x[0, n): tiles into one vector, then its lanes and the rest (a plain loop's serial
 * float sum does not vectorize). */
static inline float sum_floats(const float *restrict x, int64_t n) {
    vf a = {0};
    int64_t t = 0;
    for (; t + TB <= n; t += TB) a += loadv_f32(x + t);
    float lanes[TB], total = 0.0f;
    memcpy(lanes, &a, sizeof(lanes));
    for (int64_t i = 0; i < TB; i++) total += lanes[i];
    for (; t < n; t++) total += x[t];
    return total;
}

/* Lanes [0, w) of a tile, scaled, into s; returns the running max. */
static inline float put_lanes(vf a, int64_t w, float scale, float best, float *restrict s) {
    float lanes[TB];
    memcpy(lanes, &a, sizeof(lanes));
    for (int64_t tt = 0; tt < w; tt++) {
        s[tt] = lanes[tt] * scale;
        best = s[tt] > best ? s[tt] : best;
    }
    return best;
}

static inline int64_t clamp_lanes(int64_t left) { return left < 0 ? 0 : (left < TB ? left : TB); }

/* A[0..3] += X * the four consecutive vectors at P: independent accumulators, so the
 * multiply-adds overlap instead of waiting on each other. */
#define FMA4(A, X, P, LOADV)                  \
    do {                                      \
        const float x_ = (X);                 \
        (A)[0] += x_ * LOADV(P);              \
        (A)[1] += x_ * LOADV((P) + TB);       \
        (A)[2] += x_ * LOADV((P) + 2 * TB);   \
        (A)[3] += x_ * LOADV((P) + 3 * TB);   \
    } while (0)

/* Four tiles at a time where they fit (four independent accumulators hide the multiply-add
 * latency), then single tiles, then slot by slot. */
#define SCORE_FN(NAME, T, LOAD, LOADV)                                                            \
    static inline float NAME(const T *restrict kt, int64_t bs, int64_t lim, int64_t D, int64_t n,   \
                             const float *restrict q, float scale, float best, float *restrict s) { \
        int64_t t0 = 0;                                                                           \
        for (; t0 + 4 * TB <= lim && t0 + 3 * TB < n; t0 += 4 * TB) {                             \
            vf a[4] = {{0}, {0}, {0}, {0}};                                                       \
            for (int64_t c = 0; c < D; c++) FMA4(a, q[c], kt + c * bs + t0, LOADV);               \
            best = put_lanes(a[0], TB, scale, best, s + t0);                                      \
            best = put_lanes(a[1], TB, scale, best, s + t0 + TB);                                 \
            best = put_lanes(a[2], TB, scale, best, s + t0 + 2 * TB);                             \
            best = put_lanes(a[3], clamp_lanes(n - t0 - 3 * TB), scale, best, s + t0 + 3 * TB);   \
        }                                                                                         \
        for (; t0 + TB <= lim && t0 < n; t0 += TB) {                                              \
            vf a = {0};                                                                           \
            for (int64_t c = 0; c < D; c++) a += q[c] * LOADV(kt + c * bs + t0);                  \
            best = put_lanes(a, clamp_lanes(n - t0), scale, best, s + t0);                        \
        }                                                                                         \
        for (int64_t t = t0; t < n; t++) {                                                        \
            float a = 0.0f;                                                                       \
            for (int64_t c = 0; c < D; c++) a += q[c] * LOAD(kt + c * bs + t);                    \
            s[t] = a * scale;                                                                     \
            best = s[t] > best ? s[t] : best;                                                     \
        }                                                                                         \
        return best;                                                                              \
    }

/* acc[0, D) += sum over slots t < n of p[t] * values[t][0, D): channel chunks of four vectors
 * held in registers across the slots, then single vectors, then channel by channel. */
#define ACC_FN(NAME, T, LOAD, LOADV)                                                              \
    static inline void NAME(const T *restrict vb, int64_t D, int64_t n, const float *restrict p,  \
                            float *restrict acc) {                                                \
        int64_t c0 = 0;                                                                           \
        for (; c0 + 4 * TB <= D; c0 += 4 * TB) {                                                  \
            vf a[4];                                                                              \
            memcpy(a, acc + c0, sizeof(a));                                                       \
            for (int64_t t = 0; t < n; t++) FMA4(a, p[t], vb + t * D + c0, LOADV);                \
            memcpy(acc + c0, a, sizeof(a));                                                       \
        }                                                                                         \
        for (; c0 + TB <= D; c0 += TB) {                                                          \
            vf a = loadv_f32(acc + c0);                                                           \
            for (int64_t t = 0; t < n; t++) a += p[t] * LOADV(vb + t * D + c0);                   \
            memcpy(acc + c0, &a, sizeof(vf));                                                     \
        }                                                                                         \
        for (; c0 < D; c0++) {                                                                    \
            float a = acc[c0];                                                                    \
            for (int64_t t = 0; t < n; t++) a += p[t] * LOAD(vb + t * D + c0);                    \
            acc[c0] = a;                                                                          \
        }                                                                                         \
    }

SCORE_FN(score_f32, float, load_f32, loadv_f32)
SCORE_FN(score_bf16, uint16_t, load_bf16, loadv_bf16)
ACC_FN(acc_f32, float, load_f32, loadv_f32)
ACC_FN(acc_bf16, uint16_t, load_bf16, loadv_bf16)

/* cache: [blocks][kv heads][2][D * bs] in elements (strides given), keys [D][bs] then values
 * [bs][D]; query float32, request r's at query + rows[r] * q_stride, [Hq][D]; blocks [R][M];
 * counts, tails [R]; los/his [R][M] or NULL: entry j reads slots [los, his) of its block
 * (streaming-sink's sink block and the window's partly dead first block; one block may be
 * two entries), else [0, bs) and [0, tails[r]) for the last; cosv/sinv [R][M][rd/2] the
 * rotation by -shift of each entry (NULL: no rotation); out float32, request r's at
 * out + rows[r] * o_stride; heads_mass [R][Hkv][M] scratch (each kv head's share), mass
 * [R][M] their sum (0 past counts[r]). */
#define SELECTED(NAME, T, SCORE, ACC)                                                                       \
    int NAME(const T *cache, int64_t block_stride, int64_t head_stride, int64_t Hkv, int64_t bs,        \
              int64_t D, const float *query, int64_t q_stride, const int64_t *rows, int64_t R,            \
              int64_t Hq, const int64_t *blocks, int64_t M, const int64_t *counts, const int64_t *tails,  \
              const int64_t *los, const int64_t *his, const float *cosv, const float *sinv, int64_t rd, int64_t neox, float scale, float *out,    \
              int64_t o_stride, float *heads_mass, float *mass) {                                         \
        const int64_t G = Hq / Hkv, half_rd = rd / 2;                                                 \
        const int64_t per_thread = M * G * bs + 2 * G * D + 2 * G + M * G;                         \
        float *scratch = (float *)malloc(sizeof(float) * per_thread * max_threads());                 \
        if (!scratch) return 1;                                                                       \
        _Pragma("omp parallel if (R * Hkv > 1)")                                                      \
        {                                                                                             \
        float *buf = scratch + per_thread * thread_num();                                             \
        float *sc = buf, *qr = sc + M * G * bs, *acc = qr + G * D, *mx = acc + G * D, *l = mx + G;     \
        float *bsum = l + G;                                                                          \
        _Pragma("omp for schedule(static)")                                                           \
        for (int64_t rh = 0; rh < R * Hkv; rh++) {                                                    \
            const int64_t r = rh / Hkv, h = rh % Hkv, m = counts[r];                                  \
            const float *q = query + rows[r] * q_stride + h * G * D;                                  \
            for (int64_t g = 0; g < G; g++) mx[g] = -INFINITY;                                        \
            for (int64_t j = 0; j < m; j++) { /* pass 1: scores and their max */                      \
                const int64_t lo = los ? los[r * M + j] : 0;                                          \
                const int64_t n = (his ? his[r * M + j] : j == m - 1 ? tails[r] : bs) - lo;           \
                const T *kt = cache + blocks[r * M + j] * block_stride + h * head_stride + lo;        \
                const float *qb = q; /* the group's queries for this block: as given, or rotated */    \
                if (cosv) { /* NeoX pairs (i, i + rd/2), GPT-J (2i, 2i+1), as Rope.apply */            \
                    memcpy(qr, q, sizeof(float) * G * D); /* channels past rd pass through */          \
                    qb = qr;                                                                          \
                    const float *cs = cosv + (r * M + j) * half_rd, *sn = sinv + (r * M + j) * half_rd;  \
                    for (int64_t g = 0; g < G; g++) {                                                 \
                        const float *x = q + g * D;                                                   \
                        float *y = qr + g * D;                                                        \
                        for (int64_t i = 0; i < half_rd; i++) {                                       \
                            const int64_t a = neox ? i : 2 * i, b = neox ? i + half_rd : 2 * i + 1;   \
                            y[a] = x[a] * cs[i] - x[b] * sn[i];                                       \
                            y[b] = x[b] * cs[i] + x[a] * sn[i];                                       \
                        }                                                                             \
                    }                                                                                 \
                }                                                                                     \
                for (int64_t g = 0; g < G; g++)                                                       \
                    mx[g] = SCORE(kt, bs, bs - lo, D, n, qb + g * D, scale, mx[g], sc + (j * G + g) * bs);    \
            }                                                                                         \
            memset(acc, 0, sizeof(float) * G * D);                                                    \
            for (int64_t g = 0; g < G; g++) l[g] = 0.0f;                                              \
            for (int64_t j = 0; j < m; j++) { /* pass 2: weights, values, per-block sums */            \
                const int64_t lo = los ? los[r * M + j] : 0;                                          \
                const int64_t n = (his ? his[r * M + j] : j == m - 1 ? tails[r] : bs) - lo;           \
                const T *vb = cache + blocks[r * M + j] * block_stride + h * head_stride + D * (bs + lo); \
                for (int64_t g = 0; g < G; g++) {                                                     \
                    float *s = sc + (j * G + g) * bs;                                                 \
                    const float top = mx[g];                                                          \
                    exp_shifted(s, n, top);                                                           \
                    const float sum = sum_floats(s, n);                                               \
                    bsum[j * G + g] = sum;                                                            \
                    l[g] += sum;                                                                      \
                }                                                                                     \
                for (int64_t g = 0; g < G; g++) ACC(vb, D, n, sc + (j * G + g) * bs, acc + g * D);    \
            }                                                                                         \
            for (int64_t g = 0; g < G; g++) {                                                         \
                float *o = out + rows[r] * o_stride + (h * G + g) * D;                                \
                const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;                                   \
                for (int64_t c = 0; c < D; c++) o[c] = acc[g * D + c] * inv;                          \
                l[g] = inv;                                                                           \
            }                                                                                         \
            float *ms = heads_mass + (r * Hkv + h) * M;                                               \
            for (int64_t j = 0; j < M; j++) {                                                         \
                float total = 0.0f;                                                                   \
                if (j < m)                                                                            \
                    for (int64_t g = 0; g < G; g++) total += bsum[j * G + g] * l[g];                  \
                ms[j] = total;                                                                        \
            }                                                                                         \
        }                                                                                             \
        }                                                                                             \
        for (int64_t r = 0; r < R; r++) /* kv heads in order: the same sum at any thread count */      \
            for (int64_t j = 0; j < M; j++) {                                                         \
                float total = 0.0f;                                                                   \
                for (int64_t h = 0; h < Hkv; h++) total += heads_mass[(r * Hkv + h) * M + j];         \
                mass[r * M + j] = total;                                                              \
            }                                                                                         \
        free(scratch);                                                                                \
        return 0;                                                                                     \
    }

SELECTED(kvs_selected_decode_f32, float, score_f32, acc_f32)
SELECTED(kvs_selected_decode_bf16, uint16_t, score_bf16, acc_bf16)
