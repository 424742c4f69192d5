// Device fill and checksum of the GPU scan benchmark's synthetic store
// (bench/synthetic_store.h gives the values).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "bench/synthetic_store.h"

namespace retrace::bench {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

// Grid-stride: thread t fills elements t, t + stride, ... of both arrays.
__global__ void FillKernel(uint16_t* vectors, float* norms, int64_t count,
                           int64_t norm_count) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    const __half h = __float2half_rn(
        SyntheticUniform(uint64_t(i), kSeedVectors) * kVectorScale);
    vectors[i] = __half_as_ushort(h);
  }
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
       i < norm_count; i += stride) {
    norms[i] = SyntheticNorm(uint64_t(i));
  }
}

// Grid-stride: each thread sums its elements, the block reduces in shared
// memory and thread 0 adds the block's sums to sums[0] and sums[1].
__global__ void ChecksumKernel(const uint16_t* vectors, int64_t count,
                               const float* norms, int64_t norm_count,
                               unsigned long long* sums) {
  __shared__ unsigned long long partial[2][kThreads];
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  unsigned long long v = 0, n = 0;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    v += vectors[i];
  }
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
       i < norm_count; i += stride) {
    n += __float_as_uint(norms[i]);
  }
  partial[0][threadIdx.x] = v;
  partial[1][threadIdx.x] = n;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      partial[0][threadIdx.x] += partial[0][threadIdx.x + half];
      partial[1][threadIdx.x] += partial[1][threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    atomicAdd(&sums[0], partial[0][0]);
    atomicAdd(&sums[1], partial[1][0]);
  }
}

int Blocks(int64_t count) {
  return int(
      std::clamp<int64_t>((count + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

}  // namespace

int FillSyntheticStoreCuda(uint16_t* vectors, float* norms, int64_t rows,
                           int64_t slot_pairs, int64_t row_values,
                           ::CUstream_st* stream) {
  const int64_t count = rows * row_values;
  FillKernel<<<Blocks(count), kThreads, 0, stream>>>(vectors, norms, count,
                                                     rows * slot_pairs);
  return int(cudaGetLastError());
}

int ChecksumSyntheticStoreCuda(const uint16_t* vectors, int64_t count,
                               const float* norms, int64_t norm_count,
                               unsigned long long* sums,
                               ::CUstream_st* stream) {
  cudaError_t e =
      cudaMemsetAsync(sums, 0, 2 * sizeof(unsigned long long), stream);
  if (e != cudaSuccess) return int(e);
  ChecksumKernel<<<Blocks(count), kThreads, 0, stream>>>(vectors, count, norms,
                                                         norm_count, sums);
  return int(cudaGetLastError());
}

}  // namespace retrace::bench
