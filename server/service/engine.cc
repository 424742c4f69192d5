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
#include "common/status.h"
#include "kernels/dtype.h"
#include "kernels/projection.h"
#include "nlohmann/json.hpp"
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

QueryInputParts InputParts(const EngineParts& parts) {
  QueryInputParts input;
  input.shape = parts.shape;
  input.store_id = parts.store->manifest().store_id;
  input.featurizer = parts.featurizer;
  input.metrics = parts.metrics;
  input.clock = parts.clock;
  return input;
}

}  // namespace

AttributionEngine::AttributionEngine(EngineParts parts)
    : parts_(std::move(parts)), input_(InputParts(parts_)) {}

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
  ASSIGN_OR_RETURN(CheckedRequest checked,
                   CheckAttributeRequest(request, parts_.shape,
                                         parts_.store->num_samples()));
  if (request.include_thumbnails() && parts_.images == nullptr) {
    return absl::FailedPreconditionError(
        "thumbnails were asked for but this server has no training images "
        "(see the data directory options of retraced)");
  }
  const std::vector<v1::Method>& methods = checked.methods;
  scoring::ScoreQuery query = std::move(checked.query);
  // A shard serves part of the store: k counts the whole store's samples
  // (the router merges the shards' lists), so a shard returns what it has.
  query.k = static_cast<int32_t>(
      std::min<int64_t>(query.k, parts_.store->served_samples()));

  ASSIGN_OR_RETURN(query.vectors, input_.Vectors(request, deadline, &response));
  // Refuse what the scan would refuse (filters, NaN in featurized vectors)
  // before the query joins a batch.
  RETURN_IF_ERROR(
      scoring::PlanQuery(parts_.shape, query.vectors, query.plan).status());
  RETURN_IF_ERROR(CheckDeadline(*parts_.clock, deadline, "scoring"));

  // A shard with no samples (more parts than shard files) ranks nothing.
  BatchedResult batched;
  if (query.k > 0) {
    ASSIGN_OR_RETURN(batched,
                     parts_.batcher->Score(std::move(query), deadline));
  }
  input_.AddTiming("queue", metrics::Stage::kQueue, batched.queue_seconds,
                   &response);
  input_.AddTiming("score", metrics::Stage::kScore, batched.score_seconds,
                   &response);

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
  input_.AddTiming("select", metrics::Stage::kSelect,
                   SecondsSince(select_start), &response);
  return response;
}

const std::vector<int64_t>& AttributionEngine::SelfInfluenceOrder(int column) {
  // Over the served samples: the whole store, or a shard's part of it.
  std::call_once(self_influence_once_[column], [&] {
    const int64_t first = parts_.store->served_first();
    const int64_t n = parts_.store->served_samples();
    std::vector<float> values(static_cast<size_t>(n));
    for (const store::SampleBlock& block : parts_.store->shards()) {
      for (int64_t i = 0; i < block.count; ++i) {
        values[static_cast<size_t>(block.first - first + i)] =
            block.self_influence[i * 2 + column];
      }
    }
    std::vector<int64_t>& order = self_influence_order_[column];
    order.resize(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return values[static_cast<size_t>(a)] > values[static_cast<size_t>(b)];
    });
    for (int64_t& i : order) i += first;
  });
  return self_influence_order_[column];
}

absl::StatusOr<v1::SelfInfluenceResponse> AttributionEngine::SelfInfluence(
    const v1::SelfInfluenceRequest& request, absl::Time deadline) {
  ASSIGN_OR_RETURN(const SelfInfluencePage page,
                   CheckSelfInfluenceRequest(request));
  RETURN_IF_ERROR(
      CheckDeadline(*parts_.clock, deadline, "listing self-influence"));
  const int column = page.column;
  const int32_t page_size = page.page_size;
  const int64_t n = parts_.store->served_samples();
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

absl::StatusOr<v1::StoreInfo> AttributionEngine::StoreInfo(
    const v1::GetStoreInfoRequest& request) const {
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
  const store::StoreReader& reader = *parts_.store;
  info.set_role(reader.num_parts() > 1 ? "shard" : "single");
  info.set_served_first_sample(reader.served_first());
  info.set_served_end_sample(reader.served_end());
  info.set_part_index(static_cast<int32_t>(reader.part_index()));
  info.set_num_parts(static_cast<int32_t>(reader.num_parts()));
  if (request.include_manifest()) {
    ASSIGN_OR_RETURN(*info.mutable_manifest_json(), m.Serialize());
  }
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
