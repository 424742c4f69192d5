#include "server/service/query_input.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "server/data/image_folder.h"

namespace retrace::service {
namespace {

double SecondsSince(absl::Time start) {
  return absl::ToDoubleSeconds(absl::Now() - start);
}

absl::Status CheckFinite(const float* values, int64_t count,
                         absl::string_view what) {
  for (int64_t i = 0; i < count; ++i) {
    if (!std::isfinite(values[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " holds ", values[i], " at position ", i,
                       "; every value must be finite"));
    }
  }
  return absl::OkStatus();
}

// Every value in [lo, hi] (NaN fails): INVALID_ARGUMENT naming the field, the
// first value outside and its position.
absl::Status CheckRange(const float* values, int64_t count, float lo, float hi,
                        absl::string_view what, absl::string_view why) {
  for (int64_t i = 0; i < count; ++i) {
    if (!(values[i] >= lo && values[i] <= hi)) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " holds ", values[i], " at position ", i,
          "; every value must be in [", lo, ", ", hi, "] (", why, ")"));
    }
  }
  return absl::OkStatus();
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// The methods asked for, in request order without repeats; both when empty.
absl::StatusOr<std::vector<v1::Method>> Methods(
    const v1::AttributeRequest& request) {
  std::vector<v1::Method> methods;
  for (int m : request.methods()) {
    if (m != v1::TRACIN && m != v1::RETRAC) {
      return absl::InvalidArgumentError(absl::StrCat(
          "methods: unknown method ", m, " (TRACIN = 1 or RETRAC = 2)"));
    }
    const auto method = static_cast<v1::Method>(m);
    if (std::find(methods.begin(), methods.end(), method) == methods.end()) {
      methods.push_back(method);
    }
  }
  if (methods.empty()) methods = {v1::TRACIN, v1::RETRAC};
  return methods;
}

}  // namespace

absl::StatusOr<CheckedRequest> CheckAttributeRequest(
    const v1::AttributeRequest& request, const scoring::StoreShape& shape,
    int64_t num_samples) {
  if (request.request_id().size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("request_id ", QuoteForError(request.request_id()),
                     " is longer than ", kMaxRequestIdBytes, " bytes"));
  }
  const int64_t max_k = std::min<int64_t>(kMaxTopK, num_samples);
  const int32_t k = request.top_k() == 0 ? kDefaultTopK : request.top_k();
  if (k < 1 || k > max_k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "top_k must be in 1..", max_k, " (at most ", kMaxTopK,
        " and the store's ", num_samples, " samples), got ", request.top_k()));
  }
  CheckedRequest checked;
  ASSIGN_OR_RETURN(checked.methods, Methods(request));
  scoring::ScoreQuery& query = checked.query;
  switch (request.pairing()) {
    case v1::PAIRING_UNSPECIFIED:
    case v1::MATCHED:
      query.plan.pairing = scoring::Pairing::kMatched;
      break;
    case v1::REPLAY:
      query.plan.pairing = scoring::Pairing::kReplay;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("pairing: unknown value ", request.pairing(),
                       " (MATCHED = 1 or REPLAY = 2)"));
  }
  if (query.plan.pairing == scoring::Pairing::kReplay && !shape.has_replay) {
    return absl::InvalidArgumentError(
        "pairing REPLAY needs a store with a replay slot; this store was "
        "built without one (use MATCHED)");
  }
  query.plan.checkpoints.assign(request.checkpoints().begin(),
                                request.checkpoints().end());
  query.plan.buckets.assign(request.buckets().begin(), request.buckets().end());
  for (int32_t c : query.plan.checkpoints) {
    if (c < 0 || c >= shape.num_checkpoints) {
      return absl::InvalidArgumentError(absl::StrCat(
          "checkpoints: unknown checkpoint ", c, "; the store has ",
          shape.num_checkpoints, " (0..", shape.num_checkpoints - 1, ")"));
    }
  }
  for (int32_t b : query.plan.buckets) {
    if (b < 0 || b >= shape.num_buckets) {
      return absl::InvalidArgumentError(
          absl::StrCat("buckets: unknown bucket ", b, "; the store has ",
                       shape.num_buckets, " (0..", shape.num_buckets - 1, ")"));
    }
  }
  query.k = k;
  query.opponents = request.opponents();
  query.breakdown = request.include_breakdown();

  return checked;
}

absl::StatusOr<SelfInfluencePage> CheckSelfInfluenceRequest(
    const v1::SelfInfluenceRequest& request) {
  SelfInfluencePage page;
  switch (request.method()) {
    case v1::METHOD_UNSPECIFIED:
    case v1::RETRAC:
      page.column = 1;
      break;
    case v1::TRACIN:
      page.column = 0;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("method: unknown method ", request.method(),
                       " (TRACIN = 1 or RETRAC = 2)"));
  }
  page.page_size =
      request.page_size() == 0 ? kDefaultPageSize : request.page_size();
  if (page.page_size < 1 || page.page_size > kMaxPageSize) {
    return absl::InvalidArgumentError(absl::StrCat("page_size must be in 1..",
                                                   kMaxPageSize, ", got ",
                                                   request.page_size()));
  }
  return page;
}

absl::Status CheckDeadline(const Clock& clock, absl::Time deadline,
                           absl::string_view before) {
  if (clock.Now() >= deadline) {
    return absl::DeadlineExceededError(
        absl::StrCat("the deadline passed before ", before));
  }
  return absl::OkStatus();
}

QueryInput::QueryInput(QueryInputParts parts) : parts_(std::move(parts)) {}

void QueryInput::AddTiming(absl::string_view stage, metrics::Stage metric,
                           double seconds,
                           v1::AttributeResponse* response) const {
  v1::StageTiming* t = response->add_timings();
  t->set_stage(std::string(stage));
  t->set_milliseconds(seconds * 1e3);
  if (parts_.metrics != nullptr) parts_.metrics->ObserveStage(metric, seconds);
}

absl::StatusOr<scoring::BucketQuery> QueryInput::FromImage(
    const QueryImage& image, const v1::AttributeRequest& request,
    absl::Time deadline, v1::AttributeResponse* response) const {
  QueryFeatureOptions options;
  options.query_timesteps = request.query_timesteps() == 0
                                ? kDefaultQueryTimesteps
                                : request.query_timesteps();
  options.noise_draws = request.query_noise_draws() == 0
                            ? kDefaultNoiseDraws
                            : request.query_noise_draws();
  options.seed = request.seed();
  if (options.query_timesteps < 1 ||
      options.query_timesteps > kMaxQueryTimesteps) {
    return absl::InvalidArgumentError(
        absl::StrCat("query_timesteps must be in 1..", kMaxQueryTimesteps,
                     ", got ", request.query_timesteps()));
  }
  if (options.noise_draws < 1 || options.noise_draws > kMaxNoiseDraws) {
    return absl::InvalidArgumentError(
        absl::StrCat("query_noise_draws must be in 1..", kMaxNoiseDraws,
                     ", got ", request.query_noise_draws()));
  }
  RETURN_IF_ERROR(
      CheckDeadline(*parts_.clock, deadline, "featurizing the query"));
  const absl::Time start = absl::Now();
  ASSIGN_OR_RETURN(FeaturizedQuery q,
                   parts_.featurizer->Featurize(image, options));
  const double total = SecondsSince(start);
  AddTiming("featurize", metrics::Stage::kFeaturize,
            std::max(0.0, total - q.project_seconds), response);
  AddTiming("project", metrics::Stage::kProject, q.project_seconds, response);
  return std::move(q.vectors);
}

absl::StatusOr<scoring::BucketQuery> QueryInput::Vectors(
    const v1::AttributeRequest& request, absl::Time deadline,
    v1::AttributeResponse* response) const {
  const scoring::StoreShape& shape = parts_.shape;
  switch (request.input_case()) {
    case v1::AttributeRequest::kQueryVectors: {
      const v1::QueryVectors& v = request.query_vectors();
      const std::string& store_id = parts_.store_id;
      if (!v.store_id().empty() && v.store_id() != store_id) {
        return absl::InvalidArgumentError(
            absl::StrCat("query_vectors.store_id ", QuoteForError(v.store_id()),
                         " is not the served store ", store_id));
      }
      if (v.num_checkpoints() != shape.num_checkpoints ||
          v.num_slots() != shape.num_buckets || v.dim() != shape.dim) {
        return absl::InvalidArgumentError(
            absl::StrCat("query_vectors has shape [", v.num_checkpoints(), ", ",
                         v.num_slots(), ", ", v.dim(), "]; the store needs [",
                         shape.num_checkpoints, ", ", shape.num_buckets, ", ",
                         shape.dim, "] (checkpoints, buckets, dim)"));
      }
      const int64_t size =
          int64_t{shape.num_checkpoints} * shape.num_buckets * shape.dim;
      if (v.raw_size() != size || v.unit_size() != size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "query_vectors holds ", v.raw_size(), " raw and ", v.unit_size(),
            " unit values; [", shape.num_checkpoints, ", ", shape.num_buckets,
            ", ", shape.dim, "] needs ", size, " of each"));
      }
      RETURN_IF_ERROR(CheckFinite(v.raw().data(), size, "query_vectors.raw"));
      RETURN_IF_ERROR(CheckFinite(v.unit().data(), size, "query_vectors.unit"));
      constexpr float kMax = kMaxQueryVectorValue;
      constexpr char kWhy[] = "larger values could overflow a score";
      RETURN_IF_ERROR(CheckRange(v.raw().data(), size, -kMax, kMax,
                                 "query_vectors.raw", kWhy));
      RETURN_IF_ERROR(CheckRange(v.unit().data(), size, -kMax, kMax,
                                 "query_vectors.unit", kWhy));
      scoring::BucketQuery q;
      q.raw.assign(v.raw().begin(), v.raw().end());
      q.unit.assign(v.unit().begin(), v.unit().end());
      AddTiming("featurize", metrics::Stage::kFeaturize, 0.0, response);
      AddTiming("project", metrics::Stage::kProject, 0.0, response);
      return q;
    }
    case v1::AttributeRequest::kImage:
    case v1::AttributeRequest::kTensor:
      break;
    case v1::AttributeRequest::INPUT_NOT_SET:
      return absl::InvalidArgumentError(
          "the request has no input: set image, tensor or query_vectors");
  }

  if (parts_.featurizer == nullptr) {
    return absl::FailedPreconditionError(
        "this server has no model (started without --run) and takes only "
        "precomputed query_vectors, not images or tensors");
  }
  const std::vector<int64_t> want = parts_.featurizer->image_shape();
  const absl::Time start = absl::Now();
  QueryImage image;
  image.channels = want[0];
  image.height = want[1];
  image.width = want[2];
  if (request.input_case() == v1::AttributeRequest::kImage) {
    if (request.image().empty()) {
      return absl::InvalidArgumentError("image: the image bytes are empty");
    }
    data::ImageSpec spec{want[0], want[1], want[2]};
    ASSIGN_OR_RETURN(image.pixels,
                     data::DecodeImage(request.image(), spec, "image"));
  } else {
    const v1::Tensor& t = request.tensor();
    std::vector<int64_t> got(t.shape().begin(), t.shape().end());
    std::vector<int64_t> expected = want;
    if (got.size() == 2 && want[0] == 1) expected = {want[1], want[2]};
    if (got != expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor has shape ", ShapeText(got), "; the model takes ",
          ShapeText(want),
          want[0] == 1 ? absl::StrCat(" or ", ShapeText(expected)) : ""));
    }
    const int64_t numel = want[0] * want[1] * want[2];
    if (t.values_size() != numel) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor has ", t.values_size(), " values; shape ",
                       ShapeText(got), " needs ", numel));
    }
    RETURN_IF_ERROR(CheckFinite(t.values().data(), numel, "tensor.values"));
    RETURN_IF_ERROR(CheckRange(t.values().data(), numel, -1.0f, 1.0f,
                               "tensor.values",
                               "pixels in the model's input scale, where an "
                               "8-bit value b is b/127.5 - 1"));
    image.pixels.assign(t.values().begin(), t.values().end());
  }
  AddTiming("decode", metrics::Stage::kDecode, SecondsSince(start), response);
  return FromImage(image, request, deadline, response);
}

}  // namespace retrace::service
