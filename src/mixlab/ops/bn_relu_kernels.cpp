// Training-mode BatchNorm followed by ReLU on channels-last maps (CPU):   y = relu(bn(x))
//
// The conv-BN-ReLU unit of ConvMLP's tokenizer and convolutional stage and of the VGG-BN
// baselines. In aten it is BatchNorm's statistics and normalisation passes, ReLU's pass, and in
// the backward ReLU's mask pass and BatchNorm's two: about 9.8 ms for one of ConvMLP-S's
// 32x32x112x112 bf16 maps on 2 EPYC cores (an add over the same map: 0.85 ms). Here the forward
// is the statistics pass and one pass that normalises and applies ReLU (the rounding to bf16 and
// ReLU commute); the backward reads x and dy twice (ReLU's mask recomputed from x, as the forward
// computed it): once for BatchNorm's sums of dy and dy * (x - mean) where ReLU passed the
// gradient, once for dx. (Reading the saved output for the mask instead cost a third stream.)
//
// x is fp32 or bf16 (bf16 read as uint16 and widened by a shift, written back rounded to nearest
// even); all arithmetic fp32, channel sums fp64 (channel_sums.h). Built by
// mixlab/ops/kernel_build.py, called through ctypes on data pointers, threads from torch's own
// OpenMP pool.
#include <omp.h>
#include <cstdint>

#include "bf16_scalar.h"
#include "channel_sums.h"

namespace {

using mixlab_bf16::store;
using mixlab_bf16::widen;
using mixlab_sums::bn_stats;
using mixlab_sums::stored_value;
using mixlab_sums::sums_any_width;

// ReLU's mask as aten takes it from the stored output: y > 0, NaN passing
template <typename T>
inline bool passes(float v) { return !(stored_value<T>(v) <= 0.f); }

// y = relu(x * scale + shift - center * scale): ReLU's mask as aten's (NaN passes)
template <typename T>
int bn_relu_fwd(const T* x, T* y, const float* center, const float* scale, const float* shift, long M, long C,
                int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < M; ++r) {
        const T* xr = x + r * C;
        T* yr = y + r * C;
#pragma omp simd
        for (long c = 0; c < C; ++c) {
            const float v = (widen(xr[c]) - center[c]) * scale[c] + shift[c];
            store(yr + c, !(v <= 0.f) ? v : 0.f);
        }
    }
    return 0;
}

template <typename T>
struct MaskedGradMoments {  // dy where ReLU passed it, and that times x - center
    const T* x;
    const T* dy;
    const float* center;
    const float* scale;
    const float* shift;
    long C;
    void add(long r, long c, float& a, float& b) const {
        const long i = r * C + c;
        const float xc = widen(x[i]) - center[c];
        const float g = widen(dy[i]);  // loaded whatever the mask: a masked load is slow
        const float d = passes<T>(xc * scale[c] + shift[c]) ? g : 0.f;
        a += d;
        b += d * xc;
    }
};

template <typename T>
int bn_relu_bwd_stats(const T* x, const T* dy, const float* center, const float* scale, const float* shift, long M,
                      long C, double* sum_dy, double* sum_dy_x, int nthreads) {
    // (sums_any_width tiles `center` for narrow maps; scale and shift are tiled alike below)
    if (C < mixlab_sums::CB && mixlab_sums::CB % C == 0) {
        constexpr long CB = mixlab_sums::CB;
        float sc[CB], sh[CB];
        for (long j = 0; j < CB; ++j) {
            sc[j] = scale[j % C];
            sh[j] = shift[j % C];
        }
        return sums_any_width(MaskedGradMoments<T>{x, dy, center, sc, sh, C}, M, C, sum_dy, sum_dy_x, nthreads);
    }
    return sums_any_width(MaskedGradMoments<T>{x, dy, center, scale, shift, C}, M, C, sum_dy, sum_dy_x, nthreads);
}

// dx = k1 * dy' + k2 * (x - center) + k3, dy' = dy where ReLU passed it
template <typename T>
int bn_relu_bwd_apply(const T* x, const T* dy, T* dx, const float* center, const float* scale, const float* shift,
                      long M, long C, const float* k1, const float* k2, const float* k3, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < M; ++r) {
        const long o = r * C;
#pragma omp simd
        for (long c = 0; c < C; ++c) {
            const float xc = widen(x[o + c]) - center[c];
            const float g = widen(dy[o + c]);
            const float d = passes<T>(xc * scale[c] + shift[c]) ? g : 0.f;
            store(dx + o + c, k1[c] * d + k2[c] * xc + k3[c]);
        }
    }
    return 0;
}

}  // namespace

extern "C" {

int mixlab_bn_relu_abi_version(void) { return 1; }

#define MIXLAB_BN_RELU(SFX, T)                                                                                       \
    int mixlab_bn_relu_stats_##SFX(const void* x, const float* center, long M, long C, double* s, double* ss,       \
                                   int nt) {                                                                       \
        return bn_stats(static_cast<const T*>(x), center, M, C, s, ss, nt);                                        \
    }                                                                                                              \
    int mixlab_bn_relu_fwd_##SFX(const void* x, void* y, const float* center, const float* a, const float* b,      \
                                 long M, long C, int nt) {                                                         \
        return bn_relu_fwd(static_cast<const T*>(x), static_cast<T*>(y), center, a, b, M, C, nt);                 \
    }                                                                                                              \
    int mixlab_bn_relu_bwd_stats_##SFX(const void* x, const void* dy, const float* center, const float* a,       \
                                       const float* b, long M, long C, double* s, double* sx, int nt) {            \
        return bn_relu_bwd_stats(static_cast<const T*>(x), static_cast<const T*>(dy), center, a, b, M, C, s, sx,  \
                                 nt);                                                                              \
    }                                                                                                              \
    int mixlab_bn_relu_bwd_apply_##SFX(const void* x, const void* dy, void* dx, const float* center,              \
                                       const float* a, const float* b, long M, long C, const float* k1,            \
                                       const float* k2, const float* k3, int nt) {                                 \
        return bn_relu_bwd_apply(static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dx), center, \
                                 a, b, M, C, k1, k2, k3, nt);                                                      \
    }
MIXLAB_BN_RELU(f32, float)
MIXLAB_BN_RELU(bf16, uint16_t)
#undef MIXLAB_BN_RELU

}  // extern "C"
