// The Scorer: runs the fused TracIn + ReTrac scan of a batch of queries over
// a whole store, on the GPU when one is present, else on the CPU.
//
//   ASSIGN_OR_RETURN(auto reader, store::StoreReader::Open(dir));
//   ASSIGN_OR_RETURN(auto scorer, Scorer::Create(reader.get(), {}));
//   ASSIGN_OR_RETURN(std::vector<QueryResult> r, scorer->Score(batch));
//
// On the CPU the scan reads the memory-mapped shards in place (no copy). On the
// GPU, Create runs the start-up self test of the CUDA scan, checks that the
// store, the scan scratch and the query buffers for options.max_batch queries
// (at the largest k, with opponents and breakdowns) fit in free device memory,
// allocates all of them, and copies every shard's vectors and norms to device
// memory once, shard by shard through a pinned staging buffer. So a broken
// device or a store too large fails here rather than at some later request,
// and Score allocates no device memory.
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
  // Most queries per Score call, 1..kernels::kMaxQueries; the device scratch
  // is sized for it at Create.
  int32_t max_batch = kernels::kMaxQueries;
  // Arithmetic of the CUDA scan (kernels/scoring.h); kAuto: tensor cores for
  // fp16/bf16 stores.
  kernels::CudaScanPath cuda_path = kernels::CudaScanPath::kAuto;
};

// The device memory a CUDA Scorer holds from Create on.
struct DeviceFootprint {
  int64_t store_bytes = 0;    // vectors and norms
  int64_t scratch_bytes = 0;  // scan scratch (kernels::CudaScanScratchBytes)
  int64_t query_bytes = 0;    // one batch of query vectors and weights
  int64_t Total() const { return store_bytes + scratch_bytes + query_bytes; }
};

// Device memory left free beyond the footprint, for the CUDA runtime's own
// allocations and fragmentation.
inline constexpr int64_t kDeviceHeadroomBytes = int64_t{256} << 20;

// The footprint of a store of `layout` split into `chunks` (host pointers
// are not read) for batches of up to max_batch queries at k = min(4096, N)
// with opponents and breakdowns, on `path`. Errors as
// kernels::CudaScanScratchBytes (Unavailable in a build without CUDA).
absl::StatusOr<DeviceFootprint> PlanDeviceFootprint(
    const kernels::StoreLayout& layout,
    const std::vector<kernels::StoreChunk>& chunks, int32_t max_batch,
    kernels::CudaScanPath path);

// OK when footprint.Total() + kDeviceHeadroomBytes <= free_bytes; else
// ResourceExhausted naming the bytes needed (each part) and free.
absl::Status CheckDeviceFits(const DeviceFootprint& footprint,
                             int64_t free_bytes, int64_t total_bytes);

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
  //   InvalidArgument: max_batch outside 1..kernels::kMaxQueries, or
  //     cuda_path kTensorCore for an F32 store.
  //   Unavailable: kCuda asked for and no device can be used.
  //   ResourceExhausted: the store with the scan scratch and query buffers
  //     does not fit in free device memory (the message gives the bytes
  //     needed, part by part, and free).
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
  // Everything held on the device: store, scratch, query buffers (0 on the
  // CPU).
  const DeviceFootprint& device_footprint() const { return footprint_; }

  // Scores 1..max_batch queries in one scan; results in query order. Queries
  // may differ in k, pairing, filters, opponents and breakdown.
  //   InvalidArgument: an empty batch or one above max_batch, k out of
  //     range, or a
  //     query that PlanQuery refuses; the message names the query index.
  //   ResourceExhausted / Internal: device failures.
  absl::StatusOr<std::vector<QueryResult>> Score(
      const std::vector<ScoreQuery>& queries);

 private:
  Scorer(const store::StoreReader* store, kernels::Backend backend,
         const ScorerOptions& options);
  absl::Status ReserveDeviceMemory();
  absl::Status CopyStoreToDevice();
  absl::StatusOr<kernels::ScanResult> ScanCuda(
      const kernels::QueryBatch& host_batch,
      const kernels::ScanOptions& options);

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
  DeviceFootprint footprint_;
  CUstream_st* stream_ = nullptr;

  std::mutex scan_mutex_;    // guards the scratch and query buffers below
  void* scratch_ = nullptr;  // footprint_.scratch_bytes, allocated at Create
  void* device_queries_ = nullptr;  // footprint_.query_bytes
};

}  // namespace retrace::scoring

#endif  // RETRACE_SERVER_SCORING_SCORER_H_
