// Runtime self-test kernel (owned by the CUDA runtime, not an attention kernel):
//   y[i] = ALPHA * x[i] + y[i]   for i < n,   f32.
// ALPHA is a JIT define (-DALPHA=...) so tests can exercise specialisation and the cache key.
#include "test/axpy_util.cuh"

#ifndef ALPHA
#define ALPHA 2.0f
#endif

extern "C" __global__ void axpy(const float* __restrict__ x, float* __restrict__ y, unsigned int n) {
    const unsigned int i = global_index();
    if (i < n) {
        y[i] = ALPHA * x[i] + y[i];
    }
}
