// bf16 <-> fp32 for one value, in forms GCC vectorises inside `omp simd` loops: shared by the
// kernels that keep bf16 tensors as uint16 (gelu_kernels.cpp, layernorm_kernels.cpp,
// resample_kernels.cpp). A kernel file includes it by name; kernel_build.py hashes it with the
// file that includes it.
#pragma once
#include <cstdint>

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

}  // namespace mixlab_bf16
