// Opens a finished store directory read-only and gives zero-copy access to
// its samples.
//
//   StoreReader::Options options;            // verify_checksums = true
//   ASSIGN_OR_RETURN(auto reader, StoreReader::Open(dir, options));
//   for (const SampleBlock& block : reader->shards()) Scan(block);
//
// Open validates manifest.json (format, version, every field), maps every
// shard (mmap, read-only, shared: no second copy in memory), checks each
// shard's safetensors header, tensor dtypes and shapes against the manifest,
// the sha256 of every shard (unless options.verify_checksums is false: it
// reads the whole store once), that the spec_sha256 a shard records (when it
// records one) is the sha256 of the manifest's spec, and that no sample_id
// repeats. Errors name the file and the field or tensor:
//   NotFound            manifest.json or a shard file is missing.
//   InvalidArgument     manifest.json is not JSON or a field is missing or
//                       invalid ("manifest.json: field 'projection.dim'
//                       missing").
//   FailedPrecondition  unknown format or format_version; a tensor whose
//                       dtype or shape disagrees with the manifest, a missing
//                       tensor, a misaligned tensor; duplicate sample ids
//                       (naming both sample indices).
//   DataLoss            a truncated shard, a malformed safetensors header, a
//                       checksum mismatch (naming expected and actual), a
//                       spec that disagrees with the shards' spec_sha256.
//
// Thread safety: after Open the reader is immutable; any number of threads
// may call its methods and read the blocks concurrently. The pointers in a
// SampleBlock stay valid while the reader lives. The shard files must not be
// modified or truncated while they are mapped.
#ifndef RETRACE_SERVER_STORE_STORE_READER_H_
#define RETRACE_SERVER_STORE_STORE_READER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/env.h"
#include "kernels/dtype.h"
#include "server/store/manifest.h"

namespace retrace::store {

// A run of consecutive samples inside one shard; all pointers point into the
// shard's mapping and are already offset to the block's first sample.
struct SampleBlock {
  int64_t shard = 0;  // index into manifest().shards
  int64_t first = 0;  // global index of the block's first sample
  int64_t count = 0;
  const void* vectors = nullptr;             // [count, C, S, D] of dtype()
  const float* norms = nullptr;              // [count, C, S]
  const int64_t* sample_ids = nullptr;       // [count]
  const int32_t* labels = nullptr;           // [count]
  const float* self_influence = nullptr;     // [count, 2]: TracIn, ReTrac
  const int32_t* train_timesteps = nullptr;  // [count, C]; null without replay
};

struct StoreReaderOptions {
  // Hash every shard and compare with manifest.json. Turning it off makes
  // Open cost O(number of samples) instead of O(store bytes).
  bool verify_checksums = true;
  // Where the files are read from (not owned; must outlive Open).
  Env* env = Env::Default();
  // Open only part part_index of num_parts (a shard server's range): with
  // J shard files, the files [floor(i J / n), floor((i + 1) J / n)), the
  // same split as `retrace-batch build-store --shard i/n`. The other files
  // are neither read nor required to exist. 0 of 1: the whole store.
  int64_t part_index = 0;
  int64_t num_parts = 1;
};

class StoreReader {
 public:
  using Options = StoreReaderOptions;

  static absl::StatusOr<std::unique_ptr<StoreReader>> Open(
      const std::string& dir, const Options& options = Options());
  ~StoreReader();
  StoreReader(const StoreReader&) = delete;
  StoreReader& operator=(const StoreReader&) = delete;

  const Manifest& manifest() const { return manifest_; }
  const std::string& dir() const { return dir_; }

  // N of the whole store (the manifest's), also when only a part is served.
  int64_t num_samples() const { return manifest_.num_samples; }
  // The samples whose shard files are open: [served_first(), served_end()),
  // all of [0, N) unless Options asked for a part.
  int64_t served_first() const { return served_first_; }
  int64_t served_end() const { return served_end_; }
  int64_t served_samples() const { return served_end_ - served_first_; }
  int64_t part_index() const { return part_index_; }
  int64_t num_parts() const { return num_parts_; }
  int64_t num_checkpoints() const { return manifest_.spec.num_checkpoints(); }
  int64_t num_buckets() const { return manifest_.spec.num_buckets(); }
  int64_t num_slots() const { return manifest_.spec.num_slots(); }
  bool has_replay() const { return manifest_.spec.buckets.replay; }
  // Index of the replay slot (num_buckets()); only meaningful with replay.
  int64_t replay_slot() const { return num_buckets(); }
  int64_t dim() const { return manifest_.spec.projection.dim; }
  kernels::DType dtype() const { return manifest_.spec.dtype; }
  // Bytes of one sample's vectors: C * S * D * sizeof(dtype).
  int64_t row_bytes() const;
  // Bytes of the served vectors: served_samples * row_bytes.
  int64_t total_vector_bytes() const;

  int64_t num_shards() const { return int64_t(shards_.size()); }
  // Whole-shard blocks of the served shard files, in sample order.
  const std::vector<SampleBlock>& shards() const { return shards_; }
  // Precondition: 0 <= index < num_shards().
  const SampleBlock& shard(int64_t index) const {
    return shards_[size_t(index)];
  }

  // Index into shards() of the block holding global sample `sample`;
  // OutOfRange when sample is not served.
  absl::StatusOr<int64_t> ShardOf(int64_t sample) const;
  // Blocks covering samples [begin, end) in order, one per shard touched
  // (none when begin == end). OutOfRange unless
  // served_first <= begin <= end <= served_end.
  absl::StatusOr<std::vector<SampleBlock>> Range(int64_t begin,
                                                 int64_t end) const;
  // A one-sample block for sample `sample`.
  absl::StatusOr<SampleBlock> Sample(int64_t sample) const;

 private:
  StoreReader(std::string dir, Manifest manifest);
  absl::Status OpenShard(int64_t index, const std::string& spec_sha256,
                         const Options& options);
  absl::Status CheckDuplicateIds() const;
  SampleBlock Slice(const SampleBlock& block, int64_t offset,
                    int64_t count) const;

  const std::string dir_;
  const Manifest manifest_;
  std::vector<std::unique_ptr<MappedFile>> maps_;
  std::vector<SampleBlock> shards_;
  int64_t served_first_ = 0;
  int64_t served_end_ = 0;
  int64_t part_index_ = 0;
  int64_t num_parts_ = 1;
};

}  // namespace retrace::store

#endif  // RETRACE_SERVER_STORE_STORE_READER_H_
