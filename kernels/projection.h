// Random projection of gradients: y = P·x for a batch of B input
// vectors of dimension p, giving B outputs of dimension D.
//
// P is never stored. Every entry is a pure function of (seed, global input
// coordinate i, k or row j) through Philox-4x32-10; docs/projection.md gives
// the exact definition so that any implementation can rebuild the matrix.
//   kSjlt (default): column i has s non-zeros, one in each of s row blocks,
//     value ±1/√s.
//   kRademacher: dense, every entry ±1/√D.
//
// Streaming: the input arrives one parameter tensor ("piece") at a time with
// its global coordinate offset; the full p-vector is never built.
//
//   std::vector<uint64_t> acc(ProjectionAccumulatorWords(spec, B));
//   ProjectResetCpu(spec, B, acc.data());
//   for each tensor:  ProjectAccumulateCpu(spec, values, B, len, row_stride,
//                                          offset, scale, acc.data());
//                     offset += len;
//   ProjectFinalizeCpu(spec, acc.data(), B, output);   // output [B, D] fp32
//
// or, owning the accumulator: Projector::Create(spec, B, backend, stream, &p);
// p->Accumulate(...) per tensor; p->Finalize(output).
//
// Determinism. Each input value is scaled (x·input_scale, in double) and
// rounded once to signed 64-bit fixed point with kFixedPointFractionBits
// fractional bits (round to nearest, ties to even). Accumulation is integer
// addition modulo 2^64, which is associative and commutative, so the result
// is bit-identical for any split of the input into pieces, any piece order,
// any CPU thread count, any GPU grid or SM count, and between the CPU and the
// CUDA backends. Finalize converts each sum to double, multiplies it by
// 2^-32/√s (or 2^-32/√D) and rounds to float.
//
// Range. Finalize refuses (InvalidArgument) a batch vector that contained a
// NaN or Inf, an element with |x·input_scale| > kMaxAbsScaledInput, or whose
// L1 norm Σ|x·input_scale| over all pieces reached kMaxScaledInputL1; below
// that bound no accumulator can overflow. Inputs pre-normalized to unit L2
// norm (input_scale = 1/‖x‖) stay below it for any p < 4.6e18; multiply the
// output by ‖x‖ afterwards if the unnormalized projection is wanted.
//
// Resolution: 2^-32 ≈ 2.3e-10 per scaled element (absolute); see
// docs/projection.md for the resulting error bound.
//
// Thread safety: the functions are reentrant; calls that share an accumulator
// must not overlap (CPU) or must be ordered on one stream (CUDA). Projector is
// not thread-safe.
#ifndef RETRACE_KERNELS_PROJECTION_H_
#define RETRACE_KERNELS_PROJECTION_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cpu_isa.h"
#include "kernels/device.h"
#include "kernels/kernel_status.h"

// The runtime's stream type (cudaStream_t is CUstream_st*), declared here so
// that this header is the same with and without CUDA.
struct CUstream_st;

namespace retrace::kernels {

using CudaStream = CUstream_st*;

enum class ProjectionType : int32_t { kSjlt = 0, kRademacher = 1 };

// "sjlt" / "rademacher" (the manifest spelling).
const char* ProjectionTypeName(ProjectionType type);
// Parses the manifest spelling; false when unknown.
bool ParseProjectionType(const std::string& name, ProjectionType* out);

inline constexpr int kMaxSjltSparsity = 8;
inline constexpr int64_t kMaxProjectionDim = int64_t{1} << 22;
inline constexpr int64_t kMaxProjectionBatch = int64_t{1} << 16;
inline constexpr int kFixedPointFractionBits = 32;
// Largest accepted |x·input_scale| of a single element (2^19).
inline constexpr double kMaxAbsScaledInput = 524288.0;
// Σ|x·input_scale| of one batch vector must stay below this (2^31).
inline constexpr double kMaxScaledInputL1 = 2147483648.0;

struct ProjectionSpec {
  ProjectionType type = ProjectionType::kSjlt;
  int64_t output_dim = 1024;  // D, 1..kMaxProjectionDim
  int sparsity = 4;           // s, 1..kMaxSjltSparsity, s <= D; kSjlt only
  uint64_t seed = 0;
  // p, the total input dimension, when known (> 0): pieces reaching beyond
  // it are refused. 0 = not declared (no bound check).
  int64_t input_dim = 0;
};

// Ok, or InvalidArgument naming the bad field.
KernelStatus ValidateProjectionSpec(const ProjectionSpec& spec);

// Number of uint64_t words of an accumulator for `batch` vectors
// (D·B sums, then B L1 counters, then B error-flag words); -1 when the spec or
// batch is invalid. The layout is internal to this library; an all-zero
// accumulator is an empty one.
int64_t ProjectionAccumulatorWords(const ProjectionSpec& spec, int64_t batch);

// ---- CPU backend: all pointers are host memory. ---------------------------

// Zeroes `accumulator` (ProjectionAccumulatorWords(spec, batch) words).
KernelStatus ProjectResetCpu(const ProjectionSpec& spec, int64_t batch,
                             uint64_t* accumulator);

// Adds P[:, global_offset .. global_offset+len) · piece to the accumulator,
// where piece is `batch` rows of `len` floats, row b starting at
// values + b·row_stride (row_stride >= len). Runs on `num_threads` threads
// (0 = CpuThreads()) with the instruction set `isa` (kernels/cpu_isa.h:
// kAvx512, and kAmx with it, quantizes eight vectors at a time in registers
// and adds eight sums per instruction; the others run the generic loops);
// the result does not depend on either, bit for bit. Returns InvalidArgument
// for bad arguments (nothing is added) and for non-finite or out-of-range
// data (the accumulator is then marked bad: Finalize refuses it until the
// next Reset);
// Unavailable for an instruction set this CPU lacks.
KernelStatus ProjectAccumulateCpu(const ProjectionSpec& spec,
                                  const float* values, int64_t batch,
                                  int64_t len, int64_t row_stride,
                                  int64_t global_offset, double input_scale,
                                  uint64_t* accumulator, int num_threads = 0,
                                  CpuIsa isa = CpuIsa::kAuto);

// Writes output[b·D + j] (fp32, [batch, D]); InvalidArgument when any batch
// vector saw bad data (output is then unspecified). Leaves the accumulator
// unchanged, so more pieces may be added and finalized again.
KernelStatus ProjectFinalizeCpu(const ProjectionSpec& spec,
                                const uint64_t* accumulator, int64_t batch,
                                float* output);

// ---- CUDA backend: values, accumulator and output are device-accessible
// memory; work is enqueued on `stream` (nullptr = the legacy default stream).
// Unavailable when the library was built without CUDA.

KernelStatus ProjectResetCuda(const ProjectionSpec& spec, int64_t batch,
                              uint64_t* accumulator, CudaStream stream);

// Asynchronous: returns after enqueueing. Bad data (NaN/Inf, range) cannot be
// seen from the host here; it is recorded in the accumulator and reported by
// ProjectFinalizeCuda.
KernelStatus ProjectAccumulateCuda(const ProjectionSpec& spec,
                                   const float* values, int64_t batch,
                                   int64_t len, int64_t row_stride,
                                   int64_t global_offset, double input_scale,
                                   uint64_t* accumulator, CudaStream stream);

// Enqueues the conversion to output [batch, D] fp32, then synchronizes
// `stream` to read the error flags: InvalidArgument when any batch vector saw
// bad data. Bit-identical to ProjectFinalizeCpu on the same input.
KernelStatus ProjectFinalizeCuda(const ProjectionSpec& spec,
                                 const uint64_t* accumulator, int64_t batch,
                                 float* output, CudaStream stream);

// Owns an accumulator for one backend (host memory for kCpu, device memory
// for kCuda) and dispatches to the functions above. Not thread-safe.
class Projector {
 public:
  // Validates the spec, allocates and zeroes the accumulator. `stream` is
  // used by the kCuda backend only. Unavailable when kCuda is asked for and
  // no device can be used; OutOfMemory when allocation fails.
  static KernelStatus Create(const ProjectionSpec& spec, int64_t batch,
                             Backend backend, CudaStream stream,
                             std::unique_ptr<Projector>* out);
  ~Projector();
  Projector(const Projector&) = delete;
  Projector& operator=(const Projector&) = delete;

  const ProjectionSpec& spec() const { return spec_; }
  int64_t batch() const { return batch_; }
  Backend backend() const { return backend_; }

  // Empties the accumulator (and clears its error flags).
  KernelStatus Reset();
  // One piece; see ProjectAccumulateCpu / ProjectAccumulateCuda. `values` is
  // host memory for kCpu and device-accessible memory for kCuda.
  KernelStatus Accumulate(const float* values, int64_t len, int64_t row_stride,
                          int64_t global_offset, double input_scale = 1.0);
  // Writes [batch, D] fp32 to `output` (host memory for kCpu, device memory
  // for kCuda; for kCuda the stream is synchronized).
  KernelStatus Finalize(float* output);

 private:
  Projector(const ProjectionSpec& spec, int64_t batch, Backend backend,
            CudaStream stream);

  ProjectionSpec spec_;
  int64_t batch_;
  Backend backend_;
  CudaStream stream_;
  std::vector<uint64_t> host_accumulator_;  // kCpu
  uint64_t* device_accumulator_ = nullptr;  // kCuda
};

}  // namespace retrace::kernels

#endif  // RETRACE_KERNELS_PROJECTION_H_
