// Per-channel sums over the rows of a channels-last tensor, and the value a bf16 store keeps:
// shared by the kernels that normalise per channel (gelu_kernels.cpp: GELU + BatchNorm;
// resample_kernels.cpp: BatchNorm + max-pool + ReLU). A kernel file includes it by name;
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
    for (long c = 0; c < C; ++c) {
        double a = 0.0, b = 0.0;
        for (int t = 0; t < nthreads; ++t) {
            a += dbuf[static_cast<size_t>(t) * 2 * C + c];
            b += dbuf[static_cast<size_t>(t) * 2 * C + C + c];
        }
        out1[c] = a;
        out2[c] = b;
    }
    std::free(dbuf);
    return 0;
}

}  // namespace mixlab_sums
