/* One query per request over quantized KV pages (kernels/kv_quant.py's layout), fused:
 * dequantize each attended slot's key (main codes, outlier channels, sink keys), rotate it at
 * the plan's position, score the kv head's group of queries, and accumulate the dequantized
 * values with an online softmax. The CPU decode path's compiled form of
 * quant_sink_window_decode_cpu (torch: dequantize whole pages, then batched matmuls), tested
 * against it; built by kernels/cpu_ext.py, called through ctypes. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static float half_to_float(uint16_t h) { /* IEEE fp16 -> fp32, subnormals included */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalize */
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

typedef struct {
    int64_t bits, D, bs, S, n_out, zero_point, nf4, neox, code_bytes;
    int64_t k_scale_off, k_zero_off, v_scale_off, sink_scale_off, k_codes_off, v_codes_off, sink_k_off,
        out_idx_off, out_k_off;
} layout_t;

static const float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f,
};

/* Codes of one token, one per channel in channel order (see pair_order / unpack_codes). */
static void unpack(const uint8_t *src, const layout_t *L, int32_t *codes) {
    const int64_t half = L->D / 2;
    for (int64_t i = 0; i < half; i++) {
        int32_t a, b;
        if (L->bits == 4) { a = src[i] & 0xf; b = src[i] >> 4; }
        else { a = src[i]; b = src[half + i]; }
        if (L->neox) { codes[i] = a; codes[half + i] = b; }
        else { codes[2 * i] = a; codes[2 * i + 1] = b; }
    }
}

void kvs_quant_decode(const uint8_t *cache, int64_t block_stride, int64_t head_stride, const int64_t *lay,
                      const float *query, int64_t R, int64_t Hq, int64_t Hkv, const int64_t *blocks, int64_t nb,
                      const uint8_t *attended, const float *cosv, const float *sinv, int64_t rd, float scale,
                      float *out) {
    layout_t L;
    memcpy(&L, lay, sizeof(L));
    const int64_t D = L.D, bs = L.bs, G = Hq / Hkv, half_rd = rd / 2;
    const int32_t qmax = (1 << (L.bits - 1)) - 1, top = (1 << L.bits) - 1;
    float *buf = (float *)malloc(sizeof(float) * (6 * D + G * D + 2 * G));
    int32_t *codes = (int32_t *)malloc(sizeof(int32_t) * D);
    if (!buf || !codes) { free(buf); free(codes); return; }
    float *lo = buf, *step = buf + D, *k = buf + 2 * D, *v = buf + 3 * D, *out_abs = buf + 4 * D, *kr = buf + 5 * D;
    float *acc = buf + 6 * D, *m = acc + G * D, *l = m + G;
    for (int64_t r = 0; r < R; r++) {
        for (int64_t h = 0; h < Hkv; h++) {
            for (int64_t g = 0; g < G; g++) { m[g] = -INFINITY; l[g] = 0.0f; }
            memset(acc, 0, sizeof(float) * G * D);
            const float *q = query + (r * Hq + h * G) * D;
            for (int64_t j = 0; j < nb; j++) {
                const uint8_t *att = attended + (r * nb + j) * bs;
                int64_t any = 0;
                for (int64_t t = 0; t < bs; t++) any |= att[t];
                if (!any) continue; /* padding or nothing kept: the block id is not dereferenced */
                const uint8_t *page = cache + blocks[r * nb + j] * block_stride + h * head_stride;
                const uint16_t *ks = (const uint16_t *)(page + L.k_scale_off);
                const uint16_t *kz = (const uint16_t *)(page + L.k_zero_off);
                for (int64_t c = 0; c < D; c++) {
                    const float hi = half_to_float(ks[c]);
                    const float lo_c = L.zero_point ? half_to_float(kz[c]) : -hi;
                    lo[c] = lo_c;
                    step[c] = L.zero_point ? (hi - lo_c) / (float)top : hi / (float)qmax;
                    out_abs[c] = hi > -lo_c ? hi : -lo_c;
                }
                const uint16_t *vs = (const uint16_t *)(page + L.v_scale_off);
                const uint16_t *ss = (const uint16_t *)(page + L.sink_scale_off);
                const uint8_t *oidx = page + L.out_idx_off;
                for (int64_t t = 0; t < bs; t++) {
                    if (!att[t]) continue;
                    unpack(page + L.k_codes_off + t * L.code_bytes, &L, codes);
                    if (L.zero_point)
                        for (int64_t c = 0; c < D; c++) k[c] = lo[c] + (float)codes[c] * step[c];
                    else
                        for (int64_t c = 0; c < D; c++) k[c] = (float)(codes[c] - (qmax + 1)) * step[c];
                    for (int64_t o = 0; o < L.n_out; o++) {
                        const int64_t c = oidx[o];
                        k[c] = (float)((int32_t)page[L.out_k_off + t * L.n_out + o] - 128) * (out_abs[c] / 127.0f);
                    }
                    if (t < L.S) {
                        const float s_abs = half_to_float(ss[t]);
                        if (s_abs > 0.0f) {
                            const uint8_t *sk = page + L.sink_k_off + t * D;
                            for (int64_t c = 0; c < D; c++) k[c] = (float)((int32_t)sk[c] - 128) * (s_abs / 127.0f);
                        }
                    }
                    memcpy(kr, k, sizeof(float) * D);
                    if (cosv) { /* rotate at the plan's position: NeoX pairs (i, i + rd/2), GPT-J (2i, 2i+1) */
                        const float *cs = cosv + ((r * nb + j) * bs + t) * half_rd;
                        const float *sn = sinv + ((r * nb + j) * bs + t) * half_rd;
                        for (int64_t i = 0; i < half_rd; i++) {
                            const int64_t a = L.neox ? i : 2 * i, b = L.neox ? i + half_rd : 2 * i + 1;
                            kr[a] = k[a] * cs[i] - k[b] * sn[i];
                            kr[b] = k[b] * cs[i] + k[a] * sn[i];
                        }
                    }
                    unpack(page + L.v_codes_off + t * L.code_bytes, &L, codes);
                    const float v_abs = half_to_float(vs[t]);
                    if (L.nf4)
                        for (int64_t c = 0; c < D; c++) v[c] = NF4[codes[c]] * v_abs;
                    else
                        for (int64_t c = 0; c < D; c++) v[c] = (float)(codes[c] - (qmax + 1)) * (v_abs / (float)qmax);
                    for (int64_t g = 0; g < G; g++) {
                        const float *qg = q + g * D;
                        float s = 0.0f;
                        for (int64_t c = 0; c < D; c++) s += qg[c] * kr[c];
                        s *= scale;
                        float *ag = acc + g * D;
                        if (s > m[g]) { /* new running max: rescale what is accumulated */
                            const float f = expf(m[g] - s);
                            l[g] *= f;
                            for (int64_t c = 0; c < D; c++) ag[c] *= f;
                            m[g] = s;
                        }
                        const float p = expf(s - m[g]);
                        l[g] += p;
                        for (int64_t c = 0; c < D; c++) ag[c] += p * v[c];
                    }
                }
            }
            for (int64_t g = 0; g < G; g++) {
                float *o = out + (r * Hq + h * G + g) * D;
                const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
                for (int64_t c = 0; c < D; c++) o[c] = acc[g * D + c] * inv;
            }
        }
    }
    free(buf);
    free(codes);
}
