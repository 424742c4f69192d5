// AttributeRequest and SelfInfluenceRequest validation through the engine
// that retraced serves: the input bytes are parsed as each message (Debian
// has no protobuf-mutator, so structure comes from the seed corpus of
// serialized requests) and handed to AttributionEngine with a small store
// (10 samples, 2 checkpoints, 2 buckets + replay, D = 12, fp16) and a
// stand-in featurizer for 1x8x8 images, so image, tensor and query-vector
// inputs all reach the scan. Properties: no crash or sanitizer report; every
// refusal is a client error (never INTERNAL or UNKNOWN) whose message is
// bounded; an answer has at most top_k results per method and finite scores.
#include <unistd.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/scoring/scorer.h"
#include "server/service/batcher.h"
#include "server/service/engine.h"
#include "server/service/query_featurizer.h"
#include "server/store/store_reader.h"
#include "tests/fuzz/require.h"
#include "tests/server/store/store_test_data.h"

namespace {

using retrace::fuzz::Require;

namespace v1 = retrace::v1;
using retrace::service::FeaturizedQuery;
using retrace::service::QueryFeatureOptions;
using retrace::service::QueryImage;

// q_raw and q_unit as a fixed function of the pixels, of the store's shape.
class StandInFeaturizer : public retrace::service::QueryFeaturizer {
 public:
  explicit StandInFeaturizer(int64_t size) : size_(size) {}
  std::vector<int64_t> image_shape() const override { return {1, 8, 8}; }
  absl::StatusOr<FeaturizedQuery> Featurize(
      const QueryImage& image, const QueryFeatureOptions&) override {
    FeaturizedQuery q;
    q.vectors.raw.resize(static_cast<size_t>(size_));
    q.vectors.unit.resize(static_cast<size_t>(size_));
    for (int64_t i = 0; i < size_; ++i) {
      const float p =
          image.pixels[static_cast<size_t>(i) % image.pixels.size()];
      q.vectors.raw[static_cast<size_t>(i)] = p * static_cast<float>(i + 1);
      q.vectors.unit[static_cast<size_t>(i)] = p / 8.0f;
    }
    return q;
  }

 private:
  int64_t size_;
};

struct Served {
  std::unique_ptr<retrace::store::StoreReader> store;
  std::unique_ptr<retrace::scoring::Scorer> scorer;
  std::unique_ptr<StandInFeaturizer> featurizer;
  std::unique_ptr<retrace::service::Batcher> batcher;
  std::unique_ptr<retrace::service::AttributionEngine> engine;
};

Served* g_served = nullptr;

bool IsClientError(absl::StatusCode code) {
  return code == absl::StatusCode::kInvalidArgument ||
         code == absl::StatusCode::kFailedPrecondition ||
         code == absl::StatusCode::kOutOfRange ||
         code == absl::StatusCode::kResourceExhausted;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() /
                       ("retrace_request_fuzz_" + std::to_string(getpid()));
  fs::remove_all(dir);
  auto* served = new Served;
  namespace st = retrace::store;
  Require(st::testing::BuildStore(
              dir.string(),
              st::testing::MakeSpec(retrace::kernels::DType::kF16,
                                    /*replay=*/true, 4),
              10, /*seed=*/3)
              .ok());
  served->store = *st::StoreReader::Open(dir.string());
  retrace::scoring::ScorerOptions options;
  options.device = retrace::scoring::DeviceChoice::kCpu;
  options.cpu_threads = 1;
  options.max_batch = 4;
  served->scorer =
      *retrace::scoring::Scorer::Create(served->store.get(), options);
  const retrace::scoring::StoreShape& shape = served->scorer->shape();
  served->featurizer = std::make_unique<StandInFeaturizer>(
      int64_t{shape.num_checkpoints} * shape.num_buckets * shape.dim);
  retrace::service::BatcherOptions batcher_options;
  batcher_options.max_batch = 4;
  batcher_options.max_queue_delay_us = 0;
  retrace::scoring::Scorer* scorer = served->scorer.get();
  served->batcher = std::make_unique<retrace::service::Batcher>(
      [scorer](const std::vector<retrace::scoring::ScoreQuery>& batch) {
        return scorer->Score(batch);
      },
      batcher_options, nullptr);
  retrace::service::EngineParts parts;
  parts.store = served->store.get();
  parts.shape = shape;
  parts.backend = "cpu";
  parts.batcher = served->batcher.get();
  parts.featurizer = served->featurizer.get();
  served->engine = std::make_unique<retrace::service::AttributionEngine>(parts);
  fs::remove_all(dir);  // the reader holds what it needs in memory
  g_served = served;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (g_served == nullptr) LLVMFuzzerInitialize(nullptr, nullptr);
  v1::AttributeRequest request;
  if (request.ParseFromArray(data, static_cast<int>(size))) {
    absl::StatusOr<v1::AttributeResponse> response =
        g_served->engine->Attribute(request, absl::Now() + absl::Seconds(30));
    if (!response.ok()) {
      Require(IsClientError(response.status().code()));
      Require(response.status().message().size() < 4096);
    } else {
      const int32_t k = request.top_k() == 0 ? 10 : request.top_k();
      for (const v1::MethodResult& method : response->results()) {
        Require(method.proponents_size() <= k);
        Require(method.opponents_size() <= k);
        for (const v1::AttributedSample& s : method.proponents()) {
          Require(std::isfinite(s.score()));
        }
      }
    }
  }
  v1::SelfInfluenceRequest listing;
  if (listing.ParseFromArray(data, static_cast<int>(size))) {
    absl::StatusOr<v1::SelfInfluenceResponse> page =
        g_served->engine->SelfInfluence(listing,
                                        absl::Now() + absl::Seconds(30));
    if (!page.ok()) {
      Require(IsClientError(page.status().code()));
      Require(page.status().message().size() < 4096);
    }
  }
  return 0;
}
