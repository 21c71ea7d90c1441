/* CPU kernels in float32, built and loaded by kernels/native.py: the output layer's folds, kernels/hidden.py's
 * `_fold_forward_torch` and `_fold_backward_torch` (no softcap), in one pass per tile row.
 *
 * Notation and math as in kernels/hidden.py: a tile a (R, C) of logits u (row stride lda), vocabulary
 * columns c0 .. c0 + C, z = k u, per row the running max m (in u units), s = sum exp(d), t = sum exp(d) d, with
 * d = k (u - ref) and ref the running max (0 while it is -inf). The torch folds make five to nine passes over
 * the tile, each an op with its own dispatch; here each row (4 KiB at C = 1024, in L1) is read twice, once for
 * its max and sum, once for the exponentials, and the rows are split between OpenMP threads.
 *
 * exp is Cephes' expf (range reduction by ln 2, a degree-7 polynomial, within 1 ulp of float64 over [-80, 0]),
 * written branch-free so that the compiler vectorises the loops; 0 below -87, where float32's exp underflows,
 * exp(88) above 88, and NaN for NaN.
 */
#include <math.h>
#include <stdint.h>

#ifdef __cplusplus /* CC=g++: the names stay unmangled */
extern "C" {
#endif

static inline float exp_f32(float x) {
    float xc = x != x ? 0.0f : (x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x)); /* the folds' x is <= 0 */
    float n = xc * 1.44269504088896341f;
    n = (n + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    float y = p * scale.f;
    return x != x ? x : (x < -87.0f ? 0.0f : y);
}

/* The first column of row u (C entries) holding v, which the row has. */
static inline int64_t first_index(const float *u, int64_t C, float v) {
    int64_t j = 0;
    while (j < C - 1 && u[j] != v) j++;
    return j;
}

/* Fold the tile's rows into the running statistics (R,) in place. t, arg, u_sum and sq may be NULL (not
 * wanted). A row holding NaN or +inf gets the torch fold's numbers: m NaN or +inf (its arg-max then the first
 * +inf), s, t and sq NaN. */
void fold_forward(const float *a, int64_t R, int64_t C, int64_t lda, const int64_t *index, int64_t c0, float k,
                  float *m, float *s, float *t, float *target, int64_t *arg, float *u_sum, float *sq,
                  int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < R; i++) {
        const float *u = a + i * lda;
        float tile_max = -INFINITY, tile_sum = 0.0f;
#pragma omp simd reduction(max : tile_max) reduction(+ : tile_sum)
        for (int64_t c = 0; c < C; c++) {
            tile_max = u[c] > tile_max ? u[c] : tile_max;
            tile_sum += u[c];
        }
        if (u_sum) u_sum[i] += tile_sum;
        int64_t local = index[i] - c0;
        if (local >= 0 && local < C) target[i] = u[local];
        float m_old = m[i];
        if (!(tile_sum - tile_sum == 0.0f)) { /* not finite: NaN, +-inf, or finite logits whose sum overflowed */
            int has_nan = 0;
#pragma omp simd reduction(| : has_nan)
            for (int64_t c = 0; c < C; c++) has_nan |= u[c] != u[c];
            if (has_nan || tile_max == INFINITY) { /* torch's amax: NaN, else +inf, and d = inf - inf is NaN */
                if (!has_nan && arg && tile_max > m_old) arg[i] = c0 + first_index(u, C, tile_max);
                m[i] = has_nan ? NAN : (tile_max > m_old ? tile_max : m_old);
                s[i] = NAN;
                if (t) t[i] = NAN;
                if (sq) sq[i] = NAN;
                continue;
            }
        }
        /* strictly: an equal maximum in an earlier tile keeps its lower index */
        if (arg && tile_max > m_old) arg[i] = c0 + first_index(u, C, tile_max);
        float m_new = tile_max > m_old ? tile_max : m_old; /* m_old NaN stays NaN */
        float ref = m_new == -INFINITY ? 0.0f : m_new;
        float alpha = expf((m_old - ref) * k); /* 0 on the first tile (m_old = -inf) */
        float ts = 0.0f, tt = 0.0f, tq = 0.0f;
#pragma omp simd reduction(+ : ts, tt, tq)
        for (int64_t c = 0; c < C; c++) {
            float d = (u[c] - ref) * k;
            float e = exp_f32(d);
            ts += e;
            tt += e == 0.0f ? 0.0f : e * d; /* e d = 0, not NaN, where d = -inf */
            tq += e * e;
        }
        float s_old = s[i];
        if (t) t[i] = alpha * (t[i] + (s_old > 0.0f ? (m_old - ref) * k : 0.0f) * s_old) + tt;
        s[i] = s_old * alpha + ts;
        if (sq) sq[i] = sq[i] * (alpha * alpha) + tq;
        m[i] = m_new;
    }
}

/* Overwrite the tile with dL/da: -f p (g + ge (d - mu)) + f g at the target column, p = exp(d - log s),
 * f = dz/da. mu and ge are NULL without an entropy gradient. */
void fold_backward(float *a, int64_t R, int64_t C, int64_t lda, const int64_t *index, int64_t c0, float k,
                   float f, const float *ref, const float *log_s, const float *mu, const float *g,
                   const float *ge, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < R; i++) {
        float *u = a + i * lda;
        float r = ref[i], inv_s = expf(-log_s[i]);
        float cg = -g[i] * f * inv_s;
        if (ge) {
            float ce = -ge[i] * f * inv_s, mu_i = mu[i];
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                float d = (u[c] - r) * k;
                float e = exp_f32(d);
                u[c] = e * ((e == 0.0f ? 0.0f : d - mu_i) * ce + cg);
            }
        } else {
#pragma omp simd
            for (int64_t c = 0; c < C; c++) u[c] = exp_f32((u[c] - r) * k) * cg;
        }
        int64_t local = index[i] - c0;
        if (local >= 0 && local < C) u[local] += g[i] * f;
    }
}

#ifdef __cplusplus
}
#endif
