// BCE + soft Dice on logits (CPU, fp32), forward and backward in one pass each:
//
//   loss = w_bce * mean_j bce(x_j, t_j) + w_dice * (1 - mean_i D_i)
//   bce(x, t) = max(x, 0) - x t + log(1 + exp(-|x|))       p = sigmoid(x)
//   D_i = (2 I_i + s) / (P_i + T_i + s),  I_i = sum_j p t,  P_i = sum_j p,  T_i = sum_j t  over image i
//   dloss/dx_j = cb (p - t) + (k1_i t - k2_i) p (1 - p)
//
// (cb, k1_i, k2_i from the forward's sums, computed by the caller). UNeXt's loss: aten takes it
// as BCE-with-logits (whose log1p alone costs 2.7 ms for 524288 values on 2 EPYC cores) and five
// passes for the Dice, about 4 ms a step forward and backward, 5% of the UNeXt step at batch 8; here
// one pass forward (exp, the log series, the sigmoid) and one backward. Sums per image in fp64
// (per thread, over blocks of BLOCK values summed in fp32). Built by mixlab/ops/kernel_build.py,
// called through ctypes, threads from torch's OpenMP pool.
#include <omp.h>
#include <cstdint>
#include <cstdlib>

#include "fast_math.h"

namespace {

using mixlab_math::exp_nonpos;
using mixlab_math::log1p_unit;

constexpr long CH = 4096;  // values per chunk: one image's values are split into chunks
// values summed in fp32 before the fp64 sum: 32 to a vector lane with AVX-512, 64 with AVX2. Whole
// 4096-value chunks summed in fp32 (512 to a lane with AVX2) made the loss 4-8 fp32 ulps off the
// fp64 value on an AMD EPYC Zen 3 (aten's: under 1 ulp).
constexpr long BLOCK = 512;

}  // namespace

extern "C" {

int mixlab_seg_loss_abi_version(void) { return 1; }

// x, t: B images of n values each; sums (B x 4, fp64, written): bce sum, I, P, T per image.
// Returns 0, or 1 when the per-thread sums could not be allocated.
int mixlab_bce_dice_fwd(const float* x, const float* t, long B, long n, double* sums, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    const long per_image = (n + CH - 1) / CH, n_chunks = B * per_image;
    double* part = static_cast<double*>(std::calloc(static_cast<size_t>(nthreads) * B * 4, sizeof(double)));
    if (!part) return 1;
#pragma omp parallel num_threads(nthreads)
    {
        double* mine = part + static_cast<long>(omp_get_thread_num()) * B * 4;
#pragma omp for schedule(static)
        for (long k = 0; k < n_chunks; ++k) {
            const long i = k / per_image, j0 = (k % per_image) * CH, j1 = j0 + CH < n ? j0 + CH : n;
            const float* xi = x + i * n;
            const float* ti = t + i * n;
            double db = 0.0, di = 0.0, dp = 0.0, dt = 0.0;
            for (long b0 = j0; b0 < j1; b0 += BLOCK) {
                const long b1 = b0 + BLOCK < j1 ? b0 + BLOCK : j1;
                float sb = 0.f, si = 0.f, sp = 0.f, st = 0.f;
#pragma omp simd reduction(+ : sb, si, sp, st)
                for (long j = b0; j < b1; ++j) {
                    const float v = xi[j], tv = ti[j];
                    const float a = v < 0.f ? -v : v;
                    const float e = exp_nonpos<false>(-a);
                    const float p = v != v ? v : (v >= 0.f ? 1.0f : e) / (1.0f + e);  // NaN stays NaN
                    // max(v, 0) - v t written so that v = +inf, t = 0 gives inf (as aten's), not inf - inf * 0
                    sb += (v > 0.f ? v * (1.0f - tv) : -v * tv) + log1p_unit(e);
                    si += p * tv;
                    sp += p;
                    st += tv;
                }
                db += sb;
                di += si;
                dp += sp;
                dt += st;
            }
            mine[4 * i] += db;
            mine[4 * i + 1] += di;
            mine[4 * i + 2] += dp;
            mine[4 * i + 3] += dt;
        }
    }
    for (long q = 0; q < B * 4; ++q) {
        double s = 0.0;
        for (int th = 0; th < nthreads; ++th) s += part[static_cast<long>(th) * B * 4 + q];
        sums[q] = s;
    }
    std::free(part);
    return 0;
}

// dx_j = cb (p - t) + (k1_i t - k2_i) p (1 - p) for the values of image i
int mixlab_bce_dice_bwd(const float* x, const float* t, long B, long n, float cb, const float* k1, const float* k2,
                        float* dx, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    const long per_image = (n + CH - 1) / CH, n_chunks = B * per_image;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long k = 0; k < n_chunks; ++k) {
        const long i = k / per_image, j0 = (k % per_image) * CH, j1 = j0 + CH < n ? j0 + CH : n;
        const float* xi = x + i * n;
        const float* ti = t + i * n;
        float* di = dx + i * n;
        const float a1 = k1[i], a2 = k2[i];
#pragma omp simd
        for (long j = j0; j < j1; ++j) {
            const float v = xi[j], tv = ti[j];
            const float a = v < 0.f ? -v : v;
            const float e = exp_nonpos<false>(-a);
            const float p = v != v ? v : (v >= 0.f ? 1.0f : e) / (1.0f + e);  // NaN stays NaN
            di[j] = cb * (p - tv) + (a1 * tv - a2) * p * (1.0f - p);
        }
    }
    return 0;
}

}  // extern "C"
