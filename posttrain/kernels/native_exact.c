/* CPU kernels in float32 that give torch's own ops' numbers bit for bit, built and loaded by kernels/native.py
 * (compiled with -ffp-contract=off: every fused multiply-add below is written out, as torch's kernels do it).
 *
 * The SwiGLU MLP's elementwise work (rl/swiglu.py), per element of g, u (and dh in the backward):
 *   forward   h = silu(g) * u
 *   backward  h = silu(g) * u,  dg = silu_backward(dh * u, g),  du = dh * silu(g)
 * which torch runs as two ops forward and five backward, a pass over n floats each; here one pass each way.
 *
 * torch's CPU silu is x / (1 + exp(-x)) and its backward dy s fma(x, 1 - s, 1) with s = 1 / (1 + exp(-x)); its
 * vectorised loops take exp from SLEEF's expf_u10 (range reduction by ln 2 in two parts, a degree-6 polynomial,
 * all by fused multiply-adds) and the scalar remainder of each chunk from libm's expf. Which elements are the
 * remainder follows from torch's elementwise loop: the n elements are cut into T chunks of ceil(n / T)
 * (T = min(threads, ceil(n / 32768)); one chunk when n <= 32768), and each chunk is vectorised in blocks of
 * `block` elements (32 with AVX-512, 16 with AVX2), the last (chunk length mod block) elements by the scalar op.
 * native.py checks these numbers against torch's before it uses them.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus /* CC=g++: the names stay unmangled */
extern "C" {
#endif

static inline float bits_to_float(int32_t i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}

/* SLEEF's expf_u10: 0 below -104, inf above 100. The clamp only keeps q's conversion defined (NaN, huge d):
 * within [-104, 100] it changes nothing, and outside it the two selects decide. */
static inline float sleef_expf(float d) {
    float dc = d > -104.0f ? d : -104.0f;
    dc = dc < 100.0f ? dc : 100.0f;
    float qf = rintf(dc * 1.442695040888963407359924681001892137426645954152985934135449406931f);
    int32_t q = (int32_t)qf;
    float s = fmaf(qf, -0.693145751953125f, d);
    s = fmaf(qf, -1.428606765330187045e-06f, s);
    float u = 0.000198527617612853646278381f;
    u = fmaf(u, s, 0.00139304355252534151077271f);
    u = fmaf(u, s, 0.00833336077630519866943359f);
    u = fmaf(u, s, 0.0416664853692054748535156f);
    u = fmaf(u, s, 0.166666671633720397949219f);
    u = fmaf(u, s, 0.5f);
    u = 1.0f + fmaf(s * s, u, s);
    int32_t h = q >> 1; /* 2^q as two factors, so that neither overflows */
    u = u * bits_to_float((h + 127) << 23) * bits_to_float((q - h + 127) << 23);
    u = d < -104.0f ? 0.0f : u;
    return d > 100.0f ? INFINITY : u;
}

/* e = exp(-g[i]) from the vectorised or the scalar exp, as torch would take it for element i */
static inline void forward_one(const float *g, const float *u, float *h, int64_t i, float e) {
    h[i] = (g[i] / (1.0f + e)) * u[i];
}

/* du may be u itself: every input is read before an output is written. h may be NULL (not wanted). */
static inline void backward_one(const float *g, const float *u, float *dh, float *h, float *du, int64_t i, float e) {
    float x = g[i], ui = u[i], a = x / (1.0f + e), s = 1.0f / (1.0f + e), d = dh[i];
    if (h) h[i] = a * ui;
    du[i] = d * a;
    dh[i] = d * ui * s * fmaf(x, 1.0f - s, 1.0f); /* dg, in dh's place */
}

static int64_t chunk_length(int64_t n, int torch_threads) {
    const int64_t grain = 32768;
    if (n <= grain || torch_threads <= 1) return n;
    int64_t t = (n + grain - 1) / grain;
    if (t > torch_threads) t = torch_threads;
    return (n + t - 1) / t;
}

/* h (n,) = silu(g) * u. */
void swiglu_forward(const float *g, const float *u, float *h, int64_t n, int torch_threads, int block, int nthreads) {
    int64_t c = chunk_length(n, torch_threads);
    for (int64_t b = 0; b < n; b += c) {
        int64_t e = b + c < n ? b + c : n, v = b + (e - b) / block * block;
#pragma omp parallel for simd num_threads(nthreads) schedule(static) if (v - b > 65536)
        for (int64_t i = b; i < v; i++) forward_one(g, u, h, i, sleef_expf(-g[i]));
        for (int64_t i = v; i < e; i++) forward_one(g, u, h, i, expf(-g[i]));
    }
}

/* In: g, u, dh (n,). Out: h = silu(g) * u (unless h is NULL), du (which may be u), and dg over dh. */
void swiglu_backward(const float *g, const float *u, float *dh, float *h, float *du, int64_t n, int torch_threads,
                     int block, int nthreads) {
    int64_t c = chunk_length(n, torch_threads);
    for (int64_t b = 0; b < n; b += c) {
        int64_t e = b + c < n ? b + c : n, v = b + (e - b) / block * block;
#pragma omp parallel for simd num_threads(nthreads) schedule(static) if (v - b > 65536)
        for (int64_t i = b; i < v; i++) backward_one(g, u, dh, h, du, i, sleef_expf(-g[i]));
        for (int64_t i = v; i < e; i++) backward_one(g, u, dh, h, du, i, expf(-g[i]));
    }
}


/* The Llama family's RMSNorm (rl/rmsnorm.py): y = w * (x * rsqrt(mean(x^2) + eps)) over each row of n floats,
 * torch's ops' numbers: x.pow(2) is x * x, mean is the sum divided by n, rsqrt is 1 / sqrt, each rounded as it
 * is written here. The sum is torch's cascade_sum for a contiguous inner reduction: vectors of 8 floats, four
 * vector accumulators over groups of four vectors (summed in levels every 16 groups), the leftover vectors into
 * the first accumulator, the accumulators into the first, then the leftover floats and the 8 lanes in turn. */
#define SUM_LANES 8
#define SUM_ILP 4
#define SUM_LEVELS 4
#define SUM_LEVEL_POWER 4 /* max(4, ceil(log2(groups)) / 4): 4 below 2^16 groups, i.e. rows under 2^21 floats */

static float torch_row_sum(const float *x, int64_t n) {
    int64_t nvec = n / SUM_LANES, groups = nvec / SUM_ILP, i = 0;
    const int64_t step = (int64_t)1 << SUM_LEVEL_POWER, mask = step - 1;
    float acc[SUM_LEVELS][SUM_ILP][SUM_LANES] = {{{0}}};
    while (i + step <= groups) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < SUM_ILP; k++)
                for (int l = 0; l < SUM_LANES; l++) acc[0][k][l] += x[(i * SUM_ILP + k) * SUM_LANES + l];
        for (int j = 1; j < SUM_LEVELS; j++) {
            for (int k = 0; k < SUM_ILP; k++)
                for (int l = 0; l < SUM_LANES; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if ((i & (mask << (j * SUM_LEVEL_POWER))) != 0) break;
        }
    }
    for (; i < groups; i++)
        for (int k = 0; k < SUM_ILP; k++)
            for (int l = 0; l < SUM_LANES; l++) acc[0][k][l] += x[(i * SUM_ILP + k) * SUM_LANES + l];
    for (int j = 1; j < SUM_LEVELS; j++)
        for (int k = 0; k < SUM_ILP; k++)
            for (int l = 0; l < SUM_LANES; l++) acc[0][k][l] += acc[j][k][l];
    for (int64_t v = groups * SUM_ILP; v < nvec; v++)
        for (int l = 0; l < SUM_LANES; l++) acc[0][0][l] += x[v * SUM_LANES + l];
    for (int k = 1; k < SUM_ILP; k++)
        for (int l = 0; l < SUM_LANES; l++) acc[0][0][l] += acc[0][k][l];
    float total = 0.0f;
    for (int64_t t = nvec * SUM_LANES; t < n; t++) total += x[t];
    for (int l = 0; l < SUM_LANES; l++) total += acc[0][0][l];
    return total;
}

/* In: x (rows, n), w (n,). Out: y (rows, n), r (rows,) = rsqrt(mean(x^2) + eps). */
void rmsnorm_forward(const float *x, const float *w, float *y, float *r, int64_t rows, int64_t n, float eps,
                     int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows * n > 65536)
    for (int64_t row = 0; row < rows; row++) {
        const float *xr = x + row * n;
        float *yr = y + row * n;
        for (int64_t i = 0; i < n; i++) yr[i] = xr[i] * xr[i]; /* y's row holds x^2 until it is summed */
        float rr = 1.0f / sqrtf(torch_row_sum(yr, n) / (float)n + eps);
        r[row] = rr;
        for (int64_t i = 0; i < n; i++) yr[i] = w[i] * (xr[i] * rr);
    }
}

/* The backward autograd runs through those ops, given dy: x's gradient in its two parts, through x * r (gmul)
 * and through x^2 (gpow), which autograd adds into x's gradient one after the other; and prod = dy * (x * r)
 * (NULL: not wanted), whose sum over the rows (torch's, in the caller) is w's gradient. gpow's row holds
 * dy w x until it is summed. */
void rmsnorm_backward(const float *dy, const float *x, const float *r, const float *w, float *gmul, float *gpow,
                      float *prod, int64_t rows, int64_t n, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows * n > 65536)
    for (int64_t row = 0; row < rows; row++) {
        const float *dyr = dy + row * n, *xr = x + row * n;
        float *gm = gmul + row * n, *gp = gpow + row * n, rr = r[row];
        if (prod != NULL)
            for (int64_t i = 0; i < n; i++) prod[row * n + i] = dyr[i] * (xr[i] * rr);
        for (int64_t i = 0; i < n; i++) {
            float dh = dyr[i] * w[i];
            gm[i] = dh * rr;
            gp[i] = dh * xr[i];
        }
        float dr = torch_row_sum(gp, n);
        float dmean = ((-0.5f * dr) * ((rr * rr) * rr)) / (float)n;
        for (int64_t i = 0; i < n; i++) gp[i] = dmean * (2.0f * xr[i]);
    }
}

/* The Llama family's rotary embedding (rl/rope.py): out = x * cos + rotate_half(x) * sin, with rotate_half(x) =
 * (-x[half:], x[:half]), over rows of d floats. x (and out, laid out as x) is (b, h, t, d) with strides xs (in
 * floats; the last 1); cos and sin (b or 1, t, d) with strides cs for b and t. */
void rope_forward(const float *x, const float *cos, const float *sin, float *out, int64_t nb, int64_t nh,
                  int64_t nt, int64_t d, const int64_t *xs, const int64_t *cs, int nthreads) {
    int64_t half = d / 2;
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static) if (nb * nh * nt * d > 65536)
    for (int64_t b = 0; b < nb; b++)
        for (int64_t h = 0; h < nh; h++)
            for (int64_t t = 0; t < nt; t++) {
                const float *xr = x + b * xs[0] + h * xs[1] + t * xs[2];
                const float *c = cos + b * cs[0] + t * cs[1], *s = sin + b * cs[0] + t * cs[1];
                float *o = out + b * xs[0] + h * xs[1] + t * xs[2];
                for (int64_t i = 0; i < half; i++) o[i] = xr[i] * c[i] + (-xr[i + half]) * s[i];
                for (int64_t i = half; i < d; i++) o[i] = xr[i] * c[i] + xr[i - half] * s[i];
            }
}

/* x's gradient (b, h, t, d) contiguous, given dout with strides gs: autograd adds the rotation's part (dout * sin
 * moved back by rotate_half's slices into a zero tensor, so a -0 becomes +0) and then dout * cos. */
void rope_backward(const float *g, const float *cos, const float *sin, float *gx, int64_t nb, int64_t nh,
                   int64_t nt, int64_t d, const int64_t *gs, const int64_t *cs, int nthreads) {
    int64_t half = d / 2;
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static) if (nb * nh * nt * d > 65536)
    for (int64_t b = 0; b < nb; b++)
        for (int64_t h = 0; h < nh; h++)
            for (int64_t t = 0; t < nt; t++) {
                const float *gr = g + b * gs[0] + h * gs[1] + t * gs[2];
                const float *c = cos + b * cs[0] + t * cs[1], *s = sin + b * cs[0] + t * cs[1];
                float *o = gx + ((b * nh + h) * nt + t) * d;
                for (int64_t i = 0; i < half; i++) o[i] = (gr[i + half] * s[i + half] + 0.0f) + gr[i] * c[i];
                for (int64_t i = half; i < d; i++) o[i] = (-(gr[i - half] * s[i - half]) + 0.0f) + gr[i] * c[i];
            }
}

#ifdef __cplusplus
}
#endif
