// The Scorer: runs the fused TracIn + ReTrac scan of a batch of queries over
// a whole store, on the GPU when one is present, else on the CPU.
//
//   ASSIGN_OR_RETURN(auto reader, store::StoreReader::Open(dir));
//   ASSIGN_OR_RETURN(auto scorer, Scorer::Create(reader.get(), {}));
//   ASSIGN_OR_RETURN(std::vector<QueryResult> r, scorer->Score(batch));
//
// On the CPU the scan reads the memory-mapped shards in place (no copy). On the
// GPU, Create copies every shard's vectors and norms to device memory once,
// shard by shard through a pinned staging buffer, and runs the start-up self
// test of the CUDA scan, so that a broken device fails here rather than at the
// first request.
//
// Thread safety: Score may be called from several threads; scans run one at
// a time (each uses the whole device or every CPU core).
#ifndef RETRACE_SERVER_SCORING_SCORER_H_
#define RETRACE_SERVER_SCORING_SCORER_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/device.h"
#include "kernels/scoring.h"
#include "server/scoring/query_plan.h"
#include "server/store/store_reader.h"

namespace retrace::scoring {

enum class DeviceChoice { kAuto, kCpu, kCuda };

struct ScorerOptions {
  DeviceChoice device =
      DeviceChoice::kAuto;  // kAuto: CUDA when a device is present
  bool self_test = true;    // CUDA start-up self test
  int64_t staging_bytes = int64_t{64}
                          << 20;  // pinned staging buffer for the copy
  int32_t cpu_threads = 0;        // 0: all cores
};

// One query of a batch: its vectors, pairing and filters, and what it wants
// back. k is 1..min(4096, N).
struct ScoreQuery {
  BucketQuery vectors;
  PlanOptions plan;
  int32_t k = 10;
  bool opponents = false;
  bool breakdown = false;
};

// A returned sample, with the store's metadata.
struct RankedSample {
  int64_t index = 0;  // position in the store
  int64_t sample_id = 0;
  int32_t label = 0;
  float score = 0.0f;
  std::vector<float> breakdown;  // [C * S], index c * S + s, when asked
};

struct MethodRanking {
  std::vector<RankedSample> proponents;  // highest first
  std::vector<RankedSample> opponents;   // lowest first, when asked
};

struct QueryResult {
  MethodRanking tracin;
  MethodRanking retrac;
};

class Scorer {
 public:
  // `store` must outlive the Scorer.
  //   Unavailable: kCuda asked for and no device can be used.
  //   ResourceExhausted: the store does not fit in free device memory (the
  //     message gives the bytes needed and free).
  //   Internal: the CUDA self test failed.
  static absl::StatusOr<std::unique_ptr<Scorer>> Create(
      const store::StoreReader* store, const ScorerOptions& options);
  ~Scorer();
  Scorer(const Scorer&) = delete;
  Scorer& operator=(const Scorer&) = delete;

  kernels::Backend backend() const { return backend_; }
  const StoreShape& shape() const { return shape_; }
  const store::StoreReader& store() const { return *store_; }
  // Device memory held for the store (0 on the CPU).
  int64_t device_bytes() const { return device_bytes_; }

  // Scores 1..64 queries in one scan; results in query order. Queries may
  // differ in k, pairing, filters, opponents and breakdown.
  //   InvalidArgument: an empty or oversized batch, k out of range, or a
  //     query that PlanQuery refuses; the message names the query index.
  //   ResourceExhausted / Internal: device failures.
  absl::StatusOr<std::vector<QueryResult>> Score(
      const std::vector<ScoreQuery>& queries);

 private:
  Scorer(const store::StoreReader* store, kernels::Backend backend,
         const ScorerOptions& options);
  absl::Status CopyStoreToDevice();
  absl::StatusOr<kernels::ScanResult> ScanCuda(
      const kernels::QueryBatch& host_batch,
      const kernels::ScanOptions& options);
  absl::Status EnsureDeviceBuffer(void** ptr, size_t* capacity, size_t bytes);

  const store::StoreReader* const store_;
  const kernels::Backend backend_;
  const ScorerOptions options_;
  StoreShape shape_;
  kernels::StoreLayout layout_;
  std::vector<kernels::StoreChunk> host_chunks_;

  // CUDA state (unused on the CPU).
  std::vector<kernels::StoreChunk> device_chunks_;
  std::vector<void*> device_allocations_;
  int64_t device_bytes_ = 0;
  CUstream_st* stream_ = nullptr;

  std::mutex scan_mutex_;  // guards the scratch and query buffers below
  void* scratch_ = nullptr;
  size_t scratch_capacity_ = 0;
  void* device_queries_ = nullptr;
  size_t device_queries_capacity_ = 0;
};

}  // namespace retrace::scoring

#endif  // RETRACE_SERVER_SCORING_SCORER_H_
