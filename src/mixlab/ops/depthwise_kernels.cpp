// Stride-1 depthwise 2-D convolution on the CPU: the weight gradient, and (further down) a
// channels-last forward, which also computes the input gradient. The weight gradient:
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

// The AVX-512 register-tiled form (defined with the forward kernel below); returns the channels it
// did (all, or 0 where it does not apply).
template <typename T>
long image_wgrad_tiled_any(const T* xn, const T* gn, float* acc, long C, long H, long W, long Ho, long Wo, long KH,
                           long KW, long ph, long pw, long dh, long dw, const T* xnext, const T* gnext);

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
            const bool more = n + nt < N;
            long c_done = image_wgrad_tiled_any<T>(x + n * H * W * C, g + n * Ho * Wo * C, acc, C, H, W, Ho, Wo, KH,
                                                   KW, ph, pw, dh, dw, more ? x + (n + nt) * H * W * C : nullptr,
                                                   more ? g + (n + nt) * Ho * Wo * C : nullptr);
            if (c_done == 0)
                c_done = image_wgrad_blocked_any<T>(x + n * H * W * C, g + n * Ho * Wo * C, acc, C, H, W, Ho, Wo, KH,
                                                    KW, ph, pw, dh, dw);
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


// ----------------------------------------------------------------------------- forward (NHWC)
//
//   Y[n, ho, wo, c] = b[c] + sum_{kh, kw} W[kh, kw, c] * X[n, ho - ph + kh*dh, wo - pw + kw, c]
//
// (column dilation 1; rows any dilation). The weights come in as fp32 (KH, KW, C) (for a bf16
// convolution, its bf16 weights widened: the same products aten forms), sums are fp32, a bf16
// output is rounded once to nearest even. The input gradient of a stride-1 depthwise convolution
// is this forward with the flipped kernel (depthwise.py), so this kernel serves both.
//
// Why: aten's channels-last depthwise forward for Conv2Former's 11x11 layers ran at about half
// this kernel's speed (bf16, 2 EPYC cores: 128x64x32x32 9.8 against 4.5 ms, 128x256x8x8 1.5
// against 1.0 ms; benchmarks/bench_depthwise.py); for small kernels on large maps aten's is
// faster, so the op times both per shape and keeps the faster.
//
// Memory order: a row's tiles go left to right with every channel block of a tile before the
// next, and each tile prefetches its share of the input row the next output row meets first.
// Without that, on maps larger than the cache, a 3x3 kernel ran at a third of its in-cache speed
// (channel block by channel block, each a strided pass the hardware prefetcher served poorly):
// bf16, 2 EPYC cores, 256x128x32x32 3x3 12.4 -> 4.1 ms (aten 8.7), 256x256x16x16 3.3 -> 2.0,
// ConvMLP's 64x64x56x56 4.5 -> 1.9 (aten 1.2); Conv2Former's 11x11 layers unchanged within noise.
// Where an output-shaped tensor is summed in (a residual's gradient), its rows are prefetched one
// output row ahead and read without masks in whole channel blocks: with masked loads and no
// prefetch, that sum made the kernel 2.5-4x slower (ConvMixer's 5x5 3.5 ms against 1.4 without
// it; now 2.0). (These kernels' speed moves by 10-25% with code layout alone on this CPU: a
// variant that took whole channel blocks as a template parameter measured 27% slower on
// Conv2Former's 11x11 on 8x8 maps, and faster elsewhere, for no reason visible in its code.)
//
// A tile is WB output pixels of one row by NCB blocks of 16 channels; its sums stay in AVX-512
// registers over every tap. Each input pixel of a kernel row is loaded and widened once and
// multiplied by the KW weights it meets (output j = input i - tap k, all indices compile-time
// constants after unrolling). Columns in the zero padding are read from a zero block (no branch,
// so the sums stay in registers: a non-finite weight then gives NaN there, where aten gives 0;
// such a weight makes the whole output NaN anyway); rows in the padding are skipped. Two channel blocks per tile
// for kernels of up to 5 taps, so that the multiply-adds into one sum are not waiting on each
// other's latency. Full blocks store plainly: masked stores are slow on AMD's AVX-512. Built
// for AVX-512 (F, BW, VL) only; elsewhere mixlab_dw_fwd_max_kw() says 0 and aten runs.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define MIXLAB_DW_FWD 1

alignas(64) const uint16_t kZerosBf16[16] = {0};
alignas(64) const float kZerosF32[16] = {0};
inline const float* zero_block(const float*) { return kZerosF32; }
inline const uint16_t* zero_block(const uint16_t*) { return kZerosBf16; }

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

inline void store16(float* p, __m512 v, __mmask16 m) {
    if (m == 0xFFFF)
        _mm512_storeu_ps(p, v);
    else
        _mm512_mask_storeu_ps(p, m, v);
}
inline void store16(uint16_t* p, __m512 v, __mmask16 m) {
#ifdef __AVX512BF16__
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
#else
    // round to nearest even; a NaN stays a quiet NaN
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
    const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
#endif
    if (m == 0xFFFF)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    else
        _mm256_mask_storeu_epi16(p, m, h);
}

inline __mmask16 block_mask(long C, long c) {
    return C - c >= 16 ? static_cast<__mmask16>(0xFFFF) : C - c <= 0 ? 0 : static_cast<__mmask16>((1u << (C - c)) - 1);
}

// prefetch pixels [first, first + n) (n <= WB) of a channels-last row, channels [c0, c0 + 16 * NCB)
template <typename T, int WB, int NCB>
inline void prefetch_pixels(const T* row, long first, long n, long C, long c0) {
#pragma GCC unroll 32
    for (int j = 0; j < WB; ++j)
        if (j < n) {
            const char* p = reinterpret_cast<const char*>(row + (first + j) * C + c0);
#pragma GCC unroll 4
            for (unsigned off = 0; off < 16 * NCB * sizeof(T); off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
        }
}

// one tile: output pixels [wo0, wo0 + nb) (nb <= WB) of row ho, channels [c0, c0 + 16 * NCB)
template <typename T, int KW, int WB, int NCB>
inline void fwd_tile(const T* xn, const float* wt, const float* bias, const T* arow, T* yrow, long C, long c0,
                     long H, long W,
                     long ho, long wo0, long nb, long KH, long ph, long pw, long dh, const T* pfrow,
                     const T* pfadd) {
    __mmask16 m[NCB];
    bool full = true;
    for (int b = 0; b < NCB; ++b) {
        m[b] = block_mask(C, c0 + 16 * b);
        full = full && m[b] == 0xFFFF;
    }
    __m512 acc[NCB][WB];
#pragma GCC unroll 4
    for (int b = 0; b < NCB; ++b) {
        const __m512 b0 = bias ? load16(bias + c0 + 16 * b, m[b]) : _mm512_setzero_ps();
#pragma GCC unroll 32
        for (int j = 0; j < WB; ++j) {
            const T* a = arow + (wo0 + j) * C + c0 + 16 * b;  // (masked loads are slow on AMD: only where needed)
            acc[b][j] = arow && j < nb ? _mm512_add_ps(b0, full ? load16(a) : load16(a, m[b])) : b0;
        }
    }
    for (long kh = 0; kh < KH; ++kh) {
        const long hi = ho - ph + kh * dh;
        if (hi < 0 || hi >= H) continue;
        const T* xrow = xn + hi * W * C + c0;
        __m512 wv[NCB][KW];
#pragma GCC unroll 4
        for (int b = 0; b < NCB; ++b)
#pragma GCC unroll 16
            for (int k = 0; k < KW; ++k) wv[b][k] = load16(wt + (kh * KW + k) * C + c0 + 16 * b, m[b]);
#pragma GCC unroll 64
        for (int i = 0; i < WB + KW - 1; ++i) {
            const long wi = wo0 - pw + i;
            const bool inside = wi >= 0 && wi < W;
#pragma GCC unroll 4
            for (int b = 0; b < NCB; ++b) {
                // a partial channel block reads through its mask; a column in the padding reads zeros
                const __m512 xv = full ? load16(inside ? xrow + wi * C + 16 * b : zero_block(xrow))
                                       : load16((inside ? xrow + wi * C : xrow) + 16 * b,
                                                inside ? m[b] : static_cast<__mmask16>(0));
#pragma GCC unroll 16
                for (int k = 0; k < KW; ++k) {
                    const int j = i - k;
                    if (j >= 0 && j < WB) acc[b][j] = _mm512_fmadd_ps(wv[b][k], xv, acc[b][j]);
                }
            }
        }
    }
    if ((c0 * sizeof(T)) % 64 == 0) {  // (once per cache line of a pixel's channels)
        // the input row the next output row meets first, and that row's summand (read first thing
        // there): fetched now, while this row computes
        if (pfrow) prefetch_pixels<T, WB, NCB>(pfrow, wo0, imin(WB, W - wo0), C, c0);
        if (pfadd) prefetch_pixels<T, WB, NCB>(pfadd, wo0, nb, C, c0);
    }
#pragma GCC unroll 4
    for (int b = 0; b < NCB; ++b)
#pragma GCC unroll 32
        for (int j = 0; j < WB; ++j)
            if (j < nb) store16(yrow + (wo0 + j) * C + c0 + 16 * b, acc[b][j], m[b]);
}

template <typename T, int KW, int WB, int NCB>
void fwd_rows(const T* x, const float* wt, const float* bias, const T* add, T* y, long N, long C, long H, long W,
              long Ho, long Wo,
              long KH, long ph, long pw, long dh, int nthreads) {
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static)
    for (long n = 0; n < N; ++n)
        for (long ho = 0; ho < Ho; ++ho) {
            const T* xn = x + n * H * W * C;
            T* yrow = y + (n * Ho + ho) * Wo * C;
            const T* arow = add ? add + (n * Ho + ho) * Wo * C : nullptr;
            const long hnext = ho + 1 - ph + (KH - 1) * dh;
            const T* pfrow = ho + 1 < Ho && hnext >= 0 && hnext < H ? xn + hnext * W * C : nullptr;
            const T* pfadd = add && n * Ho + ho + 1 < N * Ho ? arow + Wo * C : nullptr;  // (rows are contiguous)
            for (long wo0 = 0; wo0 < Wo; wo0 += WB)
                for (long c0 = 0; c0 < C; c0 += 16 * NCB)
                    fwd_tile<T, KW, WB, NCB>(xn, wt, bias, arow, yrow, C, c0, H, W, ho, wo0, imin(WB, Wo - wo0), KH, ph, pw,
                                             dh, pfrow, pfadd);
        }
}

template <typename T, int KW>
void fwd_kw(const T* x, const float* wt, const float* bias, const T* add, T* y, long N, long C, long H, long W,
            long Ho, long Wo,
            long KH, long ph, long pw, long dh, int nthreads) {
    if (KW <= 5)  // 2 x 8 sums + 2 x KW weights + 2 inputs <= 28 of the 32 registers
        fwd_rows<T, KW, 8, 2>(x, wt, bias, add, y, N, C, H, W, Ho, Wo, KH, ph, pw, dh, nthreads);
    else if (Wo > 8)  // 16 sums + KW weights + 1 input
        fwd_rows<T, KW, 16, 1>(x, wt, bias, add, y, N, C, H, W, Ho, Wo, KH, ph, pw, dh, nthreads);
    else if (Wo > 4)
        fwd_rows<T, KW, 8, 1>(x, wt, bias, add, y, N, C, H, W, Ho, Wo, KH, ph, pw, dh, nthreads);
    else
        fwd_rows<T, KW, 4, 1>(x, wt, bias, add, y, N, C, H, W, Ho, Wo, KH, ph, pw, dh, nthreads);
}
// Fetches a span of memory into L2 a few cache lines per call, spread over work that is computing
// on something else: the next image's input and output gradient, while this image's are summed
// (the tiled form reads an image in strided passes, which the hardware prefetcher serves poorly;
// bf16, 2 EPYC cores: 256x128x32x32 3x3 7.2 -> 6.5 ms, ConvMixer's 5x5 2.2 -> 1.9).
struct SpanPrefetch {
    const char* p[2] = {nullptr, nullptr};
    const char* end[2] = {nullptr, nullptr};
    void add(int i, const void* start, size_t bytes) {
        p[i] = static_cast<const char*>(start);
        end[i] = start ? p[i] + bytes : nullptr;
    }
    void step(long lines) {
        for (int i = 0; i < 2; ++i)
            for (; lines > 0 && p[i] < end[i]; --lines, p[i] += 64) _mm_prefetch(p[i], _MM_HINT_T1);
    }
};

// Weight gradient, register-tiled (rows of 2-13 taps, column dilation 1; AVX-512): for 16 channels
// and one kernel row, the KW sums stay in registers over the whole image; a tile of WB output-
// gradient pixels is widened once, each input pixel of the row once, and every (pixel, tap) pair
// it meets is one multiply-add. Against the forms above (bf16, 2 EPYC cores, ms): Conv2Former's
// 11x11 on 128x64x32x32 14.3 -> 5.1, 128x256x8x8 2.8 -> 1.3; ConvMixer's 5x5 2.5 -> 2.0; 7x7 on
// 128x64x32x32 4.7 -> 2.5; on 4x4 maps and 3x3 rows on 8x8 maps they stay faster (kept there).
template <typename T, int KW, int WB>
void image_wgrad_tiled(const T* xn, const T* gn, float* acc, long C, long H, long W, long Ho, long Wo, long KH,
                       long ph, long pw, long dh, SpanPrefetch& pf, long pf_lines) {
    for (long c0 = 0; c0 < C; c0 += 16) {
        const __mmask16 m = block_mask(C, c0);
        const bool full = m == 0xFFFF;
        for (long kh = 0; kh < KH; ++kh) {
            __m512 s[KW];
#pragma GCC unroll 16
            for (int k = 0; k < KW; ++k) s[k] = _mm512_setzero_ps();
            for (long ho = 0; ho < Ho; ++ho) {
                const long hi = ho - ph + kh * dh;
                if (hi < 0 || hi >= H) continue;
                pf.step(pf_lines);
                const T* grow = gn + ho * Wo * C + c0;
                const T* xrow = xn + hi * W * C + c0;
                const long full_end = (Wo / WB) * WB;
                for (long wo0 = 0; wo0 < full_end; wo0 += WB) {
                    __m512 gv[WB];
#pragma GCC unroll 16
                    for (int j = 0; j < WB; ++j)
                        gv[j] = full ? load16(grow + (wo0 + j) * C) : load16(grow + (wo0 + j) * C, m);
#pragma GCC unroll 32
                    for (int i = 0; i < WB + KW - 1; ++i) {
                        const long wi = wo0 - pw + i;
                        const bool inside = wi >= 0 && wi < W;
                        const __m512 xv = full ? load16(inside ? xrow + wi * C : zero_block(xrow))
                                               : load16(inside ? xrow + wi * C : xrow,
                                                        inside ? m : static_cast<__mmask16>(0));
#pragma GCC unroll 16
                        for (int k = 0; k < KW; ++k) {
                            const int j = i - k;
                            if (j >= 0 && j < WB) s[k] = _mm512_fmadd_ps(gv[j], xv, s[k]);
                        }
                    }
                }
                // the last pixels of the row, fewer than a tile: each (pixel, tap) pair that exists,
                // and no other (a zero gradient times an Inf input would be NaN where aten's is not)
                for (long wo = full_end; wo < Wo; ++wo) {
                    const __m512 gv = full ? load16(grow + wo * C) : load16(grow + wo * C, m);
#pragma GCC unroll 16
                    for (int k = 0; k < KW; ++k) {
                        const long wi = wo - pw + k;
                        if (wi < 0 || wi >= W) continue;
                        s[k] = _mm512_fmadd_ps(gv, full ? load16(xrow + wi * C) : load16(xrow + wi * C, m), s[k]);
                    }
                }
            }
#pragma GCC unroll 16
            for (int k = 0; k < KW; ++k) {
                float* a = acc + (kh * KW + k) * C + c0;
                _mm512_mask_storeu_ps(a, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, a), s[k]));
            }
        }
    }
}
#endif  // AVX-512

template <typename T>
long image_wgrad_tiled_any(const T* xn, const T* gn, float* acc, long C, long H, long W, long Ho, long Wo, long KH,
                           long KW, long ph, long pw, long dh, long dw, const T* xnext, const T* gnext) {
#ifdef MIXLAB_DW_FWD
    // where it was faster than the forms above (bf16, 2 EPYC cores): every row on maps 16 or more
    // wide; rows of 5 or more taps on narrower maps but 4-wide ones (half a tile would be idle)
    if (dw != 1 || Wo <= 4 || (Wo < 16 && KW < 5)) return 0;
    SpanPrefetch pf;  // the next image (xnext, gnext; null for none), spread over this one's rows
    pf.add(0, xnext, static_cast<size_t>(H * W * C) * sizeof(T));
    pf.add(1, gnext, static_cast<size_t>(Ho * Wo * C) * sizeof(T));
    const long rows = (C + 15) / 16 * KH * Ho;
    const long pf_lines = ((H * W + Ho * Wo) * C * static_cast<long>(sizeof(T)) / 64 + rows - 1) / rows + 1;
    switch (KW) {
#define MIXLAB_TILED_KW(K) \
    case K: image_wgrad_tiled<T, K, 8>(xn, gn, acc, C, H, W, Ho, Wo, KH, ph, pw, dh, pf, pf_lines); return C;
        MIXLAB_TILED_KW(2) MIXLAB_TILED_KW(3) MIXLAB_TILED_KW(4) MIXLAB_TILED_KW(5) MIXLAB_TILED_KW(6)
        MIXLAB_TILED_KW(7) MIXLAB_TILED_KW(8) MIXLAB_TILED_KW(9) MIXLAB_TILED_KW(10) MIXLAB_TILED_KW(11)
        MIXLAB_TILED_KW(12) MIXLAB_TILED_KW(13)
#undef MIXLAB_TILED_KW
        default: return 0;
    }
#else
    (void)xn, (void)gn, (void)acc, (void)C, (void)H, (void)W, (void)Ho, (void)Wo, (void)KH, (void)KW, (void)ph;
    (void)pw, (void)dh, (void)dw, (void)xnext, (void)gnext;
    return 0;
#endif
}

constexpr long FWD_MAX_KW = 13;

// 0: done; 2: not built for this CPU, or a kernel row wider than FWD_MAX_KW taps, or column dilation
template <typename T>
int fwd_nhwc(const T* x, const float* wt, const float* bias, const T* add, T* y, long N, long C, long H, long W,
             long Ho, long Wo,
             long KH, long KW, long ph, long pw, long dh, long dw, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (dw != 1 || KW < 1 || KW > FWD_MAX_KW) return 2;
#ifdef MIXLAB_DW_FWD
    switch (KW) {
#define MIXLAB_FWD_KW(K) \
    case K: fwd_kw<T, K>(x, wt, bias, add, y, N, C, H, W, Ho, Wo, KH, ph, pw, dh, nthreads); return 0;
        MIXLAB_FWD_KW(1) MIXLAB_FWD_KW(2) MIXLAB_FWD_KW(3) MIXLAB_FWD_KW(4) MIXLAB_FWD_KW(5) MIXLAB_FWD_KW(6)
        MIXLAB_FWD_KW(7) MIXLAB_FWD_KW(8) MIXLAB_FWD_KW(9) MIXLAB_FWD_KW(10) MIXLAB_FWD_KW(11) MIXLAB_FWD_KW(12)
        MIXLAB_FWD_KW(13)
#undef MIXLAB_FWD_KW
        default: return 2;
    }
#else
    (void)x, (void)wt, (void)bias, (void)add, (void)y, (void)N, (void)C, (void)H, (void)W, (void)Ho, (void)Wo, (void)KH;
    (void)ph, (void)pw, (void)dh;
    return 2;
#endif
}

}  // namespace

#define MIXLAB_ARGS float* bias_out, long N, long C, long H, long W, long Ho, long Wo, long KH, long KW, long ph, long pw, \
                    long dh, long dw, int nthreads
#define MIXLAB_PASS bias_out, N, C, H, W, Ho, Wo, KH, KW, ph, pw, dh, dw, nthreads
#define MIXLAB_FWD_ARGS long N, long C, long H, long W, long Ho, long Wo, long KH, long KW, long ph, long pw, long dh, \
                        long dw, int nthreads
#define MIXLAB_FWD_PASS N, C, H, W, Ho, Wo, KH, KW, ph, pw, dh, dw, nthreads

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
// y = conv(x) + bias + add: `bias` (C, fp32) and `add` (an output-shaped NHWC tensor summed in
// before the rounding: a residual gradient) may each be null
int mixlab_dw_fwd_nhwc_f32(const float* x, const float* wt, const float* bias, const float* add, float* y,
                           MIXLAB_FWD_ARGS) {
    return fwd_nhwc<float>(x, wt, bias, add, y, MIXLAB_FWD_PASS);
}
int mixlab_dw_fwd_nhwc_bf16(const uint16_t* x, const float* wt, const float* bias, const uint16_t* add, uint16_t* y,
                            MIXLAB_FWD_ARGS) {
    return fwd_nhwc<uint16_t>(x, wt, bias, add, y, MIXLAB_FWD_PASS);
}
// the forward kernel's widest kernel row; 0 where it is not built (no AVX-512)
long mixlab_dw_fwd_max_kw(void) {
#ifdef MIXLAB_DW_FWD
    return FWD_MAX_KW;
#else
    return 0;
#endif
}
int mixlab_dw_abi_version(void) { return 4; }
}
