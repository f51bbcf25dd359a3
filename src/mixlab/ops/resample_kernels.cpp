// Resolution changes fused with what surrounds them, on channels-last maps (CPU):
//
// 1. BatchNorm (batch statistics) + 2x2 max-pool (stride 2) + ReLU:   y = relu(maxpool2(bn(x)))
//    UNeXt's three convolutional encoder stages. In aten that is BatchNorm's two passes over the
//    full-resolution map, the pool (which also writes int64 indices), ReLU, and in the backward
//    ReLU's mask, the pool's scatter into a zeroed full-size gradient and BatchNorm's two passes:
//    about 9.6 ms for UNeXt's first stage (8x16x256x256, bf16, 2 EPYC cores). Here the forward is
//    the statistics pass and one pass that normalises, pools and applies ReLU, writing the pooled
//    map, the window position of each maximum (4 where ReLU cut the gradient) and the input value
//    there; the backward sums dy and dy * (x - mean) from those quarter-size arrays alone (dy is
//    zero off the maxima) and computes the input gradient in one pass. (bf16 in, bf16 out: 10.2
//    against 5.1 ms forward + backward; benchmarks/bench_resample.py.)
//
// 2. BatchNorm + 2x bilinear upsampling + ReLU + a residual:   y = relu(upsample2(bn(x))) + skip
//    UNeXt's decoder stages; see the section below.
//
// 3. 2x bilinear upsampling (align_corners=False, as F.interpolate(scale_factor=2)) + ReLU + a
//    1x1 convolution to K channels:   y = conv1x1(relu(upsample2(x)))
//    UNeXt's head: the upsampled map (4x the input, C channels) is never written; each output
//    pixel interpolates its C values from the input (in cache), rounds them as the stored
//    tensor would be, applies ReLU and takes K dot products. The backward recomputes them per
//    output row, sums the weight and bias gradients, and sends each row's gradient through the
//    interpolation's transpose into fp32 rows of the input gradient that a thread owns (a band of
//    input rows; the two output rows at a band's edges are computed by both bands it touches).
//    (9.3 against 5.5 ms forward + backward for UNeXt's head at batch 8.)
//
// The channel loops get compile-time trip counts for UNeXt's narrow widths (8, 16, 32). x is fp32 or bf16 (bf16 read as uint16 and widened by a shift, written back rounded to nearest
// even); all arithmetic is fp32, channel sums fp64. Built by mixlab/ops/kernel_build.py, called
// through ctypes on data pointers, threads from torch's own OpenMP pool.
#include <omp.h>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "bf16_scalar.h"
#include "channel_sums.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

using mixlab_bf16::store;
using mixlab_bf16::widen;
using mixlab_sums::channel_sums;
using mixlab_sums::imin;
using mixlab_sums::bn_stats;
using mixlab_sums::stored_value;
using mixlab_sums::sums_any_width;

constexpr int CUT = 4;  // window position code: ReLU passed no gradient

// the window positions are kept in an integer as wide as the data's (int16 for bf16, int32 for
// fp32): with one-byte positions GCC vectorised the 16-channel loops in 128-bit pieces (5x slower)
template <typename T>
using Sel = typename std::conditional<sizeof(T) == 2, int16_t, int32_t>::type;

#if defined(__AVX512BF16__)
// 16 bf16 channels at a time with the CPU's own fp32 -> bf16 conversion (AVX512-BF16: round to
// nearest even in one instruction, where the portable rounding takes about six): these layers'
// loops are compute-bound on UNeXt's 16-160 channel maps (batch 8, bf16, forward + backward on 2 EPYC
// cores, benchmarks/bench_resample.py: encoder 1 4.6 -> 3.4 ms, the three decoder layers 3.2 -> 2.5,
// the head 5.6 -> 3.4). Used for bf16 maps whose channel count is a multiple of 16 (the head: 16
// channels to one output); NaN comes out as a NaN of the input's sign (the portable form's is positive).
inline __m512 ld16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m256i to16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
inline __m512 rounded16(__m512 v) {  // v as a stored bf16 holds it
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to16(v)), 16));
}
inline void st16(uint16_t* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to16(v)); }
inline __mmask16 relu_pass16(__m512 u) { return ~_mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_LE_OQ); }  // NaN passes
inline __m512 relu16(__m512 u) { return _mm512_maskz_mov_ps(relu_pass16(u), u); }  // +0 where u <= 0, as aten's
// a pixel's upsampled values from the vertical interpolation's row v (taps i0, i1), rounded as bf16
inline __m512 upsampled16(const float* v0, const float* v1, float l0, float l1) {
    return rounded16(_mm512_fmadd_ps(_mm512_set1_ps(l0), _mm512_loadu_ps(v0), _mm512_mul_ps(_mm512_set1_ps(l1), _mm512_loadu_ps(v1))));
}

// bn_pool_fwd's channel loop for 16 channels at c
inline void bn_pool_fwd16(const uint16_t* p0, const uint16_t* p1, const uint16_t* p2, const uint16_t* p3,
                          uint16_t* yo, int16_t* so, uint16_t* xo, const float* center, const float* scale,
                          const float* shift, long c) {
    const __m512 cen = _mm512_loadu_ps(center + c), sc = _mm512_loadu_ps(scale + c), sh = _mm512_loadu_ps(shift + c);
    const uint16_t* src[4] = {p0 + c, p1 + c, p2 + c, p3 + c};
    // the input's own 16 bits (widened) are kept for xsel: converting its fp32 value back would flush a
    // subnormal bf16 input to zero
    __m512i raw = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[0])));
    __m512 best = rounded16(_mm512_fmadd_ps(_mm512_sub_ps(_mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)), cen), sc, sh));
    __m512i bx = raw, k = _mm512_setzero_si512();
    for (int q = 1; q < 4; ++q) {  // a later value replaces the maximum when larger or NaN (aten's order)
        raw = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[q])));
        const __m512 v = rounded16(_mm512_fmadd_ps(_mm512_sub_ps(_mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)), cen), sc, sh));
        const __mmask16 t = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        best = _mm512_mask_blend_ps(t, best, v);
        bx = _mm512_mask_blend_epi32(t, bx, raw);
        k = _mm512_mask_blend_epi32(t, k, _mm512_set1_epi32(q));
    }
    const __mmask16 pass = ~_mm512_cmp_ps_mask(best, _mm512_setzero_ps(), _CMP_LE_OQ);  // NaN passes
    st16(yo + c, _mm512_maskz_mov_ps(pass, best));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(so + c),
                        _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(pass, _mm512_set1_epi32(CUT), k)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xo + c), _mm512_cvtepi32_epi16(bx));
}

// bn_pool_bwd_apply's channel loop for 16 channels at c
inline void bn_pool_bwd16(const uint16_t* x, const uint16_t* go, const int16_t* so, uint16_t* dx, long q0, long q2,
                          long C, const float* k1, const float* k2, const float* k3, const float* center, long c) {
    const __m512 gv = ld16(go + c);
    const __m512i s = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(so + c)));
    const __m512 a = _mm512_loadu_ps(k1 + c), b = _mm512_loadu_ps(k2 + c);
    const __m512 base = _mm512_fnmadd_ps(b, _mm512_loadu_ps(center + c), _mm512_loadu_ps(k3 + c));
    const long at[4] = {q0, q0 + C, q2, q2 + C};
    for (int q = 0; q < 4; ++q) {
        const __m512 d = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(s, _mm512_set1_epi32(q)), gv);
        st16(dx + at[q] + c, _mm512_fmadd_ps(a, d, _mm512_fmadd_ps(b, ld16(x + at[q] + c), base)));
    }
}
#else
#endif

// ----------------------------------------------------------------------------- BatchNorm + max-pool + ReLU

// v = bn(x) as the stored BatchNorm output would hold it; the maximum of the window's four in
// aten's order (row by row; a later value replaces the maximum when larger or NaN), then ReLU
// (NaN kept, as aten's). x is (N, H, W, C), H and W even; y, sel, xsel (N, H/2, W/2, C).
template <typename T, long CC>
int bn_pool_fwd(const T* x, T* y, Sel<T>* sel, T* xsel, const float* center, long N, long H, long W, long C_,
                const float* scale, const float* shift, int nthreads) {
    const long C = CC ? CC : C_;  // a compile-time channel count where there is one: straight-line channel loops
    if (nthreads < 1) nthreads = 1;
    const long Ho = H / 2, Wo = W / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long row = 0; row < N * Ho; ++row) {
        const long n = row / Ho, i = row % Ho;
        const T* r0 = x + (n * H + 2 * i) * W * C;
        const T* r1 = r0 + W * C;
        const long o = row * Wo * C;
        for (long j = 0; j < Wo; ++j) {
            const T* p0 = r0 + 2 * j * C;
            const T* p1 = p0 + C;
            const T* p2 = r1 + 2 * j * C;
            const T* p3 = p2 + C;
            T* yo = y + o + j * C;
            Sel<T>* so = sel + o + j * C;
            T* xo = xsel + o + j * C;
#if defined(__AVX512BF16__)
            if constexpr (std::is_same<T, uint16_t>::value) {
                if (C % 16 == 0) {
                    for (long c = 0; c < C; c += 16) bn_pool_fwd16(p0, p1, p2, p3, yo, so, xo, center, scale, shift, c);
                    continue;
                }
            }
#endif
#pragma omp simd
            for (long c = 0; c < C; ++c) {
                const float a0 = widen(p0[c]), a1 = widen(p1[c]), a2 = widen(p2[c]), a3 = widen(p3[c]);
                const float v0 = stored_value<T>((a0 - center[c]) * scale[c] + shift[c]);
                const float v1 = stored_value<T>((a1 - center[c]) * scale[c] + shift[c]);
                const float v2 = stored_value<T>((a2 - center[c]) * scale[c] + shift[c]);
                const float v3 = stored_value<T>((a3 - center[c]) * scale[c] + shift[c]);
                float best = v0, bx = a0;
                int k = 0;
                const bool t1 = v1 > best || v1 != v1;
                best = t1 ? v1 : best; bx = t1 ? a1 : bx; k = t1 ? 1 : k;
                const bool t2 = v2 > best || v2 != v2;
                best = t2 ? v2 : best; bx = t2 ? a2 : bx; k = t2 ? 2 : k;
                const bool t3 = v3 > best || v3 != v3;
                best = t3 ? v3 : best; bx = t3 ? a3 : bx; k = t3 ? 3 : k;
                const bool pass = !(best <= 0.f);  // ReLU's mask as aten's: NaN passes (value and gradient)
                store(yo + c, pass ? best : 0.f);
                so[c] = static_cast<Sel<T>>(pass ? k : CUT);
                store(xo + c, bx);
            }
        }
    }
    return 0;
}

template <typename T>
struct PooledGradMoments {  // backward sums over the pooled map: dy and dy * (x - center) at the maxima
    const T* g;
    const Sel<T>* sel;
    const T* xsel;
    const float* center;
    long C;
    void add(long r, long c, float& a, float& b) const {
        const float gv = widen(g[r * C + c]);  // loaded whatever the mask: a masked load is slow
        const float d = sel[r * C + c] < CUT ? gv : 0.f;
        a += d;
        b += d * (widen(xsel[r * C + c]) - center[c]);
    }
};

template <typename T>
int bn_pool_bwd_stats(const T* g, const Sel<T>* sel, const T* xsel, const float* center, long M, long C,
                      double* sum_dy, double* sum_dy_x, int nthreads) {
    return sums_any_width(PooledGradMoments<T>{g, sel, xsel, center, C}, M, C, sum_dy, sum_dy_x, nthreads);
}

// dx = k1 * dy + k2 * (x - center) + k3, dy = g at the window's maximum (unless cut), else 0
template <typename T, long CC>
int bn_pool_bwd_apply(const T* x, const T* g, const Sel<T>* sel, T* dx, const float* center, long N, long H, long W,
                      long C_, const float* k1, const float* k2, const float* k3, int nthreads) {
    const long C = CC ? CC : C_;
    if (nthreads < 1) nthreads = 1;
    const long Ho = H / 2, Wo = W / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long row = 0; row < N * Ho; ++row) {
        const long n = row / Ho, i = row % Ho;
        const long base0 = (n * H + 2 * i) * W * C, base1 = base0 + W * C;
        const long o = row * Wo * C;
        for (long j = 0; j < Wo; ++j) {
            const long q0 = base0 + 2 * j * C, q2 = base1 + 2 * j * C;
            const T* go = g + o + j * C;
            const Sel<T>* so = sel + o + j * C;
#if defined(__AVX512BF16__)
            if constexpr (std::is_same<T, uint16_t>::value) {
                if (C % 16 == 0) {
                    for (long c = 0; c < C; c += 16) bn_pool_bwd16(x, go, so, dx, q0, q2, C, k1, k2, k3, center, c);
                    continue;
                }
            }
#endif
#pragma omp simd
            for (long c = 0; c < C; ++c) {
                const float gv = widen(go[c]);
                const int s = so[c];
                const float base = k3[c] - k2[c] * center[c];
                store(dx + q0 + c, k1[c] * (s == 0 ? gv : 0.f) + k2[c] * widen(x[q0 + c]) + base);
                store(dx + q0 + C + c, k1[c] * (s == 1 ? gv : 0.f) + k2[c] * widen(x[q0 + C + c]) + base);
                store(dx + q2 + c, k1[c] * (s == 2 ? gv : 0.f) + k2[c] * widen(x[q2 + c]) + base);
                store(dx + q2 + C + c, k1[c] * (s == 3 ? gv : 0.f) + k2[c] * widen(x[q2 + C + c]) + base);
            }
        }
    }
    return 0;
}

// ----------------------------------------------------------------------------- upsample + ReLU + 1x1 conv

// The two source positions and weights of output coordinate o of a 2x upsampling of `in` values
// (align_corners=False: src = (o + 0.5) / 2 - 0.5, clamped at 0; the upper one clamped at in - 1)
struct Tap {
    long i0, i1;
    float l0, l1;
};
inline Tap tap(long o, long in) {
    float src = (static_cast<float>(o) + 0.5f) * 0.5f - 0.5f;
    src = src < 0.f ? 0.f : src;
    const long i0 = static_cast<long>(src);
    const float l1 = src - static_cast<float>(i0);
    return {i0, i0 < in - 1 ? i0 + 1 : i0, 1.f - l1, l1};
}

// The taps of every output coordinate of a 2x upsampling of `in` values
inline Tap* taps_of(long in) {
    Tap* t = static_cast<Tap*>(std::malloc(sizeof(Tap) * 2 * in));
    if (t)
        for (long o = 0; o < 2 * in; ++o) t[o] = tap(o, in);
    return t;
}

#if defined(__AVX512BF16__)
// The head's per-pixel work for 16 bf16 channels and one output (UNeXt's): the upsampled values,
// rounded as bf16 and through ReLU, in one register (the portable loops keep them in memory and
// round by six operations a value): forward + backward 5.6 -> 3.4 ms at batch 8 on 2 EPYC cores.
// v: the output row's vertical interpolation (w x 16 fp32).
inline __m512 head_u16(const float* v, const Tap& tx) {
    return relu16(upsampled16(v + tx.i0 * 16, v + tx.i1 * 16, tx.l0, tx.l1));
}

inline void up_conv_fwd_row16(const float* v, const Tap* tx_all, long Wo, const float* weight, float bias,
                              uint16_t* yr) {
    const __m512 wv = _mm512_loadu_ps(weight);
    for (long ox = 0; ox < Wo; ++ox)
        yr[ox] = mixlab_bf16::to_bf16(_mm512_reduce_add_ps(_mm512_mul_ps(wv, head_u16(v, tx_all[ox]))) + bias);
}

// the pixel's gradient through the horizontal transpose into hr; the row's weight and bias sums into
// rw (16 + 1 values, zeroed by the caller) where the band owns the row
inline void up_conv_bwd_row16(const float* v, float* hr, float* rw, const Tap* tx_all, long Wo, const float* weight,
                              const uint16_t* gr, bool own) {
    const __m512 wv = _mm512_loadu_ps(weight);
    __m512 rwv = _mm512_setzero_ps();
    float rb = 0.f;
    for (long ox = 0; ox < Wo; ++ox) {
        const Tap tx = tx_all[ox];
        const float gk = widen(gr[ox]);
        const __m512 u = head_u16(v, tx);
        const __mmask16 pass = relu_pass16(u);
        const __m512 d = _mm512_maskz_mul_ps(pass, _mm512_set1_ps(gk), wv);
        if (own) {
            rwv = _mm512_fmadd_ps(_mm512_set1_ps(gk), u, rwv);
            rb += gk;
        }
        float* h0 = hr + tx.i0 * 16;
        float* h1 = hr + tx.i1 * 16;
        _mm512_storeu_ps(h0, _mm512_fmadd_ps(_mm512_set1_ps(tx.l0), d, _mm512_loadu_ps(h0)));
        _mm512_storeu_ps(h1, _mm512_fmadd_ps(_mm512_set1_ps(tx.l1), d, _mm512_loadu_ps(h1)));
    }
    if (own) {
        _mm512_storeu_ps(rw, rwv);
        rw[16] = rb;
    }
}
#endif

// x (N, h, w, C); weight (K, C) and bias (K) fp32 (as the computation's dtype rounds them);
// y (N, 2h, 2w, K). Per output row: the vertical interpolation of the two input rows (w*C values,
// one contiguous loop), then per output pixel the horizontal one, rounding, ReLU and the K dot
// products in one loop over the channels (the upsampled values never leave registers).
template <typename T, long CC>
int up_conv_fwd(const T* x, const float* weight, const float* bias, T* y, long N, long h, long w, long C_, long K,
                int nthreads) {
    const long C = CC ? CC : C_;  // a compile-time channel count where there is one: straight-line channel loops
    if (nthreads < 1) nthreads = 1;
    const long Ho = 2 * h, Wo = 2 * w;
    Tap* tx_all = taps_of(w);
    if (!tx_all) return 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float* v = static_cast<float*>(std::malloc(sizeof(float) * (w * C + 16)));
        if (!v) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long row = 0; row < N * Ho; ++row) {
            if (!v) continue;
            const long n = row / Ho, oy = row % Ho;
            const Tap ty = tap(oy, h);
            const T* a = x + (n * h + ty.i0) * w * C;
            const T* b = x + (n * h + ty.i1) * w * C;
#pragma omp simd
            for (long i = 0; i < w * C; ++i) v[i] = ty.l0 * widen(a[i]) + ty.l1 * widen(b[i]);
            T* yr = y + row * Wo * K;
#if defined(__AVX512BF16__)
            if constexpr (std::is_same<T, uint16_t>::value) {
                if (C == 16 && K == 1) {  // UNeXt's head: one register per pixel
                    up_conv_fwd_row16(v, tx_all, Wo, weight, bias ? bias[0] : 0.f, yr);
                    continue;
                }
            }
#endif
            for (long ox = 0; ox < Wo; ++ox) {
                const Tap tx = tx_all[ox];
                const float* v0 = v + tx.i0 * C;
                const float* v1 = v + tx.i1 * C;
                for (long k = 0; k < K; ++k) {
                    const float* wk = weight + k * C;
                    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                    for (long c = 0; c < C; ++c) {
                        const float u = stored_value<T>(tx.l0 * v0[c] + tx.l1 * v1[c]);
                        acc += wk[c] * (!(u <= 0.f) ? u : 0.f);
                    }
                    store(yr + ox * K + k, acc + (bias ? bias[k] : 0.f));
                }
            }
        }
        std::free(v);
    }
    std::free(tx_all);
    return failed;
}

constexpr long BAND = 16;  // input rows per backward task

// dx (N, h, w, C) as T; dweight (K, C) and dbias (K) fp64 sums. Per output row: the forward's
// vertical interpolation again, then per output pixel the upsampled values (rounded, ReLU), the
// weight and bias sums and the pixel's gradient, sent at once through the horizontal
// interpolation's transpose into one row of w*C sums; that row goes through the vertical
// transpose into the band's fp32 rows of dx.
template <typename T, long CC>
int up_conv_bwd(const T* x, const T* gy, const float* weight, T* dx, double* dweight, double* dbias, long N, long h,
                long w, long C_, long K, int nthreads) {
    const long C = CC ? CC : C_;
    if (nthreads < 1) nthreads = 1;
    const long Ho = 2 * h, Wo = 2 * w;
    const long bands = (h + BAND - 1) / BAND;
    Tap* tx_all = taps_of(w);
    double* sums = static_cast<double*>(std::calloc(static_cast<size_t>(nthreads) * K * (C + 1) + 1, sizeof(double)));
    if (!tx_all || !sums) {
        std::free(tx_all);
        std::free(sums);
        return 1;
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
        double* dw_t = sums + static_cast<size_t>(tid) * K * (C + 1);  // K*C weight sums, then K bias sums
        float* acc = static_cast<float*>(std::malloc(sizeof(float) * (BAND * w * C + 2 * w * C + K * (C + 1) + 2 * C + 64)));
        if (!acc) {
#pragma omp atomic write
            failed = 1;
        }
        float* v = acc ? acc + BAND * w * C : nullptr;    // the output row's vertical interpolation
        float* hr = acc ? v + w * C : nullptr;            // its gradient through the horizontal transpose
        float* rw = acc ? hr + w * C : nullptr;           // its weight (K*C) and bias (K) sums
        float* u = acc ? rw + K * (C + 1) : nullptr;      // one pixel's upsampled values
        float* d = acc ? u + C : nullptr;                 // ... and their gradient
#pragma omp for schedule(static)
        for (long task = 0; task < N * bands; ++task) {
            if (!acc) continue;
            const long n = task / bands, r0 = (task % bands) * BAND, r1 = imin(h, r0 + BAND);
            std::memset(acc, 0, sizeof(float) * (r1 - r0) * w * C);
            const long oy0 = 2 * r0 > 0 ? 2 * r0 - 1 : 0, oy1 = imin(Ho - 1, 2 * r1);
            for (long oy = oy0; oy <= oy1; ++oy) {
                const Tap ty = tap(oy, h);
                const bool own = oy >= 2 * r0 && oy < 2 * r1;  // a band sums the weight gradient of its own rows
                const T* a = x + (n * h + ty.i0) * w * C;
                const T* b = x + (n * h + ty.i1) * w * C;
                const T* gr = gy + (n * Ho + oy) * Wo * K;
#pragma omp simd
                for (long i = 0; i < w * C; ++i) {
                    v[i] = ty.l0 * widen(a[i]) + ty.l1 * widen(b[i]);
                    hr[i] = 0.f;
                }
                if (own) std::memset(rw, 0, sizeof(float) * K * (C + 1));
#if defined(__AVX512BF16__)
                if constexpr (std::is_same<T, uint16_t>::value) {
                    if (C == 16 && K == 1) {
                        up_conv_bwd_row16(v, hr, rw, tx_all, Wo, weight, gr, own);
                        goto row_done;
                    }
                }
#endif
                for (long ox = 0; ox < Wo; ++ox) {
                    const Tap tx = tx_all[ox];
                    const float* v0 = v + tx.i0 * C;
                    const float* v1 = v + tx.i1 * C;
#pragma omp simd
                    for (long c = 0; c < C; ++c) {
                        const float uv = stored_value<T>(tx.l0 * v0[c] + tx.l1 * v1[c]);
                        u[c] = !(uv <= 0.f) ? uv : 0.f;
                        d[c] = 0.f;
                    }
                    for (long k = 0; k < K; ++k) {
                        const float gk = widen(gr[ox * K + k]);
                        const float* wk = weight + k * C;
#pragma omp simd
                        for (long c = 0; c < C; ++c) d[c] += !(u[c] <= 0.f) ? gk * wk[c] : 0.f;
                        if (own) {
                            float* rk = rw + k * C;
#pragma omp simd
                            for (long c = 0; c < C; ++c) rk[c] += gk * u[c];
                            rw[K * C + k] += gk;
                        }
                    }
                    float* h0 = hr + tx.i0 * C;
                    float* h1 = hr + tx.i1 * C;
#pragma omp simd
                    for (long c = 0; c < C; ++c) h0[c] += tx.l0 * d[c];
#pragma omp simd
                    for (long c = 0; c < C; ++c) h1[c] += tx.l1 * d[c];
                }
#if defined(__AVX512BF16__)
            row_done:
#endif
                if (own)
                    for (long k = 0; k < K * (C + 1); ++k) dw_t[k] += rw[k];
                // vertical transpose, into the rows this band owns
                const long rows[2] = {ty.i0, ty.i1};
                const float wts[2] = {ty.l0, ty.l1};
                for (int t = 0; t < 2; ++t) {
                    if (rows[t] < r0 || rows[t] >= r1 || wts[t] == 0.f) continue;
                    float* dst = acc + (rows[t] - r0) * w * C;
                    const float l = wts[t];
#pragma omp simd
                    for (long i = 0; i < w * C; ++i) dst[i] += l * hr[i];
                }
            }
            T* out = dx + (n * h + r0) * w * C;
            const long cnt = (r1 - r0) * w * C;
#pragma omp simd
            for (long i = 0; i < cnt; ++i) store(out + i, acc[i]);
        }
        std::free(acc);
    }
    for (long k = 0; k < K * (C + 1); ++k) {
        double s = 0.0;
        for (int t = 0; t < nthreads; ++t) s += sums[static_cast<size_t>(t) * K * (C + 1) + k];
        if (k < K * C) dweight[k] = s; else dbias[k - K * C] = s;
    }
    std::free(sums);
    std::free(tx_all);
    return failed;
}

// ----------------------------------------------------------------------------- BatchNorm + upsample + ReLU + residual
//
// 2. y = relu(upsample2(bn(x))) + skip   (UNeXt's decoder stages; bn with batch statistics)
//    Forward per output row: its two source rows normalised (as the stored BatchNorm output would
//    hold them; a thread keeps the last two), interpolated vertically, then per pixel horizontally,
//    rounded, ReLU, plus the residual. Backward: the gradient of the upsampled map (ReLU's mask
//    recomputed) through the interpolation's transpose into fp32 rows of dz = d bn(x), by bands as
//    the head's backward; each band then adds its rows' sums of dz and dz * (x - center) for
//    BatchNorm's backward, whose last pass (dx from dz) is bn_bwd_apply.

// the normalised source rows of output rows, cached per thread: row r of image n (w*C values)
template <typename T, long CC>
struct NormRows {
    const T* x;
    const float *center, *scale, *shift;
    long h, w, C;
    float* buf[2];
    long key[2] = {-1, -1};
    int next = 0;
    const float* row(long n, long r) {
        const long k = n * h + r;
        if (key[0] == k) return buf[0];
        if (key[1] == k) return buf[1];
        float* z = buf[next];
        key[next] = k;
        next ^= 1;
        const long Cc = CC ? CC : C;
        const T* xr = x + k * w * Cc;
        for (long j = 0; j < w; ++j) {
            const T* xj = xr + j * Cc;
            float* zj = z + j * Cc;
#pragma omp simd
            for (long c = 0; c < Cc; ++c) zj[c] = stored_value<T>((widen(xj[c]) - center[c]) * scale[c] + shift[c]);
        }
        return z;
    }
};

template <typename T, long CC>
int bn_up_add_fwd(const T* x, const T* skip, T* y, const float* center, const float* scale, const float* shift, long N,
                  long h, long w, long C_, int nthreads) {
    const long C = CC ? CC : C_;
    if (nthreads < 1) nthreads = 1;
    const long Ho = 2 * h, Wo = 2 * w;
    Tap* tx_all = taps_of(w);
    if (!tx_all) return 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float* buf = static_cast<float*>(std::malloc(sizeof(float) * (3 * w * C + 16)));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
        NormRows<T, CC> rows{x, center, scale, shift, h, w, C, {buf, buf ? buf + w * C : nullptr}};
        float* v = buf ? buf + 2 * w * C : nullptr;
#pragma omp for schedule(static)
        for (long row = 0; row < N * Ho; ++row) {
            if (!buf) continue;
            const long n = row / Ho, oy = row % Ho;
            const Tap ty = tap(oy, h);
            const float* a = rows.row(n, ty.i0);
            const float* b = rows.row(n, ty.i1);
#pragma omp simd
            for (long i = 0; i < w * C; ++i) v[i] = ty.l0 * a[i] + ty.l1 * b[i];
            const T* sr = skip + row * Wo * C;
            T* yr = y + row * Wo * C;
            for (long ox = 0; ox < Wo; ++ox) {
                const Tap tx = tx_all[ox];
                const float* v0 = v + tx.i0 * C;
                const float* v1 = v + tx.i1 * C;
#if defined(__AVX512BF16__)
                if constexpr (std::is_same<T, uint16_t>::value) {
                    if (C % 16 == 0) {  // registers and the CPU's bf16 conversion (see ld16)
                        for (long c = 0; c < C; c += 16)
                            st16(yr + ox * C + c, _mm512_add_ps(relu16(upsampled16(v0 + c, v1 + c, tx.l0, tx.l1)),
                                                                ld16(sr + ox * C + c)));
                        continue;
                    }
                }
#endif
#pragma omp simd
                for (long c = 0; c < C; ++c) {
                    const float u = stored_value<T>(tx.l0 * v0[c] + tx.l1 * v1[c]);
                    store(yr + ox * C + c, (!(u <= 0.f) ? u : 0.f) + widen(sr[ox * C + c]));
                }
            }
        }
        std::free(buf);
    }
    std::free(tx_all);
    return failed;
}

template <typename T, long CC>
int bn_up_add_bwd(const T* x, const T* gy, float* dz, const float* center, const float* scale, const float* shift,
                  long N, long h, long w, long C_, double* sum_dz, double* sum_dz_x, int nthreads) {
    const long C = CC ? CC : C_;
    if (nthreads < 1) nthreads = 1;
    const long Ho = 2 * h, Wo = 2 * w;
    const long bands = (h + BAND - 1) / BAND;
    Tap* tx_all = taps_of(w);
    double* sums = static_cast<double*>(std::calloc(static_cast<size_t>(nthreads) * 2 * C + 1, sizeof(double)));
    if (!tx_all || !sums) {
        std::free(tx_all);
        std::free(sums);
        return 1;
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
        double* s1 = sums + static_cast<size_t>(tid) * 2 * C;
        double* s2 = s1 + C;
        float* acc = static_cast<float*>(std::malloc(sizeof(float) * (BAND * w * C + 4 * w * C + 3 * C + 64)));
        if (!acc) {
#pragma omp atomic write
            failed = 1;
        }
        NormRows<T, CC> rows{x, center, scale, shift, h, w, C,
                             {acc ? acc + BAND * w * C : nullptr, acc ? acc + (BAND + 1) * w * C : nullptr}};
        float* v = acc ? acc + (BAND + 2) * w * C : nullptr;
        float* hr = acc ? v + w * C : nullptr;
        float* p1 = acc ? hr + w * C : nullptr;  // one row's sums, fp32, before the fp64 ones
        float* p2 = acc ? p1 + C : nullptr;
        float* d = acc ? p2 + C : nullptr;  // one output pixel's gradient at the upsampled map
#pragma omp for schedule(static)
        for (long task = 0; task < N * bands; ++task) {
            if (!acc) continue;
            const long n = task / bands, r0 = (task % bands) * BAND, r1 = imin(h, r0 + BAND);
            std::memset(acc, 0, sizeof(float) * (r1 - r0) * w * C);
            const long oy0 = 2 * r0 > 0 ? 2 * r0 - 1 : 0, oy1 = imin(Ho - 1, 2 * r1);
            for (long oy = oy0; oy <= oy1; ++oy) {
                const Tap ty = tap(oy, h);
                const float* a = rows.row(n, ty.i0);
                const float* b = rows.row(n, ty.i1);
#pragma omp simd
                for (long i = 0; i < w * C; ++i) {
                    v[i] = ty.l0 * a[i] + ty.l1 * b[i];
                    hr[i] = 0.f;
                }
                const T* gr = gy + (n * Ho + oy) * Wo * C;
                for (long ox = 0; ox < Wo; ++ox) {
                    const Tap tx = tx_all[ox];
                    const float* v0 = v + tx.i0 * C;
                    const float* v1 = v + tx.i1 * C;
                    float* h0 = hr + tx.i0 * C;
                    float* h1 = hr + tx.i1 * C;
                    const T* go = gr + ox * C;
#if defined(__AVX512BF16__)
                    if constexpr (std::is_same<T, uint16_t>::value) {
                        if (C % 16 == 0) {  // h0 is stored before h1 is read: one row at the right border
                            for (long c = 0; c < C; c += 16) {
                                const __m512 u = upsampled16(v0 + c, v1 + c, tx.l0, tx.l1);
                                const __m512 dv = _mm512_maskz_mov_ps(relu_pass16(u), ld16(go + c));
                                _mm512_storeu_ps(h0 + c, _mm512_fmadd_ps(_mm512_set1_ps(tx.l0), dv, _mm512_loadu_ps(h0 + c)));
                                _mm512_storeu_ps(h1 + c, _mm512_fmadd_ps(_mm512_set1_ps(tx.l1), dv, _mm512_loadu_ps(h1 + c)));
                            }
                            continue;
                        }
                    }
#endif
#pragma omp simd
                    for (long c = 0; c < C; ++c) {
                        const float u = stored_value<T>(tx.l0 * v0[c] + tx.l1 * v1[c]);
                        const float gv = widen(go[c]);
                        d[c] = !(u <= 0.f) ? gv : 0.f;  // ReLU's mask as aten's: NaN passes
                    }
                    // two loops: h0 and h1 are one row at the right border (i0 == i1)
#pragma omp simd
                    for (long c = 0; c < C; ++c) h0[c] += tx.l0 * d[c];
#pragma omp simd
                    for (long c = 0; c < C; ++c) h1[c] += tx.l1 * d[c];
                }
                const long rr[2] = {ty.i0, ty.i1};
                const float wts[2] = {ty.l0, ty.l1};
                for (int t = 0; t < 2; ++t) {
                    if (rr[t] < r0 || rr[t] >= r1 || wts[t] == 0.f) continue;
                    float* dst = acc + (rr[t] - r0) * w * C;
                    const float l = wts[t];
#pragma omp simd
                    for (long i = 0; i < w * C; ++i) dst[i] += l * hr[i];
                }
            }
            for (long r = r0; r < r1; ++r) {
                const float* src = acc + (r - r0) * w * C;
                const T* xr = x + (n * h + r) * w * C;
                float* out = dz + (n * h + r) * w * C;
                for (long c = 0; c < C; ++c) p1[c] = p2[c] = 0.f;
                for (long j = 0; j < w; ++j) {
#pragma omp simd
                    for (long c = 0; c < C; ++c) {
                        const float d = src[j * C + c];
                        out[j * C + c] = d;
                        p1[c] += d;
                        p2[c] += d * (widen(xr[j * C + c]) - center[c]);
                    }
                }
                for (long c = 0; c < C; ++c) {
                    s1[c] += p1[c];
                    s2[c] += p2[c];
                }
            }
        }
        std::free(acc);
    }
    mixlab_sums::fold_thread_sums(sums, C, nthreads, sum_dz, sum_dz_x);
    std::free(sums);
    std::free(tx_all);
    return failed;
}

// BatchNorm's last backward pass from an fp32 gradient of its output: dx = k1*dz + k2*(x - center) + k3
template <typename T>
int bn_bwd_apply(const T* x, const float* dz, T* dx, const float* center, long M, long C, const float* k1,
                 const float* k2, const float* k3, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < M; ++r) {
#pragma omp simd
        for (long c = 0; c < C; ++c)
            store(dx + r * C + c, k1[c] * dz[r * C + c] + k2[c] * (widen(x[r * C + c]) - center[c]) + k3[c]);
    }
    return 0;
}

// UNeXt's narrow widths (8, 16, 32 channels) get compiled trip counts: f(std::integral_constant<long, CC>)
// with CC the width, or 0 (any width, read at run time)
template <typename F>
int with_width(long C, F&& f) {
    switch (C) {
        case 8: return f(std::integral_constant<long, 8>{});
        case 16: return f(std::integral_constant<long, 16>{});
        case 32: return f(std::integral_constant<long, 32>{});
        default: return f(std::integral_constant<long, 0>{});
    }
}

}  // namespace

extern "C" {

int mixlab_resample_abi_version(void) { return 2; }

#define MIXLAB_RESAMPLE(SFX, T)                                                                                      \
    int mixlab_bn_stats_##SFX(const void* x, const float* center, long M, long C, double* s, double* ss, int nt) {  \
        return bn_stats(static_cast<const T*>(x), center, M, C, s, ss, nt);                                        \
    }                                                                                                              \
    int mixlab_bn_pool_fwd_##SFX(const void* x, void* y, void* sel, void* xsel, const float* center, long N,        \
                                 long H, long W, long C, const float* a, const float* b, int nt) {                 \
        return with_width(C, [&](auto cc) {                                                                        \
            return bn_pool_fwd<T, decltype(cc)::value>(static_cast<const T*>(x), static_cast<T*>(y),               \
                                                       static_cast<Sel<T>*>(sel), static_cast<T*>(xsel), center, N, \
                                                       H, W, C, a, b, nt);                                         \
        });                                                                                                        \
    }                                                                                                              \
    int mixlab_bn_pool_bwd_stats_##SFX(const void* g, const void* sel, const void* xsel, const float* center,      \
                                       long M, long C, double* s, double* sx, int nt) {                            \
        return bn_pool_bwd_stats(static_cast<const T*>(g), static_cast<const Sel<T>*>(sel),                       \
                                 static_cast<const T*>(xsel), center, M, C, s, sx, nt);                            \
    }                                                                                                              \
    int mixlab_bn_pool_bwd_apply_##SFX(const void* x, const void* g, const void* sel, void* dx, const float* center, \
                                       long N, long H, long W, long C, const float* k1, const float* k2,           \
                                       const float* k3, int nt) {                                                  \
        return with_width(C, [&](auto cc) {                                                                        \
            return bn_pool_bwd_apply<T, decltype(cc)::value>(static_cast<const T*>(x), static_cast<const T*>(g),   \
                                                             static_cast<const Sel<T>*>(sel), static_cast<T*>(dx), \
                                                             center, N, H, W, C, k1, k2, k3, nt);                  \
        });                                                                                                        \
    }                                                                                                              \
    int mixlab_up_conv_fwd_##SFX(const void* x, const float* w, const float* b, void* y, long N, long h, long wd,   \
                                 long C, long K, int nt) {                                                         \
        return with_width(C, [&](auto cc) {                                                                        \
            return up_conv_fwd<T, decltype(cc)::value>(static_cast<const T*>(x), w, b, static_cast<T*>(y), N, h,   \
                                                       wd, C, K, nt);                                              \
        });                                                                                                        \
    }                                                                                                              \
    int mixlab_up_conv_bwd_##SFX(const void* x, const void* gy, const float* w, void* dx, double* dw, double* db,   \
                                 long N, long h, long wd, long C, long K, int nt) {                                \
        return with_width(C, [&](auto cc) {                                                                        \
            return up_conv_bwd<T, decltype(cc)::value>(static_cast<const T*>(x), static_cast<const T*>(gy), w,     \
                                                       static_cast<T*>(dx), dw, db, N, h, wd, C, K, nt);           \
        });                                                                                                        \
    }                                                                                                              \
    int mixlab_bn_up_add_fwd_##SFX(const void* x, const void* skip, void* y, const float* center, const float* a,  \
                                   const float* b, long N, long h, long wd, long C, int nt) {                      \
        return with_width(C, [&](auto cc) {                                                                        \
            return bn_up_add_fwd<T, decltype(cc)::value>(static_cast<const T*>(x), static_cast<const T*>(skip),    \
                                                         static_cast<T*>(y), center, a, b, N, h, wd, C, nt);       \
        });                                                                                                        \
    }                                                                                                              \
    int mixlab_bn_up_add_bwd_##SFX(const void* x, const void* gy, float* dz, const float* center, const float* a,  \
                                   const float* b, long N, long h, long wd, long C, double* s, double* sx,         \
                                   int nt) {                                                                       \
        return with_width(C, [&](auto cc) {                                                                        \
            return bn_up_add_bwd<T, decltype(cc)::value>(static_cast<const T*>(x), static_cast<const T*>(gy), dz,  \
                                                         center, a, b, N, h, wd, C, s, sx, nt);                    \
        });                                                                                                        \
    }                                                                                                              \
    int mixlab_bn_bwd_apply_##SFX(const void* x, const float* dz, void* dx, const float* center, long M, long C,    \
                                  const float* k1, const float* k2, const float* k3, int nt) {                     \
        return bn_bwd_apply(static_cast<const T*>(x), dz, static_cast<T*>(dx), center, M, C, k1, k2, k3, nt);     \
    }
MIXLAB_RESAMPLE(f32, float)
MIXLAB_RESAMPLE(bf16, uint16_t)
#undef MIXLAB_RESAMPLE

}  // extern "C"
