// The tile transforms of a Winograd F(4x4, 3x3) convolution on channels-last fp32 maps (CPU).
//
// A 3x3 stride-1 convolution computed tile by tile: each 4x4 block of the output comes from the
// 6x6 block of the input around it, and in the transformed domain the 9 * 16 multiply-adds per
// channel pair become 36 (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
// 2016; the matrices B^T, G, A^T of their F(4x4, 3x3)). What remains are 36 independent matrix
// products, one per position of the 6x6 transformed tile, which mixlab/ops/winograd.py leaves to
// torch.bmm (MKL); this file only moves data between the channels-last maps and the
// [36][tiles][channels] matrices:
//
//   input_tf:       x (N, H, W, C)        -> V[36][T][C]    = B^T d B   (d: the 6x6 input tile)
//   output_tf:      M[36][T][Co]          -> y (N, Ho, Wo, Co) = A^T m A (+ bias)
//   grad_tf:        dy (N, Ho, Wo, Co)    -> Mg[36][T][Co]  = A dy A^T  (the output transform's adjoint)
//   input_grad_tf:  dV[36][T][C]          -> dx (N, H, W, C) += B dv B^T (the input transform's adjoint,
//                                            overlapping tiles summed)
//
// Tile (n, i, j), t = (n * TH + i) * TW + j, reads input rows 4i - p .. 4i - p + 5 and columns
// 4j - p .. 4j - p + 5 (zero outside the map: the padding) and writes output rows 4i .. 4i + 3
// (those below Ho) and columns 4j .. 4j + 3. Channels go 16 at a time through fixed-size lane
// loops that the compiler vectorises. Built by mixlab/ops/kernel_build.py, called through ctypes
// on data pointers, threads from torch's own OpenMP pool.
#include <omp.h>


namespace {

constexpr int L = 16;  // channels per pass

// Lane vectors in and out: w (<= L) channels, the rest of a loaded vector zero. A fixed-size
// loop for whole vectors (inlined as vector moves; a library copy with a run-time size was a
// call per 64 bytes and took most of the transforms' time).
inline void load(float* dst, const float* src, long w) {
    if (w == L) {
#pragma omp simd
        for (int l = 0; l < L; ++l) dst[l] = src[l];
    } else {
        for (int l = 0; l < L; ++l) dst[l] = l < w ? src[l] : 0.f;
    }
}

inline void zero(float* dst) {
#pragma omp simd
    for (int l = 0; l < L; ++l) dst[l] = 0.f;
}

inline void store(float* dst, const float* src, long w) {
    if (w == L) {
#pragma omp simd
        for (int l = 0; l < L; ++l) dst[l] = src[l];
    } else {
        for (long l = 0; l < w; ++l) dst[l] = src[l];
    }
}

// out[k] = (B^T v)[k] for k < 6, v[r] a lane vector, rows of v at stride vs, of out at stride os
inline void bt6(const float* v, long vs, float* out, long os) {
    const float *d0 = v, *d1 = v + vs, *d2 = v + 2 * vs, *d3 = v + 3 * vs, *d4 = v + 4 * vs, *d5 = v + 5 * vs;
    float *o0 = out, *o1 = out + os, *o2 = out + 2 * os, *o3 = out + 3 * os, *o4 = out + 4 * os, *o5 = out + 5 * os;
#pragma omp simd
    for (int l = 0; l < L; ++l) {
        o0[l] = 4.f * d0[l] - 5.f * d2[l] + d4[l];
        o1[l] = -4.f * (d1[l] + d2[l]) + d3[l] + d4[l];
        o2[l] = 4.f * (d1[l] - d2[l]) - d3[l] + d4[l];
        o3[l] = -2.f * (d1[l] - d3[l]) - d2[l] + d4[l];
        o4[l] = 2.f * (d1[l] - d3[l]) - d2[l] + d4[l];
        o5[l] = 4.f * d1[l] - 5.f * d3[l] + d5[l];
    }
}

// out[a] = (A^T m)[a] for a < 4 from 6 rows
inline void at6(const float* m, long ms, float* out, long os) {
    const float *m0 = m, *m1 = m + ms, *m2 = m + 2 * ms, *m3 = m + 3 * ms, *m4 = m + 4 * ms, *m5 = m + 5 * ms;
    float *o0 = out, *o1 = out + os, *o2 = out + 2 * os, *o3 = out + 3 * os;
#pragma omp simd
    for (int l = 0; l < L; ++l) {
        const float s12 = m1[l] + m2[l], d12 = m1[l] - m2[l], s34 = m3[l] + m4[l], d34 = m3[l] - m4[l];
        o0[l] = m0[l] + s12 + s34;
        o1[l] = d12 + 2.f * d34;
        o2[l] = s12 + 4.f * s34;
        o3[l] = d12 + 8.f * d34 + m5[l];
    }
}

// out[r] = (A g)[r] for r < 6 from 4 rows
inline void a4(const float* g, long gs, float* out, long os) {
    const float *g0 = g, *g1 = g + gs, *g2 = g + 2 * gs, *g3 = g + 3 * gs;
    float *o0 = out, *o1 = out + os, *o2 = out + 2 * os, *o3 = out + 3 * os, *o4 = out + 4 * os, *o5 = out + 5 * os;
#pragma omp simd
    for (int l = 0; l < L; ++l) {
        const float e = g0[l] + g2[l], f = g1[l] + g3[l], e4 = g0[l] + 4.f * g2[l], f8 = 2.f * g1[l] + 8.f * g3[l];
        o0[l] = g0[l];
        o1[l] = e + f;
        o2[l] = e - f;
        o3[l] = e4 + f8;
        o4[l] = e4 - f8;
        o5[l] = g3[l];
    }
}

// out[r] = (B v)[r] for r < 6 from 6 rows
inline void b6(const float* v, long vs, float* out, long os) {
    const float *v0 = v, *v1 = v + vs, *v2 = v + 2 * vs, *v3 = v + 3 * vs, *v4 = v + 4 * vs, *v5 = v + 5 * vs;
    float *o0 = out, *o1 = out + os, *o2 = out + 2 * os, *o3 = out + 3 * os, *o4 = out + 4 * os, *o5 = out + 5 * os;
#pragma omp simd
    for (int l = 0; l < L; ++l) {
        o0[l] = 4.f * v0[l];
        o1[l] = -4.f * (v1[l] - v2[l]) - 2.f * (v3[l] - v4[l]) + 4.f * v5[l];
        o2[l] = -5.f * v0[l] - 4.f * (v1[l] + v2[l]) - v3[l] - v4[l];
        o3[l] = v1[l] - v2[l] + 2.f * (v3[l] - v4[l]) - 5.f * v5[l];
        o4[l] = v0[l] + v1[l] + v2[l] + v3[l] + v4[l];
        o5[l] = v5[l];
    }
}

struct Geometry {
    long N, H, W, Ho, Wo, p, TH, TW;
    long tiles() const { return N * TH * TW; }
};

int input_tf(const float* x, float* V, Geometry g, long C, long t0, long t1, int nt) {
    const long T = t1 - t0;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long t = t0; t < t1; ++t) {
        const long n = t / (g.TH * g.TW), i = (t / g.TW) % g.TH, j = t % g.TW;
        alignas(64) float d[36 * L], r[36 * L], o[36 * L];
        for (long c0 = 0; c0 < C; c0 += L) {
            const long w = C - c0 < L ? C - c0 : L;
            for (int a = 0; a < 6; ++a) {
                const long row = 4 * i - g.p + a;
                for (int b = 0; b < 6; ++b) {
                    const long col = 4 * j - g.p + b;
                    float* dst = d + (a * 6 + b) * L;
                    if (row < 0 || row >= g.H || col < 0 || col >= g.W) {
                        zero(dst);
                    } else {
                        load(dst, x + ((n * g.H + row) * g.W + col) * C + c0, w);
                    }
                }
            }
            for (int b = 0; b < 6; ++b) bt6(d + b * L, 6 * L, r + b * L, 6 * L);  // columns: r = B^T d
            for (int a = 0; a < 6; ++a) bt6(r + a * 6 * L, L, o + a * 6 * L, L);  // rows: o = r B
            for (int k = 0; k < 36; ++k) store(V + (k * T + t - t0) * C + c0, o + k * L, w);
        }
    }
    return 0;
}

int output_tf(const float* M, float* y, const float* bias, Geometry g, long Co, long t0, long t1, int nt) {
    const long T = t1 - t0;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long t = t0; t < t1; ++t) {
        const long n = t / (g.TH * g.TW), i = (t / g.TW) % g.TH, j = t % g.TW;
        alignas(64) float m[36 * L], r[24 * L], o[16 * L];
        for (long c0 = 0; c0 < Co; c0 += L) {
            const long w = Co - c0 < L ? Co - c0 : L;
            for (int k = 0; k < 36; ++k) load(m + k * L, M + (k * T + t - t0) * Co + c0, w);
            for (int b = 0; b < 6; ++b) at6(m + b * L, 6 * L, r + b * L, 6 * L);  // r (4x6) = A^T m
            for (int a = 0; a < 4; ++a) at6(r + a * 6 * L, L, o + a * 4 * L, L);  // o (4x4) = r A
            for (int a = 0; a < 4; ++a) {
                const long row = 4 * i + a;
                if (row >= g.Ho) break;
                for (int b = 0; b < 4; ++b) {
                    const long col = 4 * j + b;
                    if (col >= g.Wo) break;
                    float* dst = y + ((n * g.Ho + row) * g.Wo + col) * Co + c0;
                    const float* src = o + (a * 4 + b) * L;
                    if (bias && w == L) {
#pragma omp simd
                        for (int l = 0; l < L; ++l) dst[l] = src[l] + bias[c0 + l];
                    } else if (bias) {
                        for (long l = 0; l < w; ++l) dst[l] = src[l] + bias[c0 + l];
                    } else {
                        store(dst, src, w);
                    }
                }
            }
        }
    }
    return 0;
}

int grad_tf(const float* dy, float* Mg, Geometry g, long Co, long t0, long t1, int nt) {
    const long T = t1 - t0;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long t = t0; t < t1; ++t) {
        const long n = t / (g.TH * g.TW), i = (t / g.TW) % g.TH, j = t % g.TW;
        alignas(64) float d[16 * L], r[24 * L], o[36 * L];
        for (long c0 = 0; c0 < Co; c0 += L) {
            const long w = Co - c0 < L ? Co - c0 : L;
            for (int a = 0; a < 4; ++a) {
                const long row = 4 * i + a;
                for (int b = 0; b < 4; ++b) {
                    const long col = 4 * j + b;
                    float* dst = d + (a * 4 + b) * L;
                    if (row >= g.Ho || col >= g.Wo) {
                        zero(dst);
                    } else {
                        load(dst, dy + ((n * g.Ho + row) * g.Wo + col) * Co + c0, w);
                    }
                }
            }
            for (int b = 0; b < 4; ++b) a4(d + b * L, 4 * L, r + b * L, 4 * L);  // r (6x4) = A d
            for (int a = 0; a < 6; ++a) a4(r + a * 4 * L, L, o + a * 6 * L, L);  // o (6x6) = r A^T
            for (int k = 0; k < 36; ++k) store(Mg + (k * T + t - t0) * Co + c0, o + k * L, w);
        }
    }
    return 0;
}

// dx must hold zeros (or what the tiles' gradients add to); [t0, t1) whole tile rows. Tile rows
// i and i + 2 of an image touch disjoint input rows (and rows of two images never meet), so the
// rows with even i run in parallel, then those with odd i; a task walks its row's tiles in order
// (neighbours overlap by two columns).
int input_grad_tf(const float* dV, float* dx, Geometry g, long C, long t0, long t1, int nt) {
    const long T = t1 - t0, r0 = t0 / g.TW, r1 = t1 / g.TW;
    for (int parity = 0; parity < 2; ++parity) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (long R = r0; R < r1; ++R) {
            const long n = R / g.TH, i = R % g.TH;
            if (i % 2 != parity) continue;
            alignas(64) float v[36 * L], r[36 * L], o[36 * L];
            for (long j = 0; j < g.TW; ++j) {
                const long t = R * g.TW + j;
                for (long c0 = 0; c0 < C; c0 += L) {
                    const long w = C - c0 < L ? C - c0 : L;
                    for (int k = 0; k < 36; ++k) load(v + k * L, dV + (k * T + t - t0) * C + c0, w);
                    for (int b = 0; b < 6; ++b) b6(v + b * L, 6 * L, r + b * L, 6 * L);  // r = B v
                    for (int a = 0; a < 6; ++a) b6(r + a * 6 * L, L, o + a * 6 * L, L);  // o = r B^T
                    for (int a = 0; a < 6; ++a) {
                        const long row = 4 * i - g.p + a;
                        if (row < 0 || row >= g.H) continue;
                        for (int b = 0; b < 6; ++b) {
                            const long col = 4 * j - g.p + b;
                            if (col < 0 || col >= g.W) continue;
                            float* dst = dx + ((n * g.H + row) * g.W + col) * C + c0;
                            const float* src = o + (a * 6 + b) * L;
                            if (w == L) {
#pragma omp simd
                                for (int l = 0; l < L; ++l) dst[l] += src[l];
                            } else {
                                for (long l = 0; l < w; ++l) dst[l] += src[l];
                            }
                        }
                    }
                }
            }
        }
    }
    return 0;
}

Geometry geometry(long N, long H, long W, long p) {
    Geometry g{N, H, W, H + 2 * p - 2, W + 2 * p - 2, p, 0, 0};
    g.TH = (g.Ho + 3) / 4;
    g.TW = (g.Wo + 3) / 4;
    return g;
}


// The tiles t0 .. t1 - 1 (of N * TH * TW; t = (n * TH + i) * TW + j) to and from [36][t1 - t0][channels]
// matrices: the caller walks the map a block of tile rows at a time, so that the matrices and
// the products between them stay in the cache. Returns 2 for a range that is not whole tile rows
// inside the map.
bool bad_range(const Geometry& g, long t0, long t1) {
    return t0 < 0 || t1 > g.tiles() || t0 >= t1 || t0 % g.TW != 0 || t1 % g.TW != 0;
}

}  // namespace

extern "C" {

int mixlab_winograd_abi_version(void) { return 2; }

// every function: N, H, W the input map's size, p the padding on each side (output Ho = H + 2p - 2)
int mixlab_winograd_input_tf(const float* x, float* V, long N, long H, long W, long C, long p, long t0, long t1,
                             int nt) {
    const Geometry g = geometry(N, H, W, p);
    return bad_range(g, t0, t1) ? 2 : input_tf(x, V, g, C, t0, t1, nt < 1 ? 1 : nt);
}
int mixlab_winograd_output_tf(const float* M, float* y, const float* bias, long N, long H, long W, long Co, long p,
                              long t0, long t1, int nt) {
    const Geometry g = geometry(N, H, W, p);
    return bad_range(g, t0, t1) ? 2 : output_tf(M, y, bias, g, Co, t0, t1, nt < 1 ? 1 : nt);
}
int mixlab_winograd_grad_tf(const float* dy, float* Mg, long N, long H, long W, long Co, long p, long t0, long t1,
                            int nt) {
    const Geometry g = geometry(N, H, W, p);
    return bad_range(g, t0, t1) ? 2 : grad_tf(dy, Mg, g, Co, t0, t1, nt < 1 ? 1 : nt);
}
int mixlab_winograd_input_grad_tf(const float* dV, float* dx, long N, long H, long W, long C, long p, long t0,
                                  long t1, int nt) {
    const Geometry g = geometry(N, H, W, p);
    return bad_range(g, t0, t1) ? 2 : input_grad_tf(dV, dx, g, C, t0, t1, nt < 1 ? 1 : nt);
}

}  // extern "C"
