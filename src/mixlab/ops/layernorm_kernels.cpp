// LayerNorm over the last, contiguous dimension on the CPU: forward and backward.
//
//   xhat = (x - mean) * rstd      y = xhat * gamma + beta      (per row of C values)
//
// x is (M, C) with C contiguous: a token tensor (B, N, C), an NHWC map seen as (N*H*W, C) (the
// channels-first LayerNorm2d of Conv2Former on a channels_last tensor), fp32 or bf16 (bf16 read
// as uint16 and widened by a shift, written back rounded to nearest even); gamma and beta fp32;
// all arithmetic fp32. The forward keeps mean and rstd per row (fp32, as aten does) for the
// backward:
//
//   dx = rstd * (dy*gamma - mean_C(dy*gamma) - xhat * mean_C(dy*gamma*xhat))
//   dgamma = sum_M dy * xhat      dbeta = sum_M dy
//
// Why: the rows of these models are short (64-512 values) and aten's CPU LayerNorm spends most of
// its time per row, not per value: on 2 EPYC cores, bf16, a 262144 x 64 tensor (Conv2Former-N's
// first stage, batch 256) took 6.7 ms forward and 5.9 ms backward, where adding two such tensors
// takes 1.2 ms. Here a row is three short loops over L1-resident values (sum; squared
// deviations; normalise), vectorised by the compiler, and the backward two; dgamma and dbeta are
// summed per thread in fp32 over blocks of 64 rows and then in fp64 (benchmarks/bench_layernorm.py).
//
// Built by mixlab/ops/kernel_build.py, called through ctypes on data pointers, threads from
// torch's own OpenMP pool.
#include <omp.h>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "bf16_scalar.h"

namespace {

using mixlab_bf16::store;
using mixlab_bf16::store_row;
using mixlab_bf16::to_bf16;
using mixlab_bf16::widen;

template <typename T, long CC>
void ln_fwd(const T* x, const float* gamma, const float* beta, T* y, float* mean_out, float* rstd_out, long M,
            long C_, float eps, int nthreads) {
    const long C = CC ? CC : C_;
    const float inv_c = 1.0f / static_cast<float>(C);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < M; ++r) {
        const T* xr = x + r * C;
        T* yr = y + r * C;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (long c = 0; c < C; ++c) s += widen(xr[c]);
        const float mean = s * inv_c;
        // the variance from deviations about the mean (the row is in L1): no cancellation
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (long c = 0; c < C; ++c) {
            const float d = widen(xr[c]) - mean;
            ss += d * d;
        }
        const float rstd = 1.0f / std::sqrt(ss * inv_c + eps);
        alignas(64) float buf[CC ? CC : 1];  // the row in fp32 (known widths), then stored as T
        if constexpr (CC != 0) {
#pragma omp simd
            for (long c = 0; c < C; ++c) buf[c] = (widen(xr[c]) - mean) * rstd * gamma[c] + beta[c];
            store_row(yr, buf, C);
        } else {
#pragma omp simd
            for (long c = 0; c < C; ++c) store(yr + c, (widen(xr[c]) - mean) * rstd * gamma[c] + beta[c]);
        }
        mean_out[r] = mean;
        rstd_out[r] = rstd;
    }
}

constexpr long kBlockRows = 64;  // rows summed in fp32 before the per-thread fp64 totals take them

template <typename T, long CC>
int ln_bwd(const T* x, const T* dy, const float* gamma, const float* mean, const float* rstd, T* dx, float* dgamma,
           float* dbeta, long M, long C_, int nthreads) {
    const long C = CC ? CC : C_;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > M) nthreads = static_cast<int>(M > 0 ? M : 1);
    // per thread: fp32 block sums of dgamma and dbeta (2C), then fp64 totals (2C)
    const size_t f_per = 2 * static_cast<size_t>(C), d_per = 2 * static_cast<size_t>(C);
    float* fsum = static_cast<float*>(std::calloc(static_cast<size_t>(nthreads) * f_per, sizeof(float)));
    double* dsum = static_cast<double*>(std::calloc(static_cast<size_t>(nthreads) * d_per, sizeof(double)));
    if (!fsum || !dsum) {
        std::free(fsum);
        std::free(dsum);
        return 1;
    }
    const float inv_c = 1.0f / static_cast<float>(C);
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
        const int nt = omp_get_num_threads();
        float* fg = fsum + tid * f_per;
        float* fb = fg + C;
        double* dg = dsum + tid * d_per;
        double* db = dg + C;
        const long lo = M * tid / nt, hi = M * (tid + 1) / nt;
        long in_block = 0;
        // block sums in locals of known size (kept in registers for narrow rows; the thread's
        // arrays above could alias the output as far as the compiler knows)
        alignas(64) float lg[CC ? CC : 1] = {}, lb[CC ? CC : 1] = {};
        float* bg = CC ? lg : fg;
        float* bb = CC ? lb : fb;
        for (long r = lo; r < hi; ++r) {
            const T* xr = x + r * C;
            const T* gr = dy + r * C;
            T* dxr = dx + r * C;
            const float mu = mean[r], rs = rstd[r];
            float a = 0.f, b = 0.f;
#pragma omp simd reduction(+ : a, b)
            for (long c = 0; c < C; ++c) {
                const float g = widen(gr[c]);
                const float xh = (widen(xr[c]) - mu) * rs;
                const float wg = g * gamma[c];
                a += wg;
                b += wg * xh;
                bg[c] += g * xh;
                bb[c] += g;
            }
            a *= inv_c;
            b *= inv_c;
            alignas(64) float buf[CC ? CC : 1];
            if constexpr (CC != 0) {
#pragma omp simd
                for (long c = 0; c < C; ++c) {
                    const float xh = (widen(xr[c]) - mu) * rs;
                    buf[c] = rs * (widen(gr[c]) * gamma[c] - a - xh * b);
                }
                store_row(dxr, buf, C);
            } else {
#pragma omp simd
                for (long c = 0; c < C; ++c) {
                    const float xh = (widen(xr[c]) - mu) * rs;
                    store(dxr + c, rs * (widen(gr[c]) * gamma[c] - a - xh * b));
                }
            }
            if (++in_block == kBlockRows || r + 1 == hi) {
                for (long c = 0; c < C; ++c) {
                    dg[c] += bg[c];
                    db[c] += bb[c];
                    bg[c] = bb[c] = 0.f;
                }
                in_block = 0;
            }
        }
    }
    for (long c = 0; c < C; ++c) {
        double sg = 0.0, sb = 0.0;
        for (int t = 0; t < nthreads; ++t) {
            sg += dsum[t * d_per + c];
            sb += dsum[t * d_per + C + c];
        }
        if (dgamma) dgamma[c] = static_cast<float>(sg);
        if (dbeta) dbeta[c] = static_cast<float>(sb);
    }
    std::free(fsum);
    std::free(dsum);
    return 0;
}

// rows of these widths get a loop with its trip count known to the compiler (unrolled, no
// remainder): Conv2Former's 64-512, ConvMLP's 64-256, UNeXt's 160-256
template <typename T>
void ln_fwd_any(const T* x, const float* gamma, const float* beta, T* y, float* mean, float* rstd, long M, long C,
                float eps, int nthreads) {
    switch (C) {
        case 64: return ln_fwd<T, 64>(x, gamma, beta, y, mean, rstd, M, C, eps, nthreads);
        case 128: return ln_fwd<T, 128>(x, gamma, beta, y, mean, rstd, M, C, eps, nthreads);
        case 160: return ln_fwd<T, 160>(x, gamma, beta, y, mean, rstd, M, C, eps, nthreads);
        case 256: return ln_fwd<T, 256>(x, gamma, beta, y, mean, rstd, M, C, eps, nthreads);
        case 512: return ln_fwd<T, 512>(x, gamma, beta, y, mean, rstd, M, C, eps, nthreads);
        default: return ln_fwd<T, 0>(x, gamma, beta, y, mean, rstd, M, C, eps, nthreads);
    }
}

template <typename T>
int ln_bwd_any(const T* x, const T* dy, const float* gamma, const float* mean, const float* rstd, T* dx,
               float* dgamma, float* dbeta, long M, long C, int nthreads) {
    switch (C) {
        case 64: return ln_bwd<T, 64>(x, dy, gamma, mean, rstd, dx, dgamma, dbeta, M, C, nthreads);
        case 128: return ln_bwd<T, 128>(x, dy, gamma, mean, rstd, dx, dgamma, dbeta, M, C, nthreads);
        case 160: return ln_bwd<T, 160>(x, dy, gamma, mean, rstd, dx, dgamma, dbeta, M, C, nthreads);
        case 256: return ln_bwd<T, 256>(x, dy, gamma, mean, rstd, dx, dgamma, dbeta, M, C, nthreads);
        case 512: return ln_bwd<T, 512>(x, dy, gamma, mean, rstd, dx, dgamma, dbeta, M, C, nthreads);
        default: return ln_bwd<T, 0>(x, dy, gamma, mean, rstd, dx, dgamma, dbeta, M, C, nthreads);
    }
}

}  // namespace

extern "C" {

long mixlab_ln_abi_version(void) { return 1; }

int mixlab_ln_fwd_f32(const float* x, const float* gamma, const float* beta, float* y, float* mean, float* rstd,
                      long M, long C, float eps, int nthreads) {
    ln_fwd_any<float>(x, gamma, beta, y, mean, rstd, M, C, eps, nthreads < 1 ? 1 : nthreads);
    return 0;
}

int mixlab_ln_fwd_bf16(const uint16_t* x, const float* gamma, const float* beta, uint16_t* y, float* mean,
                       float* rstd, long M, long C, float eps, int nthreads) {
    ln_fwd_any<uint16_t>(x, gamma, beta, y, mean, rstd, M, C, eps, nthreads < 1 ? 1 : nthreads);
    return 0;
}

int mixlab_ln_bwd_f32(const float* x, const float* dy, const float* gamma, const float* mean, const float* rstd,
                      float* dx, float* dgamma, float* dbeta, long M, long C, int nthreads) {
    return ln_bwd_any<float>(x, dy, gamma, mean, rstd, dx, dgamma, dbeta, M, C, nthreads);
}

int mixlab_ln_bwd_bf16(const uint16_t* x, const uint16_t* dy, const float* gamma, const float* mean,
                       const float* rstd, uint16_t* dx, float* dgamma, float* dbeta, long M, long C, int nthreads) {
    return ln_bwd_any<uint16_t>(x, dy, gamma, mean, rstd, dx, dgamma, dbeta, M, C, nthreads);
}

}  // extern "C"
