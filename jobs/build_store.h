// The store build (docs/store-build.md): from a model description
// (server/run/model_description.h) and its training set to a store directory
// (server/store/), whole or in parts that are joined later.
//
//   ASSIGN_OR_RETURN(StoreBuildResult r,
//                    BuildStore(config, images, sample_ids, options));
//   // in parts: options.num_parts = n, options.part_index = i on machine i,
//   // then, with every part's files in one directory:
//   ASSIGN_OR_RETURN(store::Manifest m, JoinStore(dir));
//
// For every sample n (in the run's training order) and checkpoint c the build
// loads θ_c (its sha256 checked against run.json first), computes with the
// featurizer (server/featurize/featurizer.h) the unit projected gradient and
// the full-dimensional norm of every bucket slot and, when the run logged it,
// of the replay slot, whose (t*, ε*) it regenerates from the replay log. It
// also computes each sample's self-influence (TracIn and ReTrac) and, at the
// end, the Spearman diagnostics; the store writer adds the norm statistics.
//
// Determinism: with the same run, data, config and thread count the store is
// byte-identical whether it was built in one go, interrupted (even by
// SIGKILL) and resumed any number of times, or built in parts and joined.
// Samples go through the featurizer in chunks on a fixed grid of sample
// indices (multiples of the chunk size and of samples_per_shard), so a resume
// or a part, which both start at a shard boundary, sees the same chunks.
//
// Not thread-safe: LibTorch's intra-op thread count is process-wide and set
// from options.threads.
#ifndef RETRACE_JOBS_BUILD_STORE_H_
#define RETRACE_JOBS_BUILD_STORE_H_

#include <cstdint>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/dtype.h"
#include "kernels/projection.h"
#include "common/env.h"
#include "server/data/image_set.h"
#include "server/model/device.h"
#include "server/store/manifest.h"
#include "server/store/store_parts.h"

namespace retrace::jobs {

// Name of the file that a build in parts leaves next to its shards so that
// the join knows the full build spec (part records only carry its sha256).
// The join removes it after writing manifest.json.
inline constexpr char kPartsSpecFile[] = "build-spec.json";

enum class ReplayMode {
  kAuto,  // a replay slot when the run has a replay log
  kOn,    // required: FAILED_PRECONDITION when the run has none
  kOff,
};

// What the store is built with (everything that determines its bytes, with
// the run, the data and the thread count).
struct StoreBuildConfig {
  // Random projection P (docs/projection.md).
  kernels::ProjectionType projection = kernels::ProjectionType::kSjlt;
  int64_t dim = 1024;  // D
  int sparsity = 4;    // s, sjlt only
  uint64_t projection_seed = 0;
  // Seeds the training-side timesteps and noise of the bucket slots.
  uint64_t store_seed = 0;
  // B + 1 edges from 0 to T; empty: num_buckets equal buckets.
  std::vector<int64_t> bucket_edges;
  int64_t num_buckets = 10;
  int64_t grad_timesteps = 1;  // m
  // Parameters projected (full match, ECMAScript); "" selects all.
  std::string param_regex;
  kernels::DType dtype = kernels::DType::kF16;
  int64_t samples_per_shard = 4096;
  ReplayMode replay = ReplayMode::kAuto;
};

struct StoreBuildOptions {
  // The model description (server/run/model_description.h): a model.toml, or
  // a folder holding one such as a retrace-batch train run directory.
  std::string model_path;
  std::string out_dir;
  // Descriptive text recorded as dataset.name (the mixture spec); the data's
  // identity is checked by its fingerprint, not by this text.
  std::string dataset_name;
  uint64_t dataset_seed = 0;
  // Where images can be read for thumbnails (dataset.root); may be empty.
  std::string dataset_root;
  // Whether the mixture named by dataset_name is shuffled (image folders of
  // model descriptions are not).
  bool dataset_shuffle = true;
  // LibTorch intra-op threads (process-wide); 0 keeps the current setting.
  // The store's bytes are reproducible at a fixed thread count.
  int threads = 0;
  // Where the per-sample gradients run (server/model/device.h): kAuto takes
  // CUDA when LibTorch has it and a device is present; kCuda without one is
  // FAILED_PRECONDITION before anything is read. The CPU unless asked (the
  // command line's --device defaults to auto). The draws are the same on
  // every device and the projection runs on the CPU, so a GPU build's store
  // agrees with a CPU build's within float rounding (docs/featurization.md,
  // "Devices"); it is byte-identical only to builds on the same device.
  model::DeviceChoice device = model::DeviceChoice::kCpu;
  // Rows (sample × timestep draw) per batched featurizer pass; bounds memory.
  // The chunk of samples per pass is max(1, batch_rows / grad_timesteps).
  int64_t batch_rows = 64;
  // 0: build the whole store. n >= 1: build part `part_index` of n
  // (store_parts.h) and leave its record for JoinStore.
  int64_t num_parts = 0;
  int64_t part_index = 0;
  // Progress on this stream (not owned); null: none.
  std::FILE* progress_out = nullptr;
  bool progress_is_tty = false;
  double progress_interval_s = 5.0;
  // Called after each chunk with the number of samples of this build's range
  // done; returning true stops the build (the shards written so far stay and
  // a rerun resumes from them).
  std::function<bool(int64_t samples_done)> should_stop;
  // The store's files (and the parts' build spec) are written and read
  // through this Env (not owned).
  Env* env = Env::Default();
};

struct StoreBuildResult {
  bool complete = false;
  int64_t total_samples = 0;  // N of the whole store
  int64_t first_sample = 0;   // this build's range [first, end)
  int64_t end_sample = 0;
  int64_t resumed_samples = 0;  // found complete on disk
  int64_t built_samples = 0;    // computed by this call
  int64_t input_dim = 0;        // p
  double seconds = 0;
  double samples_per_second = 0;
  std::optional<store::Manifest> manifest;  // a completed whole-store build
  std::optional<store::PartRecord> part;    // a completed part
};

// Builds the store of `options.run_dir` for `images` (the run's training set:
// same pixels, labels and sample ids as it was trained on; sample_ids empty
// means 0..N−1) into options.out_dir, resuming an unfinished build there.
// Errors:
//   INVALID_ARGUMENT: bad config or options (edges, dims, dtype, regex...);
//   NOT_FOUND / DATA_LOSS: run.json, a checkpoint or replay.bin missing or
//     with a sha256 other than run.json records (naming the file, both hashes);
//   FAILED_PRECONDITION: options.device kCuda without CUDA; an unfinished run;
//   data whose fingerprint differs
//     from the run's; a replay log that does not match the run or the data;
//     replay required but absent; an out_dir holding a finished store, a
//     different build, or one locked by another process;
//   PERMISSION_DENIED and other I/O codes naming the path (unwritable out_dir).
// A stopped build returns complete = false (not an error).
absl::StatusOr<StoreBuildResult> BuildStore(
    const StoreBuildConfig& config, const data::ImageSet& images,
    absl::Span<const int64_t> sample_ids, const StoreBuildOptions& options);

// Joins the parts in `dir` (every part's shards and records, and the
// kPartsSpecFile they wrote) into a finished store: computes the Spearman
// diagnostics from the shards, runs store::JoinStoreParts and removes
// kPartsSpecFile. The result is byte-identical to a whole-store build.
// NOT_FOUND when kPartsSpecFile or a part is missing; other errors as
// JoinStoreParts. File I/O goes through `env`.
absl::StatusOr<store::Manifest> JoinStore(const std::string& dir,
                                          Env* env = Env::Default());

}  // namespace retrace::jobs

#endif  // RETRACE_JOBS_BUILD_STORE_H_
