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

static inline void backward_one(const float *g, const float *u, float *dh, float *h, float *du, int64_t i, float e) {
    float a = g[i] / (1.0f + e), s = 1.0f / (1.0f + e), d = dh[i];
    h[i] = a * u[i];
    du[i] = d * a;
    dh[i] = d * u[i] * s * fmaf(g[i], 1.0f - s, 1.0f); /* dg, in dh's place */
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

/* In: g, u, dh (n,). Out: h = silu(g) * u, du, and dg over dh. */
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

#ifdef __cplusplus
}
#endif
