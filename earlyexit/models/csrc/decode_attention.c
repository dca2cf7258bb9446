/* Decode attention over per-row KV blocks, with the new entry appended in the same pass.
 *
 * One decode token per row. Row r's keys and values live in its own block of the cache,
 * ``k_cache + off[r]`` (and ``v_cache + off[r]``): Hkv heads, ``hstride`` floats apart, each
 * a run of entries of D floats. That block is whichever KV slot the row reads, so rows at
 * different steps of a shared block (depth-wise batching) attend in one call, reading each
 * history once and copying none of it (the page-table idea of paged attention, with one
 * "page" per (slot, row)). The plain decode step is the case of every row at one slot.
 *
 * Per (row, kv head), all G query heads of the group are scored against each key as it is
 * read (grouped-query attention reads K and V once per kv head, not once per query head).
 * Softmax in two passes over a per-thread score buffer; fp32 throughout.
 *
 * Strides are in floats; the last dimension (D) of every operand is contiguous.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

int ee_decode_attention(
    const float *q, int64_t q_row, int64_t q_head,          /* (R, Hkv * G, D) */
    const float *k_new, const float *v_new,                 /* (R, Hkv, D) */
    int64_t kv_new_row_k, int64_t kv_new_row_v, int64_t kv_new_head,
    float *k_cache, float *v_cache, int64_t hstride,        /* blocks of (Hkv, hstride) */
    const int64_t *off, const int64_t *len,                 /* (R,) block offset; entries incl. new */
    int64_t R, int64_t Hkv, int64_t G, int64_t D, float scale,
    float *out, int nthreads)                               /* (R, Hkv * G, D) contiguous */
{
    int64_t maxw = 1;
    for (int64_t r = 0; r < R; r++)
        if (len[r] > maxw) maxw = len[r];
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *s = (float *)malloc(sizeof(float) * (size_t)(G * maxw));
        if (s == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < R * Hkv; t++) {
            if (s == NULL) continue;
            const int64_t r = t / Hkv, h = t % Hkv, W = len[r];
            float *kb = k_cache + off[r] + h * hstride;
            float *vb = v_cache + off[r] + h * hstride;
            /* append this row's new entry at index W - 1 of its block */
            const float *kn = k_new + r * kv_new_row_k + h * kv_new_head;
            const float *vn = v_new + r * kv_new_row_v + h * kv_new_head;
            for (int64_t d = 0; d < D; d++) {
                kb[(W - 1) * D + d] = kn[d];
                vb[(W - 1) * D + d] = vn[d];
            }
            const float *qg = q + r * q_row + h * G * q_head;
            float *og = out + (r * Hkv + h) * G * D;
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
                for (int64_t d = 0; d < D; d++) og[g * D + d] = 0.f;
            }
            for (int64_t j = 0; j < W; j++) {
                const float *vj = vb + j * D;
                for (int64_t g = 0; g < G; g++) {
                    const float p = s[g * W + j];
                    float *o = og + g * D;
                    for (int64_t d = 0; d < D; d++) o[d] += p * vj[d];
                }
            }
        }
        free(s);
    }
    return failed ? -1 : 0;
}
