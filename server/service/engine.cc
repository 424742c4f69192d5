#include "server/service/engine.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "kernels/dtype.h"
#include "kernels/projection.h"
#include "nlohmann/json.hpp"
#include "common/status.h"
#include "server/data/image_folder.h"
#include "server/model/loss.h"
#include "server/model/schedule.h"
#include "server/service/page_token.h"
#include "server/store/layout.h"

namespace retrace::service {
namespace {

double SecondsSince(absl::Time start) {
  return absl::ToDoubleSeconds(absl::Now() - start);
}

absl::Status CheckDeadline(const Clock& clock, absl::Time deadline,
                           absl::string_view before) {
  if (clock.Now() >= deadline) {
    return absl::DeadlineExceededError(
        absl::StrCat("the deadline passed before ", before));
  }
  return absl::OkStatus();
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

}  // namespace

AttributionEngine::AttributionEngine(EngineParts parts)
    : parts_(std::move(parts)) {}

void AttributionEngine::AddTiming(absl::string_view stage,
                                  metrics::Stage metric, double seconds,
                                  v1::AttributeResponse* response) const {
  v1::StageTiming* t = response->add_timings();
  t->set_stage(std::string(stage));
  t->set_milliseconds(seconds * 1e3);
  if (parts_.metrics != nullptr) parts_.metrics->ObserveStage(metric, seconds);
}

absl::StatusOr<scoring::BucketQuery> AttributionEngine::FromImage(
    const QueryImage& image, const v1::AttributeRequest& request,
    absl::Time deadline, v1::AttributeResponse* response) {
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

absl::StatusOr<scoring::BucketQuery> AttributionEngine::QueryVectors(
    const v1::AttributeRequest& request, absl::Time deadline,
    v1::AttributeResponse* response) {
  const scoring::StoreShape& shape = parts_.shape;
  switch (request.input_case()) {
    case v1::AttributeRequest::kQueryVectors: {
      const v1::QueryVectors& v = request.query_vectors();
      const std::string& store_id = parts_.store->manifest().store_id;
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

absl::Status AttributionEngine::FillSample(const scoring::RankedSample& ranked,
                                           int32_t rank, bool thumbnails,
                                           v1::AttributedSample* out) const {
  out->set_rank(rank);
  out->set_index(ranked.index);
  out->set_sample_id(ranked.sample_id);
  out->set_label(ranked.label);
  out->set_score(ranked.score);
  if (parts_.images != nullptr) {
    out->set_label_name(parts_.images->LabelName(ranked.index));
  }
  const int32_t slots = parts_.shape.num_slots();
  for (size_t i = 0; i < ranked.breakdown.size(); ++i) {
    if (ranked.breakdown[i] == 0.0f) continue;  // unselected slots
    v1::Contribution* c = out->add_breakdown();
    c->set_checkpoint(static_cast<int32_t>(i) / slots);
    c->set_slot(static_cast<int32_t>(i) % slots);
    c->set_value(ranked.breakdown[i]);
  }
  if (thumbnails) {
    ASSIGN_OR_RETURN(*out->mutable_thumbnail_png(),
                     parts_.images->ThumbnailPng(ranked.index));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::AttributeResponse> AttributionEngine::Attribute(
    const v1::AttributeRequest& request, absl::Time deadline) {
  v1::AttributeResponse response;
  response.set_request_id(request.request_id());
  response.set_store_id(parts_.store->manifest().store_id);

  // Checks that need no work come first, so a bad request costs nothing.
  if (request.request_id().size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("request_id ", QuoteForError(request.request_id()),
                     " is longer than ", kMaxRequestIdBytes, " bytes"));
  }
  const int64_t max_k =
      std::min<int64_t>(kMaxTopK, parts_.store->num_samples());
  const int32_t k = request.top_k() == 0 ? kDefaultTopK : request.top_k();
  if (k < 1 || k > max_k) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_k must be in 1..", max_k, " (at most ", kMaxTopK,
                     " and the store's ", parts_.store->num_samples(),
                     " samples), got ", request.top_k()));
  }
  ASSIGN_OR_RETURN(const std::vector<v1::Method> methods, Methods(request));
  scoring::ScoreQuery query;
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
  if (query.plan.pairing == scoring::Pairing::kReplay &&
      !parts_.shape.has_replay) {
    return absl::InvalidArgumentError(
        "pairing REPLAY needs a store with a replay slot; this store was "
        "built without one (use MATCHED)");
  }
  query.plan.checkpoints.assign(request.checkpoints().begin(),
                                request.checkpoints().end());
  query.plan.buckets.assign(request.buckets().begin(), request.buckets().end());
  for (int32_t c : query.plan.checkpoints) {
    if (c < 0 || c >= parts_.shape.num_checkpoints) {
      return absl::InvalidArgumentError(
          absl::StrCat("checkpoints: unknown checkpoint ", c,
                       "; the store has ", parts_.shape.num_checkpoints,
                       " (0..", parts_.shape.num_checkpoints - 1, ")"));
    }
  }
  for (int32_t b : query.plan.buckets) {
    if (b < 0 || b >= parts_.shape.num_buckets) {
      return absl::InvalidArgumentError(
          absl::StrCat("buckets: unknown bucket ", b, "; the store has ",
                       parts_.shape.num_buckets, " (0..",
                       parts_.shape.num_buckets - 1, ")"));
    }
  }
  if (request.include_thumbnails() && parts_.images == nullptr) {
    return absl::FailedPreconditionError(
        "thumbnails were asked for but this server has no training images "
        "(see the data directory options of retraced)");
  }
  query.k = k;
  query.opponents = request.opponents();
  query.breakdown = request.include_breakdown();

  ASSIGN_OR_RETURN(query.vectors, QueryVectors(request, deadline, &response));
  // Refuse what the scan would refuse (filters, NaN in featurized vectors)
  // before the query joins a batch.
  RETURN_IF_ERROR(
      scoring::PlanQuery(parts_.shape, query.vectors, query.plan).status());
  RETURN_IF_ERROR(CheckDeadline(*parts_.clock, deadline, "scoring"));

  ASSIGN_OR_RETURN(BatchedResult batched,
                   parts_.batcher->Score(std::move(query), deadline));
  AddTiming("queue", metrics::Stage::kQueue, batched.queue_seconds, &response);
  AddTiming("score", metrics::Stage::kScore, batched.score_seconds, &response);

  const absl::Time select_start = absl::Now();
  for (v1::Method method : methods) {
    const scoring::MethodRanking& ranking =
        method == v1::TRACIN ? batched.result.tracin : batched.result.retrac;
    v1::MethodResult* out = response.add_results();
    out->set_method(method);
    for (size_t i = 0; i < ranking.proponents.size(); ++i) {
      RETURN_IF_ERROR(
          FillSample(ranking.proponents[i], static_cast<int32_t>(i + 1),
                     request.include_thumbnails(), out->add_proponents()));
    }
    for (size_t i = 0; i < ranking.opponents.size(); ++i) {
      RETURN_IF_ERROR(
          FillSample(ranking.opponents[i], static_cast<int32_t>(i + 1),
                     request.include_thumbnails(), out->add_opponents()));
    }
  }
  AddTiming("select", metrics::Stage::kSelect, SecondsSince(select_start),
            &response);
  return response;
}

const std::vector<int64_t>& AttributionEngine::SelfInfluenceOrder(int column) {
  std::call_once(self_influence_once_[column], [&] {
    const int64_t n = parts_.store->num_samples();
    std::vector<float> values(static_cast<size_t>(n));
    for (const store::SampleBlock& block : parts_.store->shards()) {
      for (int64_t i = 0; i < block.count; ++i) {
        values[static_cast<size_t>(block.first + i)] =
            block.self_influence[i * 2 + column];
      }
    }
    std::vector<int64_t>& order = self_influence_order_[column];
    order.resize(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return values[static_cast<size_t>(a)] > values[static_cast<size_t>(b)];
    });
  });
  return self_influence_order_[column];
}

absl::StatusOr<v1::SelfInfluenceResponse> AttributionEngine::SelfInfluence(
    const v1::SelfInfluenceRequest& request) {
  int column = 1;  // RETRAC by default
  switch (request.method()) {
    case v1::METHOD_UNSPECIFIED:
    case v1::RETRAC:
      break;
    case v1::TRACIN:
      column = 0;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("method: unknown method ", request.method(),
                       " (TRACIN = 1 or RETRAC = 2)"));
  }
  const int32_t page_size =
      request.page_size() == 0 ? kDefaultPageSize : request.page_size();
  if (page_size < 1 || page_size > kMaxPageSize) {
    return absl::InvalidArgumentError(absl::StrCat("page_size must be in 1..",
                                                   kMaxPageSize, ", got ",
                                                   request.page_size()));
  }
  const int64_t n = parts_.store->num_samples();
  int64_t offset = 0;
  if (!request.page_token().empty()) {
    ASSIGN_OR_RETURN(const PageToken token,
                     DecodePageToken(request.page_token(), n));
    if (token.column != column) {
      return absl::InvalidArgumentError(
          "page_token belongs to a listing of the other method");
    }
    offset = token.offset;
  }
  const std::vector<int64_t>& order = SelfInfluenceOrder(column);
  v1::SelfInfluenceResponse response;
  const int64_t end = std::min<int64_t>(n, offset + page_size);
  for (int64_t r = offset; r < end; ++r) {
    const int64_t index = order[static_cast<size_t>(r)];
    ASSIGN_OR_RETURN(const store::SampleBlock block,
                     parts_.store->Sample(index));
    v1::AttributedSample* s = response.add_samples();
    s->set_rank(static_cast<int32_t>(r + 1));
    s->set_index(index);
    s->set_sample_id(block.sample_ids[0]);
    s->set_label(block.labels[0]);
    s->set_score(block.self_influence[column]);
    if (parts_.images != nullptr) {
      s->set_label_name(parts_.images->LabelName(index));
    }
  }
  if (end < n) {
    response.set_next_page_token(EncodePageToken({column, end}));
  }
  return response;
}

v1::StoreInfo AttributionEngine::StoreInfo() const {
  const store::Manifest& m = parts_.store->manifest();
  const store::StoreSpec& spec = m.spec;
  v1::StoreInfo info;
  info.set_store_id(m.store_id);
  info.set_num_samples(m.num_samples);
  info.set_num_checkpoints(static_cast<int32_t>(spec.num_checkpoints()));
  info.set_num_buckets(static_cast<int32_t>(spec.num_buckets()));
  info.set_has_replay(spec.buckets.replay);
  info.set_dim(static_cast<int32_t>(spec.projection.dim));
  info.set_dtype(kernels::DTypeName(spec.dtype));
  info.set_projection(kernels::ProjectionTypeName(spec.projection.type));
  info.set_loss(spec.loss);
  info.set_noise_schedule(spec.noise_schedule.type);
  for (int64_t e : spec.buckets.edges) {
    info.add_bucket_edges(static_cast<int32_t>(e));
  }
  for (float w : parts_.shape.checkpoint_weights)
    info.add_checkpoint_weights(w);
  info.set_store_bytes(parts_.store->total_vector_bytes());
  info.set_backend(parts_.backend);
  if (spec.dataset.contains("name") && spec.dataset["name"].is_string()) {
    info.set_dataset(spec.dataset["name"].get<std::string>());
  }
  if (parts_.featurizer != nullptr) {
    for (int64_t d : parts_.featurizer->image_shape()) info.add_image_shape(d);
    info.set_accepts_images(true);
  }

  // Per (checkpoint, slot) norm statistics; JSON nulls (an empty store)
  // become NaN.
  const nlohmann::json& diag = m.diagnostics;
  auto stat = [&](const char* name, int64_t c, int64_t s) -> float {
    if (!diag.contains("norm_stats")) return NAN;
    const nlohmann::json& j = diag["norm_stats"];
    if (!j.contains(name) || !j[name].is_array() ||
        j[name].size() <= static_cast<size_t>(c) ||
        j[name][c].size() <= static_cast<size_t>(s) ||
        !j[name][c][s].is_number()) {
      return NAN;
    }
    return j[name][c][s].get<float>();
  };
  const int64_t num_b = spec.num_buckets();
  for (int64_t c = 0; c < spec.num_checkpoints(); ++c) {
    for (int64_t s = 0; s < spec.num_slots(); ++s) {
      v1::SlotDiagnostics* d = info.add_diagnostics();
      d->set_checkpoint(static_cast<int32_t>(c));
      d->set_bucket(static_cast<int32_t>(s));
      // The replay slot spans every timestep.
      const int64_t begin = s < num_b ? spec.buckets.edges[s] : 0;
      const int64_t end =
          s < num_b ? spec.buckets.edges[s + 1] : spec.noise_schedule.timesteps;
      d->set_timestep_begin(static_cast<int32_t>(begin));
      d->set_timestep_end(static_cast<int32_t>(end));
      d->set_norm_mean(stat("mean", c, s));
      d->set_norm_median(stat("median", c, s));
      d->set_norm_p95(stat("p95", c, s));
    }
    float rho = NAN;
    if (diag.contains("spearman") && diag["spearman"].is_array() &&
        diag["spearman"].size() > static_cast<size_t>(c) &&
        diag["spearman"][c].is_number()) {
      rho = diag["spearman"][c].get<float>();
    }
    info.add_spearman_timestep_norm(rho);
  }
  return info;
}

}  // namespace retrace::service
