// Builds a store directory: shards of samples, then manifest.json.
//
//   ASSIGN_OR_RETURN(auto writer, StoreWriter::Create(dir, spec));
//   for (int64_t n = writer->next_sample(); n < num_samples; ++n) {
//     ... compute sample n ...
//     RETURN_IF_ERROR(writer->Append(record));
//   }
//   ASSIGN_OR_RETURN(Manifest manifest, writer->Finish(diagnostics));
//
// Layout: shard i holds samples [i * spec.samples_per_shard, ...); every shard
// but the last is full. Each file (shard or manifest) is written atomically
// (temporary name, fsync, rename, fsync of the directory), and manifest.json
// is written last, so a directory without manifest.json is an unfinished
// build and one with it is complete.
//
// Resume: Create on a directory holding an unfinished build with an equal
// spec keeps the full shards that verify (header, layout, data checksum
// recorded in the shard's metadata) as a contiguous prefix, deletes the rest
// (a partial last shard, damaged files, leftover temporaries), and reports in
// next_sample() where the caller must continue. Because shard boundaries
// depend only on the spec and everything written is deterministic, the
// finished store is byte-identical to an uninterrupted build of the same data.
// Samples appended but not yet cut into a shard are lost when the writer is
// destroyed without Finish; they are rebuilt on the next run. If
// next_sample() exceeds the number of samples the caller has, the directory
// holds a build of a larger dataset under the same spec: the caller should
// refuse rather than Finish.
//
// Memory: the writer buffers one shard (samples_per_shard rows) plus, for the
// diagnostics, every sample's C x S norms and its sample id.
//
// Not thread-safe: one thread drives a writer. A directory lock keeps two
// writers (in any processes) from building into one directory at once.
//
// To build a store in parts on several machines, see StorePartWriter and
// JoinStoreParts (store_parts.h). A directory holding part records or part
// locks is refused here, so that a whole-store build never deletes the work
// of parts.
#ifndef RETRACE_SERVER_STORE_STORE_WRITER_H_
#define RETRACE_SERVER_STORE_STORE_WRITER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "nlohmann/json.hpp"
#include "common/file_util.h"
#include "server/store/manifest.h"

namespace retrace::store {

// Who holds a store directory's lock, as lock conflicts report it: whole-store
// builds and joins lock exclusively, the writers of a build in parts shared.
inline constexpr char kStoreLockHolderExclusive[] =
    "another store build (or a part of one)";
inline constexpr char kStoreLockHolderShared[] =
    "another store build (a whole-store build or a join)";

struct PartRange;

// One training sample as the build computed it. Spans are borrowed for the
// duration of Append only.
struct SampleRecord {
  int64_t sample_id = 0;  // unique within the store
  int32_t label = 0;
  // C x S x D unit projected vectors, checkpoint-major, then slot (buckets
  // 0..B-1, replay last), then dimension. Converted to spec.dtype with
  // round-to-nearest-even.
  absl::Span<const float> vectors;
  // C x S full-dimensional gradient norms, same order; finite and >= 0.
  absl::Span<const float> norms;
  float self_influence_tracin = 0.0f;
  float self_influence_retrac = 0.0f;
  // C training timesteps in [0, T) when the spec has a replay slot; empty
  // otherwise.
  absl::Span<const int32_t> train_timesteps;
};

class StoreWriter {
 public:
  // Creates `dir` (and parents) when missing, locks it and prepares a resume
  // as described above.
  //   InvalidArgument: the spec does not validate.
  //   FailedPrecondition: dir already holds manifest.json (a finished store:
  //     open it with StoreReader, or remove it to rebuild); a shard on disk
  //     was written with a different spec; another writer holds the lock;
  //     dir holds a build in parts (part-*-of-*.json or .lock files).
  //   Other codes for I/O failures, naming the operation and the path.
  // All file I/O goes through `env` (not owned; it must outlive the writer).
  static absl::StatusOr<std::unique_ptr<StoreWriter>> Create(
      const std::string& dir, const StoreSpec& spec, Env* env = Env::Default());
  ~StoreWriter();
  StoreWriter(const StoreWriter&) = delete;
  StoreWriter& operator=(const StoreWriter&) = delete;

  // Global index the next Append gets. After Create it is the number of
  // samples recovered from an earlier run (0 for a fresh build).
  int64_t next_sample() const { return next_sample_; }
  // Number of full shards recovered by Create.
  int64_t resumed_shards() const { return resumed_shards_; }
  const StoreSpec& spec() const { return spec_; }

  // Appends the sample with index next_sample(); writes a shard when one is
  // full. InvalidArgument (naming the sample index and field) for wrong
  // sizes, non-finite values, negative norms, timesteps outside [0, T) or a
  // sample_id already used (naming both indices). FailedPrecondition after
  // Finish or after an earlier write failure (create a new writer to resume).
  // ResourceExhausted when the shard buffer cannot be allocated; other codes
  // for a failed shard write, naming the path.
  absl::Status Append(const SampleRecord& sample);

  // Writes the last (partial) shard and then manifest.json. `diagnostics` is
  // a JSON object of caller-computed diagnostics (e.g. "spearman"); the
  // writer adds "norm_stats" (see norm_stats.h), so the caller must not use
  // that key (InvalidArgument). Returns the manifest written. When writing
  // manifest.json fails, Finish removes it again (best effort), so that a
  // build that reported an error never leaves a store the reader accepts;
  // a new writer resumes it.
  absl::StatusOr<Manifest> Finish(
      const nlohmann::json& diagnostics = nlohmann::json::object());

 private:
  // A part writer is a StoreWriter restricted to the shards of one part.
  friend class StorePartWriter;

  // `part` is null for a whole-store writer; otherwise the writer takes the
  // directory lock shared plus the part's lock file, and Recover, Append and
  // the shard cuts stay inside the part's range.
  static absl::StatusOr<std::unique_ptr<StoreWriter>> CreateImpl(
      const std::string& dir, const StoreSpec& spec, const PartRange* part,
      Env* env);
  StoreWriter(Env* env, std::string dir, StoreSpec spec,
              std::string spec_sha256, std::unique_ptr<DirectoryLock> lock,
              std::unique_ptr<FileLock> part_lock, const PartRange* part);

  absl::Status Recover();
  absl::Status WriteBufferedShard();
  absl::Status CheckWritable() const;
  // Samples shard `index` holds once complete: samples_per_shard, except the
  // store's last shard when the total is known (parts).
  int64_t CompleteShardCount(int64_t index) const;
  int64_t first_shard() const;

  Env* const env_;
  const std::string dir_;
  const StoreSpec spec_;
  const std::string spec_sha256_;
  std::unique_ptr<DirectoryLock> lock_;
  std::unique_ptr<FileLock> part_lock_;          // parts only
  const std::unique_ptr<const PartRange> part_;  // null: whole store
  const int64_t row_elements_;
  const int64_t slots_per_sample_;  // C x S

  int64_t next_sample_ = 0;
  int64_t resumed_shards_ = 0;
  std::vector<ShardInfo> shards_;
  bool finished_ = false;
  absl::Status failure_;  // first write error; the writer refuses work after it

  // The shard being filled, already in its on-disk encoding.
  int64_t buffered_ = 0;
  std::vector<uint8_t> vectors_;
  std::vector<float> norms_;
  std::vector<int64_t> sample_ids_;
  std::vector<int32_t> labels_;
  std::vector<float> self_influence_;
  std::vector<int32_t> train_timesteps_;

  // State for diagnostics (whole store only: the join of parts reads norms
  // back from the shards) and duplicate detection (within the writer's range).
  std::vector<float> all_norms_;
  std::unordered_map<int64_t, int64_t> index_of_id_;
};

}  // namespace retrace::store

#endif  // RETRACE_SERVER_STORE_STORE_WRITER_H_
