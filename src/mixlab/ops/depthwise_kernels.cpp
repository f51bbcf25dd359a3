// Weight gradient of a stride-1 depthwise 2-D convolution on the CPU:
//
//   dW[c, kh, kw] = sum_{n, ho, wo} dY[n, c, ho, wo] * X[n, c, ho - ph + kh*dh, wo - pw + kw*dw]
//
// (X outside the image is zero padding). X and dY are fp32 or bf16 (bf16 is read as uint16 and
// widened by a shift, so the compiler needs no bf16 support); products are summed in fp32.
//
// Why not aten: its depthwise weight gradient for one ConvMixer-256/8 layer (128x256x16x16,
// 5x5, bf16) took 179 ms on a 2-core Xeon and 54 ms on a 2-core EPYC, for work that reads two
// 16 MB tensors once; this kernel does that layer in 4.2 ms on the EPYC
// (benchmarks/bench_depthwise.py).
//
// Built at first use by mixlab/ops/depthwise_build.py with the machine's C++ compiler
// (-O3 -march=native -fopenmp; no torch headers, so it compiles in about a second) and called
// through ctypes on the tensors' data pointers. It links libgomp by soname, so inside a torch
// process it shares the libgomp torch has loaded: its threads are torch's OpenMP threads, not
// a second pool spinning beside them.
//
// Two layouts:
//  - channels_last (N, H, W, C): the inner loop runs over a block of CB contiguous channels,
//    so it vectorises without gathers; the block's partial sums stay in registers along one
//    output row and are then added into a per-thread [KH][KW][C] accumulator. Threads split
//    the batch; their accumulators are summed at the end.
//  - contiguous NCHW: threads split the channels; for each (n, c) plane and tap, a dot
//    product of an output-gradient row with the shifted input row.
#include <omp.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace {

constexpr long CB = 64;  // channels per block: 4 AVX-512 or 8 AVX2 registers of fp32 sums

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
    uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline long imax(long a, long b) { return a > b ? a : b; }
inline long imin(long a, long b) { return a < b ? a : b; }

// acc[c] += sum_{wo in [lo, hi)} g[wo, c] * x[wo + off, c], for NC channels (C apart per pixel)
template <typename T, long NC>
inline void row_block(const T* grow, const T* xrow, float* acc, long C, long lo, long hi, long off) {
    float s[NC];
    for (long c = 0; c < NC; ++c) s[c] = 0.f;
    for (long wo = lo; wo < hi; ++wo) {
        const T* gp = grow + wo * C;
        const T* xp = xrow + (wo + off) * C;
#pragma omp simd
        for (long c = 0; c < NC; ++c) s[c] += widen(gp[c]) * widen(xp[c]);
    }
    for (long c = 0; c < NC; ++c) acc[c] += s[c];
}

template <typename T>
inline void row_tail(const T* grow, const T* xrow, float* acc, long C, long nc, long lo, long hi, long off) {
    for (long c = 0; c < nc; ++c) {
        float s = 0.f;
        for (long wo = lo; wo < hi; ++wo) s += widen(grow[wo * C + c]) * widen(xrow[(wo + off) * C + c]);
        acc[c] += s;
    }
}

// Register-blocked form of one image's weight sums, for KW taps and BCB channels at a time: the
// sums of all KW taps of one kernel row stay in registers over the whole image, and each output
// gradient value is loaded once for the KW taps it meets (the form above loads it once per tap).
// ConvMixer-256/8's 5x5 layer (128x256x16x16, bf16): 3.1 against 4.8 ms on 2 EPYC cores, and
// 2.6 against 3.9 ms for 7x7; for 9 and 11 taps the sums no longer fit in registers and the bf16
// form was slower (10.9 against 7.2 ms for 11x11), so rows of over 7 taps keep the form above.
#ifdef __AVX512F__
constexpr long BCB = 32;  // 2 AVX-512 registers a tap: 14 for a 7-tap row
#else
constexpr long BCB = 16;
#endif
constexpr long BLOCKED_MAX_KW = 7;

template <typename T, long KW>
void image_wgrad_blocked(const T* xn, const T* gn, float* acc, long C, long c_end, long H, long W, long Ho,
                         long Wo, long KH, long ph, long pw, long dh, long dw) {
    // the output columns whose KW taps all fall inside the input row
    const long lo = imin(pw, Wo);
    const long hi = imax(lo, imin(Wo, W + pw - (KW - 1) * dw));
    for (long c0 = 0; c0 < c_end; c0 += BCB) {
        for (long kh = 0; kh < KH; ++kh) {
            float s[KW][BCB];
            for (long k = 0; k < KW; ++k)
                for (long c = 0; c < BCB; ++c) s[k][c] = 0.f;
            for (long ho = 0; ho < Ho; ++ho) {
                const long hi_ = ho - ph + kh * dh;
                if (hi_ < 0 || hi_ >= H) continue;
                const T* grow = gn + ho * Wo * C + c0;
                const T* xrow = xn + hi_ * W * C + c0;
                auto edge = [&](long wo) {
                    const T* gp = grow + wo * C;
                    for (long k = 0; k < KW; ++k) {
                        const long wi = wo + k * dw - pw;
                        if (wi < 0 || wi >= W) continue;
                        const T* xp = xrow + wi * C;
#pragma omp simd
                        for (long c = 0; c < BCB; ++c) s[k][c] += widen(gp[c]) * widen(xp[c]);
                    }
                };
                for (long wo = 0; wo < lo; ++wo) edge(wo);
                for (long wo = lo; wo < hi; ++wo) {
                    const T* gp = grow + wo * C;
                    const T* xp0 = xrow + (wo - pw) * C;
#pragma GCC unroll 16
                    for (long k = 0; k < KW; ++k) {
                        const T* xp = xp0 + k * dw * C;
#pragma omp simd
                        for (long c = 0; c < BCB; ++c) s[k][c] += widen(gp[c]) * widen(xp[c]);
                    }
                }
                for (long wo = hi; wo < Wo; ++wo) edge(wo);
            }
            for (long k = 0; k < KW; ++k)
                for (long c = 0; c < BCB; ++c) acc[(kh * KW + k) * C + c0 + c] += s[k][c];
        }
    }
}

// The channels [0, returned) done by the blocked form (whole blocks, rows of up to
// BLOCKED_MAX_KW taps); the rest is left to the general form.
template <typename T>
long image_wgrad_blocked_any(const T* xn, const T* gn, float* acc, long C, long H, long W, long Ho, long Wo,
                             long KH, long KW, long ph, long pw, long dh, long dw) {
    const long c_end = (C / BCB) * BCB;
    if (c_end == 0 || KW > BLOCKED_MAX_KW) return 0;
    switch (KW) {
#define MIXLAB_KW(K) \
    case K: image_wgrad_blocked<T, K>(xn, gn, acc, C, c_end, H, W, Ho, Wo, KH, ph, pw, dh, dw); return c_end;
        MIXLAB_KW(1) MIXLAB_KW(2) MIXLAB_KW(3) MIXLAB_KW(4) MIXLAB_KW(5) MIXLAB_KW(6) MIXLAB_KW(7)
#undef MIXLAB_KW
        default: return 0;
    }
}

template <typename T>
int wgrad_nhwc(const T* x, const T* g, float* out, float* bias_out, long N, long C, long H, long W, long Ho,
               long Wo, long KH, long KW, long ph, long pw, long dh, long dw, int nthreads) {
    const long KK = KH * KW;
    const long per_thread = (KK + 1) * C;  // [KH][KW][C] weight sums, then [C] bias sums
    if (nthreads < 1) nthreads = 1;
    if (nthreads > N) nthreads = static_cast<int>(N);
    float* accs = static_cast<float*>(std::calloc(static_cast<size_t>(nthreads) * per_thread, sizeof(float)));
    if (!accs) return 1;
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
        const int nt = omp_get_num_threads();
        float* acc = accs + static_cast<size_t>(tid) * per_thread;
        float* accb = acc + KK * C;
        for (long n = tid; n < N; n += nt) {
            if (bias_out) {  // the bias gradient: dY summed over pixels, while this image's dY is in cache
                const T* gn = g + n * Ho * Wo * C;
                for (long p = 0; p < Ho * Wo; ++p) {
#pragma omp simd
                    for (long c = 0; c < C; ++c) accb[c] += widen(gn[p * C + c]);
                }
            }
            const long c_done = image_wgrad_blocked_any<T>(x + n * H * W * C, g + n * Ho * Wo * C, acc, C, H, W, Ho,
                                                            Wo, KH, KW, ph, pw, dh, dw);
            for (long c0 = c_done; c0 < C; c0 += CB) {
                const long nc = imin(CB, C - c0);
                for (long kh = 0; kh < KH; ++kh) {
                    for (long ho = 0; ho < Ho; ++ho) {
                        const long hi_ = ho - ph + kh * dh;
                        if (hi_ < 0 || hi_ >= H) continue;
                        const T* grow = g + (n * Ho + ho) * Wo * C + c0;
                        const T* xrow = x + (n * H + hi_) * W * C + c0;
                        for (long kw = 0; kw < KW; ++kw) {
                            const long off = kw * dw - pw;
                            const long lo = imax(0, -off), hi = imin(Wo, W - off);
                            if (lo >= hi) continue;
                            float* a = acc + (kh * KW + kw) * C + c0;
                            if (nc == CB)
                                row_block<T, CB>(grow, xrow, a, C, lo, hi, off);
                            else
                                row_tail<T>(grow, xrow, a, C, nc, lo, hi, off);
                        }
                    }
                }
            }
        }
    }
    // out is (C, KH, KW); each thread's accumulator is (KH, KW, C)
    for (long c = 0; c < C; ++c)
        for (long k = 0; k <= KK; ++k) {
            float s = 0.f;
            for (int t = 0; t < nthreads; ++t) s += accs[static_cast<size_t>(t) * per_thread + k * C + c];
            if (k < KK)
                out[c * KK + k] = s;
            else if (bias_out)
                bias_out[c] = s;
        }
    std::free(accs);
    return 0;
}

template <typename T>
int wgrad_nchw(const T* x, const T* g, float* out, float* bias_out, long N, long C, long H, long W, long Ho,
               long Wo, long KH, long KW, long ph, long pw, long dh, long dw, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long c = 0; c < C; ++c) {
        float* o = out + c * KH * KW;
        for (long k = 0; k < KH * KW; ++k) o[k] = 0.f;
        float b = 0.f;
        for (long n = 0; n < N; ++n) {
            const T* xp = x + (n * C + c) * H * W;
            const T* gp = g + (n * C + c) * Ho * Wo;
            if (bias_out) {
#pragma omp simd reduction(+ : b)
                for (long p = 0; p < Ho * Wo; ++p) b += widen(gp[p]);
            }
            for (long kh = 0; kh < KH; ++kh) {
                const long offh = kh * dh - ph;
                const long hlo = imax(0, -offh), hhi = imin(Ho, H - offh);
                for (long kw = 0; kw < KW; ++kw) {
                    const long offw = kw * dw - pw;
                    const long wlo = imax(0, -offw), whi = imin(Wo, W - offw);
                    float s = 0.f;
                    for (long ho = hlo; ho < hhi; ++ho) {
                        const T* gr = gp + ho * Wo;
                        const T* xr = xp + (ho + offh) * W + offw;
#pragma omp simd reduction(+ : s)
                        for (long wo = wlo; wo < whi; ++wo) s += widen(gr[wo]) * widen(xr[wo]);
                    }
                    o[kh * KW + kw] += s;
                }
            }
        }
        if (bias_out) bias_out[c] = b;
    }
    return 0;
}

}  // namespace

#define MIXLAB_ARGS float* bias_out, long N, long C, long H, long W, long Ho, long Wo, long KH, long KW, long ph, long pw, \
                    long dh, long dw, int nthreads
#define MIXLAB_PASS bias_out, N, C, H, W, Ho, Wo, KH, KW, ph, pw, dh, dw, nthreads

extern "C" {
int mixlab_dw_wgrad_nhwc_f32(const float* x, const float* g, float* out, MIXLAB_ARGS) {
    return wgrad_nhwc<float>(x, g, out, MIXLAB_PASS);
}
int mixlab_dw_wgrad_nhwc_bf16(const uint16_t* x, const uint16_t* g, float* out, MIXLAB_ARGS) {
    return wgrad_nhwc<uint16_t>(x, g, out, MIXLAB_PASS);
}
int mixlab_dw_wgrad_nchw_f32(const float* x, const float* g, float* out, MIXLAB_ARGS) {
    return wgrad_nchw<float>(x, g, out, MIXLAB_PASS);
}
int mixlab_dw_wgrad_nchw_bf16(const uint16_t* x, const uint16_t* g, float* out, MIXLAB_ARGS) {
    return wgrad_nchw<uint16_t>(x, g, out, MIXLAB_PASS);
}
int mixlab_dw_abi_version(void) { return 2; }
}
