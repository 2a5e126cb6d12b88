// Causal self-attention for training on a CPU, in fp32: the forward and the backward of softmax(q k^T * scale) v.
//
// Flash-attention's scheme (Dao et al. 2022, arXiv:2205.14135): the forward keeps each query's log-sum-exp of its
// scores instead of the [T, T] probabilities, and the backward recomputes them. One task is one (batch, key-value
// head): its keys and values are transposed once into buffers that stay in cache, and its query heads are taken in
// turn, R query rows at a time, only over the keys each row can see. Each result is summed in a fixed order by one
// thread, so it does not depend on the number of threads. Given RoPE's tables (Su et al. 2021), the kernel rotates
// the queries and keys itself as it copies them into its buffers, and turns their gradients back as it writes them.
//
// Written with GCC/Clang vector extensions (no intrinsics): the compiler maps a 16-float vector onto whatever the
// machine has (one AVX-512 register, two AVX2 ones, four NEON ones). lmforge builds this file on the machine it runs
// on (model/cpu_attention.py) and calls it through ctypes; tensors arrive as pointers and element strides of their
// batch, head and position dimensions, the last dimension contiguous.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#define INLINE static inline __attribute__((always_inline))  // keeps the accumulators in registers

typedef float vec __attribute__((vector_size(64)));
typedef float vec_unaligned __attribute__((vector_size(64), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(64)));
constexpr int W = 16;            // floats in a vector
constexpr int R = 8;             // query rows per block
constexpr int J = 2;             // key vectors per pass of `products`: R * J accumulators stay in registers
template <int D>
constexpr int GROUP = D / W < 16 / R ? D / W : 16 / R;  // vectors of a row per pass: R * GROUP accumulators
constexpr float MASKED = -1e30f; // a score above the diagonal; its probability comes out exactly 0

static inline vec load(const float *p) { return *(const vec_unaligned *)p; }
static inline void store(float *p, vec x) { *(vec_unaligned *)p = x; }
static inline vec splat(float x) { return (vec){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

// e^x for x <= 0, and exactly 0 at or below -87: 2^n e^r with n = round(x / ln 2), |r| <= ln(2) / 2, and e^r by its
// Taylor series to degree 7 (relative error under 1e-8 before rounding).
static inline vec exp_nonpositive(vec x) {
    ivec keep = x > splat(-87.0f);
    x = keep ? x : splat(-87.0f);
    vec n = (x * splat(1.44269504f) + splat(12582912.0f)) - splat(12582912.0f);  // round to nearest
    vec r = x - n * splat(0.693145752f) - n * splat(1.42860677e-6f);              // ln 2 in two parts
    vec p = splat(1.f / 5040);
    p = p * r + splat(1.f / 720);
    p = p * r + splat(1.f / 120);
    p = p * r + splat(1.f / 24);
    p = p * r + splat(1.f / 6);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.f);
    p = p * r + splat(1.f);
    ivec two_to_n = (__builtin_convertvector(n, ivec) + 127) << 23;
    return keep ? p * (vec)two_to_n : splat(0.f);
}

static inline float lane_max(vec x) {
    float m = x[0];
    for (int t = 1; t < W; t++) m = x[t] > m ? x[t] : m;
    return m;
}

static inline float lane_sum(vec x) {
    float s = 0.f;
    for (int t = 0; t < W; t++) s += x[t];
    return s;
}

// The rows a_{i0}, ..., a_{i0+R-1} of a block: past the last row (`rows` < R) the first one again, whose results
// are discarded.
static inline void block_rows(const float *a, long stride, int i0, int rows, const float *out[R]) {
    for (int r = 0; r < R; r++) out[r] = a + (long)(i0 + (r < rows ? r : 0)) * stride;
}

// acc[r][u] = <a_r, bt[:, j0 + u W : j0 + (u + 1) W]> for u < NJ: each a_r[d] is loaded once for NJ vectors.
template <int D, int NJ>
INLINE void dot_columns(const float *a[R], const float *bt, int Tp, int j0, vec (*acc)[J]) {
    for (int d = 0; d < D; d++) {
        const float *column = bt + (long)d * Tp + j0;
        vec b[NJ];
        for (int u = 0; u < NJ; u++) b[u] = load(column + u * W);
        for (int r = 0; r < R; r++) {
            vec x = splat(a[r][d]);
            for (int u = 0; u < NJ; u++) acc[r][u] += x * b[u];
        }
    }
}

// s[r][j] = scale * <a_r, bt[:, j]> for j < nk (a multiple of W), bt a transposed [D, Tp] matrix; with `causal`,
// MASKED where key j comes after query i0 + r.
template <int D>
INLINE void products(const float *a[R], const float *bt, int Tp, float scale, int i0, int nk, bool causal, float *s) {
    const vec lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int j0 = 0; j0 < nk; j0 += J * W) {
        int nj = (nk - j0) / W < J ? (nk - j0) / W : J;
        vec acc[R][J] = {};
        if (nj == J)
            dot_columns<D, J>(a, bt, Tp, j0, acc);
        else
            for (int u = 0; u < nj; u++) dot_columns<D, 1>(a, bt, Tp, j0 + u * W, (vec(*)[J])&acc[0][u]);
        for (int r = 0; r < R; r++)
            for (int u = 0; u < nj; u++) {
                vec x = acc[r][u] * splat(scale);
                if (causal) x = (lane + splat((float)(j0 + u * W - i0 - r)) <= splat(0.f)) ? x : splat(MASKED);
                store(s + (long)r * Tp + j0 + u * W, x);
            }
    }
}

// acc[r] = sum_{j < n} p[r][j] b_j, b_j the rows of b (D floats each).
template <int D>
INLINE void weighted_sum(const float *p, int Tp, const float *b, long stride, int n, vec (*acc)[D / W]) {
    for (int c0 = 0; c0 < D / W; c0 += GROUP<D>) {  // GROUP<D> columns at a time: R * GROUP<D> accumulators
        vec sum[R][GROUP<D>] = {};
        for (int j = 0; j < n; j++) {
            const float *row = b + (long)j * stride + c0 * W;
            for (int c = 0; c < GROUP<D>; c++) {
                vec x = load(row + c * W);
                for (int r = 0; r < R; r++) sum[r][c] += splat(p[(long)r * Tp + j]) * x;
            }
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < GROUP<D>; c++) acc[r][c0 + c] = sum[r][c];
    }
}

// out_j += sum_r w[r][j] x_r for j < n (out rows of D floats), GROUP<D> columns at a time held in registers.
template <int D>
INLINE void accumulate_outer(const float *w, int Tp, const float *x[R], int n, float *out) {
    for (int c0 = 0; c0 < D / W; c0 += GROUP<D>) {
        vec xr[R][GROUP<D>];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < GROUP<D>; c++) xr[r][c] = load(x[r] + (c0 + c) * W);
        for (int j = 0; j < n; j++) {
            vec wj[R];
            for (int r = 0; r < R; r++) wj[r] = splat(w[(long)r * Tp + j]);
            for (int c = 0; c < GROUP<D>; c++) {
                float *cell = out + (long)j * D + (c0 + c) * W;
                vec a = load(cell);
                for (int r = 0; r < R; r++) a += wj[r] * xr[r][c];
                store(cell, a);
            }
        }
    }
}

// xt[d][j] = x[j][d], zero for T <= j < Tp.
static void transpose(const float *x, long stride, int T, int D, int Tp, float *xt) {
    for (int d = 0; d < D; d++) {
        for (int j = 0; j < T; j++) xt[(long)d * Tp + j] = x[(long)j * stride + d];
        for (int j = T; j < Tp; j++) xt[(long)d * Tp + j] = 0.f;
    }
}

// Keys a block of queries starting at i0 sees, rounded up to whole vectors.
static inline int keys_seen(int i0, int Tp) {
    int n = (i0 + R + W - 1) / W * W;
    return n < Tp ? n : Tp;
}

// RoPE's cos and sin tables [T, D] in the half-split layout (pairs (i, i + D/2)); null: no rotation.
struct Rope { const float *cos, *sin; };

// out_t = x_t rotated by RoPE for t < T (rows `stride` and `out_stride` floats apart); with `inverse`, the transpose
// of that rotation, which carries a gradient back through it. In place (out == x) is allowed.
template <int D>
static void rotate(const float *x, long stride, int T, Rope rope, bool inverse, float *out, long out_stride) {
    constexpr int H = D / 2;
    for (int t = 0; t < T; t++) {
        const float *__restrict c = rope.cos + (long)t * D, *__restrict s = rope.sin + (long)t * D;
        float a[H], b[H], *__restrict o = out + (long)t * out_stride;  // the row copied first: in place is safe
        memcpy(a, x + (long)t * stride, sizeof a);
        memcpy(b, x + (long)t * stride + H, sizeof b);
        if (inverse)
            for (int i = 0; i < H; i++) {
                o[i] = a[i] * c[i] + b[i] * s[i + H];
                o[i + H] = b[i] * c[i + H] - a[i] * s[i];
            }
        else
            for (int i = 0; i < H; i++) {
                o[i] = a[i] * c[i] - b[i] * s[i];
                o[i + H] = b[i] * c[i + H] + a[i] * s[i + H];
            }
    }
}

struct Strides { long b, h, t; };
struct Tensor { float *data; Strides s; float *at(int b, int h) const { return data + b * s.b + h * s.h; } };

static float *scratch(long floats) { return (float *)aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64); }

template <int D>
static void forward_head(const float *q, long sq, const float *kt, const float *v, long sv, float *o, long so,
                         float *lse, int T, int Tp, float scale, float *s) {
    for (int i0 = 0; i0 < T; i0 += R) {
        int rows = T - i0 < R ? T - i0 : R, nk = keys_seen(i0, Tp);
        const float *qr[R];
        block_rows(q, sq, i0, rows, qr);
        products<D>(qr, kt, Tp, scale, i0, nk, true, s);
        float inverse_sum[R];
        for (int r = 0; r < R; r++) {
            float *sr = s + (long)r * Tp;
            vec m = splat(MASKED);
            for (int j = 0; j < nk; j += W) m = load(sr + j) > m ? load(sr + j) : m;
            float row_max = lane_max(m);
            vec total = {};
            for (int j = 0; j < nk; j += W) {
                vec e = exp_nonpositive(load(sr + j) - splat(row_max));
                store(sr + j, e);
                total += e;
            }
            float sum = lane_sum(total);
            inverse_sum[r] = 1.f / sum;
            if (r < rows) lse[i0 + r] = row_max + __builtin_logf(sum);
        }
        vec acc[R][D / W];
        weighted_sum<D>(s, Tp, v, sv, i0 + rows, acc);
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < D / W; c++) store(o + (long)(i0 + r) * so + c * W, acc[r][c] * splat(inverse_sum[r]));
    }
}

// dq for one query head; its contributions to the shared head's dk and dv (unscaled) added to dk_sum and dv_sum.
template <int D>
static void backward_head(const float *q, long sq, const float *k, long sk, const float *kt, const float *vt,
                          const float *o, long so, const float *g, long sg, const float *lse, float *dq, long sdq,
                          float *dk_sum, float *dv_sum, int T, int Tp, float scale, float *p, float *ds) {
    for (int i0 = 0; i0 < T; i0 += R) {
        int rows = T - i0 < R ? T - i0 : R, nk = keys_seen(i0, Tp), n = i0 + rows;
        const float *qr[R], *gr[R];
        block_rows(q, sq, i0, rows, qr);
        block_rows(g, sg, i0, rows, gr);
        products<D>(qr, kt, Tp, scale, i0, nk, true, p);  // the scores again
        products<D>(gr, vt, Tp, 1.f, i0, nk, false, ds);  // dp = g v^T
        for (int r = 0; r < R; r++) {
            const float *orow = o + (long)(i0 + (r < rows ? r : 0)) * so;
            vec dot = {};
            for (int c = 0; c < D / W; c++) dot += load(gr[r] + c * W) * load(orow + c * W);
            float delta = lane_sum(dot), row_lse = lse[i0 + (r < rows ? r : 0)];  // delta = <g, o> = sum_j p dp
            float *pr = p + (long)r * Tp, *dsr = ds + (long)r * Tp;
            for (int j = 0; j < nk; j += W) {
                vec pj = r < rows ? exp_nonpositive(load(pr + j) - splat(row_lse)) : splat(0.f);
                store(pr + j, pj);
                store(dsr + j, pj * (load(dsr + j) - splat(delta)));  // ds = p (dp - delta), the softmax backward
            }
        }
        vec acc[R][D / W];
        weighted_sum<D>(ds, Tp, k, sk, n, acc);  // dq = scale * ds k
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < D / W; c++) store(dq + (long)(i0 + r) * sdq + c * W, acc[r][c] * splat(scale));
        accumulate_outer<D>(p, Tp, gr, n, dv_sum);  // dv += p^T g
        accumulate_outer<D>(ds, Tp, qr, n, dk_sum);  // dk += ds^T q, scaled once at the end
    }
}

// The rows of x (`stride` apart) as attention reads them: rotated into `rotated` [T, D] with `rope`, else in place.
template <int D>
static const float *rows_read(const float *x, long &stride, int T, Rope rope, float *rotated) {
    if (!rope.cos) return x;
    rotate<D>(x, stride, T, rope, false, rotated, D);
    stride = D;
    return rotated;
}

// t: q, k, v and the output o.
template <int D>
static void forward(const Tensor *t, float *lse, int B, int H, int H_kv, int T, float scale, Rope rope, int threads) {
    Tensor q = t[0], k = t[1], v = t[2], o = t[3];
    int Tp = (T + W - 1) / W * W, group = H / H_kv;
    #pragma omp parallel num_threads(threads)
    {
        float *kt = scratch((long)D * Tp), *s = scratch((long)R * Tp),
              *rotated = rope.cos ? scratch((long)T * D) : nullptr;
        #pragma omp for schedule(static)
        for (int task = 0; task < B * H_kv; task++) {
            int b = task / H_kv, kv = task % H_kv;
            long sk = k.s.t;
            const float *kr = rows_read<D>(k.at(b, kv), sk, T, rope, rotated);
            transpose(kr, sk, T, D, Tp, kt);
            for (int h = kv * group; h < (kv + 1) * group; h++) {
                long sq = q.s.t;
                const float *qr = rows_read<D>(q.at(b, h), sq, T, rope, rotated);
                forward_head<D>(qr, sq, kt, v.at(b, kv), v.s.t, o.at(b, h), o.s.t, lse + ((long)b * H + h) * T, T, Tp,
                                scale, s);
            }
        }
        free(kt);
        free(s);
        free(rotated);
    }
}

// t: q, k, v, the forward's output o, its gradient g, and the gradients dq, dk and dv written here.
template <int D>
static void backward(const Tensor *t, const float *lse, int B, int H, int H_kv, int T, float scale, Rope rope,
                     int threads) {
    Tensor q = t[0], k = t[1], v = t[2], o = t[3], g = t[4], dq = t[5], dk = t[6], dv = t[7];
    int Tp = (T + W - 1) / W * W, group = H / H_kv;
    #pragma omp parallel num_threads(threads)
    {
        float *kt = scratch((long)D * Tp), *vt = scratch((long)D * Tp), *p = scratch((long)R * Tp),
              *ds = scratch((long)R * Tp), *dk_sum = scratch((long)Tp * D), *dv_sum = scratch((long)Tp * D),
              *k_rotated = rope.cos ? scratch((long)T * D) : nullptr,
              *q_rotated = rope.cos ? scratch((long)T * D) : nullptr;
        #pragma omp for schedule(static)
        for (int task = 0; task < B * H_kv; task++) {
            int b = task / H_kv, kv = task % H_kv;
            long sk = k.s.t;
            const float *kr = rows_read<D>(k.at(b, kv), sk, T, rope, k_rotated);
            transpose(kr, sk, T, D, Tp, kt);
            transpose(v.at(b, kv), v.s.t, T, D, Tp, vt);
            memset(dk_sum, 0, sizeof(float) * Tp * D);
            memset(dv_sum, 0, sizeof(float) * Tp * D);
            for (int h = kv * group; h < (kv + 1) * group; h++) {
                long sq = q.s.t;
                const float *qr = rows_read<D>(q.at(b, h), sq, T, rope, q_rotated);
                backward_head<D>(qr, sq, kr, sk, kt, vt, o.at(b, h), o.s.t, g.at(b, h), g.s.t,
                                 lse + ((long)b * H + h) * T, dq.at(b, h), dq.s.t, dk_sum, dv_sum, T, Tp, scale, p, ds);
                if (rope.cos) rotate<D>(dq.at(b, h), dq.s.t, T, rope, true, dq.at(b, h), dq.s.t);
            }
            float *dkb = dk.at(b, kv), *dvb = dv.at(b, kv);
            for (int j = 0; j < T; j++)
                for (int c = 0; c < D / W; c++) {
                    store(dkb + (long)j * dk.s.t + c * W, load(dk_sum + (long)j * D + c * W) * splat(scale));
                    store(dvb + (long)j * dv.s.t + c * W, load(dv_sum + (long)j * D + c * W));
                }
            if (rope.cos) rotate<D>(dkb, dk.s.t, T, rope, true, dkb, dk.s.t);
        }
        free(kt);
        free(vt);
        free(p);
        free(ds);
        free(dk_sum);
        free(dv_sum);
        free(k_rotated);
        free(q_rotated);
    }
}

// The tensors' data pointers and their batch, head and position strides, three per tensor.
template <int N>
static void tensors(float *const (&data)[N], const long *strides, Tensor (&t)[N]) {
    for (int i = 0; i < N; i++) t[i] = {data[i], {strides[3 * i], strides[3 * i + 1], strides[3 * i + 2]}};
}

// Runs `kernel` with the head size D as a compile-time constant (std::integral_constant): 0, or 1 for a head size it
// was not built for (16, 32, 64 and 128 are).
template <typename Kernel>
static int with_head_size(int D, Kernel kernel) {
    switch (D) {
        case 16: kernel(std::integral_constant<int, 16>{}); return 0;
        case 32: kernel(std::integral_constant<int, 32>{}); return 0;
        case 64: kernel(std::integral_constant<int, 64>{}); return 0;
        case 128: kernel(std::integral_constant<int, 128>{}); return 0;
        default: return 1;
    }
}

// Each entry point returns `with_head_size`'s status. `cos` and `sin` are RoPE's [T, D] tables, or both null.
extern "C" int causal_attention_forward(float *q, float *k, float *v, float *o, float *lse, int B, int H, int H_kv,
                                        int T, int D, const long *strides, float scale, const float *cos,
                                        const float *sin, int threads) {
    Tensor t[4];
    tensors({q, k, v, o}, strides, t);
    Rope rope = {cos, sin};
    return with_head_size(D, [&](auto d) {
        forward<decltype(d)::value>(t, lse, B, H, H_kv, T, scale, rope, threads);
    });
}

extern "C" int causal_attention_backward(float *q, float *k, float *v, float *o, float *g, float *lse, float *dq,
                                         float *dk, float *dv, int B, int H, int H_kv, int T, int D,
                                         const long *strides, float scale, const float *cos, const float *sin,
                                         int threads) {
    Tensor t[8];
    tensors({q, k, v, o, g, dq, dk, dv}, strides, t);
    Rope rope = {cos, sin};
    return with_head_size(D, [&](auto d) {
        backward<decltype(d)::value>(t, lse, B, H, H_kv, T, scale, rope, threads);
    });
}
