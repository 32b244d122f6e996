/* Native kernels of the rANS tensor codec (docs/rans_format.md is the bitstream spec).
 *
 * A plain shared library, no Python API: vc_quant/codec/rans/native.py loads it with
 * ctypes (which releases the GIL, so Python threads run these side by side).
 *
 * Determinism: compiled with -ffp-contract=off and without -ffast-math, every float
 * operation is IEEE and happens in the order written, so the encoder makes the same
 * bitstream on every machine. The decoders are integer code: bit-identical by construction
 * (the Triton decoder implements the same integer steps).
 *
 * Untrusted input: the decoder never reads outside the word array or a segment's own
 * words, never writes outside the output, and reports a damaged stream (overrun, words
 * left over, a lane whose final state is not the encoder's initial state) as an error
 * code instead of returning garbage. Tables are validated by the caller before use.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PROB_BITS 12
#define PROB_SCALE (1u << PROB_BITS)
#define RANS_L (1u << 16) /* lower bound of the state; states live in [2^16, 2^32) */
#define LEVEL_MAX 127      /* reconstruction integers are int8: [-127, 127] */
#define N_LEVELS (2 * LEVEL_MAX + 1)
#define MAX_LANES 64

/* Hot loops are compiled for AVX-512, AVX2 and the baseline and picked at load time (gcc
 * function multi-versioning). Only exactly-rounded IEEE operations are used, so every
 * version computes the same bits. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VC_TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VC_TARGETS
#endif

/* Errors returned by the decoder (also named in native.py). */
#define ERR_OVERRUN 1     /* a lane needed more words than its segment holds */
#define ERR_LEFTOVER 2    /* words left in a segment after its last symbol */
#define ERR_FINAL_STATE 3 /* a lane did not return to the encoder's initial state */
#define ERR_BAD_SIZES 4   /* segment offsets or sizes inconsistent with the tensor */

/* Dependent quantization (two quantizers, four states; the H.266/VVC construction):
 * states 0, 1 use Q0 (reconstruction 2k), states 2, 3 use Q1 (2k - sgn k); the parity
 * of the level k selects the next state. */

static inline int sgn(int v) { return (v > 0) - (v < 0); }

/* ------------------------------------------------------------------------------------ */
/* Rotation: signs, orthonormal Walsh-Hadamard over the power-of-two factor p, then the  */
/* m x m orthogonal matrix q across the m blocks (row index a*p + b). Matches            */
/* vc_quant.codec.transform.rotate / unrotate up to float rounding.                      */

VC_TARGETS static void fwht(float *y, int64_t p) {
    for (int64_t h = 1; h < p; h <<= 1)
        for (int64_t i = 0; i < p; i += h << 1)
            for (int64_t j = i; j < i + h; j++) {
                float a = y[j], b = y[j + h];
                y[j] = a + b;
                y[j + h] = a - b;
            }
}

/* out[a2*p + b] = sum_a Q[a2][a] y[a*p + b]  (transpose: Q[a][a2]) */
VC_TARGETS static void mix_blocks(const float *y, float *out, int64_t m, int64_t p, const float *q, int transpose) {
    for (int64_t a2 = 0; a2 < m; a2++) {
        float *o = out + a2 * p;
        for (int64_t b = 0; b < p; b++) o[b] = 0.0f;
        for (int64_t a = 0; a < m; a++) {
            float w = transpose ? q[a * m + a2] : q[a2 * m + a];
            const float *src = y + a * p;
            for (int64_t b = 0; b < p; b++) o[b] += w * src[b];
        }
    }
}

/* Forward rotation of `rows` rows of n = m*p values; colmul (may be NULL) multiplies the
 * columns first. signs == NULL: no rotation (columns scaled only). */
int vc_rotate_rows(const float *x, float *out, int64_t rows, int64_t m, int64_t p, const float *signs,
                   const float *q, const float *colmul) {
    int64_t n = m * p;
    float *work = (float *)malloc(sizeof(float) * (size_t)n);
    if (!work) return -1;
    float norm = (float)(1.0 / sqrt((double)p));
    for (int64_t r = 0; r < rows; r++) {
        const float *src = x + r * n;
        float *dst = out + r * n;
        float *y = (signs && m > 1) ? work : dst;
        for (int64_t i = 0; i < n; i++) {
            float v = colmul ? src[i] * colmul[i] : src[i];
            y[i] = signs ? v * signs[i] : v;
        }
        if (!signs) continue;
        for (int64_t a = 0; a < m; a++) fwht(y + a * p, p);
        for (int64_t i = 0; i < n; i++) y[i] *= norm;
        if (m > 1) mix_blocks(y, dst, m, p, q, 0);
    }
    free(work);
    return 0;
}

/* Inverse rotation of reconstruction integers: out = unrotate(levels * step) / coldiv, the step
 * per row when row_steps is not NULL. Row by row, so the row stays in cache between the steps. */
int vc_unrotate_levels(const int8_t *levels, float step, const float *row_steps, float *out, int64_t rows, int64_t m,
                       int64_t p, const float *signs, const float *q, const float *coldiv) {
    int64_t n = m * p;
    float *work = (float *)malloc(sizeof(float) * (size_t)n * 2);
    if (!work) return -1;
    float *z = work, *y = work + n;
    float norm = (float)(1.0 / sqrt((double)p));
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *src = levels + r * n;
        float *dst = out + r * n;
        float st = row_steps ? row_steps[r] : step;
        for (int64_t i = 0; i < n; i++) z[i] = (float)src[i] * st;
        if (signs) {
            float *t = z;
            if (m > 1) {
                mix_blocks(z, y, m, p, q, 1);
                t = y;
            }
            for (int64_t a = 0; a < m; a++) fwht(t + a * p, p);
            for (int64_t i = 0; i < n; i++) dst[i] = t[i] * norm * signs[i];
        } else {
            for (int64_t i = 0; i < n; i++) dst[i] = z[i];
        }
        if (coldiv)
            for (int64_t i = 0; i < n; i++) dst[i] = dst[i] / coldiv[i];
    }
    free(work);
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* Quantizers. Values are v = x * inv_step; levels k are chosen by J = (v - r)^2 +        */
/* lambda * bits(k), bits from the cost table of the level's context (cost[ctx][k+127]).  */

/* The rate control's statistics in one pass, no temporaries: the sum of squares (double;
 * eight partial sums in a fixed order, so the same on every machine) and each row's peak |x|. */
VC_TARGETS void vc_row_stats(const float *x, int64_t rows, int64_t cols, double *sumsq, float *peak) {
    double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * cols;
        float m = 0.0f;
        int64_t c = 0;
        for (; c + 8 <= cols; c += 8)
            for (int j = 0; j < 8; j++) {
                double v = row[c + j];
                acc[j] += v * v;
                float a = fabsf(row[c + j]);
                m = a > m ? a : m;
            }
        for (; c < cols; c++) {
            double v = row[c];
            acc[0] += v * v;
            float a = fabsf(row[c]);
            m = a > m ? a : m;
        }
        peak[r] = m;
    }
    double total = 0.0;
    for (int j = 0; j < 8; j++) total += acc[j];
    *sumsq = total;
}

/* Scalar rate-distortion quantizer: the nearest level or the next one toward zero. */
void vc_sq_quantize(const float *x, int64_t n, float inv_step, double lambda, const double *cost, int8_t *k_out,
                    int64_t *hist, double *sqerr) {
    double err = 0.0;
    for (int64_t i = 0; i < n; i++) {
        float v = x[i] * inv_step;
        float a = fabsf(v);
        int k = a < 255.0f ? (int)(a + 0.5f) : 255; /* a >= 0: truncation is floor (no libm call) */
        if (k > LEVEL_MAX) k = LEVEL_MAX;
        double best_j, d = (double)a - k;
        best_j = d * d + lambda * cost[(v < 0 ? -k : k) + LEVEL_MAX];
        if (k > 0) {
            double d2 = (double)a - (k - 1);
            double j2 = d2 * d2 + lambda * cost[(v < 0 ? -(k - 1) : (k - 1)) + LEVEL_MAX];
            if (j2 <= best_j) {
                best_j = j2;
                k -= 1;
                d = d2;
            }
        }
        int ks = v < 0 ? -k : k;
        k_out[i] = (int8_t)ks;
        hist[ks + LEVEL_MAX]++;
        err += d * d;
    }
    if (sqerr) *sqerr += err;
}

/* Dependent (trellis-coded) quantization along every lane of every segment: a Viterbi
 * search over the 4 states. Lane j of a segment starting at s0 holds symbols
 * s0 + j + t*G, t = 0, 1, ...; each lane starts in state 0. ctx_out[i] is the context
 * (quantizer) symbol i is coded with; levels are k (reconstruction integers follow).
 *
 * Per value and quantizer the candidates are the two reconstruction points around |v|
 * (consecutive levels, so one even and one odd k) and zero (an even k): the cheapest even
 * and the cheapest odd level feed the two states that follow. The lanes of a segment run
 * in lockstep (one time step for all lanes, arrays of lane states) with branch-free
 * arithmetic, so the compiler vectorises across lanes; path costs are renormalised at
 * every step, so float precision suffices. */

VC_TARGETS static void dq_forward_step(const float *restrict x, int lanes, float inv_step, float lam,
                                       const float *restrict cost0, const float *restrict cost1,
                                       float *restrict C0, float *restrict C1, float *restrict C2, float *restrict C3,
                                       int8_t *restrict ke0, int8_t *restrict ko0, int8_t *restrict ke1,
                                       int8_t *restrict ko1, uint8_t *restrict choice) {
    const float z0 = lam * cost0[LEVEL_MAX], z1 = lam * cost1[LEVEL_MAX];
    for (int j = 0; j < lanes; j++) {
        float v = x[j] * inv_step;
        float a = v < 0.0f ? -v : v;
        int s = v < 0.0f ? -1 : 1;
        float zd = a * a;
        /* Q0: reconstruction 2k; |k| <= 63 */
        /* clamp after converting (a float min would stop the vectoriser); an out-of-range or NaN
         * conversion gives INT_MIN on x86, which the clamp maps to the top level too */
        int f0 = (int)(a * 0.5f);
        f0 = (f0 < 0 || f0 > 62) ? 62 : f0;
        float dl0 = a - (float)(2 * f0), dh0 = a - (float)(2 * f0 + 2);
        float jl0 = dl0 * dl0 + lam * cost0[s * f0 + LEVEL_MAX];
        float jh0 = dh0 * dh0 + lam * cost0[s * (f0 + 1) + LEVEL_MAX];
        int odd0 = f0 & 1;
        float je0 = odd0 ? jh0 : jl0, jo0 = odd0 ? jl0 : jh0;
        int e0 = s * (odd0 ? f0 + 1 : f0), o0 = s * (odd0 ? f0 : f0 + 1);
        float zj0 = zd + z0;
        int zz0 = zj0 < je0;
        je0 = zz0 ? zj0 : je0;
        e0 = zz0 ? 0 : e0;
        /* Q1: reconstruction 2k - sgn(k) (0, +-1, +-3, ...); |k| <= 64 */
        int f1 = (int)((a + 1.0f) * 0.5f);
        f1 = (f1 < 0 || f1 > 63) ? 63 : f1;
        float dl1 = a - (float)(f1 ? 2 * f1 - 1 : 0), dh1 = a - (float)(2 * f1 + 1);
        float jl1 = dl1 * dl1 + lam * cost1[s * f1 + LEVEL_MAX];
        float jh1 = dh1 * dh1 + lam * cost1[s * (f1 + 1) + LEVEL_MAX];
        int odd1 = f1 & 1;
        float je1 = odd1 ? jh1 : jl1, jo1 = odd1 ? jl1 : jh1;
        int e1 = s * (odd1 ? f1 + 1 : f1), o1 = s * (odd1 ? f1 : f1 + 1);
        float zj1 = zd + z1;
        int zz1 = zj1 < je1;
        je1 = zz1 ? zj1 : je1;
        e1 = zz1 ? 0 : e1;
        /* transitions: state 0 <- 0 (even) | 1 (odd); 2 <- 0 (odd) | 1 (even);
         *              1 <- 2 (even) | 3 (odd); 3 <- 2 (odd) | 3 (even) */
        float n0a = C0[j] + je0, n0b = C1[j] + jo0, n2a = C0[j] + jo0, n2b = C1[j] + je0;
        float n1a = C2[j] + je1, n1b = C3[j] + jo1, n3a = C2[j] + jo1, n3b = C3[j] + je1;
        int b0 = n0b < n0a, b1 = n1b < n1a, b2 = n2b < n2a, b3 = n3b < n3a;
        float c0 = b0 ? n0b : n0a, c1 = b1 ? n1b : n1a, c2 = b2 ? n2b : n2a, c3 = b3 ? n3b : n3a;
        float m01 = c0 < c1 ? c0 : c1, m23 = c2 < c3 ? c2 : c3, m = m01 < m23 ? m01 : m23;
        C0[j] = c0 - m;
        C1[j] = c1 - m;
        C2[j] = c2 - m;
        C3[j] = c3 - m;
        ke0[j] = (int8_t)e0;
        ko0[j] = (int8_t)o0;
        ke1[j] = (int8_t)e1;
        ko1[j] = (int8_t)o1;
        choice[j] = (uint8_t)(b0 | (b1 << 1) | (b2 << 2) | (b3 << 3));
    }
}

/* One step back along the lanes' best paths: level and context of each lane's symbol. */
VC_TARGETS static void dq_backward_step(int lanes, const int8_t *restrict ke0, const int8_t *restrict ko0,
                                        const int8_t *restrict ke1, const int8_t *restrict ko1,
                                        const uint8_t *restrict choice, int32_t *restrict state,
                                        int8_t *restrict k_out, uint8_t *restrict ctx_out) {
    for (int j = 0; j < lanes; j++) {
        int s = state[j];
        int bit = (choice[j] >> s) & 1;
        int q = s & 1;                /* states 0, 2 were reached from Q0 states; 1, 3 from Q1 states */
        int odd = bit ^ (s >> 1);     /* 0 <- even|odd, 2 <- odd|even (likewise 1, 3) */
        int e0 = ke0[j], o0 = ko0[j], e1 = ke1[j], o1 = ko1[j]; /* unconditional loads */
        int k0 = odd ? o0 : e0, k1 = odd ? o1 : e1;
        k_out[j] = (int8_t)(q ? k1 : k0);
        ctx_out[j] = (uint8_t)q;
        state[j] = 2 * q + bit;
    }
}

int vc_dq_quantize(const float *x, int64_t n, float inv_step, int G, int64_t lane_len, double lambda,
                   const double *cost, int8_t *k_out, uint8_t *ctx_out, int64_t *hist, double *sqerr) {
    int64_t seg_len = (int64_t)G * lane_len;
    int64_t buf = seg_len < n ? seg_len : n;
    uint8_t *mem = (uint8_t *)malloc((size_t)buf * 5);
    if (!mem || G > MAX_LANES) {
        free(mem);
        return -1;
    }
    int8_t *ke0 = (int8_t *)mem, *ko0 = ke0 + buf, *ke1 = ko0 + buf, *ko1 = ke1 + buf;
    uint8_t *choice = (uint8_t *)(ko1 + buf);
    float Cs[4][MAX_LANES];
    int32_t state[MAX_LANES];
    float cost0[N_LEVELS], cost1[N_LEVELS];
    for (int i = 0; i < N_LEVELS; i++) {
        cost0[i] = (float)cost[i];
        cost1[i] = (float)cost[N_LEVELS + i];
    }
    const float lam = (float)lambda;
    double err = 0.0;
    for (int64_t s0 = 0; s0 < n; s0 += seg_len) {
        int64_t len = s0 + seg_len < n ? seg_len : n - s0;
        int64_t full = len / G;
        int rem = (int)(len - full * G);
        for (int j = 0; j < G; j++) {
            Cs[0][j] = 0.0f;
            Cs[1][j] = Cs[2][j] = Cs[3][j] = 1e30f;
        }
        int64_t steps = full + (rem > 0);
        for (int64_t t = 0; t < steps; t++) {
            int lanes = t < full ? G : rem;
            int64_t o = t * G;
            dq_forward_step(x + s0 + o, lanes, inv_step, lam, cost0, cost1, Cs[0], Cs[1], Cs[2], Cs[3], ke0 + o,
                            ko0 + o, ke1 + o, ko1 + o, choice + o);
        }
        for (int j = 0; j < G; j++) {
            int s = 0;
            for (int q = 1; q < 4; q++)
                if (Cs[q][j] < Cs[s][j]) s = q;
            state[j] = s;
        }
        for (int64_t t = steps - 1; t >= 0; t--) {
            int lanes = t < full ? G : rem;
            int64_t o = t * G;
            dq_backward_step(lanes, ke0 + o, ko0 + o, ke1 + o, ko1 + o, choice + o, state, k_out + s0 + o,
                             ctx_out + s0 + o);
        }
        for (int64_t i = s0; i < s0 + len; i++) /* histogram: a separate, scalar pass */
            hist[ctx_out[i] * N_LEVELS + k_out[i] + LEVEL_MAX]++;
        if (sqerr) /* the squared error only when asked (tests, benchmarks): the rate control needs none */
            for (int64_t i = s0; i < s0 + len; i++) {
                int k = k_out[i], c = ctx_out[i];
                int r = c ? 2 * k - sgn(k) : 2 * k;
                double d = (double)(x[i] * inv_step) - r;
                err += d * d;
            }
    }
    if (sqerr) *sqerr += err;
    free(mem);
    return 0;
}

/* Reconstruction integers of dequantized DQ levels (what the decoder outputs), for tests. */
void vc_dq_reconstruct(const int8_t *k, const uint8_t *ctx, int64_t n, int8_t *r) {
    for (int64_t i = 0; i < n; i++) r[i] = (int8_t)(ctx[i] ? 2 * k[i] - sgn(k[i]) : 2 * k[i]);
}

/* ------------------------------------------------------------------------------------ */
/* rANS: 32-bit states, 16-bit words, probabilities in 1/4096. A segment of G lanes     */
/* shares one word stream; the decoder reads it forward, lane by lane in symbol order.  */

/* Encode n levels. freq/cum: [ctx][k + 127]. out: capacity `cap` words; seg_end[s]:
 * cumulative end offset of segment s. scratch: G*lane_len + 2G words.
 * Returns the number of words, -1 if `cap` is too small, -2 for a zero-frequency symbol. */
int64_t vc_rans_encode(const int8_t *k, const uint8_t *ctx, int64_t n, int G, int64_t lane_len, const uint32_t *freq,
                       const uint32_t *cum, uint16_t *out, int64_t cap, uint32_t *seg_end, uint16_t *scratch) {
    int64_t seg_len = (int64_t)G * lane_len, total = 0, s_idx = 0;
    int64_t scratch_cap = seg_len + 2 * (int64_t)G;
    uint32_t x[MAX_LANES];
    if (G < 1 || G > MAX_LANES) return -1;
    for (int64_t s0 = 0; s0 < n; s0 += seg_len, s_idx++) {
        int64_t s1 = s0 + seg_len < n ? s0 + seg_len : n;
        uint16_t *end = scratch + scratch_cap, *ptr = end;
        for (int j = 0; j < G; j++) x[j] = RANS_L;
        int j = (int)((s1 - 1 - s0) % G); /* the lane of the last symbol; lanes count down from it */
        for (int64_t i = s1 - 1; i >= s0; i--) {
            int c = ctx ? ctx[i] : 0;
            int idx = c * N_LEVELS + k[i] + LEVEL_MAX;
            uint32_t f = freq[idx];
            if (f == 0) return -2;
            uint64_t x_max = ((uint64_t)(RANS_L >> PROB_BITS) << 16) * f;
            uint32_t xs = x[j];
            if ((uint64_t)xs >= x_max) {
                *--ptr = (uint16_t)(xs & 0xFFFF);
                xs >>= 16;
            }
            uint32_t q = xs / f;
            x[j] = (q << PROB_BITS) + (xs - q * f) + cum[idx];
            j = j ? j - 1 : G - 1;
        }
        for (int j = G - 1; j >= 0; j--) {
            *--ptr = (uint16_t)(x[j] >> 16);
            *--ptr = (uint16_t)(x[j] & 0xFFFF);
        }
        int64_t words = end - ptr;
        if (total + words > cap) return -1;
        memcpy(out + total, ptr, sizeof(uint16_t) * (size_t)words);
        total += words;
        seg_end[s_idx] = (uint32_t)total;
    }
    return total;
}

/* One symbol of lane j (the body of every decoder loop below). DQ and CHECKED are
 * compile-time constants: the scalar quantizer skips the state machine, and rounds with at
 * least one word left per lane (each symbol reads at most one) skip the bounds check. */
static inline __attribute__((always_inline)) void decode_symbol(int dq, int checked, int j, uint32_t *x,
                                                                uint8_t *st, const uint16_t **pp,
                                                                const uint16_t *stop, uint32_t *overrun,
                                                                const uint32_t *lut, const int8_t *recon,
                                                                int8_t *out) {
    static const uint16_t zero_word = 0;
    const uint16_t *ptr = *pp;
    uint32_t xs = x[j];
    uint32_t slot = xs & (PROB_SCALE - 1);
    uint32_t st_j = dq ? st[j] : 0, c = st_j >> 1;
    uint32_t e = lut[c * PROB_SCALE + slot];
    xs = (((e >> 8) & 0xFFF) + 1) * (xs >> PROB_BITS) + slot - (e >> 20);
    /* renormalise without a branch (taken ~1 in 5, unpredictable) */
    uint32_t need = xs < RANS_L;
    uint32_t w;
    if (checked) { /* near the segment's end: read a zero past it and report the overrun */
        *overrun |= need & (ptr >= stop);
        w = *(ptr < stop ? ptr : &zero_word);
    } else {
        w = *ptr;
    }
    x[j] = (xs << (need << 4)) | (w & (0u - need)); /* need ? xs << 16 | w : xs, without a branch */
    *pp = ptr + need;
    /* DQ: r = 2k - c sgn(k) (the recon table); next state = c + 2 ((state ^ k) & 1) */
    *out = dq ? recon[(c << 8) | (e & 0xFF)] : (int8_t)(e & 0xFF);
    if (dq) st[j] = (uint8_t)(c + (((st_j ^ e) & 1) << 1));
}

/* ------------------------------------------------------------------------------------ */
/* SSE4.1: four lanes per vector, the same integer steps as decode_symbol (so the same   */
/* output, bit for bit). Only the unchecked rounds run here (each round has >= G words   */
/* left, and a group of 4 lanes reads at most 4); the checked tail stays scalar. Lane j  */
/* of a group takes the k-th word of the group's words, k = the lanes before it that     */
/* renormalise (a shuffle picked by the 4-bit mask of renormalising lanes).              */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VC_SIMD 1

static int simd_mode = -1; /* -1: not decided yet; 0: scalar; 1: SSE4.1 (atomic loads and stores) */

static int simd_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.1") && __builtin_cpu_supports("popcnt");
}

/* Decode rounds while a full round has >= G words left; returns the rounds done. G % 4 == 0. */
__attribute__((target("sse4.1,popcnt"))) static inline __attribute__((always_inline)) int64_t
simd_body(int dq, int G, int64_t full, uint32_t *restrict x, uint8_t *restrict st, const uint16_t **pp,
          const uint16_t *stop, const uint32_t *restrict lut, int8_t *restrict out) {
    uint8_t shuf[16][16] __attribute__((aligned(16)));
    for (int m = 0; m < 16; m++)
        for (int j = 0, w = 0; j < 4; j++) {
            int need = (m >> j) & 1;
            shuf[m][4 * j + 0] = need ? (uint8_t)(2 * w) : 0x80;
            shuf[m][4 * j + 1] = need ? (uint8_t)(2 * w + 1) : 0x80;
            shuf[m][4 * j + 2] = shuf[m][4 * j + 3] = 0x80;
            w += need;
        }
    uint32_t stw[MAX_LANES];
    for (int j = 0; j < G; j++) stw[j] = st[j];
    const __m128i low12 = _mm_set1_epi32(PROB_SCALE - 1), mask12 = _mm_set1_epi32(0xFFF);
    const __m128i one = _mm_set1_epi32(1), zero = _mm_setzero_si128();
    const __m128i bytes = _mm_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const uint16_t *ptr = *pp;
    int64_t t = 0;
    for (; t < full && stop - ptr >= G; t++, out += G) {
        for (int j = 0; j < G; j += 4) {
            __m128i xs = _mm_loadu_si128((const __m128i *)(x + j));
            __m128i slot = _mm_and_si128(xs, low12), idx = slot, c = zero, stv = zero;
            if (dq) {
                stv = _mm_loadu_si128((const __m128i *)(stw + j));
                c = _mm_srli_epi32(stv, 1);
                idx = _mm_or_si128(_mm_slli_epi32(c, PROB_BITS), slot);
            }
            /* unsigned indices: no sign extension before the four loads */
            uint32_t i0 = (uint32_t)_mm_cvtsi128_si32(idx), i1 = (uint32_t)_mm_extract_epi32(idx, 1);
            uint32_t i2 = (uint32_t)_mm_extract_epi32(idx, 2), i3 = (uint32_t)_mm_extract_epi32(idx, 3);
            __m128i e = _mm_setr_epi32((int)lut[i0], (int)lut[i1], (int)lut[i2], (int)lut[i3]);
            __m128i freq = _mm_add_epi32(_mm_and_si128(_mm_srli_epi32(e, 8), mask12), one);
            xs = _mm_mullo_epi32(freq, _mm_srli_epi32(xs, PROB_BITS));
            xs = _mm_sub_epi32(_mm_add_epi32(xs, slot), _mm_srli_epi32(e, 20));
            __m128i need = _mm_cmpeq_epi32(_mm_srli_epi32(xs, 16), zero); /* xs < 2^16 */
            int m = _mm_movemask_ps(_mm_castsi128_ps(need));
            __m128i w = _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)ptr),
                                         _mm_load_si128((const __m128i *)shuf[m]));
            xs = _mm_blendv_epi8(xs, _mm_or_si128(_mm_slli_epi32(xs, 16), w), need);
            _mm_storeu_si128((__m128i *)(x + j), xs);
            ptr += _mm_popcnt_u32((unsigned)m);
            __m128i r = e; /* the low byte of each lane is the output */
            if (dq) {
                __m128i k = _mm_srai_epi32(_mm_slli_epi32(e, 24), 24);
                r = _mm_sub_epi32(_mm_add_epi32(k, k), _mm_sign_epi32(c, k)); /* 2k - c sgn(k) */
                stv = _mm_add_epi32(c, _mm_slli_epi32(_mm_and_si128(_mm_xor_si128(stv, e), one), 1));
                _mm_storeu_si128((__m128i *)(stw + j), stv);
            }
            uint32_t four = (uint32_t)_mm_cvtsi128_si32(_mm_shuffle_epi8(r, bytes)); /* truncates, as the cast */
            memcpy(out + j, &four, 4);
        }
    }
    for (int j = 0; j < G; j++) st[j] = (uint8_t)stw[j];
    *pp = ptr;
    return t;
}

/* The body specialised for the encoder's default 32 lanes (unrolled) and for any G % 4 == 0. */
__attribute__((target("sse4.1,popcnt"), noinline)) static int64_t
simd_rounds(int dq, int G, int64_t full, uint32_t *x, uint8_t *st, const uint16_t **pp, const uint16_t *stop,
            const uint32_t *lut, int8_t *out) {
    if (dq && G == 32) return simd_body(1, 32, full, x, st, pp, stop, lut, out);
    if (!dq && G == 32) return simd_body(0, 32, full, x, st, pp, stop, lut, out);
    return dq ? simd_body(1, G, full, x, st, pp, stop, lut, out) : simd_body(0, G, full, x, st, pp, stop, lut, out);
}

/* Whether the SSE4.1 rounds run: mode -1 asks, 0 turns them off, 1 on where the CPU has SSE4.1
 * (tests compare both paths). Returns the mode now in effect. */
int vc_rans_simd(int mode) {
    int now = __atomic_load_n(&simd_mode, __ATOMIC_RELAXED);
    if (mode >= 0 || now < 0) {
        now = (mode != 0) && simd_supported();
        __atomic_store_n(&simd_mode, now, __ATOMIC_RELAXED);
    }
    return now;
}
#else
int vc_rans_simd(int mode) {
    (void)mode;
    return 0;
}
#endif

/* The segment's symbols [s0, s1) over G lanes; returns the overrun flag. */
static inline __attribute__((always_inline)) uint32_t decode_lanes(int dq, int G, int64_t s0, int64_t s1,
                                                                   uint32_t *x, uint8_t *st,
                                                                   const uint16_t **pp, const uint16_t *stop,
                                                                   const uint32_t *lut, const int8_t *recon,
                                                                   int8_t *out, int simd) {
    uint32_t overrun = 0;
    int64_t full = (s1 - s0) / G, i = s0, t = 0;
#ifdef VC_SIMD
    if (simd && G % 4 == 0) {
        t = simd_rounds(dq, G, full, x, st, pp, stop, lut, out + s0);
        i += t * G;
    }
#else
    (void)simd;
#endif
    for (; t < full && stop - *pp >= G; t++, i += G) /* most rounds: no bounds checks */
        for (int j = 0; j < G; j++) decode_symbol(dq, 0, j, x, st, pp, stop, &overrun, lut, recon, out + i + j);
    for (; t <= full; t++) { /* the last rounds of the segment, checked */
        int lanes = t < full ? G : (int)(s1 - i);
        for (int j = 0; j < lanes; j++, i++) decode_symbol(dq, 1, j, x, st, pp, stop, &overrun, lut, recon, out + i);
    }
    return overrun;
}

/* Decode segments [seg_lo, seg_hi) into reconstruction integers (int8).
 * lut: [ctx][4096] entries  (uint8)k | (freq - 1) << 8 | cum << 20.  dq: 0 scalar, 1 DQ. */
int vc_rans_decode(const uint16_t *words, int64_t n_words, const uint32_t *seg_end, int64_t n_seg, int64_t n, int G,
                   int64_t lane_len, const uint32_t *lut, int dq, int8_t *out, int64_t seg_lo, int64_t seg_hi) {
    int64_t seg_len = (int64_t)G * lane_len;
    uint32_t x[MAX_LANES];
    uint8_t st[MAX_LANES];
    int8_t recon[2 * 256]; /* [c][(uint8)k] -> 2k - c sgn(k) */
    if (G < 1 || G > MAX_LANES || seg_lo < 0 || seg_hi > n_seg || seg_lo > seg_hi) return ERR_BAD_SIZES;
    int simd = vc_rans_simd(-1);
    for (int c = 0; c < 2; c++)
        for (int b = 0; b < 256; b++) {
            int kk = (int8_t)b;
            recon[(c << 8) | b] = (int8_t)(2 * kk - c * sgn(kk));
        }
    for (int64_t s = seg_lo; s < seg_hi; s++) {
        int64_t start = s ? seg_end[s - 1] : 0, end = seg_end[s];
        int64_t s0 = s * seg_len, s1 = s0 + seg_len < n ? s0 + seg_len : n;
        if (start > end || end > n_words || end - start < 2 * (int64_t)G || s0 >= n) return ERR_BAD_SIZES;
        const uint16_t *ptr = words + start, *stop = words + end;
        for (int j = 0; j < G; j++) {
            x[j] = (uint32_t)ptr[0] | ((uint32_t)ptr[1] << 16);
            ptr += 2;
            st[j] = 0;
        }
        uint32_t overrun;
        /* constant lane counts (the encoder's default is 32) let the compiler unroll the lanes */
        if (dq && G == 32) overrun = decode_lanes(1, 32, s0, s1, x, st, &ptr, stop, lut, recon, out, simd);
        else if (!dq && G == 32) overrun = decode_lanes(0, 32, s0, s1, x, st, &ptr, stop, lut, recon, out, simd);
        else if (dq) overrun = decode_lanes(1, G, s0, s1, x, st, &ptr, stop, lut, recon, out, simd);
        else overrun = decode_lanes(0, G, s0, s1, x, st, &ptr, stop, lut, recon, out, simd);
        if (overrun) return ERR_OVERRUN;
        if (ptr != stop) return ERR_LEFTOVER;
        for (int j = 0; j < G; j++)
            if (x[j] != RANS_L) return ERR_FINAL_STATE;
    }
    return 0;
}

/* Decode `count` independent streams in one call (the KV cache decodes all of a layer's blocks at
 * every step): stream i has its own words, segment offsets, table and output; all share G, L, dq
 * and n. Returns 0, or (index of the first bad stream) * 16 + its error code. */
int vc_rans_decode_many(int64_t count, const uint16_t *const *words, const int64_t *n_words,
                        const uint32_t *const *seg_end, int64_t n_seg, int64_t n, int G, int64_t lane_len,
                        const uint32_t *const *lut, int dq, int8_t *const *out) {
    for (int64_t i = 0; i < count; i++) {
        int rc = vc_rans_decode(words[i], n_words[i], seg_end[i], n_seg, n, G, lane_len, lut[i], dq, out[i], 0, n_seg);
        if (rc) return (int)(i * 16 + rc);
    }
    return 0;
}
