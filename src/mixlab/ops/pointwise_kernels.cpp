// The weight gradient of a 1x1 convolution (or a linear layer) on the CPU, bf16 inputs:
//
//     gw[o][i] = sum_m g[m][o] * x[m][i]        gb[o] = sum_m g[m][o]
//
// x (M, C_in) and g (M, C_out) are the rows of a channels-last map and of its output gradient.
// This is a matrix product whose long dimension is the one summed over (M = N*H*W, up to
// 262144 in Conv2Former's first stage against 64 to 512 channels). aten computes it through
// oneDNN at 490-820 GFLOP/s on 2 EPYC cores where the forward of the same layer runs at
// 820-930 (bf16, Conv2Former-N's layers, benchmarks/bench_pointwise.py): the product's
// operands must be repacked along M for the bf16 dot-product instruction, and oneDNN does that
// as separate passes over both tensors. Here each thread packs a chunk of 256 rows of both
// (pairs of rows interleaved: the layout `vdpbf16ps` reads) into buffers that stay in L1/L2,
// computes that chunk's contribution in 6 x 64 register tiles, and prefetches the next chunk's
// rows while it computes; the bias gradient is summed from the packed rows. Accumulation is
// fp32 throughout and the result is returned in fp32, unrounded (aten rounds it to bf16:
// relative errors of ~2e-3 against ~1e-5 here).
//
// Needs AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake / Sapphire Rapids and later) and
// channel counts that are multiples of 16; mixlab_pointwise_has_dot() says whether this build
// can run it, and the Python side keeps aten's product otherwise. Built by
// mixlab/ops/kernel_build.py, called through ctypes, threads from torch's OpenMP pool.
#include <omp.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

extern "C" int mixlab_pointwise_abi_version() { return 1; }

#if defined(__AVX512BF16__)
extern "C" int mixlab_pointwise_has_dot() { return 1; }

namespace {

constexpr long MC = 256;  // rows per packed chunk (128 pairs): x and g chunks of 64 channels fit in L1
constexpr int OB = 6;     // output rows per register tile (6 x 4 accumulators + 4 operands of 32 registers)

// rows a and b (n bf16 each, n % 16 == 0; b may be null: zeros) -> n 32-bit pairs (a_i low, b_i high),
// adding both rows into sums (fp32) when sums is not null
inline void pair_rows(const uint16_t* a, const uint16_t* b, uint32_t* out, long n, float* sums) {
    for (long i = 0; i < n; i += 16) {
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i)));
        const __m512i hi = b ? _mm512_slli_epi32(
                                   _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i))), 16)
                             : _mm512_setzero_si512();
        _mm512_storeu_si512(out + i, _mm512_or_si512(lo, hi));
        if (sums) {
            const __m512 s = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)), _mm512_castsi512_ps(hi));
            _mm512_storeu_ps(sums + i, _mm512_add_ps(_mm512_loadu_ps(sums + i), s));
        }
    }
}

// acc[o][16j..16j+15] += sum_p gp[p][o] . xp[p][16j..]  for o < NO, j < NJ; while computing, prefetch
// na (nb) cache lines from pa (pb): a slice of the next chunk's rows
template <int NO, int NJ>
void tile(const uint32_t* gp, const uint32_t* xp, long P, long Cout, long Cin, float* acc,
          const char* pa, long na, const char* pb, long nb) {
    __m512 c[NO][NJ];
    for (int o = 0; o < NO; ++o)
        for (int j = 0; j < NJ; ++j) c[o][j] = _mm512_loadu_ps(acc + o * Cin + 16 * j);
    for (long p = 0; p < P; ++p) {
        __m512i b[NJ];
        for (int j = 0; j < NJ; ++j) b[j] = _mm512_loadu_si512(xp + p * Cin + 16 * j);
        if (p < na) _mm_prefetch(pa + 64 * p, _MM_HINT_T1);
        if (p < nb) _mm_prefetch(pb + 64 * p, _MM_HINT_T1);
        for (int o = 0; o < NO; ++o) {
            const __m512i a = _mm512_set1_epi32(static_cast<int>(gp[p * Cout + o]));
            for (int j = 0; j < NJ; ++j) c[o][j] = _mm512_dpbf16_ps(c[o][j], (__m512bh)a, (__m512bh)b[j]);
        }
    }
    for (int o = 0; o < NO; ++o)
        for (int j = 0; j < NJ; ++j) _mm512_storeu_ps(acc + o * Cin + 16 * j, c[o][j]);
}

template <int NO>
void tile_j(int nj, const uint32_t* gp, const uint32_t* xp, long P, long Cout, long Cin, float* acc,
            const char* pa, long na, const char* pb, long nb) {
    switch (nj) {
        case 4: tile<NO, 4>(gp, xp, P, Cout, Cin, acc, pa, na, pb, nb); break;
        case 3: tile<NO, 3>(gp, xp, P, Cout, Cin, acc, pa, na, pb, nb); break;
        case 2: tile<NO, 2>(gp, xp, P, Cout, Cin, acc, pa, na, pb, nb); break;
        default: tile<NO, 1>(gp, xp, P, Cout, Cin, acc, pa, na, pb, nb); break;
    }
}

void tile_any(int no, int nj, const uint32_t* gp, const uint32_t* xp, long P, long Cout, long Cin, float* acc,
              const char* pa, long na, const char* pb, long nb) {
    switch (no) {
        case 6: tile_j<6>(nj, gp, xp, P, Cout, Cin, acc, pa, na, pb, nb); break;
        case 5: tile_j<5>(nj, gp, xp, P, Cout, Cin, acc, pa, na, pb, nb); break;
        case 4: tile_j<4>(nj, gp, xp, P, Cout, Cin, acc, pa, na, pb, nb); break;
        case 3: tile_j<3>(nj, gp, xp, P, Cout, Cin, acc, pa, na, pb, nb); break;
        case 2: tile_j<2>(nj, gp, xp, P, Cout, Cin, acc, pa, na, pb, nb); break;
        default: tile_j<1>(nj, gp, xp, P, Cout, Cin, acc, pa, na, pb, nb); break;
    }
}

inline long lines(long bytes) { return (bytes + 63) / 64; }

// one thread's rows [m_begin, m_end) (m_begin even) into acc (Cout x Cin, zeroed) and bsum (Cout, or null)
void rows_product(const uint16_t* x, const uint16_t* g, long m_begin, long m_end, long Cin, long Cout,
                  float* acc, double* bsum, uint32_t* xp, uint32_t* gp, float* csum) {
    const long n_tiles = ((Cin + 63) / 64) * ((Cout + OB - 1) / OB);
    for (long m0 = m_begin; m0 < m_end; m0 += MC) {
        const long r = m_end - m0 < MC ? m_end - m0 : MC, P = (r + 1) / 2;
        if (bsum) std::memset(csum, 0, sizeof(float) * Cout);
        for (long p = 0; p < P; ++p) {
            const long ra = m0 + 2 * p;
            const bool two = 2 * p + 1 < r;  // an odd last row pairs with zeros
            pair_rows(x + ra * Cin, two ? x + (ra + 1) * Cin : nullptr, xp + p * Cin, Cin, nullptr);
            pair_rows(g + ra * Cout, two ? g + (ra + 1) * Cout : nullptr, gp + p * Cout, Cout, bsum ? csum : nullptr);
        }
        if (bsum)
            for (long o = 0; o < Cout; ++o) bsum[o] += csum[o];
        // the next chunk's rows (contiguous in x and in g), a slice per tile
        const long r1 = m_end - (m0 + MC) < MC ? (m_end > m0 + MC ? m_end - (m0 + MC) : 0) : MC;
        const char* nx = reinterpret_cast<const char*>(x + (m0 + MC) * Cin);
        const char* ng = reinterpret_cast<const char*>(g + (m0 + MC) * Cout);
        const long lx = lines(r1 * Cin * 2), lg = lines(r1 * Cout * 2);
        const long qx = (lx + n_tiles - 1) / n_tiles, qg = (lg + n_tiles - 1) / n_tiles;
        long q = 0;
        for (long i0 = 0; i0 < Cin; i0 += 64) {
            const int nj = static_cast<int>((Cin - i0) / 16 < 4 ? (Cin - i0) / 16 : 4);
            for (long o0 = 0; o0 < Cout; o0 += OB, ++q) {
                const int no = static_cast<int>(Cout - o0 < OB ? Cout - o0 : OB);
                const long ax = q * qx < lx ? (lx - q * qx < qx ? lx - q * qx : qx) : 0;
                const long ag = q * qg < lg ? (lg - q * qg < qg ? lg - q * qg : qg) : 0;
                tile_any(no, nj, gp + o0, xp + i0, P, Cout, Cin, acc + o0 * Cin + i0, nx + 64 * q * qx, ax,
                         ng + 64 * q * qg, ag);
            }
        }
    }
}

}  // namespace

// gw (Cout x Cin, fp32) = g^T x; gb (Cout, fp32; null: not computed) = column sums of g.
// Returns 0; 1 when a buffer could not be allocated; 2 when a channel count is not a multiple of 16.
extern "C" int mixlab_pointwise_weight_grad_bf16(const uint16_t* x, const uint16_t* g, float* gw, float* gb, long M,
                                                 long Cin, long Cout, int nthreads) {
    if (Cin % 16 || Cout % 16 || Cin <= 0 || Cout <= 0) return 2;
    if (nthreads < 1) nthreads = 1;
    const long n = Cout * Cin;
    // per-thread partial products (fp32) and bias sums (fp64), summed at the end
    float* part = static_cast<float*>(std::calloc(static_cast<size_t>(nthreads) * n, sizeof(float)));
    double* bpart = static_cast<double*>(std::calloc(static_cast<size_t>(nthreads) * Cout, sizeof(double)));
    int fail = part == nullptr || bpart == nullptr;
    if (!fail) {
#pragma omp parallel num_threads(nthreads)
        {
            const int t = omp_get_thread_num(), T = omp_get_num_threads();
            const long per = ((M + T - 1) / T + 1) & ~1L;  // even, so that pairs never straddle two threads
            const long m_begin = t * per < M ? t * per : M, m_end = m_begin + per < M ? m_begin + per : M;
            auto* xp = static_cast<uint32_t*>(std::aligned_alloc(64, sizeof(uint32_t) * (MC / 2) * Cin));
            auto* gp = static_cast<uint32_t*>(std::aligned_alloc(64, sizeof(uint32_t) * (MC / 2) * Cout));
            auto* csum = static_cast<float*>(std::malloc(sizeof(float) * Cout));
            if (!xp || !gp || !csum) {
#pragma omp atomic write
                fail = 1;
            } else {
                rows_product(x, g, m_begin, m_end, Cin, Cout, part + static_cast<long>(t) * n,
                             gb ? bpart + static_cast<long>(t) * Cout : nullptr, xp, gp, csum);
            }
            std::free(xp);
            std::free(gp);
            std::free(csum);
        }
    }
    if (!fail) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (long k = 0; k < n; ++k) {
            float s = 0.f;
            for (int t = 0; t < nthreads; ++t) s += part[static_cast<long>(t) * n + k];
            gw[k] = s;
        }
        if (gb)
            for (long o = 0; o < Cout; ++o) {
                double s = 0.0;
                for (int t = 0; t < nthreads; ++t) s += bpart[static_cast<long>(t) * Cout + o];
                gb[o] = static_cast<float>(s);
            }
    }
    std::free(part);
    std::free(bpart);
    return fail;
}
#else
// without AVX512-BF16 there is no fast form here: aten's product is used
extern "C" int mixlab_pointwise_has_dot() { return 0; }
extern "C" int mixlab_pointwise_weight_grad_bf16(const uint16_t*, const uint16_t*, float*, float*, long, long, long,
                                                 int) {
    return 3;
}
#endif
