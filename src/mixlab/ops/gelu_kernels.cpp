// GELU on the CPU: fused with the training-mode BatchNorm that follows it, and alone.
//
// The pair, on channels-last tensors:
//
//   g = gelu(x) = x * Phi(x)      y = (g - mean_c) * rstd_c * gamma_c + beta_c
//
// with mean_c, rstd_c the batch statistics of g per channel c. x is (M, C) with C contiguous
// (an NHWC tensor: M = N*H*W), fp32 or bf16 (bf16 read as uint16 and widened by a shift, written
// back with round-to-nearest-even); all arithmetic is fp32, channel sums are kept in fp64.
//
// Why: ConvMixer applies GELU then BatchNorm to every convolution's output. In aten that is a
// GELU kernel, BatchNorm's statistics pass and its normalisation, and in the backward
// BatchNorm's two passes and GELU's gradient: about 10 ms per pair for one ConvMixer-256/8
// activation (128x256x16x16, bf16, 2 EPYC cores), 17 pairs a step. Fused, the forward computes
// g once (writing it out and summing it) and then normalises it; the backward sums dy and
// dy * g, then computes the input gradient with GELU's derivative. GELU is evaluated twice a
// step instead of three times (aten: forward, and both terms of its derivative), and the
// work, bound by GELU's arithmetic more than by memory here, is one pass less each way.
// benchmarks/bench_gelu_bn.py measures both.
//
// GELU is the exact (erf) form. erf comes from Abramowitz & Stegun 7.1.26 (absolute error
// below 1.5e-7) and exp from a range reduction to [-ln2/2, ln2/2] and a degree-7 Taylor
// polynomial, both branch-free so the channel loops vectorise; for bf16 tensors shorter forms
// (7.1.25, degree 5: absolute errors below 2.5e-5) save a fifth of the
// arithmetic (relative errors up to about 1% in the far negative tail, x < -3, where GELU is
// below 1e-3 in size). exp's argument is clamped at -80, so no subnormal number is produced
// (they are slow on x86).
//
// GELU alone (y = gelu(x), dx = dy * gelu'(x)) runs element by element with the same arithmetic:
// aten's bf16 GELU took 2.0 ms and its backward 3.1 ms on a 256x128x16x16 tensor where these
// take 1.4 and 1.5 ms (2 EPYC cores).
//
// Built by mixlab/ops/kernel_build.py, called through ctypes on data pointers, threads from
// torch's own OpenMP pool.
#include <omp.h>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "bf16_scalar.h"
#include "channel_sums.h"
#include "fast_math.h"

namespace {

using mixlab_bf16::store;
using mixlab_bf16::to_bf16;
using mixlab_bf16::widen;
using mixlab_sums::channel_sums;
using mixlab_sums::imin;
using mixlab_sums::stored_value;
using mixlab_math::exp_nonpos;

struct Phi {
    float cdf, pdf;
};

// Phi(v) (the normal CDF) and the normal density phi(v), from one exp (returned by value: a
// local whose address is taken inside an `omp simd` loop keeps the loop scalar). erf is
// Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), or 7.1.25 when Lite (below 2.5e-5;
// used for bf16 tensors only, where it is a relative error of up to ~1% only in the far negative
// tail, x < -3, where GELU is below 1e-3 in size).
template <bool Lite>
inline Phi phi_pair(float v) {
    const float z = v * 0.70710678118654752f;
    const float a = std::fabs(z);
    float poly;
    if (Lite) {
        const float t = 1.0f / (1.0f + 0.47047f * a);
        poly = t * (0.3480242f + t * (-0.0958798f + t * 0.7478556f));
    } else {
        const float t = 1.0f / (1.0f + 0.3275911f * a);
        poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    }
    const float e = exp_nonpos<Lite>(-z * z);
    const float erf_abs = 1.0f - poly * e;
    const float erf = std::copysign(erf_abs, z);
    return {0.5f + 0.5f * erf, e * 0.39894228040143268f};
}

template <typename T>
constexpr bool lite() { return std::is_same<T, uint16_t>::value; }

template <typename T>
inline float gelu(float v) { return v * phi_pair<lite<T>()>(v).cdf; }

// forward pass 1 terms: gelu(x) and gelu(x)^2; g = gelu(x) is also written out, so that pass 2
// is an affine map of it instead of a second GELU, and the backward's sums read it
template <typename T>
//
// Every sum and affine map is taken about a per-channel centre (`center`: a pivot near the mean
// for the statistics, then the mean itself), so that a channel whose mean is large next to its
// spread does not lose its variance to cancellation in fp32.
struct GeluMoments {
    const T* x;
    T* g;
    const float* center;
    long C;
    void add(long r, long c, float& a, float& b) const {
        const float v = stored_value<T>(gelu<T>(widen(x[r * C + c])));
        store(g + r * C + c, v);
        const float d = v - center[c];
        a += d;
        b += d * d;
    }
};

template <typename T>
int fwd_stats(const T* x, T* g, const float* center, long M, long C, double* sum, double* sumsq, int nthreads) {
    return channel_sums(GeluMoments<T>{x, g, center, C}, M, C, sum, sumsq, nthreads);
}

// forward pass 2: y = (g - center) * scale + shift (+ res, a residual summed in before the
// rounding, where the pair ends a residual branch: mixlab/ops/residual.py)
template <typename T>
int fwd_apply(const T* g, const T* res, T* y, const float* center, long M, long C, const float* scale,
              const float* shift, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < M; ++r) {
        const T* gr = g + r * C;
        T* yr = y + r * C;
        if (res) {
            const T* rr = res + r * C;
#pragma omp simd
            for (long c = 0; c < C; ++c)
                store(yr + c, (widen(gr[c]) - center[c]) * scale[c] + shift[c] + widen(rr[c]));
        } else {
#pragma omp simd
            for (long c = 0; c < C; ++c) store(yr + c, (widen(gr[c]) - center[c]) * scale[c] + shift[c]);
        }
    }
    return 0;
}

// backward pass 1 terms: dy and dy * g (g as the forward wrote it)
template <typename T>
struct GradMoments {
    const T* g;
    const T* dy;
    const float* center;
    long C;
    void add(long r, long c, float& a, float& b) const {
        const float d = widen(dy[r * C + c]);
        a += d;
        b += d * (widen(g[r * C + c]) - center[c]);
    }
};

template <typename T>
int bwd_stats(const T* g, const T* dy, const float* center, long M, long C, double* sum_dy, double* sum_dy_g,
              int nthreads) {
    return channel_sums(GradMoments<T>{g, dy, center, C}, M, C, sum_dy, sum_dy_g, nthreads);
}

// backward pass 2: dx = (k1 * dy + k2 * (g - center) + k3) * gelu'(x)
template <typename T>
int bwd_apply(const T* x, const T* g, const T* dy, T* dx, const float* center, long M, long C, const float* k1,
              const float* k2, const float* k3, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < M; ++r) {
        const T* xr = x + r * C;
        const T* gr = g + r * C;
        const T* dr = dy + r * C;
        T* out = dx + r * C;
#pragma omp simd
        for (long c = 0; c < C; ++c) {
            const float v = widen(xr[c]);
            const Phi f = phi_pair<lite<T>()>(v);
            const float dg = k1[c] * widen(dr[c]) + k2[c] * (widen(gr[c]) - center[c]) + k3[c];
            store(out + c, dg * (f.cdf + v * f.pdf));
        }
    }
    return 0;
}

// GELU alone (where no BatchNorm follows): y = gelu(x), dx = dy * gelu'(x), element by element
// over a tensor of any layout that is dense in memory
template <typename T>
int gelu_fwd(const T* x, T* y, long n, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for simd num_threads(nthreads) schedule(static)
    for (long i = 0; i < n; ++i) store(y + i, gelu<T>(widen(x[i])));
    return 0;
}

template <typename T>
int gelu_bwd(const T* x, const T* dy, T* dx, long n, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for simd num_threads(nthreads) schedule(static)
    for (long i = 0; i < n; ++i) {
        const float v = widen(x[i]);
        const Phi f = phi_pair<lite<T>()>(v);
        store(dx + i, widen(dy[i]) * (f.cdf + v * f.pdf));
    }
    return 0;
}

#if defined(__AVX512BF16__)
// bf16 GELU alone with the CPU's own fp32 -> bf16 conversion (AVX512-BF16: round to nearest even,
// one instruction per 16 values where the portable rounding takes seven): each thread computes a
// block of values into an fp32 buffer in L1 by the loops above, then stores it (store_row). The GELU
// alone is compute-bound here (its polynomial, exp and divide): Conv2Former-N's 256x128x32x32 map
// 5.4 -> 4.2 ms forward, 6.0 -> 4.9 ms backward on 2 EPYC cores. The results are the portable
// form's bit for bit, but for values below bf16's normal range, which the instruction flushes to zero.
constexpr long BLK = 512;

// out[i] = value(i) over n values, a block of BLK at a time in fp32, then rounded to bf16
template <typename F>
void in_bf16_blocks(uint16_t* out, long n, int nthreads, F value) {
    if (nthreads < 1) nthreads = 1;
    const long nb = (n + BLK - 1) / BLK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long b = 0; b < nb; ++b) {
        alignas(64) float buf[BLK];
        const long i0 = b * BLK, m = n - i0 < BLK ? n - i0 : BLK;
#pragma omp simd
        for (long j = 0; j < m; ++j) buf[j] = value(i0 + j);
        mixlab_bf16::store_row(out + i0, buf, m);
    }
}
template <>
int gelu_fwd<uint16_t>(const uint16_t* x, uint16_t* y, long n, int nthreads) {
    in_bf16_blocks(y, n, nthreads, [x](long i) { return gelu<uint16_t>(widen(x[i])); });
    return 0;
}
template <>
int gelu_bwd<uint16_t>(const uint16_t* x, const uint16_t* dy, uint16_t* dx, long n, int nthreads) {
    in_bf16_blocks(dx, n, nthreads, [x, dy](long i) {
        const float v = widen(x[i]);
        const Phi f = phi_pair<true>(v);
        return widen(dy[i]) * (f.cdf + v * f.pdf);
    });
    return 0;
}
#endif

}  // namespace

extern "C" {

int mixlab_gelu_bn_abi_version(void) { return 5; }

// the pair: `center` is a per-channel float array (see GeluMoments)
#define MIXLAB_PAIR(SFX, T)                                                                                          \
    int mixlab_gelu_bn_fwd_stats_##SFX(const void* x, void* g, const float* center, long M, long C, double* s,     \
                                       double* ss, int nt) {                                                       \
        return fwd_stats(static_cast<const T*>(x), static_cast<T*>(g), center, M, C, s, ss, nt);                   \
    }                                                                                                              \
    int mixlab_gelu_bn_fwd_apply_##SFX(const void* g, const void* res, void* y, const float* center, long M,       \
                                       long C, const float* a, const float* b, int nt) {                           \
        return fwd_apply(static_cast<const T*>(g), static_cast<const T*>(res), static_cast<T*>(y), center, M, C, a, \
                         b, nt);                                                                                   \
    }                                                                                                              \
    int mixlab_gelu_bn_bwd_stats_##SFX(const void* g, const void* dy, const float* center, long M, long C,         \
                                       double* s, double* sg, int nt) {                                            \
        return bwd_stats(static_cast<const T*>(g), static_cast<const T*>(dy), center, M, C, s, sg, nt);            \
    }                                                                                                              \
    int mixlab_gelu_bn_bwd_apply_##SFX(const void* x, const void* g, const void* dy, void* dx, const float* center, \
                                       long M, long C, const float* k1, const float* k2, const float* k3, int nt) { \
        return bwd_apply(static_cast<const T*>(x), static_cast<const T*>(g), static_cast<const T*>(dy),            \
                         static_cast<T*>(dx), center, M, C, k1, k2, k3, nt);                                       \
    }
MIXLAB_PAIR(f32, float)
MIXLAB_PAIR(bf16, uint16_t)
#undef MIXLAB_PAIR

int mixlab_gelu_fwd_f32(const void* x, void* y, long n, int nt) {
    return gelu_fwd(static_cast<const float*>(x), static_cast<float*>(y), n, nt);
}
int mixlab_gelu_fwd_bf16(const void* x, void* y, long n, int nt) {
    return gelu_fwd(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y), n, nt);
}
int mixlab_gelu_bwd_f32(const void* x, const void* dy, void* dx, long n, int nt) {
    return gelu_bwd(static_cast<const float*>(x), static_cast<const float*>(dy), static_cast<float*>(dx), n, nt);
}
int mixlab_gelu_bwd_bf16(const void* x, const void* dy, void* dx, long n, int nt) {
    return gelu_bwd(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(dy), static_cast<uint16_t*>(dx), n,
                    nt);
}

}  // extern "C"
