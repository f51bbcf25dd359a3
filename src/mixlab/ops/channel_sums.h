// Per-channel sums over the rows of a channels-last tensor (BatchNorm's statistics among them),
// and the value a bf16 store keeps: shared by the kernels that normalise per channel
// (gelu_kernels.cpp: GELU + BatchNorm; resample_kernels.cpp: BatchNorm + pool / upsampling;
// bn_relu_kernels.cpp: BatchNorm + ReLU). A kernel file includes it by name;
// kernel_build.py hashes it with the file that includes it.
#pragma once
#include <omp.h>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "bf16_scalar.h"

namespace mixlab_sums {

inline long imin(long a, long b) { return a < b ? a : b; }

// v as a T stores it (bf16: rounded), so that sums see the values later passes read back
template <typename T>
inline float stored_value(float v) {
    if constexpr (std::is_same<T, uint16_t>::value) return mixlab_bf16::widen(mixlab_bf16::to_bf16(v));
    return v;
}

// The two per-channel sums of every thread, kept as nthreads blocks of [C sums, C sums] in buf,
// added up into out1 and out2
inline void fold_thread_sums(const double* buf, long C, int nthreads, double* out1, double* out2) {
    for (long c = 0; c < C; ++c) {
        double a = 0.0, b = 0.0;
        for (int t = 0; t < nthreads; ++t) {
            a += buf[static_cast<size_t>(t) * 2 * C + c];
            b += buf[static_cast<size_t>(t) * 2 * C + C + c];
        }
        out1[c] = a;
        out2[c] = b;
    }
}

constexpr long ROWS = 64;  // rows summed in fp32 (in registers) before they are added to the fp64 sums
constexpr long CB = 32;    // channels per register block: two sums of 32 fp32 = 4 AVX-512 registers

// Per-channel sums a_c = sum_r A(r, c), b_c = sum_r B(r, c) in fp64, split by rows over the
// threads; `Terms::add(r, c, a, b)` adds row r, channel c's two terms. A block of CB channels
// is summed over ROWS rows in registers, then added to this thread's fp64 sums.
template <typename Terms>
int channel_sums(const Terms& terms, long M, long C, double* out1, double* out2, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    double* dbuf = static_cast<double*>(std::calloc(static_cast<size_t>(nthreads) * 2 * C + 1, sizeof(double)));
    if (!dbuf) return 1;
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
        const int nt = omp_get_num_threads();
        double* d1 = dbuf + static_cast<size_t>(tid) * 2 * C;
        double* d2 = d1 + C;
        const long chunk = (M + nt - 1) / nt;
        const long lo = tid * chunk, hi = imin(M, lo + chunk);
        for (long r0 = lo; r0 < hi; r0 += ROWS) {
            const long r1 = imin(hi, r0 + ROWS);
            long c0 = 0;
            for (; c0 + CB <= C; c0 += CB) {
                float a[CB], b[CB];
                for (long c = 0; c < CB; ++c) a[c] = b[c] = 0.f;
                for (long r = r0; r < r1; ++r) {
#pragma omp simd
                    for (long c = 0; c < CB; ++c) terms.add(r, c0 + c, a[c], b[c]);
                }
                for (long c = 0; c < CB; ++c) {
                    d1[c0 + c] += a[c];
                    d2[c0 + c] += b[c];
                }
            }
            for (long c = c0; c < C; ++c) {  // channels past the last whole block
                float a = 0.f, b = 0.f;
                for (long r = r0; r < r1; ++r) terms.add(r, c, a, b);
                d1[c] += a;
                d2[c] += b;
            }
        }
    }
    fold_thread_sums(dbuf, C, nthreads, out1, out2);
    std::free(dbuf);
    return 0;
}

template <typename T>
struct Moments {  // statistics pass: x - center and its square
    const T* x;
    const float* center;
    long C;
    void add(long r, long c, float& a, float& b) const {
        const float d = mixlab_bf16::widen(x[r * C + c]) - center[c];
        a += d;
        b += d * d;
    }
};

// channel_sums for few channels (C < CB, dividing it, e.g. UNeXt's 16): rows of CB values hold
// CB / C pixels each, summed as CB channels about the centre repeated, then folded back to C
// (channel_sums' per-channel loop is scalar past its last whole block of CB channels)
template <typename Terms>
int sums_any_width(Terms terms, long M, long C, double* out1, double* out2, int nthreads) {
    if (C >= CB || CB % C != 0) return channel_sums(terms, M, C, out1, out2, nthreads);
    const long per = CB / C, Mv = M / per;
    float tiled[CB];
    double w1[CB], w2[CB];
    for (long j = 0; j < CB; ++j) tiled[j] = terms.center[j % C];
    Terms wide = terms;
    wide.C = CB;
    wide.center = tiled;
    if (channel_sums(wide, Mv, CB, w1, w2, nthreads)) return 1;
    for (long c = 0; c < C; ++c) out1[c] = out2[c] = 0.0;
    for (long j = 0; j < CB; ++j) {
        out1[j % C] += w1[j];
        out2[j % C] += w2[j];
    }
    for (long r = Mv * per; r < M; ++r)  // rows past the last whole block
        for (long c = 0; c < C; ++c) {
            float a = 0.f, b = 0.f;
            terms.add(r, c, a, b);
            out1[c] += a;
            out2[c] += b;
        }
    return 0;
}

template <typename T>
int bn_stats(const T* x, const float* center, long M, long C, double* sum, double* sumsq, int nthreads) {
    return sums_any_width(Moments<T>{x, center, C}, M, C, sum, sumsq, nthreads);
}

}  // namespace mixlab_sums
