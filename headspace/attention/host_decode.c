/* Decode attention on the host CPU: a few query rows per KV head over KV that lives in host RAM.
 *
 * Why a kernel of our own: torch's CPU attention runs a few query rows (the R query heads of one KV head)
 * at a small fraction of memory bandwidth, and at 1M tokens the host's share of the KV is tens of GB per
 * token. This kernel reads each key and value row once, with an online softmax over blocks of rows whose
 * scores stay in L1, and keeps its accumulators in registers.
 *
 * Two forms of a block: on CPUs with AVX512-BF16 (Intel since Sapphire Rapids, AMD since Zen 4), bf16 KV is
 * multiplied as stored by the bf16 dot-product instruction (two products per lane, float32 sums; the
 * probabilities meet the values in bf16, as flash attention on the GPU does); elsewhere, and for float32
 * KV, rows are widened to float32 in the compiler's vector extension (16 lanes: AVX-512, AVX2 or NEON code
 * for the machine it is compiled on, -march=native). On the H100's host the widened form was compute-bound
 * (5.5 GB/s per core with its data in L2) and the bf16 form ran at 10.3
 * (benchmarks/results/h100_host_decode_bench_{widened,bf16}.txt).
 *
 * The caller (host_decode.py) cuts the positions into items (span, head, first, stop) that the OpenMP
 * threads take one at a time; each item leaves its output and log-sum-exp, and one pass per head then
 * merges them.
 *
 * In decode on a GPU the call may begin before its query has arrived: it waits for a flag in pinned memory
 * that the GPU's copy stream writes once the query has landed, and writes another, that the GPU's compute
 * stream waits for, once the output is in place (headspace/kv/signals.py). No Python thread, and so no
 * interpreter lock, stands between the two sides.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

typedef float floats __attribute__((vector_size(64)));
typedef uint32_t words __attribute__((vector_size(64)));
typedef uint16_t halves __attribute__((vector_size(32)));

#define LANES 16
#define GROUP 4        /* query rows whose dot products run together */
#define BLOCK 64       /* rows per online-softmax step */
#define MAX_RATIO 16
#define MAX_CHUNKS 16  /* head size up to 256, in vectors of 16 */
/* query rows per pass over a block's values, so that their accumulators fill 16 registers: a divisor of GROUP */
#define PASS(chunks) ((chunks) <= 4 ? 4 : (chunks) <= 8 ? 2 : 1)
#define NONE (-1e30f)  /* the running maximum before any row: finite, as -ffast-math assumes */

/* Per item: the running output (float32, in the block form's lane order), maximum and total of each row. */
struct state {
    floats acc[MAX_RATIO][MAX_CHUNKS];
    float scores[MAX_RATIO][BLOCK] __attribute__((aligned(64)));
    float top[MAX_RATIO], total[MAX_RATIO], rescale[MAX_RATIO];
};

/* The block's scores become probabilities (zero past `rows`); each row's rescale is what its earlier sums
 * are multiplied by. */
static inline void softmax(struct state *s, int rows, int rows_padded) {
    for (int r = 0; r < rows_padded; r++) {
        float high = s->top[r];
        for (int j = 0; j < rows; j++) high = s->scores[r][j] > high ? s->scores[r][j] : high;
        float sum = 0.0f;
        for (int j = 0; j < rows; j++) {
            s->scores[r][j] = expf(s->scores[r][j] - high);
            sum += s->scores[r][j];
        }
        for (int j = rows; j < BLOCK; j++) s->scores[r][j] = 0.0f;
        s->rescale[r] = expf(s->top[r] - high);
        s->total[r] = s->total[r] * s->rescale[r] + sum;
        s->top[r] = high;
    }
}

/* Lanes [at, at + 16) of a row as float32 (bf16 when `half`: its bits are a float32's upper half). */
static inline floats widened(const char *row, int64_t at, int half) {
    if (half) {
        halves bits;
        memcpy(&bits, row + 2 * at, sizeof bits);
        return (floats)(__builtin_convertvector(bits, words) << 16);
    }
    floats out;
    memcpy(&out, row + 4 * at, sizeof out);
    return out;
}

/* Widened form: `query` holds the scaled rows as float32 vectors, row r's chunk c at r * chunks + c. */
static inline __attribute__((always_inline)) void widened_block(struct state *s, const floats *query,
                                                                 const char *keys, const char *values, int rows,
                                                                 int rows_padded, int half, const int chunks) {
    const int64_t row_bytes = (int64_t)chunks * LANES * (half ? 2 : 4);
    for (int j = 0; j < rows; j++) {
        floats key[MAX_CHUNKS];
        for (int c = 0; c < chunks; c++) key[c] = widened(keys + j * row_bytes, (int64_t)c * LANES, half);
        for (int g = 0; g < rows_padded; g += GROUP) {
            floats dot[GROUP];
            for (int r = 0; r < GROUP; r++) dot[r] = query[(g + r) * chunks] * key[0];
            for (int c = 1; c < chunks; c++)
                for (int r = 0; r < GROUP; r++) dot[r] += query[(g + r) * chunks + c] * key[c];
            for (int r = 0; r < GROUP; r++) {
                float sum = 0.0f;
                for (int i = 0; i < LANES; i++) sum += dot[r][i];
                s->scores[g + r][j] = sum;
            }
        }
    }
    softmax(s, rows, rows_padded);
    const int pass = PASS(chunks);  /* values: rows in order, a pass's accumulators of every chunk in registers */
    for (int g = 0; g < rows_padded; g += pass) {
        floats sum[MAX_CHUNKS];
        for (int r = 0; r < pass; r++)
            for (int c = 0; c < chunks; c++) sum[r * chunks + c] = s->acc[g + r][c] * s->rescale[g + r];
        for (int j = 0; j < rows; j++)
            for (int c = 0; c < chunks; c++) {
                const floats value = widened(values + j * row_bytes, (int64_t)c * LANES, half);
                for (int r = 0; r < pass; r++) sum[r * chunks + c] += s->scores[g + r][j] * value;
            }
        for (int r = 0; r < pass; r++)
            for (int c = 0; c < chunks; c++) s->acc[g + r][c] = sum[r * chunks + c];
    }
}

#if defined(__AVX512BF16__)
/* The sums of four vectors' lanes, in lanes 0, 4, 8 and 12. */
static inline __m512 four_sums(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    x = _mm512_add_ps(x, _mm512_permute_ps(x, 0x4E));
    return _mm512_add_ps(x, _mm512_permute_ps(x, 0xB1));
}

/* bf16 form, head sizes of `pairs` x 32: `query` holds the unscaled rows in bf16, row r's 32 elements c at
 * r * pairs + c. Values are taken two rows at a time, interleaved element by element so that one dot-product
 * lane holds both rows' products for one output element; within each 128-bit lane, unpacking puts elements
 * 0-3 of every 8 in the low accumulator and 4-7 in the high one (undone by bf16_output). */
static inline __attribute__((always_inline)) void bf16_block(struct state *s, const __m512bh *query, float scaling,
                                                              const char *keys, const char *values, int rows,
                                                              int rows_padded, const int pairs) {
    const int64_t row_bytes = (int64_t)pairs * 64;
    for (int j = 0; j < rows; j++) {
        __m512bh key[MAX_CHUNKS / 2];
        for (int c = 0; c < pairs; c++) key[c] = (__m512bh)_mm512_loadu_si512(keys + j * row_bytes + 64 * c);
        for (int g = 0; g < rows_padded; g += GROUP) {
            __m512 dot[GROUP];
            for (int r = 0; r < GROUP; r++) dot[r] = _mm512_setzero_ps();
            for (int c = 0; c < pairs; c++)
                for (int r = 0; r < GROUP; r++) dot[r] = _mm512_dpbf16_ps(dot[r], query[(g + r) * pairs + c], key[c]);
            float sums[LANES];
            _mm512_storeu_ps(sums, _mm512_mul_ps(four_sums(dot[0], dot[1], dot[2], dot[3]), _mm512_set1_ps(scaling)));
            for (int r = 0; r < GROUP; r++) s->scores[g + r][j] = sums[4 * r];
        }
    }
    softmax(s, rows, rows_padded);
    uint32_t weights[MAX_RATIO][BLOCK / 2];  /* row r's probabilities of rows j and j + 1 as a bf16 pair */
    for (int r = 0; r < rows_padded; r++)
        for (int j = 0; j < BLOCK; j += 32)
            _mm512_storeu_si512(&weights[r][j / 2], (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(&s->scores[r][j + 16]),
                                                                                 _mm512_load_ps(&s->scores[r][j])));
    const int pass = PASS(2 * pairs);
    for (int g = 0; g < rows_padded; g += pass) {
        __m512 low[MAX_CHUNKS], high[MAX_CHUNKS];
        for (int r = 0; r < pass; r++)
            for (int c = 0; c < pairs; c++) {
                const __m512 rescale = _mm512_set1_ps(s->rescale[g + r]);
                low[r * pairs + c] = _mm512_mul_ps((__m512)s->acc[g + r][2 * c], rescale);
                high[r * pairs + c] = _mm512_mul_ps((__m512)s->acc[g + r][2 * c + 1], rescale);
            }
        for (int j = 0; j < rows; j += 2) {
            const char *first = values + j * row_bytes;
            for (int c = 0; c < pairs; c++) {
                const __m512i a = _mm512_loadu_si512(first + 64 * c);
                const __m512i b = j + 1 < rows ? _mm512_loadu_si512(first + row_bytes + 64 * c) : _mm512_setzero_si512();
                const __m512bh lows = (__m512bh)_mm512_unpacklo_epi16(a, b), highs = (__m512bh)_mm512_unpackhi_epi16(a, b);
                for (int r = 0; r < pass; r++) {
                    const __m512bh weight = (__m512bh)_mm512_set1_epi32((int)weights[g + r][j / 2]);
                    low[r * pairs + c] = _mm512_dpbf16_ps(low[r * pairs + c], weight, lows);
                    high[r * pairs + c] = _mm512_dpbf16_ps(high[r * pairs + c], weight, highs);
                }
            }
        }
        for (int r = 0; r < pass; r++)
            for (int c = 0; c < pairs; c++) {
                s->acc[g + r][2 * c] = (floats)low[r * pairs + c];
                s->acc[g + r][2 * c + 1] = (floats)high[r * pairs + c];
            }
    }
}

/* Row r's output from the bf16 form's accumulators: element 8q + e of each 32 is lane 4q + e of the low
 * accumulator for e < 4, of the high one (e - 4) otherwise. */
static void bf16_output(const floats *acc, int pairs, float *out) {
    for (int c = 0; c < pairs; c++)
        for (int q = 0; q < 4; q++)
            for (int e = 0; e < 4; e++) {
                out[32 * c + 8 * q + e] = acc[2 * c][4 * q + e];
                out[32 * c + 8 * q + 4 + e] = acc[2 * c + 1][4 * q + e];
            }
}
#endif

/* Attention of `ratio` query rows (float32, unscaled) over rows [first, stop) of one head: output and
 * log-sum-exp. */
static void attend(const float *query, float scaling, const char *keys, const char *values, int64_t first,
                   int64_t stop, int half, int ratio, int dim, float *out, float *lse) {
    struct state s;
    const int chunks = dim / LANES, rows_padded = (ratio + GROUP - 1) / GROUP * GROUP;
    const int64_t row_bytes = (int64_t)dim * (half ? 2 : 4);
    for (int r = 0; r < rows_padded; r++) {
        s.top[r] = NONE;
        s.total[r] = 0.0f;
        for (int c = 0; c < chunks; c++) s.acc[r][c] = (floats){0};
    }
#if defined(__AVX512BF16__)
    const int bf16 = half && dim % 32 == 0;
#else
    const int bf16 = 0;
#endif
    /* the query rows as the block form multiplies them, rows past `ratio` zero up to a whole group */
    floats scaled[MAX_RATIO * MAX_CHUNKS];  /* widened: scaled, in float32 */
    if (!bf16)
        for (int r = 0; r < rows_padded; r++)
            for (int c = 0; c < chunks; c++)
                for (int i = 0; i < LANES; i++)
                    scaled[r * chunks + c][i] = r < ratio ? query[r * dim + c * LANES + i] * scaling : 0.0f;
#if defined(__AVX512BF16__)
    __m512bh rounded[MAX_RATIO * MAX_CHUNKS / 2];  /* bf16: unscaled, rounded to bf16 */
    if (bf16)
        for (int i = 0; i < rows_padded * chunks / 2; i++) {
            const float *source = query + (int64_t)i * 32;
            rounded[i] = i < ratio * chunks / 2
                             ? _mm512_cvtne2ps_pbh(_mm512_loadu_ps(source + 16), _mm512_loadu_ps(source))
                             : (__m512bh)_mm512_setzero_si512();
        }
#endif
    for (int64_t start = first; start < stop; start += BLOCK) {
        const int rows = (int)(stop - start < BLOCK ? stop - start : BLOCK);
        const char *block_keys = keys + start * row_bytes, *block_values = values + start * row_bytes;
#if defined(__AVX512BF16__)
        if (bf16) {
            switch (chunks) {  /* the common head sizes as constants, so that the chunk loops unroll */
            case 4: bf16_block(&s, rounded, scaling, block_keys, block_values, rows, rows_padded, 2); break;
            case 8: bf16_block(&s, rounded, scaling, block_keys, block_values, rows, rows_padded, 4); break;
            case 16: bf16_block(&s, rounded, scaling, block_keys, block_values, rows, rows_padded, 8); break;
            default: bf16_block(&s, rounded, scaling, block_keys, block_values, rows, rows_padded, chunks / 2);
            }
            continue;
        }
#endif
        switch (chunks) {
        case 4: widened_block(&s, scaled, block_keys, block_values, rows, rows_padded, half, 4); break;
        case 8: widened_block(&s, scaled, block_keys, block_values, rows, rows_padded, half, 8); break;
        case 16: widened_block(&s, scaled, block_keys, block_values, rows, rows_padded, half, 16); break;
        default: widened_block(&s, scaled, block_keys, block_values, rows, rows_padded, half, chunks);
        }
    }
    for (int r = 0; r < ratio; r++) {
        const float inverse = 1.0f / s.total[r];
        float *row = out + (int64_t)r * dim;
#if defined(__AVX512BF16__)
        if (bf16)
            bf16_output(s.acc[r], chunks / 2, row);
        else
#endif
            for (int c = 0; c < chunks; c++) memcpy(row + c * LANES, &s.acc[r][c], sizeof(floats));
        for (int d = 0; d < dim; d++) row[d] *= inverse;
        lse[r] = s.top[r] + logf(s.total[r]);
    }
}

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static double seconds_now(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
}

/* Returns once *flag has reached `value` (int32 counters that wrap), or -1 after `patience` seconds. Spins
 * for about 0.1 ms, then naps 10 us at a time: the query comes 20-30 ms after the call begins at 1M tokens,
 * and a core spinning all that time would be taken from the attention of the layer before. */
static int await_flag(const int32_t *flag, int32_t value, double patience) {
    double start = 0.0;
    const struct timespec nap = {0, 10000};
    for (long turn = 0;; turn++) {
        if ((int32_t)((uint32_t)__atomic_load_n(flag, __ATOMIC_ACQUIRE) - (uint32_t)value) >= 0) return 0;
        if (turn < 2000) {
            relax();
            continue;
        }
        if (turn == 2000) start = seconds_now();
        else if (seconds_now() - start > patience) return -1;
        nanosleep(&nap, NULL);
    }
}

/* items: `count` rows of (span, head, first, stop); keys[s]/values[s]: span s's position 0 of head 0, heads
 * `key_strides[s]`/`value_strides[s]` elements apart, rows contiguous. query: (heads, ratio, dim) float32,
 * unscaled. parts: (count, ratio, dim) and part_lse (count, ratio) scratch; out (heads, ratio, dim), lse
 * (heads, ratio). With `ready`, the query is read once *ready has reached `ready_value` (-2 if that takes
 * over `patience` seconds); with `done`, *done is set to `done_value` once out and lse are written. With
 * `times`, the monotonic clock's seconds when the query was there and when the output was written (for
 * benchmarks/host_timeline.py). Returns 0, or -1 when the ratio or the head size does not fit the kernel. */
int headspace_host_decode(int64_t count, const int64_t *items, const void *const *keys, const void *const *values,
                          const int64_t *key_strides, const int64_t *value_strides, int half, const float *query,
                          float scaling, int64_t heads, int64_t ratio, int64_t dim, float *parts, float *part_lse,
                          float *out, float *lse, int threads, const int32_t *ready, int32_t ready_value,
                          int32_t *done, int32_t done_value, double patience, double *times) {
    if (ratio > MAX_RATIO || dim % LANES || dim / LANES > MAX_CHUNKS) return -1;
    if (ready && await_flag(ready, ready_value, patience)) return -2;
    if (times) times[0] = seconds_now();
    const int64_t element = half ? 2 : 4;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < count; i++) {
        const int64_t *item = items + 4 * i;
        const int64_t span = item[0], head = item[1];
        attend(query + head * ratio * dim, scaling, (const char *)keys[span] + head * key_strides[span] * element,
               (const char *)values[span] + head * value_strides[span] * element, item[2], item[3], half,
               (int)ratio, (int)dim, parts + i * ratio * dim, part_lse + i * ratio);
    }
    for (int64_t head = 0; head < heads; head++) {  /* the items of each head merged by log-sum-exp */
        for (int64_t r = 0; r < ratio; r++) {
            float high = NONE, total = 0.0f;
            for (int64_t i = 0; i < count; i++)
                if (items[4 * i + 1] == head && part_lse[i * ratio + r] > high) high = part_lse[i * ratio + r];
            float *target = out + (head * ratio + r) * dim;
            for (int64_t d = 0; d < dim; d++) target[d] = 0.0f;
            for (int64_t i = 0; i < count; i++) {
                if (items[4 * i + 1] != head) continue;
                const float weight = expf(part_lse[i * ratio + r] - high);
                const float *part = parts + (i * ratio + r) * dim;
                for (int64_t d = 0; d < dim; d++) target[d] += weight * part[d];
                total += weight;
            }
            for (int64_t d = 0; d < dim; d++) target[d] /= total;
            lse[head * ratio + r] = high + logf(total);
        }
    }
    if (times) times[1] = seconds_now();
    if (done) __atomic_store_n(done, done_value, __ATOMIC_RELEASE);
    return 0;
}
