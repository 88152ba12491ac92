/* Flush-to-zero (FTZ) and denormals-are-zero (DAZ) on every thread PyTorch's CPU kernels run on.
 *
 * A float below 2^-126 is a denormal; on x86 an SSE/AVX operation reading or producing one takes a
 * microcode assist, tens to hundreds of times a normal operation. A model in training makes more of them
 * as it learns (near-zero attention probabilities, AdamW's second moments of tiny gradients), and a step
 * slows down. The two MXCSR bits make those values zero instead. MXCSR is per thread, so the bits are set
 * inside an OpenMP parallel region: its team is the pool of threads PyTorch's OpenMP backend (and MKL's
 * GNU threading) reuse for their own regions from this thread.
 */
#include <xmmintrin.h>

#define FTZ_DAZ 0x8040u /* MXCSR bit 15: flush to zero; bit 6: denormals are zero */

static void set_bits(int on) {
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(on ? csr | FTZ_DAZ : csr & ~FTZ_DAZ);
}

/* Set (on = 1) or clear (on = 0) both bits on the calling thread and the `threads` threads of its team.
 * Returns 1 if both were set on the calling thread before, else 0. */
int gptlab_flush_denormals(int on, int threads) {
    const int before = (_mm_getcsr() & FTZ_DAZ) == FTZ_DAZ;
#pragma omp parallel num_threads(threads)
    set_bits(on);
    set_bits(on); /* the calling thread, also where the region ran with one thread */
    return before;
}

/* How many of the calling thread's team of `threads` have both bits set (a check for tests). */
int gptlab_denormals_flushed(int threads) {
    int n = 0;
#pragma omp parallel num_threads(threads) reduction(+ : n)
    n += (_mm_getcsr() & FTZ_DAZ) == FTZ_DAZ;
    return n;
}
