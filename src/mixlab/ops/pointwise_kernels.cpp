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

// one thread's rows [m_begin, m_end) (m_begin even) of acc (no x ni, zeroed) += b^T a, where a (M x ni) is
// the operand along the register tiles' vectors and b (M x no) the broadcast one; the column sums of
// a (sums_of_a) or of b into bsum (n of them, or null)
void rows_product(const uint16_t* a, const uint16_t* b, long m_begin, long m_end, long ni, long no,
                  float* acc, double* bsum, bool sums_of_a, uint32_t* ap, uint32_t* bp, float* csum) {
    const long n_tiles = ((ni + 63) / 64) * ((no + OB - 1) / OB);
    const long n_sums = sums_of_a ? ni : no;
    for (long m0 = m_begin; m0 < m_end; m0 += MC) {
        const long r = m_end - m0 < MC ? m_end - m0 : MC, P = (r + 1) / 2;
        if (bsum) std::memset(csum, 0, sizeof(float) * n_sums);
        float* sa = bsum && sums_of_a ? csum : nullptr;
        float* sb = bsum && !sums_of_a ? csum : nullptr;
        for (long p = 0; p < P; ++p) {
            const long ra = m0 + 2 * p;
            const bool two = 2 * p + 1 < r;  // an odd last row pairs with zeros
            pair_rows(a + ra * ni, two ? a + (ra + 1) * ni : nullptr, ap + p * ni, ni, sa);
            pair_rows(b + ra * no, two ? b + (ra + 1) * no : nullptr, bp + p * no, no, sb);
        }
        if (bsum)
            for (long o = 0; o < n_sums; ++o) bsum[o] += csum[o];
        // the next chunk's rows (contiguous in a and in b), a slice per tile
        const long r1 = m_end - (m0 + MC) < MC ? (m_end > m0 + MC ? m_end - (m0 + MC) : 0) : MC;
        const char* na_ = reinterpret_cast<const char*>(a + (m0 + MC) * ni);
        const char* nb_ = reinterpret_cast<const char*>(b + (m0 + MC) * no);
        const long la = lines(r1 * ni * 2), lb = lines(r1 * no * 2);
        const long qa = (la + n_tiles - 1) / n_tiles, qb = (lb + n_tiles - 1) / n_tiles;
        long q = 0;
        for (long i0 = 0; i0 < ni; i0 += 64) {
            const int nj = static_cast<int>((ni - i0) / 16 < 4 ? (ni - i0) / 16 : 4);
            for (long o0 = 0; o0 < no; o0 += OB, ++q) {
                const int nob = static_cast<int>(no - o0 < OB ? no - o0 : OB);
                const long ca = q * qa < la ? (la - q * qa < qa ? la - q * qa : qa) : 0;
                const long cb = q * qb < lb ? (lb - q * qb < qb ? lb - q * qb : qb) : 0;
                tile_any(nob, nj, bp + o0, ap + i0, P, no, ni, acc + o0 * ni + i0, na_ + 64 * q * qa, ca,
                         nb_ + 64 * q * qb, cb);
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
    // With few output channels the input goes broadcast and the output gradient along the register
    // tiles' vectors: for Conv2Former's 128 -> 64 layer (262144 rows) 5.3 against 6.7 ms the other way
    // round, 256 -> 128 5.2 against 5.5; from 256 outputs on, no better. The product is then gw's transpose.
    const bool swap = Cin > Cout && Cout <= 128;
    const uint16_t* a = swap ? g : x;
    const uint16_t* b = swap ? x : g;
    const long ni = swap ? Cout : Cin, no = swap ? Cin : Cout;
    if (!fail) {
#pragma omp parallel num_threads(nthreads)
        {
            const int t = omp_get_thread_num(), T = omp_get_num_threads();
            const long per = ((M + T - 1) / T + 1) & ~1L;  // even, so that pairs never straddle two threads
            const long m_begin = t * per < M ? t * per : M, m_end = m_begin + per < M ? m_begin + per : M;
            auto* ap = static_cast<uint32_t*>(std::aligned_alloc(64, sizeof(uint32_t) * (MC / 2) * ni));
            auto* bp = static_cast<uint32_t*>(std::aligned_alloc(64, sizeof(uint32_t) * (MC / 2) * no));
            auto* csum = static_cast<float*>(std::malloc(sizeof(float) * Cout));
            if (!ap || !bp || !csum) {
#pragma omp atomic write
                fail = 1;
            } else {
                rows_product(a, b, m_begin, m_end, ni, no, part + static_cast<long>(t) * n,
                             gb ? bpart + static_cast<long>(t) * Cout : nullptr, swap, ap, bp, csum);
            }
            std::free(ap);
            std::free(bp);
            std::free(csum);
        }
    }
    if (!fail) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (long k = 0; k < n; ++k) {  // k = o * Cin + i of gw; the swapped product holds it at i * Cout + o
            const long src = swap ? (k % Cin) * Cout + k / Cin : k;
            float s = 0.f;
            for (int t = 0; t < nthreads; ++t) s += part[static_cast<long>(t) * n + src];
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
