/* free + malloc of random small sizes (16-215 B, as a key-value server makes), one thread:
 * the allocator's own speed.  gcc -O2 -o malloc_loop bench/programs/malloc_loop.c, then run it plain,
 * with LD_PRELOAD=libjemalloc.so.2, and under python -m odfork_user exec -- ./malloc_loop. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
int main(void)
{
    enum { N = 1 << 16 };
    static void *slot[N];
    unsigned s = 1;
    double t0 = now();
    long ops = 0;
    for (int r = 0; r < 60; r++)
        for (int i = 0; i < N; i++) {
            s = s * 1103515245 + 12345;
            int k = (s >> 8) % N;
            free(slot[k]);
            size_t n = 16 + (s >> 20) % 200; /* redis-like small objects */
            slot[k] = malloc(n);
            memset(slot[k], 1, 8);
            ops++;
        }
    double t = now() - t0;
    printf("%.1f ns per free+malloc\n", t / ops * 1e9);
    return 0;
}
