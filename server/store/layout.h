// Byte layout of a retrace store shard: tensor names, shapes, order and the
// offset arithmetic that the reader, the writer and the scan share.
//
// All sizes and offsets are int64 because a single shard or store easily
// exceeds 2^31 (and 2^32) bytes. The functions assume their arguments come from
// a validated spec (non-negative, products below 2^63); they do no I/O and are
// thread-safe.
#ifndef RETRACE_SERVER_STORE_LAYOUT_H_
#define RETRACE_SERVER_STORE_LAYOUT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "server/store/safetensors.h"

namespace retrace::store {

inline constexpr char kVectorsTensor[] = "vectors";
inline constexpr char kNormsTensor[] = "norms";
inline constexpr char kSampleIdsTensor[] = "sample_ids";
inline constexpr char kLabelsTensor[] = "labels";
inline constexpr char kSelfInfluenceTensor[] = "self_influence";
inline constexpr char kTrainTimestepsTensor[] = "train_timesteps";

// Columns of the `self_influence` tensor.
inline constexpr int64_t kSelfInfluenceTracIn = 0;
inline constexpr int64_t kSelfInfluenceReTrac = 1;
inline constexpr int64_t kSelfInfluenceColumns = 2;

// Shape of one shard. Slots are buckets 0..B-1, then the replay slot (when
// present) last, so num_slots = B + (replay ? 1 : 0).
struct ShardGeometry {
  int64_t count = 0;            // samples in the shard
  int64_t num_checkpoints = 0;  // C
  int64_t num_slots = 0;        // S
  int64_t dim = 0;              // D
  kernels::DType dtype = kernels::DType::kF16;
  bool has_replay = false;  // adds `train_timesteps` [count, C]
};

// Values per sample in `vectors`: C * S * D.
int64_t RowElements(int64_t num_checkpoints, int64_t num_slots, int64_t dim);
// Bytes per sample in `vectors`: C * S * D * sizeof(dtype).
int64_t RowBytes(int64_t num_checkpoints, int64_t num_slots, int64_t dim,
                 kernels::DType dtype);
// Byte offset of sample `sample_in_shard`'s row inside the `vectors` tensor.
int64_t RowByteOffset(int64_t sample_in_shard, int64_t num_checkpoints,
                      int64_t num_slots, int64_t dim, kernels::DType dtype);
// Byte offset of element (sample, c, s, d) inside the `vectors` tensor:
// ((sample * C + c) * S + s) * D + d, times sizeof(dtype).
int64_t VectorElementByteOffset(int64_t sample_in_shard, int64_t c, int64_t s,
                                int64_t d, int64_t num_checkpoints,
                                int64_t num_slots, int64_t dim,
                                kernels::DType dtype);

// The tensors of a shard with their dtypes, shapes and data offsets, in the
// order the writer lays them out: by element size, largest first (ties by
// name), as the `safetensors` package does, so that every tensor starts at a
// multiple of its element size when the data section is 8-byte aligned.
std::vector<TensorEntry> ShardTensors(const ShardGeometry& geometry);

// Total bytes of a shard's data section (sum of ShardTensors' sizes).
int64_t ShardDataBytes(const ShardGeometry& geometry);

// File name of shard `index`: "shard-00000.safetensors" (five digits, more
// when the index needs them).
std::string ShardFileName(int64_t index);
// Inverse of ShardFileName: true, with *index set, when `name` is exactly
// ShardFileName(i) for some i (so "shard-7.safetensors" is not).
bool ParseShardFileName(const std::string& name, int64_t* index);

// Number of shards of a store of `num_samples` samples cut every
// `samples_per_shard` (>= 1): ceil(num_samples / samples_per_shard).
int64_t NumShards(int64_t num_samples, int64_t samples_per_shard);
// Samples in shard `index` of that grid: samples_per_shard for all but the
// last, which holds the rest. Precondition: 0 <= index < NumShards(...).
int64_t ShardSampleCount(int64_t index, int64_t num_samples,
                         int64_t samples_per_shard);

}  // namespace retrace::store

#endif  // RETRACE_SERVER_STORE_LAYOUT_H_
