/* The host decode kernel (headspace/attention/host_decode.c) against a plain read of the same memory, on this
 * machine's cores: one layer's worth of host KV (2 heads x 1M positions x 128, bf16: 512 MiB of keys and as
 * much of values), at 1-16 threads, with transparent huge pages refused and asked for; "hot(L2)" runs the
 * kernel over 2,048 positions per thread again and again, so its data stays in L2 and what is left is the
 * kernel's own speed. Prints one line per thread count (GB/s of KV).
 *
 *   cc -O3 -march=native -ffast-math -fopenmp benchmarks/host_decode_bench.c \
 *      headspace/attention/host_decode.c -o host_decode_bench -lm && ./host_decode_bench
 *   (add -mno-avx512bf16 for the widened form on a CPU that has the bf16 instructions)
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <omp.h>
int headspace_host_decode(int64_t count, const int64_t *items, const void *const *keys, const void *const *values,
                          const int64_t *key_strides, const int64_t *value_strides, int half, const float *query,
                          float scaling, int64_t heads, int64_t ratio, int64_t dim, float *parts, float *part_lse, float *out,
                          float *lse, int threads);
static double now(){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+1e-9*t.tv_nsec;}
typedef float floats __attribute__((vector_size(64)));
int main(){
  const int64_t n = 1<<20, D = 128, H = 2; const size_t bytes = (size_t)H*n*D*2;
  for (int huge = 0; huge < 2; huge++) {
    uint16_t *k = mmap(0, bytes, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
    uint16_t *v = mmap(0, bytes, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
    madvise(k, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE); madvise(v, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    #pragma omp parallel for
    for (int64_t i = 0; i < (int64_t)(bytes/2); i++) { k[i] = 0x3c00 + (i & 255); v[i] = 0x3c00 + (i & 127); }
    float q[2*4*128]; for (int i = 0; i < 1024; i++) q[i] = 0.001f * (i % 13);
    int threads_list[] = {1, 4, 8, 14, 16};
    for (int t = 0; t < 5; t++) {
      int T = threads_list[t];
      /* read: sum the words */
      double best = 1e9; float sink = 0;
      for (int rep = 0; rep < 3; rep++) { double a = now(); float s = 0;
        #pragma omp parallel for num_threads(T) reduction(+:s)
        for (int64_t c = 0; c < (int64_t)(2*bytes/64); c++) { const floats *p = (const floats*)((c < (int64_t)(bytes/64)) ? (char*)k + 64*c : (char*)v + 64*(c - bytes/64)); s += (*p)[0] + (*p)[5]; }
        sink += s; double e = now() - a; if (e < best) best = e; }
      int64_t cnt = 4 * T * H; if (cnt < 8) cnt = 8; int64_t *items = malloc(cnt*4*8); int per = cnt / H;
      for (int64_t i = 0; i < cnt; i++) { items[4*i] = 0; items[4*i+1] = i / per; items[4*i+2] = n*(i%per)/per; items[4*i+3] = n*(i%per+1)/per; }
      const void *kp[1] = {k}, *vp[1] = {v}; int64_t ks[1] = {n*D}, vs[1] = {n*D};
      float *parts = malloc(cnt*4*128*4), *pl = malloc(cnt*4*4), out[1024], lse[8];
      double bestk = 1e9;
      for (int rep = 0; rep < 3; rep++) { double a = now();
        headspace_host_decode(cnt, items, kp, vp, ks, vs, 1, q, 0.1f, H, 4, D, parts, pl, out, lse, T);
        double e = now() - a; if (e < bestk) bestk = e; }
      int64_t hot = 256 * T; int64_t *hitems = malloc(hot*4*8);
      for (int64_t i = 0; i < hot; i++) { hitems[4*i] = 0; hitems[4*i+1] = 0; hitems[4*i+2] = 2048 * (i % T); hitems[4*i+3] = 2048 * (i % T) + 2048; }
      float *hparts = malloc(hot*4*128*4), *hpl = malloc(hot*4*4);
      double besth = 1e9;
      for (int rep = 0; rep < 3; rep++) { double a = now();
        headspace_host_decode(hot, hitems, kp, vp, ks, vs, 1, q, 0.1f, 1, 4, D, hparts, hpl, out, lse, T);
        double e = now() - a; if (e < besth) besth = e; }
      printf("hot(L2) %6.1f GB/s  ", hot * 2048 * 512.0 / besth / 1e9);
      printf("huge=%d threads=%2d read %6.1f GB/s  kernel %6.1f GB/s  (%g %g)\n", huge, T, 2*bytes/best/1e9, 2*bytes/bestk/1e9, sink, out[3]);
      fflush(stdout);
    }
    munmap(k, bytes); munmap(v, bytes);
  }
  return 0;
}
