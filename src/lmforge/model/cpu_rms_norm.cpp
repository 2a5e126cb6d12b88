// RMSNorm for training on a CPU, in fp32 (Zhang & Sennrich 2019): y = x_hat * w with x_hat = x / rms(x) and
// rms(x) = sqrt(mean(x^2) + eps) over each row, and its backward,
//
//     grad_x = (g * w - x_hat * mean(g * w * x_hat)) / rms(x),     grad_w = sum over rows of g * x_hat,
//
// each one pass over the rows, which stay in cache between their two loops (PyTorch's ops take several passes over
// memory each way). The rows are cut into fixed chunks; each chunk's share of grad_w is summed by one thread and the
// shares are added in chunk order, so no result depends on the number of threads. lmforge builds this file on the
// machine it runs on (model/cpu_build.py) and calls it through ctypes, on contiguous [rows, d] tensors.
#include <cmath>

constexpr long CHUNK = 64;  // rows per share of grad_w

extern "C" void rms_norm_forward(const float *x, const float *w, float *y, float *inv_rms, long rows, long d,
                                 float eps, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < rows; i++) {
        const float *xi = x + i * d;
        float *yi = y + i * d, squares = 0.f;
        #pragma omp simd reduction(+ : squares)
        for (long c = 0; c < d; c++) squares += xi[c] * xi[c];
        float inv = 1.f / std::sqrt(squares / d + eps);
        inv_rms[i] = inv;
        #pragma omp simd
        for (long c = 0; c < d; c++) yi[c] = xi[c] * inv * w[c];
    }
}

// `shares` has room for ceil(rows / CHUNK) rows of d floats; grad_x may be null (no gradient wanted for x).
extern "C" void rms_norm_backward(const float *g, const float *x, const float *w, const float *inv_rms, float *grad_x,
                                  float *grad_w, float *shares, long rows, long d, int threads) {
    long chunks = (rows + CHUNK - 1) / CHUNK;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long k = 0; k < chunks; k++) {
        float *share = shares + k * d;
        for (long c = 0; c < d; c++) share[c] = 0.f;
        long end = (k + 1) * CHUNK < rows ? (k + 1) * CHUNK : rows;
        for (long i = k * CHUNK; i < end; i++) {
            const float *gi = g + i * d, *xi = x + i * d;
            float inv = inv_rms[i], dot = 0.f;
            #pragma omp simd reduction(+ : dot)
            for (long c = 0; c < d; c++) dot += gi[c] * w[c] * xi[c];
            float mean = dot * inv / d;  // mean(g * w * x_hat)
            if (grad_x) {
                float *dx = grad_x + i * d;
                #pragma omp simd
                for (long c = 0; c < d; c++) dx[c] = (gi[c] * w[c] - xi[c] * inv * mean) * inv;
            }
            #pragma omp simd
            for (long c = 0; c < d; c++) share[c] += gi[c] * (xi[c] * inv);
        }
    }
    for (long c = 0; c < d; c++) grad_w[c] = 0.f;
    for (long k = 0; k < chunks; k++)
        for (long c = 0; c < d; c++) grad_w[c] += shares[k * d + c];
}
