// Host-side arithmetic of the CUDA scan (internal to kernels/ and its tests):
// launch shapes and the layout of the device scratch. Plain C++, built with
// and without CUDA, so that the sizing can be tested on machines without a
// device.
#ifndef RETRACE_KERNELS_SCAN_PLAN_H_
#define RETRACE_KERNELS_SCAN_PLAN_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/scoring.h"

namespace retrace::kernels {

// Every scratch region starts on this boundary (WMMA loads need 32 bytes).
inline constexpr size_t kScratchAlign = 256;

// fp32 path: thread columns of 4 score columns each (a power of two), so the
// padded column count is 4 * Fp32ColumnGroups(Q) >= 2Q.
int Fp32ColumnGroups(int num_queries);

// Tensor-core path: score columns are padded to 16-column MMA fragments;
// the fragment count is a power of two (1, 2, 4 or 8 for Q <= 64).
inline constexpr int kTensorFragment = 16;
int TensorColumnFragments(int num_queries);
// Query dim padded to whole MMA steps.
int64_t TensorPaddedDim(int32_t dim);

// Selection: every score column is cut into SelectSlices(N) slices of
// SelectSliceRows(N) positions, one block each, so that even Q = 1 spreads
// over many blocks. At most kMaxSelectSlices slices.
inline constexpr int64_t kSelectSliceRows = 16384;
inline constexpr int64_t kMaxSelectSlices = 4096;
inline constexpr int kRadixBins = 2048;  // 11-bit digits: 11, 11, 10 bits
int64_t SelectSlices(int64_t total_rows);
int64_t SelectSliceRows(int64_t total_rows);

// Byte offsets of the scratch regions (0 and unused when a region is absent).
struct ScratchPlan {
  // fp32 path: [C*S, D, 4 * Fp32ColumnGroups(Q)] fp32 query matrix.
  size_t qmat = 0;
  // Tensor-core path: hi and lo parts [C*S, TensorPaddedDim(D), 16 * F] in
  // the store's 16-bit type, and the per-column inverse scales [C*S, 16 * F].
  size_t qhi = 0, qlo = 0, inv_scale = 0;
  size_t scale = 0;        // [C*S, padded columns] slot weights
  size_t slot_active = 0;  // [C*S] int
  size_t bad = 0;          // first non-finite query value
  size_t scores = 0;       // [2Q, N] fp32
  size_t radix_state = 0;  // [2Q * lists] RadixState
  size_t histogram = 0;    // [2Q * lists, kRadixBins] uint32
  size_t tie_counts = 0;   // [2Q * lists, SelectSlices(N)] uint32
  size_t selected = 0;     // [2Q * lists, k] packed candidates
  size_t breakdown = 0;    // [2Q * lists * k, C*S] fp32, when asked
  size_t total = 0;
  int32_t padded_columns = 0;  // columns of qmat / qhi / scale
};

// The layout for `path` (kFp32 or kTensorCore, already chosen). Arguments are
// assumed valid (ValidateScan).
ScratchPlan PlanScanScratch(const StoreLayout& layout, int64_t total_rows,
                            int32_t num_queries, const ScanOptions& options,
                            CudaScanPath path);

int64_t TotalRows(const std::vector<StoreChunk>& chunks);

}  // namespace retrace::kernels

#endif  // RETRACE_KERNELS_SCAN_PLAN_H_
