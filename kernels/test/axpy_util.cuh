// Helper for kernels/test/axpy.cu; exists to test `#include` resolution of embedded headers.
#pragma once

__device__ __forceinline__ unsigned int global_index() {
    return blockIdx.x * blockDim.x + threadIdx.x;
}
