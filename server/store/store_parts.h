// Building one store in parts, on several machines, and joining the parts.
//
//   // On machine i of n (any order, in parallel):
//   ASSIGN_OR_RETURN(auto part, StorePartWriter::Create(dir, spec, i, n, N));
//   for (int64_t s = part->next_sample(); s < part->range().end_sample; ++s) {
//     ... compute sample s ...
//     RETURN_IF_ERROR(part->Append(record));
//   }
//   RETURN_IF_ERROR(part->Finish().status());
//   // Once every part has finished and all files sit in one directory:
//   ASSIGN_OR_RETURN(Manifest m, JoinStoreParts(dir, spec, diagnostics));
//
// The split. The shard grid does not depend on the parts: with
// k = spec.samples_per_shard and J = ceil(N / k) shards, shard j holds samples
// [j k, min((j + 1) k, N)). Part i of n owns the shards
// [floor(i J / n), floor((i + 1) J / n)) and therefore a contiguous sample
// range (ComputePartRange). Parts differ in size by at most one shard. When
// n > J some parts own no shard; they are allowed (so a job can use a fixed n
// whatever the dataset size): such a part appends nothing, and its Finish
// still writes its record, which the join requires like any other.
//
// Files. A part writes its shards under their global names
// (shard-NNNNN.safetensors), byte-identical to what a whole-store StoreWriter
// writes for the same samples, and at Finish its record
// part-IIII-of-NNNN.json (PartRecordFileName). While it runs it holds
// part-IIII-of-NNNN.lock (PartLockFileName) exclusively and the directory
// shared, so parts run side by side in one directory (shared file system),
// and never next to a whole-store StoreWriter or a join there. Parts may as
// well run in different directories whose files are later copied into one.
// All parts of one build must use the same n and N.
//
// The join verifies every part, writes manifest.json (last, atomically) and
// then removes the part records and lock files, so that the finished
// directory is byte-identical to a whole-store build of the same samples with
// the same diagnostics. If the join is killed after the manifest is written,
// records and locks may remain; readers ignore them.
//
// Not thread-safe: one thread drives a StorePartWriter. Different parts may
// run in different threads or processes.
#ifndef RETRACE_SERVER_STORE_STORE_PARTS_H_
#define RETRACE_SERVER_STORE_STORE_PARTS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "server/store/manifest.h"
#include "server/store/store_writer.h"

namespace retrace::store {

inline constexpr char kPartFormatName[] = "retrace-store-part";
inline constexpr int64_t kPartFormatVersion = 1;
// Bound on num_parts; keeps i * J in 64 bits for any store that fits a disk.
inline constexpr int64_t kMaxParts = int64_t(1) << 20;

// What part `part_index` of `num_parts` owns of a store of `total_samples`
// samples.
struct PartRange {
  int64_t part_index = 0;
  int64_t num_parts = 1;
  int64_t total_samples = 0;  // N of the whole store
  int64_t samples_per_shard = 1;
  int64_t first_shard = 0;  // shards [first_shard, end_shard)
  int64_t end_shard = 0;
  int64_t first_sample = 0;  // samples [first_sample, end_sample)
  int64_t end_sample = 0;

  int64_t num_shards() const { return end_shard - first_shard; }
  int64_t num_samples() const { return end_sample - first_sample; }
  bool operator==(const PartRange&) const;
};

// The split described above. InvalidArgument naming the argument unless
// 0 <= total_samples <= 2^62, 1 <= samples_per_shard <= 2^62,
// 1 <= num_parts <= kMaxParts and 0 <= part_index < num_parts.
absl::StatusOr<PartRange> ComputePartRange(int64_t total_samples,
                                           int64_t samples_per_shard,
                                           int64_t part_index,
                                           int64_t num_parts);

// "part-0003-of-0008.json" / ".lock": at least four digits each, more when
// the numbers need them.
std::string PartRecordFileName(int64_t part_index, int64_t num_parts);
std::string PartLockFileName(int64_t part_index, int64_t num_parts);
// True, with the numbers set, when `name` is exactly PartRecordFileName(i, n)
// (or PartLockFileName(i, n)) for some i < n.
bool ParsePartRecordFileName(const std::string& name, int64_t* part_index,
                             int64_t* num_parts);
bool ParsePartLockFileName(const std::string& name, int64_t* part_index,
                           int64_t* num_parts);

// The record a finished part leaves for the join: its range, the spec it was
// built with (by sha256, see StoreSpec::Sha256) and its shards (file, first,
// count, sha256 of the whole file), in sample order. Diagnostics are not
// recorded: the join reads the norms back from the shards it verifies anyway.
struct PartRecord {
  std::string spec_sha256;
  PartRange range;
  std::vector<ShardInfo> shards;

  // Keys sorted, two-space indentation, trailing newline; deterministic.
  std::string Serialize() const;
  // Parses the JSON and checks each field's type and that the range fields
  // agree with ComputePartRange of the recorded (N, samples_per_shard, i, n).
  // Does not look at the shard files. InvalidArgument naming `source` and the
  // field ("part-0001-of-0004.json: field 'first_sample' ..."), and
  // FailedPrecondition for an unknown format or version.
  static absl::StatusOr<PartRecord> Parse(absl::string_view text,
                                          absl::string_view source);
  bool operator==(const PartRecord&) const;
};

// Builds the shards of one part. Same contract as StoreWriter (atomic files,
// deterministic bytes, input validation, duplicate sample ids refused within
// the part), restricted to range():
//
// Resume: Create on a directory where this part ran before keeps the verified
// shards of its range as a contiguous prefix from range().first_shard (the
// last shard of the store counts as complete when it holds its
// N - (J - 1) k samples), deletes the later shards of its range, its own
// temporaries and its own earlier record, and sets next_sample() to where the
// caller must continue. Files outside its range, other parts' temporaries and
// records are never touched. Creating a part that had finished therefore
// finds every shard, next_sample() == range().end_sample, and Finish writes
// the same record again.
//
// Memory: one shard's buffer plus the part's sample ids; no norms (the join
// reads them from the shards).
class StorePartWriter {
 public:
  // InvalidArgument: the spec does not validate, or the part arguments are
  //   invalid (see ComputePartRange).
  // FailedPrecondition: dir holds manifest.json (already joined or built
  //   whole); a shard of this part's range was written with a different spec;
  //   this part is being written by someone else, or a whole-store build or a
  //   join holds the directory.
  // Other codes for I/O failures, naming the operation and the path.
  // All file I/O goes through `env` (not owned; it must outlive the writer).
  static absl::StatusOr<std::unique_ptr<StorePartWriter>> Create(
      const std::string& dir, const StoreSpec& spec, int64_t part_index,
      int64_t num_parts, int64_t total_samples, Env* env = Env::Default());
  ~StorePartWriter();
  StorePartWriter(const StorePartWriter&) = delete;
  StorePartWriter& operator=(const StorePartWriter&) = delete;

  const PartRange& range() const { return range_; }
  // Global index the next Append gets, in
  // [range().first_sample, range().end_sample].
  int64_t next_sample() const;
  // Shards of this part recovered by Create.
  int64_t resumed_shards() const;
  const StoreSpec& spec() const;

  // As StoreWriter::Append; in addition OutOfRange once next_sample() has
  // reached range().end_sample. A shard is written as soon as it is complete
  // (the store's last shard when its N - (J - 1) k samples are in).
  absl::Status Append(const SampleRecord& sample);

  // Writes the part record (atomically) and returns it. FailedPrecondition
  // when fewer samples than the range holds were appended (naming how many
  // are missing), after Finish, or after a write failure.
  absl::StatusOr<PartRecord> Finish();

 private:
  StorePartWriter(PartRange range, std::unique_ptr<StoreWriter> writer);

  const PartRange range_;
  std::unique_ptr<StoreWriter> writer_;
};

// Joins the parts in `dir` into a finished store and returns its manifest.
// Checks, with errors naming the file and field:
//   - dir holds no manifest.json (FailedPrecondition) and no part is being
//     written there (the directory lock; FailedPrecondition);
//   - the part records all have the same n, and all n are present (NotFound
//     naming the first missing record);
//   - each record parses, and has this spec's sha256, the same N, its own
//     index and n, the range ComputePartRange gives, contiguous with the
//     previous part's (FailedPrecondition naming the field);
//   - each record lists exactly the shards of its range (file, first, count);
//   - each shard file exists (NotFound), hashes to the recorded sha256
//     (DataLoss, giving both), and has the layout and metadata this spec
//     gives it (FailedPrecondition);
//   - no sample_id repeats in the whole store (FailedPrecondition naming both
//     sample indices, their shard files and parts).
// Then computes diagnostics.norm_stats from the shards' norms exactly as
// StoreWriter::Finish does, adds `diagnostics` (a JSON object without the key
// "norm_stats": InvalidArgument otherwise), writes manifest.json last and
// then removes the part records and lock files, leftover temporaries and
// shard files beyond the store's last shard (left by an earlier, larger
// build; logged). Nothing is written or removed when a check fails. When
// writing manifest.json fails it is removed again (best effort), so that a
// join that reported an error leaves no store the reader accepts. File I/O
// goes through `env`.
absl::StatusOr<Manifest> JoinStoreParts(
    const std::string& dir, const StoreSpec& spec,
    const nlohmann::json& diagnostics = nlohmann::json::object(),
    Env* env = Env::Default());

}  // namespace retrace::store

#endif  // RETRACE_SERVER_STORE_STORE_PARTS_H_
