/* y (M, N) = x (M, K) @ w (N, K)^T [+ bias] for a few rows M (decode steps of small batches,
 * speculative verification chunks): every weight row is read from memory once and dotted
 * with all M input rows while it sits in L1, so a call over 2-4 rows costs about what one
 * row does (decoding streams the weights; the GEMM libraries' small-M paths measured
 * 1.5-1.8x a one-row call on our CPUs).
 *
 * Batch invariance: each output element is one dot product whose partial sums are formed in
 * the same order whatever M is (rows are processed in register blocks of up to RB, each row
 * with its own LANES accumulators), so a row's result does not depend on the other rows of
 * the call: a verification pass over k+1 tokens computes bit for bit what k+1 one-token
 * steps compute, and greedy speculation cannot drift from full-depth decoding on a tie.
 *
 * Strides in floats; x rows are x_row floats apart, w and y are contiguous.
 */
#include <stdint.h>

#define LANES 16
#define RB 4

static inline void dots(const float *w, const float *x, int64_t xs, int rows, int64_t K,
                        float *out, int64_t os)
{
    float acc[RB][LANES] = {{0}};
    int64_t i = 0;
    for (; i + LANES <= K; i += LANES)
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < LANES; j++)
                acc[r][j] += w[i + j] * x[r * xs + i + j];
    for (int r = 0; r < rows; r++) {
        for (int64_t t = i; t < K; t++)
            acc[r][t - i] += w[t] * x[r * xs + t];
        float s = 0.0f;
        for (int j = 0; j < LANES; j++)
            s += acc[r][j];
        out[r * os] += s;
    }
}

void ee_skinny_linear(const float *x, int64_t x_row, const float *w, const float *bias,
                      float *y, int64_t M, int64_t N, int64_t K, int nthreads)
{
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *wr = w + n * K;
        for (int64_t m = 0; m < M; m++)
            y[m * N + n] = bias ? bias[n] : 0.0f;
        for (int64_t m = 0; m < M; m += RB) {
            int rows = (int)(M - m < RB ? M - m : RB);
            dots(wr, x + m * x_row, x_row, rows, K, y + m * N + n, N);
        }
    }
}
