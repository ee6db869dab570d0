/* The quantized store's decode case (kernels/kv_quant.py, _write_alone): one token into slot
 * `off` (> 0, not a sink) of each of m blocks, in place of the torch ops, writing the same
 * bytes. Per block: the channel ranges grown by the token (rounded to fp16, as stored); if
 * any channel of any head grew, the block's earlier tokens are decoded with the old range and
 * re-encoded with the new one (outlier channels included); then the token's key codes,
 * outlier codes, value scale and value codes. Every float operation is the one torch does,
 * in the same order, without contraction (the build's -ffp-contract=off), so the bytes equal
 * the reference's (tested). */
#include "kvstream_cpu.h"

static inline float round_half(float f) { return h2f(f2h(f)); }

static const float NF4_EDGES[15] = { /* kv_quant.NF4_EDGES: (NF4[1:] + NF4[:-1]) / 2 in float32 */
    -0.8480963706970215f, -0.6106328964233398f, -0.4599952697753906f, -0.33967941999435425f,
    -0.23460739850997925f, -0.13791173696517944f, -0.045525018125772476f, 0.03979014977812767f,
    0.120255246758461f, 0.2035212516784668f, 0.2920137643814087f, 0.3893125355243683f,
    0.5016634464263916f, 0.6427869200706482f, 0.8614784479141235f,
};

/* _encode: symmetric codes with offset qmax + 1. */
static inline int32_t enc_sym(float x, float absmax, int32_t qmax) {
    const float scale = absmax > 0.0f ? absmax / (float)qmax : 1.0f;
    float q = floorf(x / scale + 0.5f);
    if (q < (float)-qmax) q = (float)-qmax;
    if (q > (float)qmax) q = (float)qmax;
    return (int32_t)q + qmax + 1;
}

/* _encode_range: asymmetric codes 0 .. top spanning [lo, hi]. */
static inline int32_t enc_range(float x, float lo, float hi, int32_t top) {
    const float step = hi > lo ? (hi - lo) / (float)top : 1.0f;
    float q = floorf((x - lo) / step + 0.5f);
    if (q < 0.0f) q = 0.0f;
    if (q > (float)top) q = (float)top;
    return (int32_t)q;
}

/* Key codes of one token (channel order) with outlier channels filled, and the outliers' codes. */
static void key_codes(const float *x, const float *lo, const float *hi, const uint8_t *oidx, const layout_t *L,
                      int32_t *codes, int32_t *out_codes) {
    const int32_t qmax = (1 << (L->bits - 1)) - 1, top = (1 << L->bits) - 1;
    for (int64_t c = 0; c < L->D; c++)
        codes[c] = L->zero_point ? enc_range(x[c], lo[c], hi[c], top) : enc_sym(x[c], hi[c], qmax);
    for (int64_t o = 0; o < L->n_out; o++) {
        const int64_t c = oidx[o];
        codes[c] = L->zero_point ? 0 : qmax + 1;
        const float a = hi[c] > -lo[c] ? hi[c] : -lo[c]; /* torch.maximum(hi, -lo) */
        out_codes[o] = enc_sym(x[c], a, 127);
    }
}

static void pack(const int32_t *codes, const layout_t *L, uint8_t *dst) {
    const int64_t half = L->D / 2;
    for (int64_t i = 0; i < half; i++) {
        const int32_t a = codes[L->neox ? i : 2 * i], b = codes[L->neox ? half + i : 2 * i + 1];
        if (L->bits == 4) dst[i] = (uint8_t)(a | (b << 4));
        else { dst[i] = (uint8_t)a; dst[half + i] = (uint8_t)b; }
    }
}

static void unpack(const uint8_t *src, const layout_t *L, int32_t *codes) {
    const int64_t half = L->D / 2;
    for (int64_t i = 0; i < half; i++) {
        int32_t a, b;
        if (L->bits == 4) { a = src[i] & 0xf; b = src[i] >> 4; }
        else { a = src[i]; b = src[half + i]; }
        codes[L->neox ? i : 2 * i] = a;
        codes[L->neox ? half + i : 2 * i + 1] = b;
    }
}

int kvs_quant_store_alone(uint8_t *cache, int64_t block_stride, int64_t head_stride, const int64_t *lay, int64_t m,
                           int64_t H, const int64_t *blocks, const int64_t *offs, const float *k, const float *v) {
    layout_t L;
    memcpy(&L, lay, sizeof(L));
    const int64_t D = L.D;
    const int32_t qmax = (1 << (L.bits - 1)) - 1, top = (1 << L.bits) - 1;
    const int64_t fper = 5 * H * D + D, cper = D + 256;
    float *fscratch = (float *)malloc(sizeof(float) * fper * max_threads());
    int32_t *cscratch = (int32_t *)malloc(sizeof(int32_t) * cper * max_threads());
    if (!fscratch || !cscratch) { free(fscratch); free(cscratch); return 1; }
#pragma omp parallel if (m > 1)
    {
    float *fb = fscratch + fper * thread_num();
    int32_t *codes = cscratch + cper * thread_num();
    float *old_lo = fb, *old_hi = fb + H * D, *lo = fb + 2 * H * D, *hi = fb + 3 * H * D, *prev = fb + 4 * H * D;
    int32_t *out_codes = codes + D;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m; r++) { /* one token per block: blocks are distinct */
        uint8_t *blk = cache + blocks[r] * block_stride;
        const int64_t off = offs[r];
        int grew = 0;
        for (int64_t h = 0; h < H; h++) {
            const uint8_t *page = blk + h * head_stride;
            const uint16_t *ks = (const uint16_t *)(page + L.k_scale_off), *kz = (const uint16_t *)(page + L.k_zero_off);
            const float *x = k + (r * H + h) * D;
            for (int64_t c = 0; c < D; c++) {
                const float oh = h2f(ks[c]), ol = L.zero_point ? h2f(kz[c]) : -oh;
                const float nh = L.zero_point ? x[c] : fabsf(x[c]), nl = L.zero_point ? x[c] : -fabsf(x[c]);
                const float l_ = round_half(ol < nl ? ol : nl), h_ = round_half(oh > nh ? oh : nh);
                old_lo[h * D + c] = ol; old_hi[h * D + c] = oh;
                lo[h * D + c] = l_; hi[h * D + c] = h_;
                grew |= (h_ > oh) | (l_ < ol);
            }
        }
        for (int64_t h = 0; h < H; h++) {
            uint8_t *page = blk + h * head_stride;
            const uint8_t *oidx = page + L.out_idx_off;
            const float *ol = old_lo + h * D, *oh = old_hi + h * D, *nl = lo + h * D, *nh = hi + h * D;
            if (grew) { /* re-encode the earlier tokens (slots < off) with the grown range */
                for (int64_t t = 0; t < off; t++) {
                    uint8_t *kc = page + L.k_codes_off + t * L.code_bytes;
                    unpack(kc, &L, codes);
                    for (int64_t c = 0; c < D; c++)
                        prev[c] = L.zero_point ? ol[c] + (float)codes[c] * ((oh[c] - ol[c]) / (float)top)
                                               : (float)(codes[c] - (qmax + 1)) * (oh[c] / (float)qmax);
                    for (int64_t o = 0; o < L.n_out; o++) {
                        const int64_t c = oidx[o];
                        const float a = oh[c] > -ol[c] ? oh[c] : -ol[c];
                        prev[c] = (float)((int32_t)page[L.out_k_off + t * L.n_out + o] - 128) * (a / 127.0f);
                    }
                    key_codes(prev, nl, nh, oidx, &L, codes, out_codes);
                    pack(codes, &L, kc);
                    for (int64_t o = 0; o < L.n_out; o++) page[L.out_k_off + t * L.n_out + o] = (uint8_t)out_codes[o];
                }
            }
            uint16_t *ks = (uint16_t *)(page + L.k_scale_off), *kz = (uint16_t *)(page + L.k_zero_off);
            for (int64_t c = 0; c < D; c++) {
                ks[c] = f2h(nh[c]);
                if (L.zero_point) kz[c] = f2h(nl[c]);
            }
            key_codes(k + (r * H + h) * D, nl, nh, oidx, &L, codes, out_codes);
            for (int64_t o = 0; o < L.n_out; o++) page[L.out_k_off + off * L.n_out + o] = (uint8_t)out_codes[o];
            pack(codes, &L, page + L.k_codes_off + off * L.code_bytes);
            const float *y = v + (r * H + h) * D;
            float a = 0.0f;
            for (int64_t c = 0; c < D; c++) a = fabsf(y[c]) > a ? fabsf(y[c]) : a;
            const uint16_t ah = f2h(a);
            ((uint16_t *)(page + L.v_scale_off))[off] = ah;
            const float af = h2f(ah);
            for (int64_t c = 0; c < D; c++) {
                if (L.nf4) {
                    const float q = y[c] / (af > 0.0f ? af : 1.0f);
                    int32_t n = 0;
                    for (int e = 0; e < 15; e++) n += q >= NF4_EDGES[e];
                    codes[c] = n;
                } else {
                    codes[c] = enc_sym(y[c], af, qmax);
                }
            }
            pack(codes, &L, page + L.v_codes_off + off * L.code_bytes);
        }
    }
    }
    free(fscratch);
    free(cscratch);
    return 0;
}
