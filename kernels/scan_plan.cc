#include "kernels/scan_plan.h"

#include <algorithm>

namespace retrace::kernels {

int Fp32ColumnGroups(int num_queries) {
  int tx = 1;
  while (4 * tx < 2 * num_queries) tx *= 2;
  return tx;
}

int TensorColumnFragments(int num_queries) {
  int f = 1;
  while (kTensorFragment * f < 2 * num_queries) f *= 2;
  return f;
}

int64_t TensorPaddedDim(int32_t dim) {
  return (int64_t{dim} + kTensorFragment - 1) / kTensorFragment *
         kTensorFragment;
}

int64_t SelectSlices(int64_t total_rows) {
  const int64_t slices = (total_rows + kSelectSliceRows - 1) / kSelectSliceRows;
  return std::clamp<int64_t>(slices, 1, kMaxSelectSlices);
}

int64_t SelectSliceRows(int64_t total_rows) {
  const int64_t slices = SelectSlices(total_rows);
  return (total_rows + slices - 1) / slices;
}

ScratchPlan PlanScanScratch(const StoreLayout& layout, int64_t total_rows,
                            int32_t num_queries, const ScanOptions& options,
                            CudaScanPath path) {
  const size_t cs = size_t(layout.SlotPairs());
  const size_t cols = size_t(2 * num_queries);
  const size_t lists = options.want_bottom ? 2 : 1;
  const size_t k = size_t(options.k);
  size_t offset = 0;
  auto take = [&](size_t bytes) {
    const size_t at = offset;
    offset += (bytes + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
    return at;
  };
  ScratchPlan p;
  if (path == CudaScanPath::kTensorCore) {
    p.padded_columns = kTensorFragment * TensorColumnFragments(num_queries);
    const size_t ncp = size_t(p.padded_columns);
    const size_t half_matrix =
        cs * size_t(TensorPaddedDim(layout.dim)) * ncp * sizeof(uint16_t);
    p.qhi = take(half_matrix);
    p.qlo = take(half_matrix);
    p.inv_scale = take(cs * ncp * sizeof(float));
  } else {
    p.padded_columns = 4 * Fp32ColumnGroups(num_queries);
    p.qmat = take(cs * size_t(layout.dim) * size_t(p.padded_columns) *
                  sizeof(float));
  }
  p.scale = take(cs * size_t(p.padded_columns) * sizeof(float));
  p.slot_active = take(cs * sizeof(int));
  p.bad = take(sizeof(unsigned long long));
  p.scores = take(cols * size_t(total_rows) * sizeof(float));
  p.radix_state = take(cols * lists * 4 * sizeof(uint32_t));
  p.histogram = take(cols * lists * size_t(kRadixBins) * sizeof(uint32_t));
  p.tie_counts =
      take(cols * lists * size_t(SelectSlices(total_rows)) * sizeof(uint32_t));
  p.selected = take(cols * lists * k * sizeof(unsigned long long));
  if (options.want_breakdown) {
    p.breakdown = take(cols * lists * k * cs * sizeof(float));
  }
  p.total = offset;
  return p;
}

int64_t TotalRows(const std::vector<StoreChunk>& chunks) {
  int64_t n = 0;
  for (const StoreChunk& c : chunks) n += c.rows;
  return n;
}

}  // namespace retrace::kernels
