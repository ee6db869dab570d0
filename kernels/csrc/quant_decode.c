/* One query per request over quantized KV pages (kernels/kv_quant.py's layout), fused:
 * dequantize each attended slot's key (main codes, outlier channels, sink keys), rotate it at
 * the plan's position, score the kv head's group of queries, and accumulate the dequantized
 * values with an online softmax. The CPU decode path's compiled form of
 * quant_sink_window_decode_cpu (torch: dequantize whole pages, then batched matmuls), tested
 * against it; built by kernels/cpu_ext.py, called through ctypes. */
/* Fused multiply-adds allowed here (the build's -ffp-contract=off is for stage_sinks.c). */
#if defined(__clang__)
#pragma clang fp contract(fast)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=fast")
#endif
#include "kvstream_cpu.h"

static const float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f,
};

/* Per (request, kv head, page): the attended slots' keys dequantized into a transposed tile
 * kt[D][bs] (channel rows: every loop below runs over slots, contiguous), rotated at the plan's
 * positions (cos/sin given per slot as [rd/2][bs] rows), scored for the head's group of
 * queries, merged into the running softmax of the request (max, sum, accumulator), then the
 * values dequantized row by row and accumulated. */
int kvs_quant_decode(const uint8_t *cache, int64_t block_stride, int64_t head_stride, const int64_t *lay,
                      const float *query, int64_t R, int64_t Hq, int64_t Hkv, const int64_t *blocks, int64_t nb,
                      const uint8_t *attended, const float *cosv, const float *sinv, int64_t rd, float scale,
                      float *out) {
    layout_t L;
    memcpy(&L, lay, sizeof(L));
    const int64_t D = L.D, bs = L.bs, G = Hq / Hkv, half = D / 2, half_rd = rd / 2;
    const int32_t qmax = (1 << (L.bits - 1)) - 1, top = (1 << L.bits) - 1;
    /* (request, kv head) pairs split over the OpenMP threads (torch's own runtime and thread
     * count: the same libgomp is loaded), each with its own slice of one scratch buffer. */
    const int64_t per_thread = 5 * D + G * D + 2 * G + D * bs + G * bs + D;
    float *scratch = (float *)malloc(sizeof(float) * per_thread * max_threads());
    int64_t *chan = (int64_t *)malloc(sizeof(int64_t) * D); /* byte i's two channels: chan[i], chan[half + i] */
    if (!scratch || !chan) { free(scratch); free(chan); return 1; }
    for (int64_t i = 0; i < half; i++) {
        chan[i] = L.neox ? i : 2 * i;
        chan[half + i] = L.neox ? half + i : 2 * i + 1;
    }
#pragma omp parallel if (R * Hkv > 1)
    {
    float *buf = scratch + per_thread * thread_num();
    float *lo = buf, *step = buf + 1 * D, *out_abs = buf + 2 * D, *vrow = buf + 3 * D;
    float *acc = buf + 5 * D, *m = acc + G * D, *l = m + G, *kt = l + G, *sc = kt + D * bs;
#pragma omp for schedule(static)
    for (int64_t rh = 0; rh < R * Hkv; rh++) {
        const int64_t r = rh / Hkv, h = rh % Hkv;
        {
            for (int64_t g = 0; g < G; g++) { m[g] = -INFINITY; l[g] = 0.0f; }
            memset(acc, 0, sizeof(float) * G * D);
            const float *q = query + (r * Hq + h * G) * D;
            for (int64_t j = 0; j < nb; j++) {
                const uint8_t *att = attended + (r * nb + j) * bs;
                int64_t n = 0;
                while (n < bs && !att[n]) n++;
                if (n == bs) continue; /* padding or nothing kept: the block id is not dereferenced */
                const uint8_t *page = cache + blocks[r * nb + j] * block_stride + h * head_stride;
                const uint16_t *ks = (const uint16_t *)(page + L.k_scale_off);
                const uint16_t *kz = (const uint16_t *)(page + L.k_zero_off);
                for (int64_t c = 0; c < D; c++) {
                    const float hi = h2f(ks[c]);
                    const float lo_c = L.zero_point ? h2f(kz[c]) : -hi;
                    lo[c] = lo_c;
                    step[c] = L.zero_point ? (hi - lo_c) / (float)top : hi / (float)qmax;
                    out_abs[c] = hi > -lo_c ? hi : -lo_c;
                }
                /* main codes: byte i of a slot holds channels chan[i] and chan[half + i] */
                const uint8_t *kc = page + L.k_codes_off;
                const float off = L.zero_point ? 0.0f : (float)(qmax + 1);
                for (int64_t i = 0; i < half; i++) {
                    const int64_t ca = chan[i], cb = chan[half + i];
                    float *ra = kt + ca * bs, *rb = kt + cb * bs;
                    const float la = L.zero_point ? lo[ca] : 0.0f, lb = L.zero_point ? lo[cb] : 0.0f;
                    const float sa = step[ca], sb = step[cb];
                    if (L.bits == 4) {
                        for (int64_t t = 0; t < bs; t++) {
                            const int32_t byte = kc[t * L.code_bytes + i];
                            ra[t] = la + ((float)(byte & 0xf) - off) * sa;
                            rb[t] = lb + ((float)(byte >> 4) - off) * sb;
                        }
                    } else {
                        for (int64_t t = 0; t < bs; t++) {
                            ra[t] = la + ((float)kc[t * L.code_bytes + i] - off) * sa;
                            rb[t] = lb + ((float)kc[t * L.code_bytes + half + i] - off) * sb;
                        }
                    }
                }
                for (int64_t o = 0; o < L.n_out; o++) { /* outlier channels: 8-bit codes */
                    const int64_t c = page[L.out_idx_off + o];
                    const float f = out_abs[c] / 127.0f;
                    const uint8_t *oc = page + L.out_k_off + o;
                    for (int64_t t = 0; t < bs; t++) kt[c * bs + t] = (float)((int32_t)oc[t * L.n_out] - 128) * f;
                }
                const uint16_t *ss = (const uint16_t *)(page + L.sink_scale_off);
                for (int64_t t = 0; t < L.S; t++) { /* sink slots: 8-bit keys with their own scale */
                    const float s_abs = h2f(ss[t]);
                    if (s_abs > 0.0f) {
                        const uint8_t *sk = page + L.sink_k_off + t * D;
                        for (int64_t c = 0; c < D; c++) kt[c * bs + t] = (float)((int32_t)sk[c] - 128) * (s_abs / 127.0f);
                    }
                }
                if (cosv) { /* rotate at the plan's positions: NeoX pairs (i, i + rd/2), GPT-J (2i, 2i+1) */
                    const float *cs = cosv + (r * nb + j) * half_rd * bs, *sn = sinv + (r * nb + j) * half_rd * bs;
                    for (int64_t i = 0; i < half_rd; i++) {
                        float *ra = kt + (L.neox ? i : 2 * i) * bs, *rb = kt + (L.neox ? i + half_rd : 2 * i + 1) * bs;
                        const float *ci = cs + i * bs, *si = sn + i * bs;
                        for (int64_t t = 0; t < bs; t++) {
                            const float a = ra[t], b = rb[t];
                            ra[t] = a * ci[t] - b * si[t];
                            rb[t] = b * ci[t] + a * si[t];
                        }
                    }
                }
                for (int64_t g = 0; g < G; g++) { /* scores, then the running softmax */
                    float *sg = sc + g * bs;
                    const float *qg = q + g * D;
                    for (int64_t t = 0; t < bs; t++) sg[t] = 0.0f;
                    for (int64_t c = 0; c < D; c++) {
                        const float qc = qg[c] * scale;
                        const float *row = kt + c * bs;
                        for (int64_t t = 0; t < bs; t++) sg[t] += qc * row[t];
                    }
                    float mx = m[g];
                    for (int64_t t = 0; t < bs; t++) if (att[t] && sg[t] > mx) mx = sg[t];
                    if (mx > m[g]) {
                        const float f = exp_nonpos(m[g] - mx);
                        l[g] *= f;
                        for (int64_t c = 0; c < D; c++) acc[g * D + c] *= f;
                        m[g] = mx;
                    }
                    float sum = 0.0f;
                    for (int64_t t = 0; t < bs; t++) {
                        const float e = exp_nonpos(att[t] ? sg[t] - mx : -INFINITY);
                        sg[t] = e;
                        sum += e;
                    }
                    l[g] += sum;
                }
                const uint16_t *vs = (const uint16_t *)(page + L.v_scale_off);
                const uint8_t *vc = page + L.v_codes_off;
                for (int64_t t = 0; t < bs; t++) {
                    if (!att[t]) continue;
                    const float v_abs = h2f(vs[t]);
                    const uint8_t *row = vc + t * L.code_bytes;
                    if (L.bits == 4 && L.nf4 && L.neox) { /* the default INT4: direct channels */
                        for (int64_t i = 0; i < half; i++) {
                            vrow[i] = NF4[row[i] & 0xf] * v_abs;
                            vrow[half + i] = NF4[row[i] >> 4] * v_abs;
                        }
                    } else if (L.bits == 4 && L.nf4) {
                        for (int64_t i = 0; i < half; i++) {
                            vrow[chan[i]] = NF4[row[i] & 0xf] * v_abs;
                            vrow[chan[half + i]] = NF4[row[i] >> 4] * v_abs;
                        }
                    } else {
                        const float f = v_abs / (float)qmax;
                        for (int64_t i = 0; i < half; i++) {
                            const int32_t a = L.bits == 4 ? row[i] & 0xf : row[i];
                            const int32_t b = L.bits == 4 ? row[i] >> 4 : row[half + i];
                            vrow[chan[i]] = (float)(a - (qmax + 1)) * f;
                            vrow[chan[half + i]] = (float)(b - (qmax + 1)) * f;
                        }
                    }
                    for (int64_t g = 0; g < G; g++) {
                        const float p = sc[g * bs + t];
                        float *ag = acc + g * D;
                        for (int64_t c = 0; c < D; c++) ag[c] += p * vrow[c];
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
    }
    free(chan);
    free(scratch);
    return 0;
}
