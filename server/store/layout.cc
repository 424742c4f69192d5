#include "server/store/layout.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"

namespace retrace::store {

int64_t RowElements(int64_t num_checkpoints, int64_t num_slots, int64_t dim) {
  return num_checkpoints * num_slots * dim;
}

int64_t RowBytes(int64_t num_checkpoints, int64_t num_slots, int64_t dim,
                 kernels::DType dtype) {
  return RowElements(num_checkpoints, num_slots, dim) *
         kernels::DTypeSize(dtype);
}

int64_t RowByteOffset(int64_t sample_in_shard, int64_t num_checkpoints,
                      int64_t num_slots, int64_t dim, kernels::DType dtype) {
  return sample_in_shard * RowBytes(num_checkpoints, num_slots, dim, dtype);
}

int64_t VectorElementByteOffset(int64_t sample_in_shard, int64_t c, int64_t s,
                                int64_t d, int64_t num_checkpoints,
                                int64_t num_slots, int64_t dim,
                                kernels::DType dtype) {
  int64_t index =
      ((sample_in_shard * num_checkpoints + c) * num_slots + s) * dim + d;
  return index * kernels::DTypeSize(dtype);
}

std::vector<TensorEntry> ShardTensors(const ShardGeometry& g) {
  const int64_t n = g.count;
  std::vector<TensorEntry> tensors;
  tensors.push_back({kVectorsTensor,
                     kernels::DTypeName(g.dtype),
                     {n, g.num_checkpoints, g.num_slots, g.dim}});
  tensors.push_back({kNormsTensor, "F32", {n, g.num_checkpoints, g.num_slots}});
  tensors.push_back({kSampleIdsTensor, "I64", {n}});
  tensors.push_back({kLabelsTensor, "I32", {n}});
  tensors.push_back({kSelfInfluenceTensor, "F32", {n, kSelfInfluenceColumns}});
  if (g.has_replay) {
    tensors.push_back({kTrainTimestepsTensor, "I32", {n, g.num_checkpoints}});
  }
  std::sort(tensors.begin(), tensors.end(),
            [](const TensorEntry& a, const TensorEntry& b) {
              int64_t sa = SafetensorsDTypeSize(a.dtype),
                      sb = SafetensorsDTypeSize(b.dtype);
              return sa != sb ? sa > sb : a.name < b.name;
            });
  int64_t offset = 0;
  for (TensorEntry& t : tensors) {
    int64_t bytes = SafetensorsDTypeSize(t.dtype);
    for (int64_t dim : t.shape) bytes *= dim;
    t.begin = offset;
    t.end = offset + bytes;
    offset = t.end;
  }
  return tensors;
}

int64_t ShardDataBytes(const ShardGeometry& geometry) {
  std::vector<TensorEntry> tensors = ShardTensors(geometry);
  return tensors.empty() ? 0 : tensors.back().end;
}

std::string ShardFileName(int64_t index) {
  return absl::StrFormat("shard-%05d.safetensors", index);
}

bool ParseShardFileName(const std::string& name, int64_t* index) {
  constexpr absl::string_view kPrefix = "shard-", kSuffix = ".safetensors";
  if (!absl::StartsWith(name, kPrefix) || !absl::EndsWith(name, kSuffix))
    return false;
  std::string digits = name.substr(
      kPrefix.size(), name.size() - kPrefix.size() - kSuffix.size());
  if (digits.empty() || digits.size() > 12) return false;
  for (char ch : digits) {
    if (ch < '0' || ch > '9') return false;
  }
  if (!absl::SimpleAtoi(digits, index)) return false;
  return ShardFileName(*index) == name;
}

int64_t NumShards(int64_t num_samples, int64_t samples_per_shard) {
  return (num_samples + samples_per_shard - 1) / samples_per_shard;
}

int64_t ShardSampleCount(int64_t index, int64_t num_samples,
                         int64_t samples_per_shard) {
  return std::min(samples_per_shard, num_samples - index * samples_per_shard);
}

}  // namespace retrace::store
