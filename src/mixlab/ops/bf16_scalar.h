// bf16 <-> fp32 for one value, in forms GCC vectorises inside `omp simd` loops, and for a row of
// fp32 values (store_row): shared by the kernels that keep bf16 tensors as uint16 (gelu_kernels.cpp,
// layernorm_kernels.cpp, resample_kernels.cpp). A kernel file includes it by name; kernel_build.py hashes it with the
// file that includes it.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#endif

namespace mixlab_bf16 {

inline float widen(float v) { return v; }
// bit casts through __builtin_bit_cast, not memcpy: a memcpy to a local keeps GCC from vectorising
inline float widen(uint16_t v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16); }
inline void store(float* p, float v) { *p = v; }
inline uint16_t to_bf16(float v) {
    const uint32_t u = __builtin_bit_cast(uint32_t, v);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest, ties to even
    return static_cast<uint16_t>(v != v ? 0x7FC0u : r);          // NaN stays NaN
}
inline void store(uint16_t* p, float v) { *p = to_bf16(v); }

// a row of fp32 values stored as T: bf16 rounded to nearest even, by the CPU's own conversion
// where it has one (the portable loop vectorises poorly: it made LayerNorm's bf16 rows slower than fp32)
inline void store_row(float* dst, const float* src, long n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void store_row(uint16_t* dst, const float* src, long n) {
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    long c = 0;
    for (; c + 16 <= n; c += 16)  // plain stores: masked ones are slow on AMD's AVX-512
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + c)));
    if (c < n) {
        const __mmask16 m = static_cast<__mmask16>((1u << (n - c)) - 1);
        _mm256_mask_storeu_epi16(dst + c, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + c)));
    }
#else
#pragma omp simd
    for (long i = 0; i < n; ++i) dst[i] = to_bf16(src[i]);
#endif
}

}  // namespace mixlab_bf16
