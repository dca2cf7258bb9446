/* Decode attention over per-row KV blocks, with the new entries appended in the same pass.
 *
 * A few new tokens per row (one when decoding; a short chunk for a catch-up or a
 * verification), right-padded to T. Row r's keys and values live in its own block of the cache,
 * ``k_cache + off[r]`` (and ``v_cache + off[r]``): Hkv heads, ``hstride`` floats apart, each
 * a run of entries of D floats. That block is whichever KV slot the row reads, so rows at
 * different steps of a shared block (depth-wise batching) attend in one call, reading each
 * history once and copying none of it (the page-table idea of paged attention, with one
 * "page" per (slot, row)). The plain decode step is the case of every row at one slot.
 *
 * Per (row, kv head), all G query heads of the group are scored against each key as it is
 * read (grouped-query attention reads K and V once per kv head, not once per query head).
 * A row's n new entries are written first, then query t attends to the block's first
 * start + t + 1 entries (causal by index); padding queries get zeros. Each query reads the
 * whole history again, so this is for short chunks only (prefill stays on SDPA's blocked
 * kernel). Softmax in two passes over a per-thread score buffer; fp32 throughout.
 *
 * Strides are in floats; the last dimension (D) of every operand is contiguous.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

int ee_decode_attention(
    const float *q, int64_t q_row, int64_t q_head, int64_t q_t,  /* (R, Hkv * G, T, D) */
    const float *k_new, const float *v_new,                      /* (R, Hkv, T, D) */
    int64_t kn_row, int64_t vn_row, int64_t kv_head, int64_t kn_t, int64_t vn_t,
    float *k_cache, float *v_cache, int64_t hstride,             /* blocks of (Hkv, hstride) */
    const int64_t *off, const int64_t *start, const int64_t *n_new, /* (R,) */
    int64_t R, int64_t T, int64_t Hkv, int64_t G, int64_t D, float scale,
    float *out, int nthreads)                                    /* (R, Hkv * G, T, D) contiguous */
{
    int64_t maxw = 1;
    for (int64_t r = 0; r < R; r++)
        if (start[r] + n_new[r] > maxw) maxw = start[r] + n_new[r];
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *s = (float *)malloc(sizeof(float) * (size_t)(G * maxw));
        if (s == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < R * Hkv; task++) {
            if (s == NULL) continue;
            const int64_t r = task / Hkv, h = task % Hkv, n = n_new[r];
            float *kb = k_cache + off[r] + h * hstride;
            float *vb = v_cache + off[r] + h * hstride;
            /* append this row's new entries at start[r] .. start[r] + n - 1 of its block:
               all of them first, so query t sees entries up to its own (causal by index) */
            for (int64_t t = 0; t < n; t++) {
                const float *kn = k_new + r * kn_row + h * kv_head + t * kn_t;
                const float *vn = v_new + r * vn_row + h * kv_head + t * vn_t;
                float *kd = kb + (start[r] + t) * D, *vd = vb + (start[r] + t) * D;
                for (int64_t d = 0; d < D; d++) {
                    kd[d] = kn[d];
                    vd[d] = vn[d];
                }
            }
            for (int64_t t = 0; t < T; t++) {
                const int64_t W = start[r] + t + 1; /* entries query t attends to */
                float *og = out + ((r * Hkv + h) * G * T + t) * D; /* head h*G, query t */
                if (t >= n) { /* right padding: no query, zeros out */
                    for (int64_t g = 0; g < G; g++)
                        for (int64_t d = 0; d < D; d++) og[g * T * D + d] = 0.f;
                    continue;
                }
                const float *qg = q + r * q_row + h * G * q_head + t * q_t;
                for (int64_t j = 0; j < W; j++) {
                    const float *kj = kb + j * D;
                    for (int64_t g = 0; g < G; g++) {
                        const float *qq = qg + g * q_head;
                        float acc = 0.f;
                        for (int64_t d = 0; d < D; d++) acc += qq[d] * kj[d];
                        s[g * W + j] = acc * scale;
                    }
                }
                for (int64_t g = 0; g < G; g++) {
                    float *sg = s + g * W, m = -FLT_MAX, sum = 0.f;
                    for (int64_t j = 0; j < W; j++) m = sg[j] > m ? sg[j] : m;
                    for (int64_t j = 0; j < W; j++) {
                        sg[j] = expf(sg[j] - m);
                        sum += sg[j];
                    }
                    const float inv = 1.f / sum;
                    for (int64_t j = 0; j < W; j++) sg[j] *= inv;
                    for (int64_t d = 0; d < D; d++) og[g * T * D + d] = 0.f;
                }
                for (int64_t j = 0; j < W; j++) {
                    const float *vj = vb + j * D;
                    for (int64_t g = 0; g < G; g++) {
                        const float p = s[g * W + j];
                        float *o = og + g * T * D;
                        for (int64_t d = 0; d < D; d++) o[d] += p * vj[d];
                    }
                }
            }
        }
        free(s);
    }
    return failed ? -1 : 0;
}
