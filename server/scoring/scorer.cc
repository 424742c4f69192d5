#include "server/scoring/scorer.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "common/status.h"
#include "kernels/device_memory.h"
#include "server/core/kernel_status.h"

namespace retrace::scoring {
namespace {

std::string Bytes(int64_t b) {
  return absl::StrFormat("%d bytes (%.2f GiB)", b,
                         b / double(int64_t{1} << 30));
}

// Copies host memory to the device through two halves of a pinned staging
// buffer, so that filling one half overlaps the DMA of the other.
class StagedUploader {
 public:
  StagedUploader(void* staging, size_t bytes, CUstream_st* stream)
      : half_(bytes / 2), stream_(stream) {
    halves_[0] = static_cast<char*>(staging);
    halves_[1] = static_cast<char*>(staging) + half_;
  }

  absl::Status Upload(void* dst, const void* src, size_t bytes) {
    const char* from = static_cast<const char*>(src);
    char* to = static_cast<char*>(dst);
    for (size_t done = 0; done < bytes;) {
      const size_t n = std::min(half_, bytes - done);
      char* buf = halves_[next_];
      // The copy that last used this half was enqueued before the most recent
      // synchronization, so the half is free again.
      std::memcpy(buf, from + done, n);
      RETURN_IF_KERNEL_ERROR(kernels::StreamSynchronize(stream_));
      RETURN_IF_KERNEL_ERROR(
          kernels::CopyToDeviceAsync(to + done, buf, n, stream_));
      next_ ^= 1;
      done += n;
    }
    return absl::OkStatus();
  }

  absl::Status Finish() {
    return FromKernelStatus(kernels::StreamSynchronize(stream_));
  }

 private:
  size_t half_;
  CUstream_st* stream_;
  char* halves_[2];
  int next_ = 0;
};

MethodRanking ToRanking(const kernels::RankedList& list, const ScoreQuery& q,
                        const store::StoreReader& store) {
  auto convert = [&](const std::vector<kernels::ScoredSample>& in,
                     std::vector<RankedSample>* out) {
    const size_t n = std::min(in.size(), static_cast<size_t>(q.k));
    out->reserve(n);
    for (size_t i = 0; i < n; ++i) {
      RankedSample r;
      r.index = in[i].index;
      r.score = in[i].score;
      auto block = store.Sample(in[i].index);
      if (block.ok()) {
        r.sample_id = block->sample_ids[0];
        r.label = block->labels[0];
      }
      if (q.breakdown) r.breakdown = in[i].breakdown;
      out->push_back(std::move(r));
    }
  };
  MethodRanking m;
  convert(list.top, &m.proponents);
  if (q.opponents) convert(list.bottom, &m.opponents);
  return m;
}

// Largest k any request can ask for on a store of `rows` samples.
int32_t MaxK(int64_t rows) {
  return static_cast<int32_t>(std::min<int64_t>(kernels::kMaxTopK, rows));
}

}  // namespace

absl::StatusOr<DeviceFootprint> PlanDeviceFootprint(
    const kernels::StoreLayout& layout,
    const std::vector<kernels::StoreChunk>& chunks, int32_t max_batch,
    kernels::CudaScanPath path) {
  DeviceFootprint f;
  const int64_t row_bytes =
      layout.RowValues() * kernels::DTypeSize(layout.dtype) +
      layout.SlotPairs() * int64_t{sizeof(float)};
  int64_t rows = 0;
  for (const kernels::StoreChunk& c : chunks) rows += c.rows;
  f.store_bytes = rows * row_bytes;
  // Raw and unit vectors, then TracIn and ReTrac weights, all fp32.
  f.query_bytes = int64_t{max_batch} *
                  (2 * layout.RowValues() + 2 * layout.SlotPairs()) *
                  int64_t{sizeof(float)};
  if (rows == 0) return f;  // nothing to scan: every request is refused
  kernels::ScanOptions worst;
  worst.k = MaxK(rows);
  worst.want_bottom = true;
  worst.want_breakdown = true;
  worst.cuda_path = path;
  size_t scratch = 0;
  RETURN_IF_KERNEL_ERROR(kernels::CudaScanScratchBytes(
      layout, chunks, max_batch, worst, &scratch));
  f.scratch_bytes = static_cast<int64_t>(scratch);
  return f;
}

absl::Status CheckDeviceFits(const DeviceFootprint& footprint,
                             int64_t free_bytes, int64_t total_bytes) {
  if (footprint.Total() + kDeviceHeadroomBytes <= free_bytes) {
    return absl::OkStatus();
  }
  return absl::ResourceExhaustedError(absl::StrCat(
      "the store does not fit in device memory: it needs ",
      Bytes(footprint.Total() + kDeviceHeadroomBytes), " (",
      Bytes(footprint.store_bytes), " for vectors and norms, ",
      Bytes(footprint.scratch_bytes), " of scan scratch and ",
      Bytes(footprint.query_bytes), " for the queries of the largest batch, ",
      Bytes(kDeviceHeadroomBytes), " of headroom); the device has ",
      Bytes(free_bytes), " free of ", Bytes(total_bytes),
      ". Lower the max batch, shard the store over several nodes (retraced "
      "--role shard) or use the CPU backend"));
}

Scorer::Scorer(const store::StoreReader* store, kernels::Backend backend,
               const ScorerOptions& options)
    : store_(store), backend_(backend), options_(options) {
  shape_.num_checkpoints = static_cast<int32_t>(store->num_checkpoints());
  shape_.num_buckets = static_cast<int32_t>(store->num_buckets());
  shape_.has_replay = store->has_replay();
  shape_.dim = store->dim();
  for (const auto& ckpt : store->manifest().spec.model.checkpoints) {
    shape_.checkpoint_weights.push_back(static_cast<float>(ckpt.weight));
  }
  layout_.dtype = store->manifest().spec.dtype;
  layout_.checkpoints = shape_.num_checkpoints;
  layout_.slots = shape_.num_slots();
  layout_.dim = static_cast<int32_t>(shape_.dim);
  for (const store::SampleBlock& shard : store->shards()) {
    if (shard.count == 0) continue;
    host_chunks_.push_back(
        {shard.vectors, shard.norms, shard.count, shard.first});
  }
}

Scorer::~Scorer() {
  for (void* p : device_allocations_) kernels::DeviceFree(p);
  kernels::DeviceFree(scratch_);
  kernels::DeviceFree(device_queries_);
  kernels::StreamDestroy(stream_);
}

absl::StatusOr<std::unique_ptr<Scorer>> Scorer::Create(
    const store::StoreReader* store, const ScorerOptions& options) {
  if (store == nullptr)
    return absl::InvalidArgumentError("Scorer: store is null");
  if (store->dim() > INT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("Scorer: projection dim ", store->dim(), " is too large"));
  }
  if (options.max_batch < 1 || options.max_batch > kernels::kMaxQueries) {
    return absl::InvalidArgumentError(
        absl::StrCat("Scorer: max batch ", options.max_batch,
                     " is out of range 1..", kernels::kMaxQueries));
  }
  kernels::Backend backend = kernels::Backend::kCpu;
  switch (options.device) {
    case DeviceChoice::kCpu:
      break;
    case DeviceChoice::kAuto:
      backend = kernels::DefaultBackend();
      break;
    case DeviceChoice::kCuda:
      if (!kernels::CudaDeviceAvailable()) {
        return absl::UnavailableError(absl::StrCat(
            "CUDA scoring asked for, but ", kernels::CudaAvailabilityReason()));
      }
      backend = kernels::Backend::kCuda;
      break;
  }
  std::unique_ptr<Scorer> scorer(new Scorer(store, backend, options));
  if (backend == kernels::Backend::kCpu) {
    // The instruction set every CPU scan of this store will run: said once
    // here, and an unusable RETRACE_CPU_ISA refused now rather than by every
    // request.
    kernels::CpuIsa isa = kernels::CpuIsa::kScalar;
    RETURN_IF_KERNEL_ERROR(kernels::ChooseCpuScanIsa(
        kernels::CpuIsa::kAuto, scorer->layout_.dtype, &isa));
    RETRACE_LOG(INFO) << "CPU scan: " << kernels::CpuIsaName(isa) << " for a "
                      << kernels::DTypeName(scorer->layout_.dtype) << " store";
  }
  if (backend == kernels::Backend::kCuda) {
    kernels::CudaScanPath path = kernels::CudaScanPath::kFp32;
    RETURN_IF_KERNEL_ERROR(
        kernels::ChooseCudaScanPath(scorer->layout_, options.cuda_path, &path));
    RETURN_IF_KERNEL_ERROR(kernels::StreamCreate(&scorer->stream_));
    if (options.self_test) {
      RETURN_IF_ERROR(Annotate(FromKernelStatus(kernels::CudaSelfTest()),
                               "CUDA scan self test failed"));
    }
    RETURN_IF_ERROR(scorer->ReserveDeviceMemory());
    RETURN_IF_ERROR(scorer->CopyStoreToDevice());
    RETRACE_LOG(INFO) << "CUDA scan: " << kernels::CudaScanPathName(path)
                      << " path, scratch for " << options.max_batch
                      << " queries: "
                      << Bytes(scorer->footprint_.scratch_bytes);
  }
  RETRACE_LOG(INFO) << "scorer ready: " << store->served_samples()
                    << " samples, " << kernels::BackendName(backend)
                    << (backend == kernels::Backend::kCuda
                            ? " (" + kernels::CudaAvailabilityReason() + ", " +
                                  Bytes(scorer->device_bytes_) + " on device)"
                            : "");
  return scorer;
}

// Checks the whole footprint against free memory before allocating any of
// it, then allocates the scratch and query buffers (the store follows in
// CopyStoreToDevice).
absl::Status Scorer::ReserveDeviceMemory() {
  ASSIGN_OR_RETURN(
      footprint_, PlanDeviceFootprint(layout_, host_chunks_, options_.max_batch,
                                      options_.cuda_path));
  size_t free_bytes = 0, total_bytes = 0;
  RETURN_IF_KERNEL_ERROR(kernels::DeviceMemoryInfo(&free_bytes, &total_bytes));
  RETURN_IF_ERROR(CheckDeviceFits(footprint_, static_cast<int64_t>(free_bytes),
                                  static_cast<int64_t>(total_bytes)));
  RETURN_IF_KERNEL_ERROR(kernels::DeviceAlloc(
      static_cast<size_t>(std::max<int64_t>(footprint_.scratch_bytes, 1)),
      &scratch_));
  RETURN_IF_KERNEL_ERROR(kernels::DeviceAlloc(
      static_cast<size_t>(footprint_.query_bytes), &device_queries_));
  return absl::OkStatus();
}

absl::Status Scorer::CopyStoreToDevice() {
  const int64_t norm_bytes_per_row =
      layout_.SlotPairs() * int64_t{sizeof(float)};
  const int64_t row_bytes = store_->row_bytes();
  void* staging = nullptr;
  RETURN_IF_KERNEL_ERROR(kernels::PinnedAlloc(
      static_cast<size_t>(options_.staging_bytes), &staging));
  std::unique_ptr<void, void (*)(void*)> staging_guard(staging,
                                                       kernels::PinnedFree);
  StagedUploader uploader(staging, static_cast<size_t>(options_.staging_bytes),
                          stream_);
  for (const kernels::StoreChunk& chunk : host_chunks_) {
    const size_t vbytes = static_cast<size_t>(chunk.rows * row_bytes);
    const size_t nbytes = static_cast<size_t>(chunk.rows * norm_bytes_per_row);
    void* dv = nullptr;
    void* dn = nullptr;
    RETURN_IF_KERNEL_ERROR(kernels::DeviceAlloc(vbytes, &dv));
    device_allocations_.push_back(dv);
    RETURN_IF_KERNEL_ERROR(kernels::DeviceAlloc(nbytes, &dn));
    device_allocations_.push_back(dn);
    RETURN_IF_ERROR(uploader.Upload(dv, chunk.vectors, vbytes));
    RETURN_IF_ERROR(uploader.Upload(dn, chunk.norms, nbytes));
    device_chunks_.push_back(
        {dv, static_cast<const float*>(dn), chunk.rows, chunk.first_index});
    device_bytes_ += static_cast<int64_t>(vbytes + nbytes);
  }
  return uploader.Finish();
}

absl::StatusOr<kernels::ScanResult> Scorer::ScanCuda(
    const kernels::QueryBatch& host_batch,
    const kernels::ScanOptions& options) {
  const size_t vec =
      static_cast<size_t>(host_batch.num_queries) * layout_.RowValues();
  const size_t wts =
      static_cast<size_t>(host_batch.num_queries) * layout_.SlotPairs();
  const size_t total_floats = 2 * vec + 2 * wts;
  if (total_floats * sizeof(float) >
      static_cast<size_t>(footprint_.query_bytes)) {
    return absl::InternalError(
        absl::StrCat("scorer: a batch of ", host_batch.num_queries,
                     " queries exceeds the query buffer sized at start-up"));
  }
  float* base = static_cast<float*>(device_queries_);
  kernels::QueryBatch dev = host_batch;
  dev.raw = base;
  dev.unit = base + vec;
  dev.tracin_weights = base + 2 * vec;
  dev.retrac_weights = base + 2 * vec + wts;
  RETURN_IF_KERNEL_ERROR(kernels::CopyToDeviceAsync(
      const_cast<float*>(dev.raw), host_batch.raw, vec * 4, stream_));
  RETURN_IF_KERNEL_ERROR(kernels::CopyToDeviceAsync(
      const_cast<float*>(dev.unit), host_batch.unit, vec * 4, stream_));
  RETURN_IF_KERNEL_ERROR(
      kernels::CopyToDeviceAsync(const_cast<float*>(dev.tracin_weights),
                                 host_batch.tracin_weights, wts * 4, stream_));
  RETURN_IF_KERNEL_ERROR(
      kernels::CopyToDeviceAsync(const_cast<float*>(dev.retrac_weights),
                                 host_batch.retrac_weights, wts * 4, stream_));
  size_t scratch_bytes = 0;
  RETURN_IF_KERNEL_ERROR(kernels::CudaScanScratchBytes(
      layout_, device_chunks_, dev.num_queries, options, &scratch_bytes));
  if (scratch_bytes > static_cast<size_t>(footprint_.scratch_bytes)) {
    // Cannot happen: the scratch grows with Q and k, and Create sized it for
    // max_batch queries at the largest k.
    return absl::InternalError(
        absl::StrCat("scorer: the scan needs ", scratch_bytes,
                     " bytes of scratch, more than the ",
                     footprint_.scratch_bytes, " sized at start-up"));
  }
  kernels::ScanResult result;
  RETURN_IF_KERNEL_ERROR(kernels::ScanCuda(
      layout_, device_chunks_, dev, options, scratch_,
      static_cast<size_t>(footprint_.scratch_bytes), stream_, &result));
  return result;
}

absl::StatusOr<std::vector<QueryResult>> Scorer::Score(
    const std::vector<ScoreQuery>& queries) {
  const int64_t n = store_->served_samples();
  if (queries.empty() ||
      queries.size() > static_cast<size_t>(options_.max_batch)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a scan takes 1..", options_.max_batch,
        " queries (the scorer's max batch), got ", queries.size()));
  }
  const int64_t max_k = std::min<int64_t>(kernels::kMaxTopK, n);
  const size_t row = static_cast<size_t>(layout_.RowValues());
  const size_t pairs = static_cast<size_t>(layout_.SlotPairs());
  const size_t q_count = queries.size();
  std::vector<float> raw(q_count * row), unit(q_count * row);
  std::vector<float> tw(q_count * pairs), rw(q_count * pairs);
  kernels::ScanOptions options;
  options.k = 0;
  options.want_bottom = false;
  options.want_breakdown = false;
  options.num_threads = options_.cpu_threads;
  options.cuda_path = options_.cuda_path;
  for (size_t i = 0; i < q_count; ++i) {
    const ScoreQuery& q = queries[i];
    if (q.k < 1 || q.k > max_k) {
      return absl::InvalidArgumentError(absl::StrCat(
          "query ", i, ": top_k = ", q.k, " is out of range: it must be 1..",
          max_k, " (at most ", kernels::kMaxTopK, " and at most the store's ",
          n, " samples)"));
    }
    auto plan = PlanQuery(shape_, q.vectors, q.plan);
    if (!plan.ok()) return Annotate(plan.status(), absl::StrCat("query ", i));
    std::copy(plan->query_raw.begin(), plan->query_raw.end(),
              raw.begin() + i * row);
    std::copy(plan->query_unit.begin(), plan->query_unit.end(),
              unit.begin() + i * row);
    std::copy(plan->weight_tracin.begin(), plan->weight_tracin.end(),
              tw.begin() + i * pairs);
    std::copy(plan->weight_retrac.begin(), plan->weight_retrac.end(),
              rw.begin() + i * pairs);
    options.k = std::max(options.k, q.k);
    options.want_bottom |= q.opponents;
    options.want_breakdown |= q.breakdown;
  }
  kernels::QueryBatch batch;
  batch.num_queries = static_cast<int32_t>(q_count);
  batch.raw = raw.data();
  batch.unit = unit.data();
  batch.tracin_weights = tw.data();
  batch.retrac_weights = rw.data();

  kernels::ScanResult scan;
  {
    std::lock_guard<std::mutex> lock(scan_mutex_);
    if (backend_ == kernels::Backend::kCuda) {
      ASSIGN_OR_RETURN(scan, ScanCuda(batch, options));
    } else {
      RETURN_IF_KERNEL_ERROR(
          kernels::ScanCpu(layout_, host_chunks_, batch, options, &scan));
    }
  }
  std::vector<QueryResult> results(q_count);
  for (size_t i = 0; i < q_count; ++i) {
    results[i].tracin =
        ToRanking(scan.Get(static_cast<int>(i), kernels::Method::kTracIn),
                  queries[i], *store_);
    results[i].retrac =
        ToRanking(scan.Get(static_cast<int>(i), kernels::Method::kReTrac),
                  queries[i], *store_);
  }
  return results;
}

}  // namespace retrace::scoring
