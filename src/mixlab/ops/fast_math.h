// Elementary functions in forms GCC vectorises inside `omp simd` loops (no calls, no branches),
// shared by the kernels that need them (gelu_kernels.cpp, seg_loss_kernels.cpp). A kernel file
// includes it by name; kernel_build.py hashes it with the file that includes it.
#pragma once
#include <cstdint>

namespace mixlab_math {

// exp(w) for w <= 0 (clamped to -80: exp(-80) times the erf polynomial and the density's
// constant are still normal floats). Lite: a degree-5
// polynomial (relative error below 3e-6), enough for bf16 results, which keep 8 bits.
template <bool Lite>
inline float exp_nonpos(float w) {
    w = w > -80.0f ? w : -80.0f;  // a select, not std::fmax (which GCC 12 leaves scalar)
    // n = round(w / ln 2) by the 1.5 * 2^23 trick (std::floor keeps GCC 12 from vectorising)
    const float n = (w * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (w - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
    float p;
    if (Lite) {
        p = 1.0f / 120.0f;
    } else {
        p = 1.0f / 5040.0f;
        p = p * r + 1.0f / 720.0f;
        p = p * r + 1.0f / 120.0f;
    }
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

// log(1 + e) for e in [0, 1], as 2 atanh(z) with z = e / (2 + e) in [0, 1/3] (odd series to z^13:
// relative error below 1e-8; no cancellation for small e, where it is e)
inline float log1p_unit(float e) {
    const float z = e / (2.0f + e), z2 = z * z;
    float s = 1.0f / 13.0f;
    s = s * z2 + 1.0f / 11.0f;
    s = s * z2 + 1.0f / 9.0f;
    s = s * z2 + 1.0f / 7.0f;
    s = s * z2 + 1.0f / 5.0f;
    s = s * z2 + 1.0f / 3.0f;
    s = s * z2 + 1.0f;
    return 2.0f * z * s;
}

}  // namespace mixlab_math
